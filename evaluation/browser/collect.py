"""The statistics a feature browser shows, from one streaming pass over store rows, for every
latent of a member, in memory that does not grow with the number of rows.

Rows arrive a batch of whole sequences at a time, as latent activations f [S, P, F] (S sequences,
P stored positions, F latents) with their token ids. Per latent the recorder keeps:

  * the K highest activations, one per sequence (its peak there), with the ±HALF tokens around
    the peak and the latent's activation on each of them;
  * a uniform sample of R of its activating tokens (the R smallest of a random key drawn for every
    activating token: a bottom-k sketch, exact and order-free), with the same context, from which
    the quantile bands' examples are drawn;
  * a histogram of its activations in powers of two, its count, sum and maximum.

Everything is a fixed-size tensor per latent (O(F·(K + R)·W) for W = 2·HALF + 1), so memory is
independent of how many rows pass. A batch is merged in sparsely: only the activating tokens, and
of them only those that beat a latent's worst slot, are candidates, and only the latents with
candidates are re-sorted (a batch of a 65,536-latent member touched all F·(K + R)·W slots before). Ties among equal activations
go to the earlier sequence (sequences arrive in increasing order; the sort is stable), then to the
earlier position (the first maximum of a sequence).

Dimension key: S sequences, P positions stored per sequence, F latents, K top contexts, R samples,
W context width, B histogram bins.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

HALF = 8  # tokens shown each side of an example's token
LOW_EXP, N_BINS = -20, 34  # histogram bins [2^e, 2^(e+1)) for e = -20 … 13 (values beyond go to the end bins)


@dataclass
class Examples:
    """Per latent, a fixed number of examples with their contexts (value −inf: an empty slot)."""

    value: torch.Tensor  # [F, N] activation at the example's token
    key: torch.Tensor  # [F, N] what the slots are ranked by (the value for top examples, a random key for samples)
    where: torch.Tensor  # [F, N, 2] int64: (sequence, stored position)
    tokens: torch.Tensor  # [F, N, W] int32 token ids around it (−1: outside the sequence)
    acts: torch.Tensor  # [F, N, W] float16 the latent's activation on each of them

    @classmethod
    def empty(cls, F: int, N: int, fill_key: float) -> "Examples":
        W = 2 * HALF + 1
        return cls(torch.full((F, N), -math.inf), torch.full((F, N), fill_key), torch.zeros(F, N, 2, dtype=torch.long),
                   torch.full((F, N, W), -1, dtype=torch.int32), torch.zeros(F, N, W, dtype=torch.float16))

    def select(self, rows: torch.Tensor) -> "Examples":
        return Examples(*(t[rows] for t in vars(self).values()))

    def assign(self, rows: torch.Tensor, other: "Examples") -> None:
        for mine, theirs in zip(vars(self).values(), vars(other).values()):
            mine[rows] = theirs

    def merged(self, other: "Examples", largest: bool) -> "Examples":
        """The best N of both by key (stable: self's slots, then other's in their order, win ties)."""
        key = torch.cat([self.key, other.key], dim=1)  # [F, N + M]
        order_FN = key.sort(dim=1, descending=largest, stable=True).indices[:, : self.key.shape[1]]
        rows_F1 = torch.arange(len(key)).unsqueeze(1)
        return Examples(*(torch.cat([a, b], dim=1)[rows_F1, order_FN] for a, b in zip(vars(self).values(), vars(other).values())))


class LatentRecorder:
    """The browser's statistics of one member's F latents (see the module docstring)."""

    def __init__(self, F: int, top_k: int = 20, samples: int = 32, seed: int = 0):
        self.F, self.top_k, self.samples = F, top_k, samples
        self.top = Examples.empty(F, top_k, -math.inf)
        self.sample = Examples.empty(F, samples, math.inf)
        self.hist = torch.zeros(F, N_BINS, dtype=torch.long)  # [F, B]
        self.count = torch.zeros(F, dtype=torch.long)
        self.sum = torch.zeros(F, dtype=torch.float64)
        self.max = torch.zeros(F)
        self.n_tokens = 0
        self.generator = torch.Generator().manual_seed(seed)

    def nbytes(self) -> int:
        """What the recorder holds (it does not grow with the rows it has seen)."""
        tensors = [*vars(self.top).values(), *vars(self.sample).values(), self.hist, self.count, self.sum, self.max]
        return sum(t.numel() * t.element_size() for t in tensors)

    @torch.no_grad()
    def update(self, f_SPF: torch.Tensor, tokens_SP: torch.Tensor, seq_S: torch.Tensor) -> None:
        """Record a batch of whole sequences: f [S, P, F] (≥ 0, 0 where a latent is off), their
        token ids [S, P] and sequence numbers [S] (increasing across calls). Only the candidates
        that beat a latent's current worst slot are merged, and only those latents' slots touched:
        once the slots fill, a batch costs little more than reading f."""
        f_SPF = f_SPF.float().cpu()
        S, P, F = f_SPF.shape
        self.n_tokens += S * P
        s_A, p_A, latent_A = f_SPF.nonzero(as_tuple=True)  # the activating tokens, sequence-major
        value_A = f_SPF[s_A, p_A, latent_A]
        self.count += torch.bincount(latent_A, minlength=F)
        self.sum.index_add_(0, latent_A, value_A.double())
        self.max.scatter_reduce_(0, latent_A, value_A, reduce="amax")
        bins_A = (torch.floor(torch.log2(value_A)) - LOW_EXP).clamp(0, N_BINS - 1).long()
        self.hist.view(-1).index_add_(0, latent_A * N_BINS + bins_A, torch.ones_like(bins_A))
        context = _Context(f_SPF, tokens_SP.cpu(), seq_S.cpu())
        # one candidate per latent and sequence: its peak there (the first, where several tie)
        peak_SF, at_SF = f_SPF.max(dim=1)
        s_C, latent_C = ((peak_SF > 0) & (peak_SF > self.top.key[:, -1])).nonzero(as_tuple=True)
        peak_C = peak_SF[s_C, latent_C]
        self.top = self._merge(self.top, latent_C, peak_C, peak_C, s_C, at_SF[s_C, latent_C], context, largest=True)
        # a uniform sample of activating tokens: the smallest random keys
        key_A = torch.rand(len(value_A), generator=self.generator)
        keep = key_A < self.sample.key[latent_A, -1]
        self.sample = self._merge(self.sample, latent_A[keep], value_A[keep], key_A[keep], s_A[keep], p_A[keep], context,
                                  largest=False)

    @staticmethod
    def _merge(slots: Examples, latent_C, value_C, key_C, s_C, p_C, context: "_Context", largest: bool) -> Examples:
        """`slots` with candidates (latent, value, key, sequence and position in the batch) merged
        in: per latent the best N by key, the slots first, then the candidates in their order."""
        if len(latent_C) == 0:
            return slots
        N = slots.key.shape[1]
        by_key = key_C.sort(descending=largest, stable=True).indices
        order = by_key[latent_C[by_key].sort(stable=True).indices]  # by latent, then by key, then as given
        latents_U, count_U = torch.unique_consecutive(latent_C[order], return_counts=True)
        rank = torch.arange(len(order)) - torch.repeat_interleave(count_U.cumsum(0) - count_U, count_U)
        best = order[rank < N]  # a latent's best N candidates
        u_B, rank_B = torch.repeat_interleave(torch.arange(len(latents_U)), count_U)[rank < N], rank[rank < N]
        candidates = Examples.empty(len(latents_U), min(N, int(count_U.max())), _WORST[largest])
        candidates.value[u_B, rank_B], candidates.key[u_B, rank_B] = value_C[best], key_C[best]
        candidates.where[u_B, rank_B] = torch.stack([context.seq_S[s_C[best]], p_C[best]], -1)
        candidates.tokens[u_B, rank_B], candidates.acts[u_B, rank_B] = context.around(s_C[best], p_C[best], latent_C[best])
        merged = slots.select(latents_U).merged(candidates, largest)
        slots.assign(latents_U, merged)
        return slots

    # ---------------------------------------------------------------- what the pages show
    def density(self) -> torch.Tensor:
        return self.count.double() / max(self.n_tokens, 1)

    def mean_active(self) -> torch.Tensor:
        return self.sum / self.count.clamp_min(1)

    def bands(self, n_bands: int = 5, per_band: int = 4) -> list[list[dict]]:
        """Per latent, n_bands activation-quantile bands of its activating tokens (edges from the
        histogram, between powers of two by geometric interpolation), each with its range, the
        fraction of activations it holds and up to `per_band` sampled examples inside it (slots of
        `sample`, highest value first); [] for a latent that never fired. All latents at once."""
        edges_FE = self.band_edges(n_bands)  # [F, n_bands + 1]
        value_FR = self.sample.value
        order_FR = value_FR.sort(dim=1, descending=True, stable=True).indices
        sorted_FR = value_FR.gather(1, order_FR)
        band_FR = torch.searchsorted(edges_FE[:, 1:-1].contiguous(), sorted_FR.double().contiguous())  # lo < v ≤ hi
        inside_FRN = (band_FR.unsqueeze(-1) == torch.arange(n_bands)) & (sorted_FR > 0).unsqueeze(-1)
        rank_FRN = inside_FRN.cumsum(1) - 1  # its place in its band, highest value first
        f, r, b = (inside_FRN & (rank_FRN < per_band)).nonzero(as_tuple=True)
        slots_FNS = torch.full((self.F, n_bands, per_band), -1, dtype=torch.long)
        slots_FNS[f, b, rank_FRN[f, r, b]] = order_FR[f, r]
        edges, slots, fired = edges_FE.tolist(), slots_FNS.tolist(), (self.count > 0).tolist()
        return [[{"lo": edges[i][k], "hi": edges[i][k + 1], "frac": 1 / n_bands, "samples": [j for j in slots[i][k] if j >= 0]}
                 for k in range(n_bands)] if fired[i] else [] for i in range(self.F)]

    def band_edges(self, n_bands: int) -> torch.Tensor:
        """Each latent's activation quantiles 0, 1/n_bands, …, 1 from its power-of-two histogram
        (geometric within a bin), the first 0 and the last its maximum.  → [F, n_bands + 1] float64"""
        cumulative_FB = self.hist.cumsum(1).double()
        target_FQ = self.count.double().unsqueeze(1) * torch.linspace(0, 1, n_bands + 1, dtype=torch.float64)
        b_FQ = torch.searchsorted(cumulative_FB, target_FQ).clamp(max=N_BINS - 1)
        below_FQ = torch.where(b_FQ > 0, cumulative_FB.gather(1, (b_FQ - 1).clamp(min=0)), 0.0)
        inside_FQ = cumulative_FB.gather(1, b_FQ) - below_FQ
        fraction_FQ = torch.where(inside_FQ > 0, (target_FQ - below_FQ) / inside_FQ.clamp(min=1), 0.0)
        top_F1 = self.max.double().unsqueeze(1)
        edges_FQ = torch.minimum(top_F1, 2.0 ** (b_FQ + LOW_EXP + fraction_FQ))
        edges_FQ[:, 0], edges_FQ[:, -1] = 0.0, top_F1[:, 0]
        return edges_FQ


_WORST = {True: -math.inf, False: math.inf}  # an empty slot's key: top examples (largest first), samples (smallest first)


class _Context:
    """A batch's activations and tokens padded by HALF each side, for the windows around examples."""

    def __init__(self, f_SPF: torch.Tensor, tokens_SP: torch.Tensor, seq_S: torch.Tensor):
        self.f = torch.nn.functional.pad(f_SPF, (0, 0, HALF, HALF))  # [S, P + 2H, F]
        self.tokens = torch.nn.functional.pad(tokens_SP, (HALF, HALF), value=-1)  # [S, P + 2H], −1 beyond the sequence
        self.seq_S = seq_S

    def around(self, s_C: torch.Tensor, p_C: torch.Tensor, latent_C: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The token ids [C, W] and the latent's activations [C, W] (float16) at positions p ± HALF."""
        at_CW = p_C.unsqueeze(1) + torch.arange(2 * HALF + 1)  # padded positions
        s_CW = s_C.unsqueeze(1).expand_as(at_CW)
        return self.tokens[s_CW, at_CW].int(), self.f[s_CW, at_CW, latent_C.unsqueeze(1).expand_as(at_CW)].half()


def bin_edges() -> list[float]:
    """The histogram's bin edges (powers of two)."""
    return [2.0 ** (e + LOW_EXP) for e in range(N_BINS + 1)]
