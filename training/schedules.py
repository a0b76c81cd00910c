"""The schedules that follow each architecture's recipe (training/members.py) step by step.

Every recipe value is a default that a flag overrides; the resolved values are written to
sweep_config.json. Warm-ups and decay are fractions of the run, so they keep their meaning when a
run is short; `short_run_note` says when a run is too short for its schedule to mean anything.

Schedules are functions of the step alone, so a resumed run follows the same schedule:
  lr_t       = lr · min(1, (t+1)/warm-up) · (linear decay to 0 from decay_start·T)
  λ_t        = λ · min(1, (t+1)/sparsity warm-up)
  k_t        = k annealed linearly from d_in (at most d_sae) over `k_anneal_steps`
  p_t        = p-annealing: from 1 to p_end in `p_anneal_updates` equal steps from p_anneal_start·T
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


MIN_STEPS = 300  # below this, no schedule of any recipe means much


@dataclass(frozen=True)
class Schedule:
    """The resolved per-step schedule of one run (what `apply_` follows)."""

    total_steps: int
    lr_warmup_steps: int = 0
    lr_decay_start: float | None = None
    sparsity_warmup_steps: int = 0
    k_anneal_steps: int = 0
    p_anneal_start: float = 0.2
    p_anneal_updates: int = 10

    def lr_scale(self, step: int) -> float:
        scale = min(1.0, (step + 1) / self.lr_warmup_steps) if self.lr_warmup_steps else 1.0
        if self.lr_decay_start is not None and self.lr_decay_start < 1:
            decay_from = self.lr_decay_start * self.total_steps
            if step >= decay_from:
                scale *= max(0.0, (self.total_steps - step) / max(self.total_steps - decay_from, 1))
        return scale

    def sparsity_scale(self, step: int) -> float:
        return min(1.0, (step + 1) / self.sparsity_warmup_steps) if self.sparsity_warmup_steps else 1.0

    def apply_(self, ensemble, step: int) -> None:
        """Set this step's learning-rate factor, sparsity factor, annealed k and p."""
        ensemble.optimizer.lr_scale = self.lr_scale(step)
        dictionary = ensemble.dictionary
        dictionary.sparsity_scale.fill_(self.sparsity_scale(step))
        if self.k_anneal_steps:
            start_E = torch.full_like(dictionary.k, min(dictionary.I, dictionary.W_enc.shape[2]))
            start_E = torch.maximum(start_E, dictionary.k)
            progress = min(1.0, step / self.k_anneal_steps)
            dictionary.k_active.copy_(torch.round(start_E + (dictionary.k - start_E) * progress).long())
        if dictionary.spec.penalty == "lp":
            updates = p_updates_done(step, self.total_steps, self.p_anneal_start, self.p_anneal_updates)
            dictionary.p_active.copy_(1 + (dictionary.p_end - 1) * updates / self.p_anneal_updates)


def p_updates_done(step: int, total: int, start: float, n_updates: int) -> int:
    """How many of the p-annealing steps have happened by `step`: they fall at
    start·total + j·(1 − start)·total / n_updates for j = 0 … n_updates − 1."""
    first = start * total
    if step < first:
        return 0
    return min(n_updates, int((step - first) // ((total - first) / n_updates)) + 1)


def short_run_note(arch: str, schedule: Schedule, batch_size: int, train_rows: int) -> str | None:
    """One line when the run is too short for its schedule to mean anything, with the fix."""
    T = schedule.total_steps
    problems = []
    if T < MIN_STEPS:
        problems.append(f"{T} steps (fewer than {MIN_STEPS})")
    for name, steps in (("lr warm-up", schedule.lr_warmup_steps), ("sparsity warm-up", schedule.sparsity_warmup_steps)):
        if 0 < steps < 10:
            problems.append(f"a {name} of {steps} steps")
    if not problems:
        return None
    need = max(MIN_STEPS, T)
    fix = (f"--n_epochs {math.ceil(need * batch_size / max(train_rows, 1))}" if T < MIN_STEPS else "--n_epochs"
           ) + f", a smaller --batch_size (now {batch_size}) or a store with more tokens"
    return f"note: this {arch} run is short for its schedule ({', '.join(problems)}); train longer: {fix}"
