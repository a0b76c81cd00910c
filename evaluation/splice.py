"""Downstream loss with activations replaced: how much of the model survives a dictionary.

A splice is a set of hooks run in one forward pass: some only record the activation they see
(a transcoder's input), others replace theirs (an SAE's reconstruction, a transcoder's output
computed from the input recorded earlier in the same pass, a whole cross-layer transcoder's
outputs at once). For each splice r:

    CE_r        mean over predicted tokens of −log p_r(next token)
    KL_r        mean over predicted tokens of KL(p_clean ‖ p_r)
    recovered   (CE_ablation − CE_spliced) / (CE_ablation − CE_clean)   (zero or mean ablation)

Positions before `first_pos` (BOS when the cache excluded it) and tokens in `exclude_tokens`
keep their clean activation, as the dictionary never saw them. Sums are per token, so results do not depend on batch size.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from tqdm.auto import tqdm

# (raw activations [rows, d] at this hook in this pass, the activations recorded so far in this
# pass {hook: [rows, d]}, the batch's sequences as a slice of `sequences`) → [rows, d]
Replace = Callable[[torch.Tensor, dict, slice], torch.Tensor]


@dataclass(frozen=True)
class Splice:
    """Hooks of one forward pass: `record` only store their activation, `replace` swap theirs."""

    replace: tuple[tuple[str, Replace], ...]
    record: tuple[str, ...] = ()


def single(hook: str, fn: Callable[[torch.Tensor, slice], torch.Tensor]) -> Splice:
    """One hook's activation replaced by fn(activation, batch)."""
    return Splice(((hook, lambda x, recorded, batch: fn(x, batch)),))


def spliced_losses(model, sequences: torch.Tensor, splices: dict[str, Splice], *, first_pos: int = 0,
                   exclude_tokens: tuple[int, ...] = (), batch_size: int = 8,
                   desc: str | None = None) -> dict[str, dict[str, float]]:
    """{"clean": {"ce"}, name: {"ce", "kl"} for each splice}.  sequences [N, T] token ids"""
    sums = {name: torch.zeros(2, dtype=torch.float64) for name in ["clean", *splices]}
    n_tokens = 0
    device = model.cfg.device
    batches = range(0, len(sequences), batch_size)
    with torch.inference_mode():
        for start in tqdm(batches, desc=desc, unit="batch", leave=False, disable=desc is None):
            tokens = sequences[start : start + batch_size].to(device)
            clean_logp = model(tokens).log_softmax(-1)[:, :-1]  # [b, T-1, V]
            targets = tokens[:, 1:]
            sums["clean"][0] += _ce_sum(clean_logp, targets)
            n_tokens += targets.numel()
            batch = slice(start, start + len(tokens))
            clean_rows = torch.isin(tokens[:, first_pos:], torch.tensor(exclude_tokens, device=device)).reshape(-1, 1)
            for name, splice in splices.items():
                hooks = _hooks(splice, first_pos, batch, clean_rows if exclude_tokens else None)
                logp = model.run_with_hooks(tokens, fwd_hooks=hooks).log_softmax(-1)[:, :-1]
                sums[name] += torch.stack([_ce_sum(logp, targets), _kl_sum(clean_logp, logp)])
    out = {"clean": {"ce": sums["clean"][0].item() / n_tokens}}
    for name in splices:
        out[name] = {"ce": sums[name][0].item() / n_tokens, "kl": sums[name][1].item() / n_tokens}
    return out


def recovered(ce_spliced: float, ce_clean: float, ce_ablated: float) -> float:
    """Fraction of the ablation's loss increase that the reconstruction gives back."""
    gap = ce_ablated - ce_clean
    return (ce_ablated - ce_spliced) / gap if gap != 0 else float("nan")


def _hooks(splice: Splice, first_pos: int, batch: slice, clean_rows: torch.Tensor | None) -> list:
    recorded: dict[str, torch.Tensor] = {}

    def record(act: torch.Tensor, hook) -> None:  # act [b, T, d]
        kept = act[:, first_pos:]
        recorded[hook.name] = kept.reshape(-1, kept.shape[-1]).float()

    def replacing(fn: Replace):
        def hook_fn(act: torch.Tensor, hook) -> torch.Tensor:
            kept = act[:, first_pos:]
            x = kept.reshape(-1, kept.shape[-1]).float()
            rows = fn(x, recorded, batch)
            if clean_rows is not None:
                rows = torch.where(clean_rows, x, rows)
            act = act.clone()
            act[:, first_pos:] = rows.reshape(kept.shape).to(act.dtype)
            return act

        return hook_fn

    return [(h, record) for h in splice.record] + [(h, replacing(fn)) for h, fn in splice.replace]


def _ce_sum(logp: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return -logp.gather(-1, targets.unsqueeze(-1)).double().sum()


def _kl_sum(clean_logp: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    return (clean_logp.exp() * (clean_logp - logp)).sum(-1).double().sum()  # per-token sums, then float64
