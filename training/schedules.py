"""Per-architecture training recipes, and the schedules that follow them step by step.

A recipe is what the reference implementation of an architecture trains with: learning rate,
warm-ups, decay, gradient clipping and the window after which a latent counts as dead. Every
value is a default that a flag overrides; the resolved values are written to sweep_config.json.
Warm-ups and decay are fractions of the run, so they keep their meaning when a run is short
(the references' own step counts are quoted beside each recipe); `short_run_note` says when a
run is too short for its schedule to mean anything.

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


@dataclass(frozen=True)
class Recipe:
    """An architecture's reference training recipe (fractions are of the run's steps)."""

    lr: float
    """Adam learning rate (for TopK-family: at 2¹⁴ latents, scaled by 1/√(d_sae/2¹⁴))."""
    lr_warmup: float
    """Fraction of the run over which the learning rate rises linearly from 0."""
    lr_decay_start: float | None
    """Fraction of the run after which the learning rate decays linearly to 0 (None: never)."""
    sparsity_warmup: float
    """Fraction of the run over which the sparsity coefficient rises linearly from 0."""
    grad_clip: float | None
    """Per-member gradient-norm clip."""
    dead_tokens: int
    """Tokens without firing after which a latent is dead (AuxK, resampling, reports)."""
    scale_lr_with_width: bool = False
    """lr ∝ 1/√(d_sae / 2¹⁴) (Gao et al. 2024)."""
    reference: str = ""

    def learning_rate(self, d_sae: int) -> float:
        return self.lr / math.sqrt(d_sae / 2**14) if self.scale_lr_with_width else self.lr


# References: dictionary_learning's trainers (lr warm-up 1000 steps, sparsity warm-up 2000 steps,
# decay over the last 20%, clip 1, on runs of ~10k–25k steps: ≈ 5% and 10%); Anthropic's
# April 2024 update and crosscoder recipe (λ warm-up 5%, decay over the last 20%, clip 1);
# Gao et al. 2024 for TopK (lr 2e-4/√(m/2¹⁴), dead after 10M tokens); Rajamanoharan et al. 2024
# / dictionary_learning for JumpReLU (lr 7e-5) and Gated (lr 5e-5); Anthropic's "Circuit Tracing"
# (2025) for the cross-layer transcoder (λ warms up over the whole run).
_L1 = Recipe(1e-3, 0.05, 0.8, 0.10, 1.0, 1_000_000, reference="dictionary_learning standard: lr 1e-3")
RECIPES = {
    "relu": _L1,
    "panneal": _L1,
    "relu_april": Recipe(1e-3, 0.0, 0.8, 0.05, 1.0, 1_000_000, reference="Anthropic April 2024 update"),
    "crosscoder": Recipe(1e-3, 0.0, 0.8, 0.05, 1.0, 1_000_000, reference="Anthropic crosscoders (Lindsey et al. 2024)"),
    "topk": Recipe(2e-4, 0.05, 0.8, 0.0, 1.0, 10_000_000, scale_lr_with_width=True, reference="Gao et al. 2024"),
    "batchtopk": Recipe(2e-4, 0.05, 0.8, 0.0, 1.0, 10_000_000, scale_lr_with_width=True, reference="Bussmann et al. 2024"),
    "matryoshka": Recipe(2e-4, 0.05, 0.8, 0.0, 1.0, 10_000_000, scale_lr_with_width=True, reference="Bussmann et al. 2025"),
    "jumprelu": Recipe(1e-3, 0.05, 0.8, 0.10, 1.0, 10_000_000,
                       reference="Rajamanoharan et al. 2024 use 7e-5; 1e-3 measured better here (bench/RESULTS.md)"),
    "jumprelu_tanh": Recipe(1e-3, 0.05, 0.8, 1.0, 1.0, 10_000_000,
                            reference="Anthropic, Circuit Tracing 2025 (schedule); 1e-3 measured better than 1e-4 here "
                                      "(bench/RESULTS.md)"),
    "gated": Recipe(1e-3, 0.05, 0.8, 0.10, 1.0, 1_000_000,
                    reference="Rajamanoharan et al. 2024a use 5e-5; 1e-3 measured better here (bench/RESULTS.md)"),
}
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
