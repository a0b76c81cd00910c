"""PNG plots of a sweep: λ vs L0, the L0–FVU and L0–CE-recovered frontiers (one curve per
architecture and width), and per-latent firing-density histograms."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402


def plot_sweep(rows: list[dict], out: Path, log10_density: dict[str, torch.Tensor] | None = None) -> list[Path]:
    """Write the sweep's plots into `out`; return their paths."""
    paths = [
        _curves(out / "l1_vs_l0.png", rows, "l1_coeff", "l0", "L1 coefficient λ", "L0 (held-out)", logx=True),
        _curves(out / "l0_vs_fvu.png", rows, "l0", "fvu", "L0 (held-out)", "FVU (held-out)", logx=True),
    ]
    if any("ce_recovered" in r for r in rows):
        paths.append(_curves(out / "l0_vs_ce_recovered.png", rows, "l0", "ce_recovered",
                             "L0 (held-out)", "CE recovered (zero ablation)", logx=True))
    if log10_density:
        paths.append(_density(out / "density.png", log10_density))
    return paths


def _curves(path: Path, rows: list[dict], xkey: str, ykey: str, xlabel: str, ylabel: str, logx: bool) -> Path:
    groups: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for r in rows:
        if r.get(xkey) is not None and r.get(ykey) is not None:
            groups[f"{r.get('arch', 'relu')} d_sae={r.get('d_sae')}"].append((r[xkey], r[ykey]))
    fig, ax = plt.subplots(figsize=(5, 4), dpi=100)
    for label, points in groups.items():
        xs, ys = zip(*sorted(points))
        ax.plot(xs, ys, "o-", label=label)
    if logx and all(x > 0 for pts in groups.values() for x, _ in pts):
        ax.set_xscale("log")
    ax.set(xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    if groups:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, f"no member has both {xlabel} and {ylabel}", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _density(path: Path, log10_density: dict[str, torch.Tensor]) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    floor = -10.0  # dead latents (density 0) are drawn at the left edge
    for name, values in log10_density.items():
        ax.hist(values.clamp_min(floor).cpu().numpy(), bins=50, histtype="step", label=name)
    ax.axvline(floor + 0.25, color="grey", lw=0.8, ls=":")
    ax.text(floor + 0.3, 0.97, "← dead: never fired\n   on held-out rows", transform=ax.get_xaxis_transform(),
            fontsize=7, va="top", color="grey")
    ax.set(xlabel="log10 firing density (held-out)", ylabel="latents")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
