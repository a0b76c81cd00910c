"""Check a device string before any work starts, so a typo or a missing GPU is one clear line."""
from __future__ import annotations


def check_device(device: str) -> str:
    """Return `device` if torch can use it here; raise ValueError saying what to use instead.
    The CPU needs no check, and no torch import (the CLIs' quick refusals stay quick)."""
    if device == "cpu":
        return device
    import torch

    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device!r} is not a device name: use cpu, cuda, cuda:1 or mps") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: this torch build or machine has no CUDA GPU; use --device cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {device}: MPS is not available here; use --device cpu")
    return device
