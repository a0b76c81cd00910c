"""How long `--help` takes for each CLI, as a new user meets it: a fresh Python process each time.

    python -m bench.cli_help            # best and median of 5 runs per CLI

The CLIs import torch, transformer_lens and zarr only after click has parsed the options, so
--help should answer in well under a second; `python -c pass` is printed beside them as the floor
(interpreter start-up alone).
"""
from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = {
    "python -c pass": [sys.executable, "-c", "pass"],
    "generate_activations.py --help": [sys.executable, str(ROOT / "generate_activations.py"), "--help"],
    "train_sweep.py --help": [sys.executable, str(ROOT / "train_sweep.py"), "--help"],
    "evaluate.py --help": [sys.executable, str(ROOT / "evaluate.py"), "--help"],
}


def wall_seconds(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, cwd=ROOT)
    return time.perf_counter() - start


@click.command()
@click.option("--repeats", type=int, default=5)
def main(repeats: int) -> None:
    print("| command | best s | median s |")
    print("| --- | ---: | ---: |")
    for name, command in COMMANDS.items():
        times = [wall_seconds(command) for _ in range(repeats)]
        print(f"| `{name}` | {min(times):.2f} | {statistics.median(times):.2f} |")


if __name__ == "__main__":
    main()
