"""A full disk is one line: what was being written where, and what to do.

Every stage that writes wraps its writes in `writing(path, what)`; a write that fails because
the device (or a quota, or a file-size limit) is full becomes a `DiskFullError`, which the CLIs
print without a traceback. Writes are made resumable by their callers (blocks recorded whole,
checkpoints written to a temporary file and renamed), so the fix is always the same: free space,
then rerun the same command. Where a write's size is known in advance, `check_free` refuses it
before it starts, with the numbers.
"""
from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
from pathlib import Path
from typing import Iterator

FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}  # no space, over quota, over the file-size limit


class DiskFullError(OSError):
    """A write that the device had no room for."""


# How writers that raise no OSError of their own say it: safetensors ("… (os error 28)"), numpy's
# short writes ("N requested and M written"), and the strerror of each errno in FULL.
_FULL_WORDS = re.compile(r"os error (28|27|122)\)|No space left on device|File too large|Disk quota exceeded|"
                         r"requested and \d+ written")


def is_disk_full(err: BaseException | None) -> bool:
    """Whether `err`, or anything it was raised from, is a full device (or quota, or file-size
    limit). torch.save's C++ writer raises a RuntimeError ("unexpected pos …") whose context is
    the OSError of the Python file it wrote to."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in FULL or _FULL_WORDS.search(str(err)):
            return True
        err = err.__cause__ or err.__context__
    return False


@contextlib.contextmanager
def writing(path: str | Path, what: str) -> Iterator[None]:
    """Turn a full device during the block into one DiskFullError naming `path` and `what`."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as err:
        if is_disk_full(err):
            raise DiskFullError(errno.ENOSPC, message(path, what)) from None
        raise


def message(path: str | Path, what: str) -> str:
    free = free_bytes(path)
    room = f" ({_size(free)} free)" if free is not None else ""
    return f"no space left on the device of {path}{room} while {what}: free space, then rerun the same command to resume"


def check_free(path: str | Path, need_bytes: int, what: str) -> None:
    """Refuse, before it starts, work that will write `need_bytes` under `path` when less is free."""
    free = free_bytes(path)
    if free is not None and free < need_bytes:
        raise DiskFullError(errno.ENOSPC, f"{what} needs {_size(need_bytes)} under {path} and its device has "
                                          f"{_size(free)} free: free space (or choose another place), then rerun")


def free_bytes(path: str | Path) -> int | None:
    """Free bytes on the device of `path` (its nearest existing ancestor); None for URLs."""
    text = str(path)
    if "://" in text and not text.startswith("file://"):
        return None
    p = Path(text.removeprefix("file://")).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def save_tensors(tensors: dict, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors' `save_file`, with the file's permissions following the umask as any other
    file's would (save_file creates its files 0600: colleagues on a shared cluster could not read
    an export)."""
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)
    Path(path).chmod(0o666 & ~_umask())


def _umask() -> int:
    """This process's umask, read without changing it where /proc tells it (Linux)."""
    with contextlib.suppress(OSError, StopIteration, ValueError):
        status = Path("/proc/self/status").read_text()
        return int(next(line for line in status.splitlines() if line.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
