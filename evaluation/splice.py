"""Downstream loss with a hook's activation replaced: how much of the model survives a dictionary.

For each replacement r of the activation at `hook` (a reconstruction, zeros, the mean):

    CE_r        mean over predicted tokens of −log p_r(next token)
    KL_r        mean over predicted tokens of KL(p_clean ‖ p_r)
    recovered   (CE_ablation − CE_spliced) / (CE_ablation − CE_clean)   (zero or mean ablation)

Positions before `first_pos` (BOS when the cache excluded it) keep their clean activation, as
the dictionary never saw them. Sums are per token, so results do not depend on batch size.
"""
from __future__ import annotations

from typing import Callable

import torch

# (raw activations [rows, d], the batch's sequences as a slice of `sequences`) → [rows, d]; the
# slice lets a replacement use other data of the same tokens (a crosscoder's other sources).
Replacement = Callable[[torch.Tensor, slice], torch.Tensor]


def spliced_losses(
    model,
    sequences: torch.Tensor,  # [N, T] token ids
    hook: str,
    replacements: dict[str, Replacement],
    *,
    first_pos: int = 0,
    batch_size: int = 8,
) -> dict[str, dict[str, float]]:
    """{"clean": {"ce"}, name: {"ce", "kl"} for each replacement}."""
    sums = {name: torch.zeros(2, dtype=torch.float64) for name in ["clean", *replacements]}
    n_tokens = 0
    device = model.cfg.device
    with torch.inference_mode():
        for start in range(0, len(sequences), batch_size):
            tokens = sequences[start : start + batch_size].to(device)
            clean_logp = model(tokens).log_softmax(-1)[:, :-1]  # [b, T-1, V]
            targets = tokens[:, 1:]
            sums["clean"][0] += _ce_sum(clean_logp, targets)
            n_tokens += targets.numel()
            batch = slice(start, start + len(tokens))
            for name, replace in replacements.items():
                hooked = [(hook, _splice(replace, first_pos, batch))]
                logp = model.run_with_hooks(tokens, fwd_hooks=hooked).log_softmax(-1)[:, :-1]
                sums[name] += torch.stack([_ce_sum(logp, targets), _kl_sum(clean_logp, logp)])
    out = {"clean": {"ce": sums["clean"][0].item() / n_tokens}}
    for name in replacements:
        out[name] = {"ce": sums[name][0].item() / n_tokens, "kl": sums[name][1].item() / n_tokens}
    return out


def recovered(ce_spliced: float, ce_clean: float, ce_ablated: float) -> float:
    """Fraction of the ablation's loss increase that the reconstruction gives back."""
    gap = ce_ablated - ce_clean
    return (ce_ablated - ce_spliced) / gap if gap != 0 else float("nan")


def _splice(replace: Replacement, first_pos: int, batch: slice):
    def hook_fn(act: torch.Tensor, hook) -> torch.Tensor:  # act [b, T, d]
        kept = act[:, first_pos:]
        rows = replace(kept.reshape(-1, kept.shape[-1]).float(), batch)
        act = act.clone()
        act[:, first_pos:] = rows.reshape(kept.shape).to(act.dtype)
        return act

    return hook_fn


def _ce_sum(logp: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return -logp.gather(-1, targets.unsqueeze(-1)).double().sum()


def _kl_sum(clean_logp: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    return (clean_logp.exp() * (clean_logp - logp)).sum(-1).double().sum()  # per-token sums, then float64
