"""Train E dictionaries as one: stacked parameters, one batched step, per-member optimiser knobs.

Every member reads the same batch, so reading and moving data is paid once for E dictionaries.
The members' losses are summed before backward: member e's parameters only enter its own loss,
so each gets exactly the gradient it would get alone. Adam is elementwise, so one Adam over
[E, ...] tensors is E independent Adams; `BatchedAdam` adds a per-member learning rate (a [E]
tensor), which torch.optim.Adam cannot give to slices of one tensor.
Invariant (tested): member e of an ensemble equals the same configuration trained alone.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn
from torch.func import functional_call

from training.dictionary import MemberConfig, build_dictionary


class BatchedAdam:
    """Adam over parameters with a leading member axis and a per-member learning rate.

    Update per element (Kingma & Ba 2015): m ← β1 m + (1−β1) g; v ← β2 v + (1−β2) g²;
    p ← p − lr_e · m̂ / (√v̂ + ε) with bias-corrected m̂, v̂.
    """

    def __init__(self, params: list[nn.Parameter], lr_E: torch.Tensor, betas=(0.9, 0.99), eps: float = 1e-8):
        self.params = params
        self.lr_E = lr_E
        self.betas = betas
        self.eps = eps
        self.step_count = 0
        self.exp_avg = [torch.zeros_like(p) for p in params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in params]

    @torch.no_grad()
    def step(self) -> None:
        self.step_count += 1
        beta1, beta2 = self.betas
        bias1 = 1 - beta1**self.step_count
        bias2 = 1 - beta2**self.step_count
        for p, m, v in zip(self.params, self.exp_avg, self.exp_avg_sq):
            if p.grad is None:
                continue
            m.lerp_(p.grad, 1 - beta1)
            v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
            denom = (v / bias2).sqrt_().add_(self.eps)
            lr = (self.lr_E / bias1).view(-1, *([1] * (p.dim() - 1)))  # [E, 1, ...]
            p.addcdiv_(m * lr, denom, value=-1.0)

    def state_dict(self) -> dict:
        return {"step_count": self.step_count, "exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq}

    def load_state_dict(self, state: dict) -> None:
        self.step_count = state["step_count"]
        for mine, saved in zip(self.exp_avg + self.exp_avg_sq, state["exp_avg"] + state["exp_avg_sq"]):
            mine.copy_(saved)


class StepOutput(NamedTuple):
    """What one step reports per member (no batch-sized tensors)."""

    total: torch.Tensor  # [E]
    mse: torch.Tensor  # [E]
    sparsity: torch.Tensor  # [E]
    l0: torch.Tensor  # [E]
    fired: torch.Tensor  # [E, F] bool: latent fired on some row of the batch


class Ensemble:
    """E members of one architecture and width, trained together on shared batches.

    The forward/backward runs over groups of `member_chunk` members at a time (the optimiser
    step always covers all of them). On a GPU one group of all members fills the device best;
    on a CPU the [E, B, F] intermediates of a whole ensemble overflow the caches, and groups of
    a few members (about 64 MB of activations each, the default there) run faster. The result
    does not depend on the grouping: members never interact.
    """

    def __init__(self, members: list[MemberConfig], device: str | torch.device = "cpu", member_chunk: int | None = None):
        self.members = list(members)
        self.device = torch.device(device)
        self.dictionary = build_dictionary(self.members).to(self.device)
        self.member_chunk = member_chunk
        lr_E = torch.tensor([m.lr for m in self.members], device=self.device)
        self.optimizer = BatchedAdam(list(self.dictionary.parameters()), lr_E)

    def __len__(self) -> int:
        return len(self.members)

    def step(self, x_BD: torch.Tensor) -> StepOutput:
        """One optimisation step of every member on the batch x [B, D]."""
        params = dict(self.dictionary.named_parameters())
        buffers = dict(self.dictionary.named_buffers())
        for p in params.values():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        outputs = []
        for group in self._groups(len(x_BD)):
            # Detached slices are leaves of their own: the backward of one group writes only
            # that group's gradients, with no full-size zero-filled gradient per group.
            leaves = {n: p[group].detach().requires_grad_() for n, p in params.items()}
            out = functional_call(self.dictionary, ({**leaves, **{n: b[group] for n, b in buffers.items()}},), (x_BD,))
            grads = torch.autograd.grad(out.total.sum(), list(leaves.values()))
            for p, g in zip(params.values(), grads):
                p.grad[group] = g
            outputs.append(StepOutput(out.total.detach(), out.mse.detach(), out.sparsity.detach(), out.l0.detach(),
                                      (out.f > 0).any(dim=1)))
        self.dictionary.before_step_()
        self.optimizer.step()
        self.dictionary.after_step_()
        return StepOutput(*(torch.cat(parts) for parts in zip(*outputs)))

    def _groups(self, batch_size: int) -> list[slice]:
        E = len(self.members)
        chunk = self.member_chunk
        if chunk is None:
            if self.device.type == "cuda":
                chunk = E
            else:
                bytes_per_member = batch_size * self.members[0].d_sae * 4
                chunk = max(1, (64 * 2**20) // bytes_per_member)
        return [slice(i, min(i + chunk, E)) for i in range(0, E, chunk)]

    def state_dict(self) -> dict:
        return {
            "members": [m.to_dict() for m in self.members],
            "dictionary": self.dictionary.state_dict(),
            "optimizer": self.optimizer.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        saved = [MemberConfig(**m) for m in state["members"]]
        if saved != self.members:
            raise ValueError("checkpoint was written for other members than this sweep's")
        self.dictionary.load_state_dict(state["dictionary"])
        self.optimizer.load_state_dict(state["optimizer"])
