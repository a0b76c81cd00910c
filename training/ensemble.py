"""Train E dictionaries as one: stacked parameters, one batched step, per-member optimiser knobs.

Every member reads the same batch, so reading and moving data is paid once for E dictionaries.
The members' losses are summed before backward: member e's parameters only enter its own loss,
so each gets exactly the gradient it would get alone. Adam is elementwise, so one Adam over
[E, ...] tensors is E independent Adams; `BatchedAdam` adds a per-member learning rate (a [E]
tensor), which torch.optim.Adam cannot give to slices of one tensor.
Invariant (tested): member e of an ensemble equals the same configuration trained alone.
"""
from __future__ import annotations

import torch
from torch import nn

from training.dictionary import LossOutput, MemberConfig, build_dictionary


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

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def state_dict(self) -> dict:
        return {"step_count": self.step_count, "exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq}

    def load_state_dict(self, state: dict) -> None:
        self.step_count = state["step_count"]
        for mine, saved in zip(self.exp_avg + self.exp_avg_sq, state["exp_avg"] + state["exp_avg_sq"]):
            mine.copy_(saved)


class Ensemble:
    """E members of one architecture and width, trained together on shared batches."""

    def __init__(self, members: list[MemberConfig], device: str | torch.device = "cpu"):
        self.members = list(members)
        self.dictionary = build_dictionary(self.members).to(device)
        lr_E = torch.tensor([m.lr for m in self.members], device=device)
        self.optimizer = BatchedAdam(list(self.dictionary.parameters()), lr_E)

    def __len__(self) -> int:
        return len(self.members)

    def step(self, x_BD: torch.Tensor) -> LossOutput:
        """One optimisation step of every member on the batch x [B, D]."""
        out = self.dictionary.loss(x_BD)
        self.optimizer.zero_grad()
        out.total.sum().backward()
        self.dictionary.before_step_()
        self.optimizer.step()
        self.dictionary.after_step_()
        return out

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
