"""How long `--help` and wrong input take to answer for each CLI, as a new user meets them: a
fresh Python process each time.

    python -m bench.cli_help            # best and median of 5 runs per command

The CLIs import torch, transformer_lens and zarr only after click has parsed the options and the
paths they are given have been checked, so --help, an unknown flag and a store or run directory
that is not there should answer in well under a second; `python -c pass` is printed beside them
as the floor (interpreter start-up alone). Wrong input must fail (exit status 1 or 2).
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
    "train_sweep.py --cache missing": [sys.executable, str(ROOT / "train_sweep.py"), "--cache", "no/such/store"],
    "train_sweep.py --no_such_flag": [sys.executable, str(ROOT / "train_sweep.py"), "--no_such_flag"],
    "evaluate.py --run_dir missing": [sys.executable, str(ROOT / "evaluate.py"), "--run_dir", "no/such/run"],
    "generate_activations.py --verify --out missing": [sys.executable, str(ROOT / "generate_activations.py"), "--verify",
                                                       "--out", "no/such/store"],
    "train_suite.py --cache missing": [sys.executable, str(ROOT / "train_suite.py"), "--cache", "no/such/store",
                                       "--output_dir", "no/such/run"],
}


def wall_seconds(command: list[str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, cwd=ROOT)
    seconds = time.perf_counter() - start
    should_succeed = "--help" in command or command[1:] == ["-c", "pass"]
    if (done.returncode == 0) != should_succeed:
        raise SystemExit(f"{' '.join(command)} exited {done.returncode}: {done.stderr.decode()[-300:]}")
    return seconds


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
