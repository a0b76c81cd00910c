"""Several architectures in one pass over the store, against one run per architecture one after
another: the same members, the same batches, the same steps.

    python generate_activations.py --n_tokens 200_000 --out caches/gemma-l6
    python -m bench.multi_arch --cache caches/gemma-l6 --steps 60      # 5 architectures × 6 members × 4,096 latents

Each variant is `train_sweep.py` as a subprocess (what a user runs), with held-out metrics but no
spliced CE (`--eval_sequences 0`), so the one-run variant also draws the seed demo job's frontier
(`l0_vs_fvu.png`, one series per architecture) at this machine's scale. Reported per variant:
wall time, the training loops' time (`train_seconds` of sweep.json, summed over runs), the
store chunks read and the peak RSS of the process (os.wait4's ru_maxrss of each child).
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import click

from bench._common import format_table, run_measured

ROOT = Path(__file__).resolve().parent.parent
ARCHS = ("relu", "topk", "batchtopk", "jumprelu", "gated")


def run(args: list[str]) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of `train_sweep.py args` in a child process."""
    _, seconds, peak = run_measured([sys.executable, str(ROOT / "train_sweep.py"), *args], cwd=ROOT)
    return seconds, peak


def train_seconds(out: Path) -> float:
    return float(json.loads((out / "sweep.json").read_text())["train_seconds"])


@click.command()
@click.option("--cache", required=True, help="A complete single-source store (the demo model's activations).")
@click.option("--steps", type=int, default=60, show_default=True)
@click.option("--batch_size", type=int, default=1024, show_default=True)
@click.option("--d_sae", type=int, default=4096, show_default=True)
@click.option("--per_arch", type=int, default=6, show_default=True, help="Members per architecture.")
@click.option("--keep", default=None, help="Keep the one-run variant's directory here (its report and plots).")
def main(cache: str, steps: int, batch_size: int, d_sae: int, per_arch: int, keep: str | None) -> None:
    common = ["--cache", cache, "--d_sae", str(d_sae), "--batch_size", str(batch_size), "--n_tokens",
              str(steps * batch_size), "--eval_sequences", "0", "--eval_tokens", "20000"]
    members = ["--n_models", str(per_arch)]  # the coefficient axis of relu, jumprelu and gated
    k_axis = ["--sweep", "topk:k=" + ",".join(str(20 * 2**i) for i in range(per_arch)),
              "batchtopk:k=" + ",".join(str(20 * 2**i) for i in range(per_arch))]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        one = Path(keep) if keep else Path(tmp) / "one"
        seconds, peak = run([*common, *members, "--arch", *ARCHS, *k_axis, "--output_dir", str(one), "--overwrite"])
        together = (seconds, train_seconds(one), peak)
        rows.append([f"one run, {len(ARCHS)} architectures × {per_arch}", f"{seconds:.0f}", f"{together[1]:.0f}",
                     "1", f"{peak / 2**30:.2f}"])
        walls, trains, peaks = [], [], []
        for arch in ARCHS:
            out = Path(tmp) / arch
            scoped = [a for a in k_axis if a.startswith(f"{arch}:")]
            seconds, peak = run([*common, "--arch", arch, *(["--sweep", *scoped] if scoped else members),
                                 "--output_dir", str(out)])
            walls.append(seconds), trains.append(train_seconds(out)), peaks.append(peak)
        rows.append([f"{len(ARCHS)} runs one after another", f"{sum(walls):.0f}", f"{sum(trains):.0f}", str(len(ARCHS)),
                     f"{max(peaks) / 2**30:.2f}"])
    print(format_table(["variant", "wall s", "training s", "passes over the store", "peak RSS GiB"], rows))
    print(f"one run / separate runs: wall {together[0] / sum(walls):.2f}×, training {together[1] / sum(trains):.2f}×")
    print("per architecture alone (wall s, training s): "
          + ", ".join(f"{a} {w:.0f}/{t:.0f}" for a, w, t in zip(ARCHS, walls, trains)))


if __name__ == "__main__":
    main()
