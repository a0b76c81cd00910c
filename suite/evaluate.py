"""Measure a suite on held-out data: per module, the vanilla and pruned MSE/FVU (pruned at several
numbers of connections C' ≤ C, for the plot of pruned FVU against C); per transcoder, how much of
each active latent's pre-activation its C connections explain; and the model's loss with the
suite spliced in, under names a reader cannot mix up:

    ce_clean               the model as it is
    ce_zero_ablation       every MLP output zeroed
    ce_zero_ablation_block every attention and MLP output of the suite's layers zeroed (what the
                           whole suite stands in for)
    ce_vanilla_mlp         every MLP output replaced by its transcoder (on the input it sees)
    ce_vanilla_suite       … and every attention output by its SAE's reconstruction
    ce_pruned_suite        … with every transcoder on its pruned input: its active latents from
                           the embedding and their C connections to the suite's upstream latents
                           in the same forward pass
with KL(clean ‖ spliced) beside each and BOS (positions the cache dropped) kept clean; with the
suite before fine-tuning given, `ce_vanilla_suite_untuned` and `ce_pruned_suite_untuned` too.
Recovery is reported against both zero ablations (`…_vs_block` against the block's).

The explained fraction of latent i: 1 − Σ_t (pre_all − pre_C)² / Σ_t (pre_all − mean pre_all)² over
the tokens where i is active, pre_all being the pre-activation with every upstream latent
connected (on the residual the suite rebuilds), pre_C the pruned one.
"""
from __future__ import annotations

import math
from collections import defaultdict

import torch
from tqdm.auto import tqdm

from evaluation.splice import Splice, spliced_losses
from suite.model import Suite, active_latents


class _Fit:
    """Σ of squared errors per variant, and the target's sums for its variance, of one module."""

    def __init__(self):
        self.n, self.sq, self.total, self.sse = 0, 0.0, None, defaultdict(float)

    def add(self, variant: str, y: torch.Tensor, y_hat: torch.Tensor, count_target: bool) -> None:
        self.sse[variant] += (y_hat - y).double().pow(2).sum().item()
        if count_target:
            self.n += len(y)
            self.sq += y.double().pow(2).sum().item()
            self.total = y.double().sum(0) + (0 if self.total is None else self.total)

    def results(self) -> dict:
        variance = self.sq - self.total.pow(2).sum().item() / self.n
        width = len(self.total)
        return {v: {"mse": sse / (self.n * width), "fvu": sse / variance if variance > 0 else math.nan}
                for v, sse in self.sse.items()}


@torch.no_grad()
def held_out_metrics(suite: Suite, batches, embed, indices: list[torch.Tensor], connection_counts: list[int]) -> dict:
    """Vanilla and pruned MSE/FVU per module (pruned at each of `connection_counts`, ascending)
    and the explained fractions at the largest, over held-out batches of (rows, ids)."""
    L, F = suite.layout.n_layers, suite.d_sae
    fits = defaultdict(_Fit)
    explained = torch.zeros(L, F, 4, dtype=torch.float64)  # per latent: n, Σ pre_all, Σ pre_all², Σ (pre_all − pre_C)²
    for x_BC, ids in tqdm(batches, desc="suite metrics on held-out rows", unit="batch", leave=False):
        attn_out, mlp_out = suite.vanilla(x_BC)
        codes = suite.dense_codes(attn_out, mlp_out)
        embed_Bd = embed(ids)
        for layer in range(L):
            fits[f"attn{layer}"].add("vanilla", _columns(suite, x_BC, suite.layout.attn[layer]), attn_out.x_hat[layer], True)
        for m in range(L):
            y = _columns(suite, x_BC, suite.layout.mlp_out[m])
            fits[f"mlp{m}"].add("vanilla", y, mlp_out.x_hat[m], True)
            active, alive = active_latents(mlp_out, m)
            sigma = suite.sigma(x_BC, m)
            for C in connection_counts:
                pre = suite.pruned_pre(m, codes, sigma, embed_Bd, indices[m][:, :C], active)
                fits[f"mlp{m}"].add(f"pruned_C{C}", y, suite.pruned_output(m, pre, active, alive), False)
            pre_all = suite.reconstructed_pre(m, codes, embed_Bd, sigma).gather(1, active)
            _accumulate_explained(explained[m], active[alive], pre_all[alive], pre[alive])
    return {"modules": {name: fit.results() for name, fit in fits.items()}, "connection_counts": connection_counts,
            "explained_fraction": _explained_summary(explained, connection_counts[-1])}


def _columns(suite: Suite, x_BC: torch.Tensor, source: str) -> torch.Tensor:
    start, width = suite.columns[source]
    return x_BC[:, start:start + width]


def _accumulate_explained(stats_F4: torch.Tensor, latents: torch.Tensor, pre_all: torch.Tensor, pre_C: torch.Tensor) -> None:
    values = torch.stack([torch.ones_like(pre_all), pre_all, pre_all.pow(2), (pre_all - pre_C).pow(2)], dim=1).double()
    stats_F4.index_add_(0, latents, values)


def _explained_summary(explained: torch.Tensor, C: int) -> dict:
    """Per transcoder: the median and mean explained fraction over latents active on ≥ 10 rows."""
    out = {"connections": C}
    for m in range(explained.shape[0]):
        n, s, s2, err = explained[m].unbind(-1)
        keep = n >= 10
        variance = s2[keep] - s[keep].pow(2) / n[keep]
        fraction = 1 - err[keep] / variance.clamp_min(1e-12)
        out[f"mlp{m}"] = {"latents": int(keep.sum()), "median": fraction.median().item() if keep.any() else None,
                          "mean": fraction.mean().item() if keep.any() else None}
    return out


@torch.no_grad()
def spliced(suite: Suite, model, sequences: torch.Tensor, embed_tokens, indices: list[torch.Tensor], first_pos: int,
            batch_size: int, hooks: dict[str, list[str]], untuned: Suite | None = None) -> dict:
    """The CE/KL figures named in the module docstring; with `untuned` (the suite before
    fine-tuning, same connections) also its vanilla and pruned CE, in the same stacked passes."""
    L = suite.layout.n_layers
    zero = lambda x, rec, b: torch.zeros_like(x)  # noqa: E731

    def attn_replace(suite, layer):
        def replace(x, recorded, batch):
            values, index = suite.encode("attn", layer, x)
            recorded[("attn", layer)] = _dense(values, index, suite.d_sae)
            return suite.decode("attn", layer, values, index)
        return replace

    def mlp_replace(suite, layer, pruned: bool):
        def replace(x, recorded, batch):
            x_in = recorded[hooks["mlp_in"][layer]]
            values, index = suite.encode("mlp", layer, x_in)
            recorded[("mlp", layer)] = _dense(values, index, suite.d_sae)
            if not pruned:
                return suite.decode("mlp", layer, values, index)
            tokens = sequences[batch, first_pos:]
            positions = torch.arange(first_pos, sequences.shape[1]).expand_as(tokens)
            embed_Bd = embed_tokens(tokens.reshape(-1), positions.reshape(-1))
            sigma = recorded[hooks["scale"][layer]][:, 0]
            pre = suite.pruned_pre(layer, recorded, sigma, embed_Bd, indices[layer], index)
            return suite.decode("mlp", layer, torch.relu(pre) * (values > 0), index)
        return replace

    records = (*hooks["mlp_in"], *hooks["scale"])
    mlps = lambda s, pruned: tuple((hooks["mlp_out"][m], mlp_replace(s, m, pruned)) for m in range(L))  # noqa: E731
    attns = lambda s: tuple((hooks["attn"][layer], attn_replace(s, layer)) for layer in range(L))  # noqa: E731
    splices = {
        "zero_ablation": Splice(tuple((h, zero) for h in hooks["mlp_out"])),
        "zero_ablation_block": Splice(tuple((h, zero) for h in (*hooks["attn"], *hooks["mlp_out"]))),
        "vanilla_mlp": Splice(mlps(suite, False), record=records),
        "vanilla_suite": Splice(attns(suite) + mlps(suite, False), record=records),
        "pruned_suite": Splice(attns(suite) + mlps(suite, True), record=records),
    }
    if untuned is not None:
        splices["vanilla_suite_untuned"] = Splice(attns(untuned) + mlps(untuned, False), record=records)
        splices["pruned_suite_untuned"] = Splice(attns(untuned) + mlps(untuned, True), record=records)
    losses = spliced_losses(model, sequences, splices, first_pos=first_pos, batch_size=batch_size, desc="suite CE/KL")
    out = {"ce_clean": losses["clean"]["ce"]}
    for name in splices:
        out[f"ce_{name}"], out[f"kl_{name}"] = losses[name]["ce"], losses[name]["kl"]
    for baseline in ("zero_ablation", "zero_ablation_block"):
        gap = out[f"ce_{baseline}"] - out["ce_clean"]
        suffix = "" if baseline == "zero_ablation" else "_vs_block"
        for name in splices:
            if not name.startswith("zero"):
                out[f"ce_recovered_{name}{suffix}"] = (out[f"ce_{baseline}"] - out[f"ce_{name}"]) / gap if gap else math.nan
    return out


def _dense(values: torch.Tensor, index: torch.Tensor, F: int) -> torch.Tensor:
    return values.new_zeros(len(values), F).scatter(1, index, values)
