"""Fine-tune a suite with its connections fixed:

    L = Σ_modules (MSE + AuxK/32)  +  c · Σ_transcoders pruned-MSE

MSEs in each target's normalised units; the pruned MSE is each transcoder's output from its
pruned pre-activations (suite/model.py) against the MLP's output. Gradients reach the upstream
decoders and encoders through the virtual weights and the upstream latents, so the suite trains
as one model: Adam per module (the ensembles' batched Adam, every module's own moments), unit-norm
decoders kept, dead-latent statistics applied after each step. The learning rate warms up over the
first 5% of steps and decays linearly over the last 20%. Checkpoints every `checkpoint_every`
steps (and at the end); a rerun resumes from the last one and reaches the same weights.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from suite.config import FinetuneSettings
from suite.model import Suite, active_latents
from training.ensemble import BatchedAdam
from training.schedules import Schedule

CHECKPOINT = "checkpoint.pt"


@dataclass
class _State:
    step: int = 0
    last_total: float = float("nan")
    last_pruned: float = float("nan")


def losses(suite: Suite, x_BC: torch.Tensor, embed_Bd: torch.Tensor, indices: list[torch.Tensor], c: float):
    """(total loss, vanilla-loss sum, pruned-MSE sum, the two ensembles' loss outputs) of a batch."""
    attn_out, mlp_out = suite.vanilla(x_BC)
    codes = suite.dense_codes(attn_out, mlp_out)
    pruned = x_BC.new_zeros(())
    for m in range(suite.layout.n_layers):
        active, alive = active_latents(mlp_out, m)
        pre = suite.pruned_pre(m, codes, suite.sigma(x_BC, m), embed_Bd, indices[m], active)
        pruned = pruned + suite.pruned_mse(m, suite.pruned_output(m, pre, active, alive), x_BC)
    vanilla = attn_out.total.sum() + mlp_out.total.sum()
    return vanilla + c * pruned, vanilla, pruned, attn_out, mlp_out


def finetune(suite: Suite, settings: FinetuneSettings, batches: Callable[[int], object], embed: Callable,
             indices: list[torch.Tensor], directory: Path, checkpoint_every: int = 50) -> Suite:
    """Train `suite` in place for `settings.steps` steps (resuming from `directory`'s checkpoint)."""
    directory.mkdir(parents=True, exist_ok=True)
    optimizers = [BatchedAdam(list(d.parameters()), torch.full((len(d.members),), settings.lr, device=d.W_enc.device),
                              betas=d.spec.betas) for d in (suite.attn, suite.mlp)]
    state = _State()
    if (directory / CHECKPOINT).exists():
        saved = torch.load(directory / CHECKPOINT, weights_only=False)
        suite.load_state_dict(saved["suite"])
        for optimizer, opt_state in zip(optimizers, saved["optimizers"]):
            optimizer.load_state_dict(opt_state)
        state = _State(**saved["state"])
    schedule = Schedule(settings.steps, lr_warmup_steps=round(0.05 * settings.steps), lr_decay_start=0.8)
    bar = tqdm(total=settings.steps, initial=state.step, desc=f"fine-tuning {settings.name}", unit="step")
    for x_BC, ids in batches(state.step):
        if state.step >= settings.steps:
            break
        for optimizer in optimizers:
            optimizer.lr_scale = schedule.lr_scale(state.step)
        total, _, pruned, attn_out, mlp_out = losses(suite, x_BC, embed(ids), indices, settings.c)
        for p in suite.parameters():
            p.grad = None
        total.backward()
        for d, optimizer in zip((suite.attn, suite.mlp), optimizers):
            d.before_step_()
            optimizer.step()
            d.after_step_()
        suite.attn.observe_(attn_out.stats, len(x_BC))
        suite.mlp.observe_(mlp_out.stats, len(x_BC))
        state.step += 1
        state.last_total, state.last_pruned = total.item(), pruned.item()
        bar.update()
        bar.set_postfix_str(f"loss {state.last_total:.4f} pruned MSE {state.last_pruned:.4f}")
        if state.step % checkpoint_every == 0 or state.step == settings.steps:
            _save(directory / CHECKPOINT, suite, optimizers, state)
    bar.close()
    return suite


def _save(path: Path, suite: Suite, optimizers: list[BatchedAdam], state: _State) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"suite": suite.state_dict(), "optimizers": [o.state_dict() for o in optimizers], "state": asdict(state)}, tmp)
    os.replace(tmp, path)
