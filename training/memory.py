"""Will a sweep fit? An estimate of the training memory of an ensemble, checked against what the
device has before anything runs (a sweep of cross-layer transcoders can need tens of GB; it
should fail in a second with the numbers, not after an hour).

    parameters, gradients and Adam's two moments   16 bytes × parameters (fp32)
    one group's forward/backward                   ~8 × 4 bytes × B × (U_g·F + E_g·O)   (pre-activations,
                                                   activations, penalty terms and their gradients; U_g units
                                                   and E_g members of the largest group, O the width a member
                                                   writes; measured 6.6 GB for a d 512 × 6-layer CLT with
                                                   8,192 features per layer at B 4,096: bench/RESULTS.md)
    batches in flight                              4 bytes × B × C × (1 + prefetch) on the host
    the evaluation after training                  the model, its spliced passes and the members' weights
                                                   (evaluation/memory.py `memory_needed`), once training's
                                                   tensors are freed

A cross-layer transcoder over L layers of width d with F latents per layer has L·d·F encoder and
d·F·L(L+1)/2 decoder weights: about (L+1)/2 times an SAE per layer. Estimates are rough (within
~30%, on the high side for TopK, whose sparse path keeps less); the check refuses only what clearly will
not fit.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from training.rules import rule_of

GiB = 2**30


PROCESS_BYTES = int(0.45 * GiB)  # Python with torch, zarr and the evaluation's libraries imported (measured: bench/RESULTS.md)


@dataclass(frozen=True)
class Estimate:
    parameters: int  # weights of every member
    state_bytes: int  # parameters + gradients + Adam moments
    activation_bytes: int  # one member group's forward/backward
    batch_bytes: int  # batches in flight (host memory)
    evaluation_bytes: int | None = None  # the evaluation that follows training (None: none, or unknown)

    @property
    def device_bytes(self) -> int:
        return self.state_bytes + self.activation_bytes

    def peak_bytes(self, device: torch.device) -> int:
        """The larger of training's and evaluation's needs on `device` (on a CPU: the whole process's)."""
        training = self.device_bytes + (self.batch_bytes + PROCESS_BYTES if device.type == "cpu" else 0)
        evaluation = (self.evaluation_bytes or 0) + (PROCESS_BYTES if device.type == "cpu" else 0)
        return max(training, evaluation)

    def describe(self, device: torch.device | None = None) -> str:
        text = (f"{self.parameters / 1e6:,.1f}M parameters: {self.state_bytes / GiB:.2f} GiB with gradients and Adam, "
                f"{self.activation_bytes / GiB:.2f} GiB for a step's activations")
        if self.evaluation_bytes is not None:
            text += f"; evaluation {self.evaluation_bytes / GiB:.2f} GiB (the model and its spliced passes)"
        if device is not None:
            text += f"; peak ≈ {self.peak_bytes(device) / GiB:.1f} GiB" + (" for the process" if device.type == "cpu" else "")
        return text


def parameter_count(members: list) -> int:
    """Weights of an ensemble of `members` (one architecture and shape; as wide as the widest),
    counted from their configurations, before any tensor exists."""
    m = members[0]
    F, G, I, O = max(x.d_sae for x in members), m.n_groups, m.unit_in, m.member_out
    decoder_columns = m.width_out * m.n_targets * (m.n_targets + 1) // 2 if m.cross_layer else O
    per_member = G * I * F + G * F + F * decoder_columns + O
    per_member += I * O if m.skip else 0
    per_member += rule_of(m.spec).floats_per_latent(G) * F
    return len(members) * per_member


def step_bytes_per_member(members: list, batch_size: int) -> int:
    """One member's forward/backward intermediates at `batch_size`: ~8 float32 tensors of its
    [B, G·F] latents and [B, O] outputs alive at once."""
    m = members[0]
    return 8 * 4 * batch_size * (m.n_groups * max(x.d_sae for x in members) + m.member_out)


def estimate(members: list, batch_size: int, group_members: int, columns: int, prefetch: int) -> Estimate:
    """The memory an ensemble of `members` needs to train, with `group_members` members per
    forward/backward group (training/ensemble.py's group_size)."""
    parameters = parameter_count(members)
    activations = min(group_members, len(members)) * step_bytes_per_member(members, batch_size)
    return Estimate(parameters, 16 * parameters, activations, 4 * batch_size * columns * (1 + prefetch))


def combine(estimates: list[Estimate]) -> Estimate:
    """Several ensembles stepped one after another on the same batches: their weights and states
    add up, only the largest group's step is alive at a time, and the batches are read once."""
    if not estimates:
        return Estimate(0, 0, 0, 0)
    return Estimate(sum(e.parameters for e in estimates), sum(e.state_bytes for e in estimates),
                    max(e.activation_bytes for e in estimates), max(e.batch_bytes for e in estimates))


def available_bytes(device: torch.device) -> int | None:
    """Free memory of the device (a CUDA GPU's, or the host's MemAvailable); None if unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_fits(need: Estimate, device: torch.device, n_members: int) -> None:
    """Refuse, with the numbers and the ways out, a sweep that clearly will not fit."""
    free = available_bytes(device)
    total = need.peak_bytes(device) - (PROCESS_BYTES if device.type == "cpu" else 0)  # the process already runs
    if free is None or total <= 0.9 * free:
        return
    if need.evaluation_bytes and need.evaluation_bytes > need.device_bytes:
        raise ValueError(f"the evaluation after training needs about {total / GiB:.1f} GiB on {device} ({need.describe()}) "
                         f"and {free / GiB:.1f} GiB are free: evaluate fewer --eval_sequences or a smaller "
                         "--eval_batch_size, or train with --no_eval and evaluate elsewhere")
    per_member = need.state_bytes / max(n_members, 1)
    fit = max(0, math.floor((0.9 * free - need.activation_bytes) / per_member))
    raise ValueError(
        f"this sweep needs about {total / GiB:.1f} GiB on {device} ({need.describe()}) and {free / GiB:.1f} GiB are free: "
        f"train at most {fit} members at a time, fewer latents (--ratio/--d_sae), a smaller --batch_size, "
        "or split the members over several processes with torchrun")
