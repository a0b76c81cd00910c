"""Logit effects of a member's latents: the tokens each decoder direction promotes and suppresses
most, W_dec[i] · W_U (the logit change per unit of the latent's activation, through the final
norm's weight and the unembedding, centred over the vocabulary; the norm's 1/RMS scale, which
depends on the whole residual, left out).

The product is F·V numbers (65,536 latents × Gemma-3's 262,144 tokens: 64 GiB in float32), of
which only each latent's top and bottom k are kept: it is computed a tile of latents × a tile of
the vocabulary at a time, each tile's top and bottom k merged into the running ones, so the
largest tensor is one tile (`tile_elements`), whatever F and V.

Dimension key: F latents, D d_model, V vocabulary, K kept per side.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

TILE_ELEMENTS = 2**24  # the largest logits block held: 64 MiB in float32
RESIDUAL_WRITERS = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")  # a decoder direction W_U can read
UNIT = ("logit change per unit activation: W_dec·W_U, through the final norm's weight (not its 1/RMS scale), "
        "centred over the vocabulary")


class LogitEffects(NamedTuple):
    pos_ids: torch.Tensor  # [F, K] int64, the most promoted tokens first
    pos_values: torch.Tensor  # [F, K]
    neg_ids: torch.Tensor  # [F, K] int64, the most suppressed tokens first
    neg_values: torch.Tensor  # [F, K]


@torch.no_grad()
def top_logit_effects(W_dec_FD: torch.Tensor, W_U_DV: torch.Tensor, k: int = 10,
                      tile_elements: int = TILE_ELEMENTS) -> LogitEffects:
    """Each latent's top and bottom k of W_dec · W_U, without the [F, V] product: tiles of at
    most `tile_elements` logits, on W_U's device; the result on the CPU."""
    F, V = len(W_dec_FD), W_U_DV.shape[1]
    k = min(k, V)
    rows = max(1, min(F, tile_elements // max(k, 1024)))  # latents per tile: ≥ 1,024 vocabulary columns each
    cols = max(k, tile_elements // rows)
    parts = []
    for f0 in range(0, F, rows):
        W_FD = W_dec_FD[f0:f0 + rows].to(W_U_DV.device, torch.float32)
        best = [_empty(len(W_FD), k, W_FD.device, largest) for largest in (True, False)]
        for v0 in range(0, V, cols):
            logits_FV = W_FD @ W_U_DV[:, v0:v0 + cols]  # [F_tile, V_tile]
            best = [_merge(values, ids, logits_FV, v0, k, largest) for (values, ids), largest in zip(best, (True, False))]
        (pos_values, pos_ids), (neg_values, neg_ids) = best
        parts.append(tuple(t.cpu() for t in (pos_ids, pos_values, neg_ids, neg_values)))
    return LogitEffects(*(torch.cat(p) for p in zip(*parts)))


def _empty(F: int, k: int, device, largest: bool) -> tuple[torch.Tensor, torch.Tensor]:
    fill = -torch.inf if largest else torch.inf
    return torch.full((F, k), fill, device=device), torch.zeros(F, k, dtype=torch.long, device=device)


def _merge(values_FK: torch.Tensor, ids_FK: torch.Tensor, logits_FV: torch.Tensor, v0: int, k: int,
           largest: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The best k of the running ones [F, K] and of a tile of logits [F, V_tile] starting at token v0."""
    tile = logits_FV.topk(min(k, logits_FV.shape[1]), dim=1, largest=largest)
    values = torch.cat([values_FK, tile.values], dim=1)  # [F, K + K_tile]
    ids = torch.cat([ids_FK, tile.indices + v0], dim=1)
    order = values.topk(k, dim=1, largest=largest)
    return order.values, ids.gather(1, order.indices)


def member_logit_effects(member, store, W_U_DV: torch.Tensor, centre_input: bool, k: int = 10) -> LogitEffects | None:
    """The logit effects of a member whose decoder writes where the unembedding reads (the
    residual stream and what adds to it; a crosscoder: its first source's model); None for others.
    A LayerNorm model's direction is centred first, as the norm centres what it reads (its
    scale is positive and leaves the ranking as it is)."""
    if "W_dec" not in member.weights or len(member.targets) > 1 and member.wiring != "crosscoder":
        return None
    if store.source(member.targets[0]).kind not in RESIDUAL_WRITERS:
        return None
    W_dec = member.weights["W_dec"]
    W_dec_FD = (W_dec[:, 0] if W_dec.dim() == 3 else W_dec).float()
    if centre_input:
        W_dec_FD = W_dec_FD - W_dec_FD.mean(-1, keepdim=True)
    return top_logit_effects(W_dec_FD, W_U_DV, k)
