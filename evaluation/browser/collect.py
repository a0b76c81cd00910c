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

Everything is a fixed-size tensor per latent (O(F·(K + R)·W) for W = 2·HALF + 1), merged with each
batch by one sort, so memory is independent of how many rows pass. Ties among equal activations
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
    tokens: torch.Tensor  # [F, N, W] int64 token ids around it (−1: outside the sequence)
    acts: torch.Tensor  # [F, N, W] float16 the latent's activation on each of them

    @classmethod
    def empty(cls, F: int, N: int, fill_key: float) -> "Examples":
        W = 2 * HALF + 1
        return cls(torch.full((F, N), -math.inf), torch.full((F, N), fill_key), torch.zeros(F, N, 2, dtype=torch.long),
                   torch.full((F, N, W), -1, dtype=torch.long), torch.zeros(F, N, W, dtype=torch.float16))

    def merged(self, other: "Examples", largest: bool) -> "Examples":
        """The best N of both by key (stable: self's slots, then other's in their order, win ties)."""
        key = torch.cat([self.key, other.key], dim=1)
        order = key.sort(dim=1, descending=largest, stable=True).indices[:, : self.key.shape[1]]  # [F, N]
        pick = lambda a, b: torch.cat([a, b], dim=1).gather(1, order.view(*order.shape, *([1] * (a.dim() - 2))).expand(  # noqa: E731
            *order.shape, *a.shape[2:]))
        return Examples(pick(self.value, other.value), key.gather(1, order), pick(self.where, other.where),
                        pick(self.tokens, other.tokens), pick(self.acts, other.acts))


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
        token ids [S, P] and sequence numbers [S] (increasing across calls)."""
        f_SPF = f_SPF.float().cpu()
        S, P, F = f_SPF.shape
        self.n_tokens += S * P
        active = f_SPF > 0
        self.count += active.sum(dim=(0, 1))
        self.sum += f_SPF.sum(dim=(0, 1)).double()
        self.max = torch.maximum(self.max, f_SPF.amax(dim=(0, 1)))
        self._histogram(f_SPF, active)
        windows_SPFW, tokens_SPW = _windows(f_SPF, tokens_SP.cpu())
        # one candidate per latent and sequence: its peak there
        peak_SF, at_SF = f_SPF.max(dim=1)
        self.top = self.top.merged(self._examples(peak_SF.T, peak_SF.T, -math.inf, seq_S, at_SF.T, windows_SPFW, tokens_SPW),
                                   largest=True)
        # a uniform sample of activating tokens: the smallest random keys
        keys_FN = torch.where(active.view(S * P, F), torch.rand(S * P, F, generator=self.generator), math.inf).T
        n = min(self.samples, S * P)
        key_FR, flat_FR = keys_FN.topk(n, dim=1, largest=False)
        value_FR = torch.where(torch.isfinite(key_FR), f_SPF.view(S * P, F).T.gather(1, flat_FR), 0.0)
        s_FR, p_FR = flat_FR // P, flat_FR % P
        candidates = self._examples(value_FR, key_FR, math.inf, seq_S, p_FR, windows_SPFW, tokens_SPW, s_FR)
        self.sample = self.sample.merged(candidates, largest=False)

    def _examples(self, value_FN, key_FN, worst: float, seq_S, p_FN, windows_SPFW, tokens_SPW, s_FN=None) -> Examples:
        """Examples at (sequence s, position p) per latent (s defaults to the column: one per
        sequence); slots whose value is not positive are empty (key `worst`)."""
        F, N = value_FN.shape
        if s_FN is None:
            s_FN = torch.arange(N).expand(F, N)
        latent_FN = torch.arange(F).unsqueeze(1).expand(F, N)
        valid = value_FN > 0
        return Examples(torch.where(valid, value_FN, -math.inf), torch.where(valid, key_FN, worst),
                        torch.stack([seq_S[s_FN], p_FN], -1), tokens_SPW[s_FN, p_FN], windows_SPFW[s_FN, p_FN, latent_FN].half())

    def _histogram(self, f_SPF: torch.Tensor, active: torch.Tensor) -> None:
        values = f_SPF[active]  # [n] the activating values, latent-major order of `active`'s nonzero
        latent = active.nonzero()[:, 2]
        bins = (torch.floor(torch.log2(values)) - LOW_EXP).clamp(0, N_BINS - 1).long()
        self.hist.view(-1).index_add_(0, latent * N_BINS + bins, torch.ones_like(bins))

    # ---------------------------------------------------------------- what the pages show
    def density(self) -> torch.Tensor:
        return self.count.double() / max(self.n_tokens, 1)

    def mean_active(self) -> torch.Tensor:
        return self.sum / self.count.clamp_min(1)

    def bands(self, n_bands: int = 5, per_band: int = 4) -> list[list[dict]]:
        """Per latent, n_bands activation-quantile bands of its activating tokens (edges from the
        histogram, between powers of two by geometric interpolation), each with its range, the
        fraction of activations it holds and up to `per_band` sampled examples inside it."""
        out = []
        cumulative = self.hist.cumsum(1).double()  # [F, B]
        for i in range(self.F):
            total = int(self.count[i])
            if total == 0:
                out.append([])
                continue
            edges = [_quantile(cumulative[i], total, q / n_bands, float(self.max[i])) for q in range(n_bands + 1)]
            edges[0], edges[-1] = 0.0, float(self.max[i])
            bands = []
            for b in range(n_bands):
                lo, hi = edges[b], edges[b + 1]
                inside = [j for j in range(self.samples) if math.isfinite(float(self.sample.value[i, j]))
                          and lo < float(self.sample.value[i, j]) <= hi]
                inside.sort(key=lambda j: -float(self.sample.value[i, j]))
                bands.append({"lo": lo, "hi": hi, "frac": 1 / n_bands, "samples": inside[:per_band]})
            out.append(bands)
        return out


def _windows(f_SPF: torch.Tensor, tokens_SP: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For every (sequence, position), the ±HALF positions around it: activations [S, P, F, W]
    (a view) and token ids [S, P, W] (−1 beyond the sequence)."""
    padded_f = torch.nn.functional.pad(f_SPF, (0, 0, HALF, HALF))  # [S, P+2H, F]
    windows = padded_f.unfold(1, 2 * HALF + 1, 1)  # [S, P, F, W]
    padded_t = torch.nn.functional.pad(tokens_SP, (HALF, HALF), value=-1)
    return windows, padded_t.unfold(1, 2 * HALF + 1, 1)  # [S, P, W]


def _quantile(cumulative_B: torch.Tensor, total: int, q: float, top: float) -> float:
    """The q-quantile of a latent's activations from its power-of-two histogram."""
    target = q * total
    b = int(torch.searchsorted(cumulative_B, torch.tensor(target, dtype=torch.float64)).clamp(max=N_BINS - 1))
    below = float(cumulative_B[b - 1]) if b > 0 else 0.0
    inside = float(cumulative_B[b]) - below
    fraction = 0.0 if inside <= 0 else (target - below) / inside
    lo = 2.0 ** (b + LOW_EXP)
    return min(top, lo * 2.0 ** fraction)


def bin_edges() -> list[float]:
    """The histogram's bin edges (powers of two)."""
    return [2.0 ** (e + LOW_EXP) for e in range(N_BINS + 1)]
