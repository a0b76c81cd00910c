"""The feature browser's pass against the metrics pass, on runs of a few sizes: seconds, peak RSS
and MB on disk per member, so that how each grows with members, latents and rows can be read off.

    python generate_activations.py --n_tokens 200_000 --out caches/gemma-l6
    python -m bench.browser --cache caches/gemma-l6          # 8 members × 4,096 latents, and smaller variants

    python -m bench.browser --cache caches/gemma-l6 --sizes 1x65536,2x65536   # the widest members

The members are ReLU SAEs trained for a few steps (what they learned does not change the cost of
either pass). Each pass runs in a fresh process, timed by the process itself around the call;
the browser's own phases as it reports them: its streaming pass, reading the unembedding, the
logit effects, writing the pages. "besides" is the browser without its logit effects, the part
that does not grow with the vocabulary. Peak RSS is that process's ru_maxrss (os.wait4),
imports included, printed beside the peak of a process that only imports the same modules.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import click

from bench._common import format_table, run_measured

ROOT = Path(__file__).resolve().parent.parent

_CHILD = '''
import json, sys, time
sys.path.insert(0, {root!r})
from evaluation.browser import BrowserConfig, build_browser
from evaluation.config import EvalConfig
from evaluation.runner import evaluate_run
start = time.perf_counter()
if {what!r} == "metrics":
    evaluate_run(EvalConfig(run_dir={run!r}, n_sequences=0))
elif {what!r} == "browser":
    build_browser(BrowserConfig(run_dir={run!r}, rows={rows!r}))
print(json.dumps({{"seconds": time.perf_counter() - start}}))
'''


PHASES = re.compile(r"rows in ([0-9.]+) s; unembedding read in ([0-9.]+) s, logit effects ([0-9.]+) s, pages ([0-9.]+) s")


def child(what: str, run: Path, rows: int | None = None) -> tuple[float, int, list[float]]:
    """(seconds of the whole call, peak RSS bytes of the process that ran it, the browser's phases
    as it reports them: pass, unembedding, logit effects, pages)."""
    code = _CHILD.format(root=str(ROOT), what=what, run=str(run), rows=rows)
    out, _, peak = run_measured([sys.executable, "-c", code], cwd=ROOT)
    lines = out.strip().splitlines()
    phases = [m for m in map(PHASES.search, lines) if m]
    return json.loads(lines[-1])["seconds"], peak, [float(x) for x in phases[0].groups()] if phases else []


def train(cache: str, out: Path, members: int, d_sae: int, steps: int) -> None:
    """A run of `members` ReLU SAEs, evaluated (the browser's index shows its metrics)."""
    args = [sys.executable, str(ROOT / "train_sweep.py"), "--cache", cache, "--output_dir", str(out), "--n_models",
            str(members), "--d_sae", str(d_sae), "--batch_size", "1024", "--n_tokens", str(steps * 1024),
            "--eval_sequences", "0", "--eval_tokens", "20000"]
    subprocess.run(args, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _variant(text: str) -> tuple[int, int, int | None]:
    shape, _, rows = text.partition("@")
    members, latents = shape.split("x")
    return int(members), int(latents), int(rows) if rows else None


def mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6


@click.command()
@click.option("--cache", required=True, help="A complete single-source store (the demo model's activations).")
@click.option("--steps", type=int, default=10, show_default=True, help="Training steps of each run.")
@click.option("--sizes", default="8x4096,4x4096,8x2048,8x4096@40000", show_default=True,
              help="Variants: MEMBERSxLATENTS, with @ROWS to build from that many training rows instead of the held-out ones.")
def main(cache: str, steps: int, sizes: str) -> None:
    rows = []
    _, imports, _ = child("imports", Path("."))
    with tempfile.TemporaryDirectory() as tmp:
        for members, d_sae, browser_rows in map(_variant, sizes.split(",")):
            run = Path(tmp) / f"m{members}_f{d_sae}"
            if not run.exists():
                train(cache, run, members, d_sae, steps)
            metrics_s, metrics_rss, _ = child("metrics", run)
            browser_s, browser_rss, (pass_s, unembed_s, logits_s, pages_s) = child("browser", run, browser_rows)
            rows.append([f"{members} × {d_sae:,}", "held-out" if browser_rows is None else f"{browser_rows:,} training",
                         f"{metrics_s:.1f}", f"{browser_s:.1f}", f"{pass_s:.1f}", f"{unembed_s:.1f}", f"{logits_s:.1f}",
                         f"{pages_s:.1f}", f"{browser_s / metrics_s:.1f}×", f"{(browser_s - logits_s) / metrics_s:.1f}×",
                         f"{metrics_rss / 2**30:.2f}", f"{browser_rss / 2**30:.2f}", f"{mb(run / 'browser') / members:.1f}"])
            shutil.rmtree(run / "browser")
            print(" | ".join(rows[-1]), flush=True)
    print(format_table(["members × latents", "browser rows", "metrics s", "browser s", "pass s", "W_U s", "logit effects s",
                        "pages s", "browser / metrics", "besides / metrics", "metrics peak GiB", "browser peak GiB",
                        "MB per member"], rows))
    print(f"a process importing the same modules and doing nothing: peak {imports / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
