"""Faults of the machine itself: a disk that fills up mid-run, two processes on one output, and
an exit status that scripts can trust.

The full-disk tests write into a real small filesystem: a tmpfs mounted by the test (as root),
filled up by the test while the writer is stopped between two writes (SIGSTOP/SIGCONT), so the
next write really fails with ENOSPC. Where mounting is not allowed they set RLIMIT_FSIZE in the
writer's process instead (EFBIG on the first large file) and say so.
"""
from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import train_sweep
from runtime.background import THREAD_NAME
from store.zarr_store import ActivationStore
from tests.conftest import gen_args
from tests.test_architectures import _assert_same_members

ROOT = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def small_filesystem(path: Path, size_mb: int):
    """A tmpfs of `size_mb` MiB mounted at `path` (yields it), or None where mounting is not allowed."""
    path.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(path)],
                             capture_output=True).returncode == 0
    try:
        yield path if mounted else None
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(path: Path) -> Path:
    """Take every free byte of the filesystem of `path` with one file."""
    filler = path / "filler.bin"
    fd = os.open(filler, os.O_CREAT | os.O_WRONLY)
    try:
        for size in (2**20, 4096, 1):
            with contextlib.suppress(OSError):
                while os.write(fd, b"\0" * size):
                    pass
    finally:
        os.close(fd)
    return filler


def _limit_file_size(max_bytes: int):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, resource.RLIM_INFINITY))
    return apply


def _cli(script: str, args: list[str], **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / script), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"}, **kw)


def _stop_when(process: subprocess.Popen, ready, timeout: float = 120) -> None:
    """SIGSTOP `process` as soon as `ready()` holds."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the writer never got there"
        time.sleep(0.002)
    process.send_signal(signal.SIGSTOP)


def _assert_one_line_full_disk(done: subprocess.Popen, out: str, err: str, path_part: str, operation: str) -> None:
    assert done.returncode not in (0, None), out + err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "no space left on the device of" in lines[0] and path_part in lines[0], err
    assert operation in lines[0] and "free space, then rerun the same command to resume" in lines[0], err
    assert "Traceback" not in err and "enforce fail" not in err, err


def _train_args(store: Path, out: Path) -> list[str]:
    return ["--cache", str(store), "--source", "blocks.1.hook_resid_post", "--output_dir", str(out), "--ratio", "2", "--batch_size", "64", "--lr", "1e-2",
            "--n_epochs", "6", "--eval_tokens", "400", "--checkpoint_every", "20", "--no_eval"]


def test_a_full_disk_while_training_is_one_line_keeps_the_last_checkpoint_and_resumes_exactly(small_store, tmp_path):
    whole = tmp_path / "whole"
    assert CliRunner().invoke(train_sweep.main, _train_args(small_store, whole)).exit_code == 0
    with small_filesystem(tmp_path / "fs", 48) as fs:
        if fs is None:
            out = tmp_path / "limited"
            print("RLIMIT_FSIZE ran (no tmpfs mount here)")
            first = _cli("train_sweep.py", _train_args(small_store, out), preexec_fn=_limit_file_size(100_000))
        else:
            out = fs / "run"
            first = _cli("train_sweep.py", _train_args(small_store, out))
            _stop_when(first, lambda: (out / "checkpoint.pt").exists())
            filler = fill(fs)
            first.send_signal(signal.SIGCONT)
        stdout, stderr = first.communicate(timeout=300)
        _assert_one_line_full_disk(first, stdout, stderr, str(out), "checkpoint")
        assert not list(out.glob("*.tmp")), list(out.iterdir())
        assert not (out / "sweep.json").exists()  # nothing is marked done
        if fs is not None:
            import torch

            step = torch.load(out / "checkpoint.pt", weights_only=False)["state"]["step"]  # the last one is intact
            assert step % 20 == 0 and step > 0
            filler.unlink()  # space is freed
        again = _cli("train_sweep.py", _train_args(small_store, out))
        stdout, stderr = again.communicate(timeout=300)
        assert again.returncode == 0, stdout + stderr
        assert fs is None or "resuming" in stdout
        _assert_same_members(whole, out)


def _store_arrays(path: Path) -> dict[str, np.ndarray]:
    store = ActivationStore.open(path)
    arrays = {name: store.read_column(name, 0) for name in ("tokens", "positions", "sequence")}
    for source in store.sources:
        arrays[source.name] = store.read_rows(source.name, 0, store.n_rows).numpy()
    return arrays


def test_a_full_disk_while_caching_is_one_line_and_the_rerun_completes_an_identical_store(tmp_path, text_dir):
    args = lambda out: gen_args(out, text_dir, **{"--n_tokens": 3000, "--chunk_mb": "0.01", "--chunks_per_block": 1,  # noqa: E731
                                                  "--batch_size": 1})
    whole = tmp_path / "whole"
    done = _cli("generate_activations.py", args(whole))
    assert done.wait(timeout=300) == 0, done.communicate()
    with small_filesystem(tmp_path / "fs", 8) as fs:
        if fs is None:
            out = tmp_path / "limited"
            print("RLIMIT_FSIZE ran (no tmpfs mount here)")
            first = _cli("generate_activations.py", args(out), preexec_fn=_limit_file_size(20_000))
        else:
            out = fs / "store"
            first = _cli("generate_activations.py", args(out))
            _stop_when(first, lambda: (out / "manifest.blocks" / "000000.json").exists())
            filler = fill(fs)
            first.send_signal(signal.SIGCONT)
        stdout, stderr = first.communicate(timeout=300)
        _assert_one_line_full_disk(first, stdout, stderr, str(out), "block")
        assert not ActivationStore.open(out, allow_incomplete=True).complete
        if fs is not None:
            filler.unlink()
        again = _cli("generate_activations.py", args(out))
        stdout, stderr = again.communicate(timeout=300)
        assert again.returncode == 0, stdout + stderr
        a, b = _store_arrays(whole), _store_arrays(out)
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_a_store_that_cannot_fit_is_refused_before_anything_is_written(tmp_path, text_dir):
    with small_filesystem(tmp_path / "fs", 1) as fs:
        if fs is None:
            pytest.skip("needs a small filesystem (tmpfs mount), not allowed here")
        out = fs / "store"
        done = _cli("generate_activations.py", gen_args(out, text_dir, **{"--n_tokens": 200_000}))
        stdout, stderr = done.communicate(timeout=300)
        assert done.returncode == 1 and "needs" in stderr and "free" in stderr and "Traceback" not in stderr, stderr
        assert not out.exists() or not any(out.iterdir())


# ---------------------------------------------------------------- one writer per output
def test_a_second_writer_is_refused_at_once_naming_the_first(small_store, tmp_path):
    out = tmp_path / "run"
    first = _cli("train_sweep.py", _train_args(small_store, out) + ["--n_epochs", "40"])
    deadline = time.monotonic() + 120
    while not (tmp_path / "run.lock").exists():
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()
        time.sleep(0.01)
    start = time.monotonic()
    second = _cli("train_sweep.py", _train_args(small_store, out) + ["--n_epochs", "40"])
    stdout, stderr = second.communicate(timeout=60)
    seconds = time.monotonic() - start
    first.send_signal(signal.SIGINT)
    first.communicate(timeout=120)
    assert second.returncode == 1 and f"pid {first.pid}" in stderr and "being written by" in stderr, stderr
    assert "Traceback" not in stderr
    assert seconds < 1.5, f"refused after {seconds:.1f} s"  # interpreter start-up and click, no torch
    assert not (tmp_path / "run.lock").exists()  # released on SIGINT


def test_a_stale_lock_is_taken_over_and_locks_are_released_on_success_and_error(small_store, tmp_path):
    import socket

    out = tmp_path / "run"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that is gone
    (tmp_path / "run.lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": time.time(),
                                                   "command": "train_sweep.py (killed)"}))
    result = CliRunner().invoke(train_sweep.main, _train_args(small_store, out) + ["--n_epochs", "1"])
    assert result.exit_code == 0, result.output
    assert f"taking over the lock of pid {dead.pid}" in result.stderr and "gone" in result.stderr
    assert not (tmp_path / "run.lock").exists()  # released after success
    bad = CliRunner().invoke(train_sweep.main, _train_args(small_store, out) + ["--n_epochs", "1", "--lr", "3e-2"])
    assert bad.exit_code == 1 and "holds another run" in bad.output
    assert not (tmp_path / "run.lock").exists()  # released after an error


def test_a_lock_from_another_host_is_refused_unless_broken(small_store, tmp_path):
    out = tmp_path / "run"
    (tmp_path / "run.lock").write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": time.time(), "command": "x"}))
    refused = CliRunner().invoke(train_sweep.main, _train_args(small_store, out) + ["--n_epochs", "1"])
    assert refused.exit_code == 1 and "on elsewhere" in refused.output and "--break_lock" in refused.output
    taken = CliRunner().invoke(train_sweep.main, _train_args(small_store, out) + ["--n_epochs", "1", "--break_lock"])
    assert taken.exit_code == 0, taken.output


# ---------------------------------------------------------------- a clean exit
def test_no_thread_outlives_a_cli(small_store, tmp_path):
    before = set(threading.enumerate())
    result = CliRunner().invoke(train_sweep.main, _train_args(small_store, tmp_path / "r") + ["--n_epochs", "2"])
    assert result.exit_code == 0, result.output
    left = [t for t in threading.enumerate() if t not in before and (t.name == THREAD_NAME or not t.daemon)]
    assert not left, left


def test_the_exit_status_is_zero_every_time_the_work_is_done(small_store, tmp_path):
    """The prefetch thread is busy when training ends (8 batches queued ahead, 2 epochs of
    whole-store reads): it is stopped and joined, and the interpreter exits cleanly."""
    for run in range(4):
        done = _cli("train_sweep.py", _train_args(small_store, tmp_path / f"r{run}") + ["--n_epochs", "1", "--prefetch", "8"])
        stdout, stderr = done.communicate(timeout=300)
        assert done.returncode == 0, stdout + stderr
        assert "terminate called" not in stderr
