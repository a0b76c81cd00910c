"""PNG plots of a sweep: L1 coefficient vs L0, and the L0–FVU frontier."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402


def plot_sweep(rows: list[dict], out: Path) -> list[Path]:
    """Write l1_vs_l0.png and l0_vs_fvu.png into `out`; return their paths."""
    l1 = [r["l1_coeff"] for r in rows]
    l0 = [r["l0"] for r in rows]
    fvu = [r["fvu"] for r in rows]
    paths = [
        _scatter(out / "l1_vs_l0.png", l1, l0, "L1 coefficient λ", "L0 (held-out)", logx=True),
        _scatter(out / "l0_vs_fvu.png", l0, fvu, "L0 (held-out)", "FVU (held-out)", logx=True),
    ]
    return paths


def _scatter(path: Path, x: list[float], y: list[float], xlabel: str, ylabel: str, logx: bool) -> Path:
    fig, ax = plt.subplots(figsize=(5, 4), dpi=100)
    ax.plot(x, y, "o-")
    if logx and min(x) > 0:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
