"""Helpers shared by the benchmarks: wall-clock timing (sides interleaved round by round, their
ratio as a median with its spread), peak-RSS sampling and plain-text tables.

Imported by bench/train_throughput.py and bench/cache_throughput.py; not a script. Peak memory is
the process's resident set size sampled by a background thread (psutil), so it includes
everything the process holds, and the allocator may keep memory freed by an earlier
measurement: read it as an upper bound per phase, not as an exact figure. Without psutil the
memory column is left empty.
"""
from __future__ import annotations

import os
import statistics
import subprocess
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

try:
    import psutil
except ImportError:  # optional: memory columns stay empty
    psutil = None


@dataclass
class RssPeak:
    """Peak resident memory seen while a `track_rss` block ran (bytes; None without psutil)."""

    start: int | None = None
    peak: int | None = None

    @property
    def growth(self) -> int | None:
        return None if self.start is None or self.peak is None else self.peak - self.start


@dataclass
class _Sampler:
    interval_s: float
    result: RssPeak = field(default_factory=RssPeak)
    stop: threading.Event = field(default_factory=threading.Event)

    def sample(self) -> None:
        self.result.peak = max(self.result.peak or 0, psutil.Process().memory_info().rss)

    def run(self) -> None:
        while not self.stop.is_set():
            self.sample()
            self.stop.wait(self.interval_s)


@contextmanager
def track_rss(interval_s: float = 0.02) -> Iterator[RssPeak]:
    """Sample this process's RSS every `interval_s` while the block runs; yields the running peak."""
    if psutil is None:
        yield RssPeak()
        return
    sampler = _Sampler(interval_s)
    sampler.result.start = psutil.Process().memory_info().rss
    thread = threading.Thread(target=sampler.run, daemon=True)
    thread.start()
    try:
        yield sampler.result
    finally:
        sampler.stop.set()
        thread.join()
        sampler.sample()  # a block shorter than one interval still gets a reading


def run_measured(command: list[str], cwd: str | os.PathLike | None = None) -> tuple[str, float, int]:
    """Run `command` to its end: (its stdout, wall seconds, its peak RSS in bytes). The peak is
    this child's own ru_maxrss (os.wait4), which Linux takes as at least the parent's RSS at the
    fork, so the calling bench keeps torch out of its own process. Output goes through temporary
    files (a chatty child cannot block on a full pipe); a failure exits with its stderr's end."""
    start = time.perf_counter()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        child = subprocess.Popen(command, stdout=out, stderr=err, cwd=cwd)
        _, status, usage = os.wait4(child.pid, 0)
        seconds = time.perf_counter() - start
        out.seek(0), err.seek(0)
        if status != 0:
            raise SystemExit(f"{' '.join(map(str, command))[:300]} failed:\n{err.read().decode(errors='replace')[-3000:]}")
        return out.read().decode(errors="replace"), seconds, usage.ru_maxrss * 1024  # KiB on Linux


def interleaved(sides: dict[str, Callable[[int], object]], rounds: int,
                sync: Callable[[], None] = lambda: None) -> dict[str, list[float]]:
    """Seconds of each side in each round: round r runs every side once (`side(r)`), the order
    rotating from round to round (A B, B A, …), so a slow spell of a shared machine falls on
    every side alike. `sync` waits for the device before each clock reading."""
    names, seconds = list(sides), {name: [] for name in sides}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            sync()
            start = time.perf_counter()
            sides[name](r)
            sync()
            seconds[name].append(time.perf_counter() - start)
    return seconds


@dataclass(frozen=True)
class Ratio:
    """How many times faster one side ran than another, round by round (`interleaved`)."""

    values: tuple[float, ...]

    @classmethod
    def of(cls, slower: list[float], faster: list[float]) -> "Ratio":
        """Per round: the seconds of `slower` ÷ those of `faster` (> 1: `faster` is faster)."""
        return cls(tuple(s / f for s, f in zip(slower, faster)))

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    def __str__(self) -> str:
        return f"{self.median:.2f}× (min {min(self.values):.2f}, max {max(self.values):.2f}, {len(self.values)} rounds)"


class Stopwatch:
    """Accumulates wall-clock seconds over several `with watch:` blocks."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._t0 = 0.0

    def __enter__(self) -> "Stopwatch":
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds += time.perf_counter() - self._t0


def mib(n_bytes: int | None) -> str:
    return "n/a" if n_bytes is None else f"{n_bytes / 2**20:,.0f}"


def format_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Right-aligned columns (first column left-aligned) with a rule under the header."""
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]

    def line(row: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))

    return "\n".join([line(cells[0]), "  ".join("-" * w for w in widths), *(line(r) for r in cells[1:])])
