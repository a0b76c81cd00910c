"""Sparse dictionaries with a leading member axis: E dictionaries in one set of tensors.

Dimension key: B batch, D d_in, F d_sae, E members.

ReLU SAE (Towards Monosemanticity; Bricken et al. 2023), per member e:

    f  = ReLU((x − b_dec) W_enc + b_enc)          # [B, F]
    x̂  = f W_dec + b_dec                           # [B, D]
    L  = mean_{b,d} (x̂ − x)² + λ_e · mean_b Σ_i f_i

with the rows of W_dec kept at unit norm (the gradient is projected onto the rows' tangent
space before the step, and rows are renormalised after it). The reconstruction term is averaged
over d: λ from a loss that sums over d is λ_sum = λ · d. Members differ only in the values of
their knobs (λ, seed, lr), which live in tensors with a leading [E] axis, so one batched
forward/backward trains all of them. Not here yet: other architectures, resampling.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
from torch import nn

ARCHITECTURES = ("relu",)
LOSS_CONVENTION = "mse_mean_over_d+l1_sum_over_latents_mean_over_batch"


@dataclass(frozen=True)
class MemberConfig:
    """One dictionary of a sweep."""

    d_in: int
    """Width of the activations it reads."""
    d_sae: int
    """Number of latents."""
    l1_coeff: float
    """λ in L = mean_{b,d}(x̂−x)² + λ·mean_b Σ_i f_i (activations normalised to mean norm √d)."""
    lr: float = 1e-4
    """Adam learning rate."""
    seed: int = 0
    """Seed of this member's initialisation."""
    arch: str = "relu"
    """Architecture; one of ARCHITECTURES."""

    def __post_init__(self):
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {self.arch!r}; choose one of {', '.join(ARCHITECTURES)}")
        if self.d_in < 1 or self.d_sae < 1:
            raise ValueError(f"dictionary widths must be positive (d_in={self.d_in}, d_sae={self.d_sae})")
        if self.l1_coeff < 0 or not math.isfinite(self.l1_coeff):
            raise ValueError(f"l1_coeff must be a finite number ≥ 0, got {self.l1_coeff}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")

    def to_dict(self) -> dict:
        return asdict(self)


class LossOutput(NamedTuple):
    total: torch.Tensor  # [E] the loss each member minimises
    mse: torch.Tensor  # [E] mean over batch and d of (x̂ − x)²
    sparsity: torch.Tensor  # [E] mean over batch of Σ_i f_i
    l0: torch.Tensor  # [E] mean over batch of #{f_i > 0}
    f: torch.Tensor  # [E, B, F]
    x_hat: torch.Tensor  # [E, B, D]


class ReluDictionary(nn.Module):
    """E ReLU SAEs of one width as stacked parameters."""

    def __init__(self, members: list[MemberConfig]):
        super().__init__()
        _check_same(members, "d_in", "d_sae", "arch")
        E, D, F = len(members), members[0].d_in, members[0].d_sae
        self.members = list(members)
        self.W_enc = nn.Parameter(torch.empty(E, D, F))
        self.b_enc = nn.Parameter(torch.zeros(E, F))
        self.W_dec = nn.Parameter(torch.empty(E, F, D))
        self.b_dec = nn.Parameter(torch.zeros(E, D))
        self.register_buffer("l1_coeff", torch.tensor([m.l1_coeff for m in members]))
        with torch.no_grad():
            for e, member in enumerate(members):
                W_dec_FD = init_decoder(F, D, member.seed)
                self.W_dec[e] = W_dec_FD
                # Encoder = decoder transpose, scaled so x̂ ≈ x at the start: for random unit rows w,
                # E[ReLU(w·x) w] = x / (2D), so F latents sum to F/(2D) · x.
                self.W_enc[e] = W_dec_FD.T * (2 * D / F)

    def encode(self, x_BD: torch.Tensor) -> torch.Tensor:
        """Latent activations of every member.  x [B, D] → f [E, B, F]"""
        return torch.relu(self._pre_activation(x_BD))

    def _pre_activation(self, x_BD: torch.Tensor) -> torch.Tensor:
        # (x − b_dec) W_enc + b_enc = x W_enc + (b_enc − b_dec W_enc): folding b_dec into the bias
        # keeps the batch-sized product free of b_dec, so its gradient costs a vector product,
        # not a third [B, F] × [F, D] matmul.
        bias_E1F = self.b_enc.unsqueeze(1) - torch.bmm(self.b_dec.unsqueeze(1), self.W_enc)
        E, B = self.W_enc.shape[0], x_BD.shape[0]
        return torch.baddbmm(bias_E1F, x_BD.expand(E, B, -1), self.W_enc)  # [E, B, F]

    def decode(self, f_EBF: torch.Tensor) -> torch.Tensor:
        """Reconstructions.  f [E, B, F] → x̂ [E, B, D]"""
        return torch.baddbmm(self.b_dec.unsqueeze(1), f_EBF, self.W_dec)

    def reconstruct(self, x_BD: torch.Tensor) -> torch.Tensor:
        """x [B, D] → x̂ [E, B, D]"""
        return self.decode(self.encode(x_BD))

    def forward(self, x_BD: torch.Tensor) -> LossOutput:
        """The training objective (what `torch.func.functional_call` evaluates)."""
        return self.loss(x_BD)

    def loss(self, x_BD: torch.Tensor) -> LossOutput:
        f_EBF = self.encode(x_BD)
        x_hat_EBD = self.decode(f_EBF)
        mse_E = (x_hat_EBD - x_BD).pow(2).mean(dim=(1, 2))
        sparsity_E = f_EBF.sum(-1).mean(-1)
        l0_E = (f_EBF > 0).float().sum(-1).mean(-1)
        return LossOutput(mse_E + self.l1_coeff * sparsity_E, mse_E, sparsity_E, l0_E, f_EBF, x_hat_EBD)

    @torch.no_grad()
    def init_b_dec_(self, mean_D: torch.Tensor) -> None:
        """Start every member's b_dec at the data mean, so encoders see centred inputs from step 0
        (large constant directions, as in Gemma's residual stream, otherwise dominate early FVU)."""
        self.b_dec.copy_(mean_D.expand_as(self.b_dec))

    @torch.no_grad()
    def before_step_(self) -> None:
        """Remove from each decoder row's gradient its component along the row (unit-norm constraint)."""
        g = self.W_dec.grad
        if g is not None:
            g -= (g * self.W_dec).sum(-1, keepdim=True) * self.W_dec

    @torch.no_grad()
    def after_step_(self) -> None:
        """Renormalise decoder rows to unit norm."""
        self.W_dec /= self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    @torch.no_grad()
    def member_tensors(self, e: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
        """Member e's weights in SAELens names, for raw activations x_raw = scale · x.

        The pre-activation is invariant: (x_raw − s·b_dec)(W_enc / s) + b_enc equals the
        normalised one, and the reconstruction scales by s.
        """
        return {
            "W_enc": (self.W_enc[e] / scale).contiguous(),
            "b_enc": self.b_enc[e].clone(),
            "W_dec": (self.W_dec[e] * scale).contiguous(),
            "b_dec": (self.b_dec[e] * scale).clone(),
        }

    def saelens_architecture(self, e: int) -> dict:
        """The architecture-specific part of member e's SAELens cfg.json."""
        return {"architecture": "standard", "apply_b_dec_to_input": True}


def init_decoder(d_sae: int, d_in: int, seed: int) -> torch.Tensor:
    """Random unit-norm decoder rows, from this member's own generator (so a member's init does
    not depend on its neighbours in the ensemble).  → [F, D]"""
    generator = torch.Generator().manual_seed(seed)
    W = torch.randn(d_sae, d_in, generator=generator)
    return W / W.norm(dim=-1, keepdim=True)


def build_dictionary(members: list[MemberConfig]) -> ReluDictionary:
    """The stacked dictionary for `members` (all of one architecture and width)."""
    return ReluDictionary(members)


def _check_same(members: list[MemberConfig], *fields: str) -> None:
    if not members:
        raise ValueError("an ensemble needs at least one member")
    for name in fields:
        values = {getattr(m, name) for m in members}
        if len(values) > 1:
            raise ValueError(f"members of one ensemble must share {name}; got {sorted(values)}")
