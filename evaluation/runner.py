"""Evaluate a trained sweep directory: reconstruction metrics, spliced CE/KL, report.

    evaluate_run(EvalConfig(run_dir="runs/l1-sweep"))

Reads the members as exported (raw-space weights: SAELens semantics for SAEs, the crosscoder
format for members reading several sources), so what is measured is what users load.
Reconstruction metrics use the store's held-out rows, in normalised space (x / s, so MSE is
comparable across hooks; FVU is scale-free), overall and per source for crosscoders. CE/KL
re-run the model on held-out sequences (none of whose rows were trained on) with each member
spliced into its hook; a crosscoder is spliced into each of its sources in turn (that source's
hook in its own model replaced by its reconstruction from the clean activations of all
sources), and also gets the model-diff analysis of its decoder (evaluation.crosscoder).
Writes per-latent density (sparsity.safetensors), sweep.json/csv, plots and report.md.

Dimension key: B rows, S sources, D d_in per source, F d_sae, E members, N sequences, T context.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file

from cache.devices import check_device
from cache.store import ActivationStore
from cache.stream import ActivationStream, StreamConfig
from evaluation.crosscoder import crosscoder_forward, is_crosscoder_dir, load_crosscoder, write_diff_analysis
from evaluation.export import load_member, sae_forward
from evaluation.metrics import MetricAccumulator
from evaluation.plots import plot_sweep
from evaluation.report import write_report, write_summary
from evaluation.splice import recovered, spliced_losses

Forward = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # x [B, S, D] raw → (f [B, F], x̂ [B, S, D])
_PER_SOURCE_METRICS = ("mse", "fvu", "explained_variance", "cosine", "l2_ratio")


@dataclass(frozen=True)
class EvalConfig:
    run_dir: str
    """A directory written by train_sweep.py."""
    n_sequences: int = 64
    """Held-out sequences for the spliced CE/KL (0: skip; it loads the model)."""
    batch_size: int = 8
    """Sequences per forward pass of the model."""
    row_batch_size: int = 2048
    """Held-out rows per batch for reconstruction metrics."""
    device: str = "cpu"
    """Device for the model and the dictionaries."""

    def __post_init__(self):
        if self.n_sequences < 0 or self.batch_size < 1 or self.row_batch_size < 1:
            raise ValueError("n_sequences must be ≥ 0, batch sizes positive")
        check_device(self.device)


@dataclass(frozen=True)
class _Member:
    name: str
    d_sae: int
    forward: Forward
    config: dict
    weights: dict[str, torch.Tensor]


def evaluate_run(cfg: EvalConfig) -> list[dict]:
    """Measure every member of the sweep in cfg.run_dir; return the updated member rows."""
    out = Path(cfg.run_dir)
    if not (out / "sweep.json").exists():
        raise FileNotFoundError(f"{out} holds no finished sweep (no sweep.json): run train_sweep.py first")
    summary = json.loads((out / "sweep.json").read_text())
    rows = summary["members"]
    store = ActivationStore.open(summary["store"]["path"])
    sources = summary["store"].get("sources") or [summary["store"]["source"]]
    members = [_load(out / r["dir"], r["name"], cfg.device) for r in rows]
    density, mean_SD = _reconstruction_metrics(cfg, store, summary, sources, members, rows)
    for r, m, log10_density in zip(rows, members, density.values()):
        save_file({"sparsity": log10_density.cpu().contiguous()}, out / r["dir"] / "sparsity.safetensors")
        if len(sources) > 1:
            diff = write_diff_analysis(out / r["dir"], m.config, m.weights, alive_M=log10_density > -10)
            r["diff"] = {k: v for k, v in diff.items() if k.startswith(("n_", "frac_")) or k == "relative_norm_mean"}
    if cfg.n_sequences > 0:
        summary["eval"] = _downstream_metrics(cfg, store, summary, sources, members, rows, mean_SD)
    write_summary(out, summary)
    write_report(out, summary, plot_sweep(rows, out, density))
    return rows


def _load(directory: Path, name: str, device: str) -> _Member:
    """A member in either format, with a forward on [B, S, D] (S = 1 for an SAE)."""
    if is_crosscoder_dir(directory):
        c, w = load_crosscoder(directory, device)
        return _Member(name, c["d_sae"], lambda x, c=c, w=w: crosscoder_forward(c, w, x), c, w)
    c, w = load_member(directory, device)

    def forward(x_B1D: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f_BF, x_hat_BD = sae_forward(c, w, x_B1D[:, 0])
        return f_BF, x_hat_BD.unsqueeze(1)

    return _Member(name, c["d_sae"], forward, c, w)


@torch.no_grad()
def _reconstruction_metrics(cfg: EvalConfig, store, summary, sources: list[str], members: list[_Member],
                            rows) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Held-out L0/MSE/FVU/... into `rows` (and per source for crosscoders); return each member's
    log10 density and the held-out mean raw activation of each source [S, D] (the mean-ablation
    baseline), from the same one pass over the rows."""
    stream_cfg = StreamConfig(batch_size=cfg.row_batch_size, eval_rows=summary["config"]["eval_tokens"], normalise=False)
    stream = ActivationStream(store, sources, stream_cfg, cfg.device)
    S, D = len(sources), stream.d
    scale_S1 = torch.tensor(summary["store"].get("norm_scales") or [summary["store"]["norm_scale"]],
                            device=cfg.device).unsqueeze(1)
    d_sae = max(m.d_sae for m in members)
    overall = MetricAccumulator(len(members), S * D, d_sae, cfg.device)
    per_source = [MetricAccumulator(len(members), D, d_sae, cfg.device) for _ in range(S)] if S > 1 else []
    for x_raw in stream.eval_batches():
        x_BSD = x_raw.view(-1, S, D)
        outputs = [m.forward(x_BSD) for m in members]
        f_EBF = torch.stack([_pad(f, d_sae) for f, _ in outputs])
        x_hat_EBSD = torch.stack([x_hat for _, x_hat in outputs]) / scale_S1
        x_BSD = x_BSD / scale_S1
        overall.update(x_BSD.flatten(1), x_hat_EBSD.flatten(2), f_EBF)
        for s, acc in enumerate(per_source):
            acc.update(x_BSD[:, s], x_hat_EBSD[:, :, s], f_EBF)
    per_source_results = [acc.results() for acc in per_source]  # [S][E]
    for e, (r, metrics) in enumerate(zip(rows, overall.results())):
        r.update(metrics)
        if per_source:
            r["per_source"] = {name: {k: results[e][k] for k in _PER_SOURCE_METRICS}
                               for name, results in zip(sources, per_source_results)}
    log10 = torch.log10(overall.density().float().clamp_min(1e-10))
    mean_SD = (overall.sum_x_D / overall.n_tokens).float().view(S, D) * scale_S1
    return {r["name"]: log10[e, : m.d_sae] for e, (r, m) in enumerate(zip(rows, members))}, mean_SD


def _pad(f_BF: torch.Tensor, width: int) -> torch.Tensor:
    return torch.nn.functional.pad(f_BF, (0, width - f_BF.shape[1])) if f_BF.shape[1] < width else f_BF


def _downstream_metrics(cfg: EvalConfig, store, summary, sources: list[str], members: list[_Member], rows,
                        mean_SD: torch.Tensor) -> dict:
    """Spliced CE/KL of every member into `rows`, per source for crosscoders (with their mean at
    the top level); return the clean and ablation baselines."""
    from cache.models import load_model  # the models are needed only here

    start = summary["store"]["eval_sequence_start"]  # sequences from here on are held out whole
    stop = min(start + cfg.n_sequences, store.attrs["n_sequences"])
    sequences = torch.from_numpy(store.read_sequences(start, stop)).long()
    entries = [_model_entry(store, source) for source in sources]
    models = {e["label"]: load_model(e["model"], e["model_path"], device=cfg.device, dtype=store.identity["model_dtype"])
              for e in entries}
    hooks = [store.source(source).hook for source in sources]
    first_pos = 1 if store.info["exclude_bos"] else 0
    # a crosscoder reconstructs each source from all of them: record their clean activations first
    acts_NTSD = _clean_activations(models, entries, hooks, sequences, cfg.batch_size) if len(sources) > 1 else None
    baselines, results = {}, {r["name"]: {} for r in rows}
    for s, (source, entry, hook) in enumerate(zip(sources, entries, hooks)):
        replacements = {"zero": lambda x, _: torch.zeros_like(x), "mean": lambda x, _, s=s: mean_SD[s].expand_as(x)}
        for m in members:
            replacements[m.name] = _replacement(m, s, acts_NTSD, first_pos)
        losses = spliced_losses(models[entry["label"]], sequences, hook, replacements,
                                first_pos=first_pos, batch_size=cfg.batch_size)
        clean, zero, mean = losses["clean"]["ce"], losses["zero"]["ce"], losses["mean"]["ce"]
        baselines[source] = {"clean_ce": clean, "zero_ablation_ce": zero, "mean_ablation_ce": mean,
                             "zero_ablation_kl": losses["zero"]["kl"], "mean_ablation_kl": losses["mean"]["kl"]}
        for r in rows:
            spliced = losses[r["name"]]
            results[r["name"]][source] = {"ce_spliced": spliced["ce"], "kl": spliced["kl"],
                                          "ce_recovered": recovered(spliced["ce"], clean, zero),
                                          "ce_recovered_mean_ablation": recovered(spliced["ce"], clean, mean)}
    for r in rows:
        per = results[r["name"]]
        r.update({k: sum(p[k] for p in per.values()) / len(per) for k in next(iter(per.values()))})
        if len(sources) > 1:
            for source, values in per.items():
                r["per_source"][source].update(values)
    if len(sources) == 1:
        return {"n_sequences": len(sequences), **baselines[sources[0]]}
    return {"n_sequences": len(sequences), "per_source": baselines}


def _replacement(member: _Member, s: int, acts_NTSD: torch.Tensor | None, first_pos: int):
    """The reconstruction of source s, spliced at its hook: from the hook's own rows for an SAE,
    from the recorded clean activations of every source for a crosscoder."""
    if acts_NTSD is None:
        return lambda x, _: member.forward(x.unsqueeze(1))[1][:, 0]
    S, D = acts_NTSD.shape[2:]
    return lambda x, seqs: member.forward(acts_NTSD[seqs, first_pos:].reshape(-1, S, D))[1][:, s]


def _clean_activations(models: dict, entries: list[dict], hooks: list[str], sequences: torch.Tensor,
                       batch_size: int) -> torch.Tensor:
    """The clean activation of every source on `sequences`, from one forward pass per model and
    batch for all of that model's hooks (a layer stack is one model).  → [N, T, S, D]"""
    from cache.generate import record_hooks

    N, T = sequences.shape
    recorded = {}  # source index → [N·T, D]
    for label, model in models.items():
        mine = [s for s, entry in enumerate(entries) if entry["label"] == label]
        parts = [record_hooks(model, sequences[i : i + batch_size].to(model.cfg.device), [hooks[s] for s in mine])
                 for i in range(0, N, batch_size)]
        recorded.update({s: torch.cat([part[hooks[s]] for part in parts]) for s in mine})
    return torch.stack([recorded[s].view(N, T, -1) for s in range(len(hooks))], dim=2)


def _model_entry(store, source: str) -> dict:
    """How to load the model that wrote `source` (the second model for chat/... in a pair)."""
    label = source.split("/", 1)[0] if "/" in source else None
    for entry in store.info["models"]:
        if entry["label"] == label:
            return entry
    raise ValueError(f"store {store.path} does not record the model of {source}")
