"""Model diffing from a trained crosscoder's decoder (base + chat at one layer, or a stack of layers).

Dimension key: M latents, S sources, D d_in per source.

Model diffing (base + chat at one layer): how much of latent i's decoder lives in each model says
whether the latent is specific to one of them. Following Lindsey et al. and Minder et al. 2025 we use
the relative decoder norm r_i = ‖W_dec[i, chat]‖ / (‖W_dec[i, base]‖ + ‖W_dec[i, chat]‖): r ≈ 0 base
only, r ≈ 1 chat only, r ≈ ½ shared; for shared latents the cosine between the two decoder vectors
says whether both models use the same direction. These are decoder-norm statistics only: they do not
check that a "chat-only" latent is truly absent from the base model (Minder et al. show that an L1
penalty can make latents look chat-only when the base model does carry them; their Latent Scaling
check is not done here).

The decoders analysed here must be in the space the penalty acted on: the trainer divides each
source by its own normalisation factor, so a raw-space (exported, scale-folded) decoder is first
divided by those factors (`normalised_decoder`); otherwise a source with a larger scale looks as
if it carried more of every latent.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from matplotlib.figure import Figure


def normalised_decoder(W_dec_MSD: torch.Tensor, scales_S) -> torch.Tensor:
    """An exported (raw-space) decoder in the normalised space training used: W_dec[:, s] / s_s.  → [M, S, D]"""
    s_S = torch.as_tensor(scales_S, dtype=W_dec_MSD.dtype, device=W_dec_MSD.device)
    return W_dec_MSD / s_S.view(1, -1, 1)


def source_norm_fractions(W_dec_MSD: torch.Tensor) -> torch.Tensor:
    """‖W_dec[i, s]‖ / Σ_s' ‖W_dec[i, s']‖; all-zero (dead) rows give 0.  → [M, S]"""
    norms_MS = W_dec_MSD.norm(dim=-1)
    return norms_MS / norms_MS.sum(-1, keepdim=True).clamp_min(torch.finfo(norms_MS.dtype).tiny)


def relative_decoder_norm(W_dec_MSD: torch.Tensor, a: int, b: int) -> torch.Tensor:
    """r_i = ‖W_dec[i, b]‖ / (‖W_dec[i, a]‖ + ‖W_dec[i, b]‖): 0 only in a, 1 only in b; zero rows 0.  → [M]"""
    norm_a_M, norm_b_M = W_dec_MSD[:, a].norm(dim=-1), W_dec_MSD[:, b].norm(dim=-1)
    return norm_b_M / (norm_a_M + norm_b_M).clamp_min(torch.finfo(norm_b_M.dtype).tiny)


def decoder_cosine(W_dec_MSD: torch.Tensor, a: int, b: int) -> torch.Tensor:
    """Cosine between latent i's decoder vectors for sources a and b (0 where either is zero).  → [M]"""
    cos_M = torch.nn.functional.cosine_similarity(W_dec_MSD[:, a], W_dec_MSD[:, b], dim=-1)
    return cos_M.clamp(-1.0, 1.0)  # rounding gives 1 + 1e-7 for parallel vectors, outside histogram ranges


@dataclass(frozen=True)
class DiffThresholds:
    """Bands of the relative decoder norm r (all inclusive); latents in none of them are "other"."""

    a_only_max: float = 0.1
    """r ≤ this: the latent decodes (almost) only into source a (e.g. base)."""
    b_only_min: float = 0.9
    """r ≥ this: the latent decodes (almost) only into source b (e.g. chat)."""
    shared_min: float = 0.3
    """Lower edge of the shared band."""
    shared_max: float = 0.7
    """Upper edge of the shared band."""

    def __post_init__(self):
        if not 0 <= self.a_only_max < self.shared_min <= self.shared_max < self.b_only_min <= 1:
            raise ValueError(f"need 0 ≤ a_only_max < shared_min ≤ shared_max < b_only_min ≤ 1, got {self}")


def _histogram(values: torch.Tensor, lo: float, hi: float, bins: int = 20) -> dict:
    counts, edges = torch.histogram(values.double().cpu(), bins=bins, range=(lo, hi))
    return {"bin_edges": [round(e, 6) + 0.0 for e in edges.tolist()], "counts": [int(c) for c in counts]}


def _pair_stats(
    W_dec_MSD: torch.Tensor, a: int, b: int, keep_M: torch.Tensor, t: DiffThresholds
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """r, cosine and the shared mask over the N kept latents whose decoder is non-zero in a or b."""
    has_norm_M = keep_M & (W_dec_MSD[:, [a, b]].norm(dim=(-2, -1)) > 0)
    r_N = relative_decoder_norm(W_dec_MSD, a, b)[has_norm_M]
    return r_N, decoder_cosine(W_dec_MSD, a, b)[has_norm_M], (r_N >= t.shared_min) & (r_N <= t.shared_max)


def diff_summary(W_dec_MSD: torch.Tensor, a: int, b: int, labels: tuple[str, str],
                 thresholds: DiffThresholds = DiffThresholds(), alive_M: torch.Tensor | None = None) -> dict:
    """JSON-ready band counts, r histogram and shared-latent cosines over the (alive) latents.
    Latents whose decoder is zero in both a and b have no r: they count as "other" and `n_zero_norm`."""
    if len(labels) != 2 or labels[0] == labels[1]:
        raise ValueError(f"need two distinct labels, got {labels}")
    W_dec_MSD = W_dec_MSD.detach().float().cpu()
    alive_M = torch.ones(W_dec_MSD.shape[0], dtype=torch.bool) if alive_M is None else alive_M.bool().cpu()
    r_N, cos_N, shared_N = _pair_stats(W_dec_MSD, a, b, alive_M, thresholds)
    n = int(alive_M.sum())
    counts = {f"{labels[0]}_only": int((r_N <= thresholds.a_only_max).sum()),
              f"{labels[1]}_only": int((r_N >= thresholds.b_only_min).sum()), "shared": int(shared_N.sum())}
    counts["other"] = n - sum(counts.values())
    cos_shared = cos_N[shared_N]
    return {
        "labels": list(labels), "n_latents": n, "n_zero_norm": n - len(r_N),
        **{f"n_{k}": v for k, v in counts.items()}, **{f"frac_{k}": v / max(n, 1) for k, v in counts.items()},
        "thresholds": asdict(thresholds),
        "relative_norm_mean": r_N.mean().item() if len(r_N) else None,
        "relative_norm_histogram": _histogram(r_N, 0.0, 1.0),
        "shared_decoder_cosine": {
            "mean": cos_shared.mean().item() if len(cos_shared) else None,
            "median": cos_shared.quantile(0.5).item() if len(cos_shared) else None,
            "histogram": _histogram(cos_shared, -1.0, 1.0) if len(cos_shared) else None,
        },
    }


def plot_diff(r_M: torch.Tensor, cosine_M: torch.Tensor, shared_mask_M: torch.Tensor, labels: tuple[str, str],
              path: str | Path, thresholds: DiffThresholds | None = None) -> Path:
    """Two panels: histogram of r, and of the decoder cosine of the shared latents."""
    path = Path(path)
    fig = Figure(figsize=(10, 4), dpi=100)  # no pyplot: no backend, no display, nothing global to close
    ax_r, ax_cos = fig.subplots(1, 2)
    ax_r.hist(r_M.detach().cpu().float().numpy(), bins=50, range=(0, 1))
    for edge in (asdict(thresholds).values() if thresholds else ()):
        ax_r.axvline(edge, color="grey", linestyle=":", linewidth=1)
    a, b = labels
    ax_r.set(xlim=(0, 1), xlabel=f"relative decoder norm ‖{b}‖ / (‖{a}‖ + ‖{b}‖)", ylabel="latents",
             title=f"0: {a} only   1: {b} only")
    shared_cos = cosine_M[shared_mask_M.bool()].detach().cpu().float()
    if len(shared_cos):
        ax_cos.hist(shared_cos.numpy(), bins=50, range=(-1, 1))
    else:
        ax_cos.text(0.5, 0.5, "no shared latents", ha="center", va="center", transform=ax_cos.transAxes)
    ax_cos.set(xlim=(-1, 1), xlabel=f"cosine(W_dec[{a}], W_dec[{b}])", ylabel="latents",
               title=f"shared latents (n={len(shared_cos)})")
    fig.tight_layout()
    fig.savefig(path)  # the Agg renderer, whatever backend pyplot may have elsewhere
    return path


def _pick_pair(sources: list[dict], labels: tuple[str, str] | None) -> tuple[int, int, tuple[str, str]]:
    """Indices (a, b) of the sources to compare, and their labels."""
    tags = [s.get("label") for s in sources]
    if labels is None:
        if "base" in tags and "chat" in tags:
            return tags.index("base"), tags.index("chat"), ("base", "chat")
        distinct = tags[0] and tags[1] and tags[0] != tags[1]
        return 0, 1, ((tags[0], tags[1]) if distinct else ("source0", "source1"))
    found = [next((i for i, s in enumerate(sources) if tag in (s.get("label"), s["name"])), None) for tag in labels]
    if None in found or found[0] == found[1]:
        raise ValueError(f"labels {labels} must name two different sources by label {tags} or name "
                         f"{[s['name'] for s in sources]}")
    return found[0], found[1], tuple(labels)


def _norm_fraction_summary(W_dec_MSD: torch.Tensor, sources: list[dict], alive_M: torch.Tensor) -> dict:
    """Per source: mean share of the decoder norm, and #latents with > 90% of it there (layer stacks)."""
    frac_MS = source_norm_fractions(W_dec_MSD)
    frac_NS = frac_MS[alive_M & (frac_MS.sum(-1) > 0)]
    per_source = [{"name": s["name"], "label": s.get("label"), "n_dominant": int((frac_NS[:, i] > 0.9).sum()),
                   "mean_fraction": frac_NS[:, i].mean().item() if len(frac_NS) else None}
                  for i, s in enumerate(sources)]
    return {"dominant_min": 0.9, "n_latents": len(frac_NS), "per_source": per_source}


def write_diff_analysis(directory: str | Path, config: dict, w: dict[str, torch.Tensor],
                        labels: tuple[str, str] | None = None, thresholds: DiffThresholds = DiffThresholds(),
                        alive_M: torch.Tensor | None = None) -> dict:
    """Write `diff_summary.json` and `diff.png` into `directory` for the pair chosen by `labels` (source
    labels or names; default: the sources labelled base and chat, else sources 0 and 1); return the summary.
    Norms are compared in the normalised space training used when the config records the scales
    folded into the export (`normalisation.scales`), else as stored."""
    W_dec_MSD = w["W_dec"].detach().float().cpu()
    scales = (config.get("normalisation") or {}).get("scales")
    if scales is not None:
        W_dec_MSD = normalised_decoder(W_dec_MSD, scales)
    M, S, _ = W_dec_MSD.shape
    if S < 2:
        raise ValueError(f"a model-diff analysis needs at least two sources; this crosscoder has {S}")
    sources = config["sources"]
    a, b, labels = _pick_pair(sources, labels)
    alive_M = torch.ones(M, dtype=torch.bool) if alive_M is None else alive_M.bool().cpu()
    summary = diff_summary(W_dec_MSD, a, b, labels, thresholds, alive_M)
    summary["pair"] = {"a": {"index": a, **sources[a]}, "b": {"index": b, **sources[b]}}
    summary["source_norm_fractions"] = _norm_fraction_summary(W_dec_MSD, sources, alive_M)
    summary["space"] = ("normalised: each source's decoder divided by its normalisation factor "
                        f"{[round(x, 6) for x in scales]}, the space the penalty acted on") if scales is not None else "as stored"
    summary["plot"] = "diff.png"
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    plot_diff(*_pair_stats(W_dec_MSD, a, b, alive_M, thresholds), labels, directory / "diff.png", thresholds)
    (directory / "diff_summary.json").write_text(json.dumps(summary, indent=2))
    return summary
