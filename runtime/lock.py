"""One writer per output: a lock beside the directory or store a stage writes (`<out>.lock`).

    with OutputLock("runs/demo", "train_sweep.py"):
        ...                         # a second process on runs/demo is refused at once

The lock file records who holds it (pid, host, start time, command), so a refusal names the
holder. A local lock is also an exclusive `flock` held for the process's life, which the kernel
drops when the process dies however it dies: a lock file left by a killed process on this host is
taken over, with a line saying so. A lock written on another host (a shared filesystem, an object
store) cannot be checked from here: it is refused unless `break_lock`.

Object stores (s3://…): the lock is an object created with a conditional put (If-None-Match: *),
so of two writers starting together exactly one succeeds; what is and is not protected is in the
README ("Faults").

Under torchrun, rank 0 takes the lock for the whole job.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from runtime.location import Location, location


class LockError(ValueError):
    """The output is being written by another process."""


class OutputLock:
    """Exclusive right to write `target` (a local path or a URL) while held."""

    def __init__(self, target: str | Path | Location, what: str, break_lock: bool = False):
        self.where = target if isinstance(target, Location) else location(target)
        self.what = what
        self.break_lock = break_lock
        self._file = None  # the open, flock-ed lock file (local)
        self._held = False

    @property
    def url(self) -> str:
        return self.where.url.rstrip("/") + ".lock"

    def __enter__(self) -> "OutputLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> bool:
        self.release()
        return False

    def refuse_if_held(self) -> None:
        """Refuse at once if a live process holds the lock (what a CLI checks before its slow
        imports); the lock itself is taken later, by the stage that writes."""
        if self.where.remote:
            return
        path = Path(self.url)
        if not path.exists():
            return
        with open(path, "a+", encoding="utf-8") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise LockError(self._refusal(_read(path))) from None

    def acquire(self) -> None:
        if self.where.remote:
            self._acquire_remote()
        else:
            self._acquire_local()
        self._held = True

    def release(self) -> None:
        if not self._held:
            return
        self._held = False
        if self._file is not None:
            with contextlib.suppress(OSError):
                Path(self.url).unlink()
            self._file.close()  # drops the flock
            self._file = None
        else:
            fs, path = self.where.filesystem()
            with contextlib.suppress(OSError):
                fs.rm(path.rstrip("/") + ".lock")

    # ---------------------------------------------------------------- local: flock + record
    def _acquire_local(self) -> None:
        path = Path(self.url)
        path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            handle = open(path, "a+", encoding="utf-8")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read(path)
                handle.close()
                raise LockError(self._refusal(holder)) from None
            if _same_file(handle, path):
                break
            handle.close()  # its holder released it (and removed the file) while we waited: again, on the new file
        holder = _read(path)
        if holder and holder.get("host") != socket.gethostname() and not self.break_lock:
            fcntl.flock(handle, fcntl.LOCK_UN)
            handle.close()
            raise LockError(self._refusal(holder, other_host=True))
        if holder:
            print(f"{self.where.url}: taking over the lock of pid {holder.get('pid')} on {holder.get('host')} "
                  f"({holder.get('command', '?')}, {_ago(holder)}): "
                  + ("--break_lock" if holder.get("host") != socket.gethostname() else "that process is gone"),
                  file=sys.stderr)
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps(_record(self.what)))
        handle.flush()
        self._file = handle

    # ---------------------------------------------------------------- object stores: conditional put
    def _acquire_remote(self) -> None:
        fs, root = self.where.filesystem()
        key = root.rstrip("/") + ".lock"
        for _ in range(2):
            try:
                fs.pipe_file(key, json.dumps(_record(self.what)).encode(), mode="create")
                return
            except FileExistsError:
                holder = _read_remote(fs, key)
            except OSError as err:  # some clients report the failed precondition as a plain error
                if "PreconditionFailed" not in str(err) and "412" not in str(err):
                    raise
                holder = _read_remote(fs, key)
            same_host = holder.get("host") == socket.gethostname()
            if (same_host and not _alive(holder)) or self.break_lock:
                print(f"{self.where.url}: taking over the lock of pid {holder.get('pid')} on {holder.get('host')} "
                      f"({_ago(holder)}): " + ("that process is gone" if same_host and not _alive(holder) else "--break_lock"),
                      file=sys.stderr)
                fs.rm(key)
                continue
            raise LockError(self._refusal(holder, other_host=not same_host))
        raise LockError(f"{self.where.url}: another process took the lock while this one was taking over a stale one")

    def _refusal(self, holder: dict, other_host: bool = False) -> str:
        who = (f"pid {holder.get('pid')} on {holder.get('host')} ({holder.get('command', '?')}, started {_ago(holder)})"
               if holder else "another process")
        text = f"{self.where.url} is being written by {who}: wait for it to finish, or stop it, then rerun"
        if other_host:
            text += f"; if that process is gone, rerun with --break_lock (the lock is {self.url})"
        return text


def _same_file(handle, path: Path) -> bool:
    try:
        return os.fstat(handle.fileno()).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def _record(what: str) -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "start_ticks": _start_ticks(os.getpid()),
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv and sys.argv[0] else what}


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}


def _read_remote(fs, key: str) -> dict:
    try:
        return json.loads(fs.cat_file(key) or b"{}")
    except (OSError, ValueError):
        return {}


def _alive(holder: dict) -> bool:
    """Whether the holder's process still runs (a reused pid has another start time)."""
    pid = holder.get("pid")
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    ticks = _start_ticks(pid)
    return ticks is None or holder.get("start_ticks") in (None, ticks)


def _start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux), which tells a reused pid apart."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _ago(holder: dict) -> str:
    started = holder.get("started")
    if not isinstance(started, (int, float)):
        return "at an unknown time"
    seconds = max(0, time.time() - started)
    return f"{seconds:.0f} s ago" if seconds < 120 else f"{seconds / 60:.0f} min ago"
