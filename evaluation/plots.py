"""PNG plots of a sweep (or of several compared): λ vs L0, the L0–FVU and L0–CE-recovered
frontiers (against zero and mean ablation; one curve per architecture and width, with a legend),
and per-latent firing-density histograms."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Callable

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402


def series(row: dict) -> str:
    """A frontier's label: one curve per architecture and width."""
    return f"{row.get('arch', 'relu')} d_sae={row.get('d_sae')}"


def plot_sweep(rows: list[dict], out: Path, log10_density: dict[str, torch.Tensor] | None = None,
               label: Callable[[dict], str] = series, prefix: str = "") -> list[Path]:
    """Write the sweep's plots into `out` (file names after `prefix`); return their paths.
    `label`: which curve a member belongs to."""
    paths = []
    if any(r.get("l1_coeff") is not None for r in rows):
        paths.append(_curves(out / f"{prefix}l1_vs_l0.png", rows, "l1_coeff", "l0", "L1 coefficient λ", "L0 (held-out)",
                             logx=True, label=label))
    paths.append(_curves(out / f"{prefix}l0_vs_fvu.png", rows, "l0", "fvu", "L0 (held-out)", "FVU (held-out)", logx=True,
                         label=label))
    if any("ce_recovered" in r for r in rows):
        paths.append(_curves(out / f"{prefix}l0_vs_ce_recovered.png", rows, "l0", "ce_recovered",
                             "L0 (held-out)", "CE recovered (zero ablation)", logx=True, label=label))
        paths.append(_curves(out / f"{prefix}l0_vs_ce_recovered_mean.png", rows, "l0", "ce_recovered_mean_ablation",
                             "L0 (held-out)", "CE recovered (mean ablation)", logx=True, label=label))
    if log10_density:
        paths.append(_density(out / f"{prefix}density.png", log10_density))
    return paths


def _curves(path: Path, rows: list[dict], xkey: str, ykey: str, xlabel: str, ylabel: str, logx: bool,
            label: Callable[[dict], str] = series) -> Path:
    groups: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for r in rows:
        if r.get(xkey) is not None and r.get(ykey) is not None:
            groups[label(r)].append((r[xkey], r[ykey]))
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
