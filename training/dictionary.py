"""Sparse dictionaries with a leading member axis: E dictionaries of one architecture in one set
of tensors, differing only in the values of their knobs.

Dimension key: B batch, D the width a member reads (n_sources × d_in), F d_sae, E members.

Every architecture is the same mechanism with different parameters (see ARCHS):

    pre = (x − b_dec) W_enc + b_enc        (x W_enc + b_enc where `subtract_b_dec` is off)
    f   = activation(pre)                  relu | topk | batchtopk | jumprelu | gated
    x̂   = f W_dec + b_dec
    L   = mean_{b,d} (x̂ − x)² + c · s_t · r_t · penalty(f) + α · AuxK (+ the gated auxiliary loss)

    relu        penalty mean_b Σ_i f_i, unit-norm decoder rows (Bricken et al. 2023)
    relu_april  penalty mean_b Σ_i f_i ‖W_dec,i‖, free decoder norms (Anthropic, April 2024)
    topk        f = the k largest of ReLU(pre) per row; AuxK on dead latents (Gao et al. 2024)
    batchtopk   the k·B largest of ReLU(pre) over the batch; inference threshold θ = EMA of the
                smallest kept value, exported as JumpReLU (Bussmann et al. 2024)
    jumprelu    f = z·H(z − θ), θ > 0 learned through a straight-through estimator with a
                rectangle kernel of bandwidth ε; penalty L0 (Rajamanoharan et al. 2024)
    matryoshka  BatchTopK whose reconstruction loss is averaged over nested prefixes of the
                latents (the first m_1 < … < m_G = F), so early latents stand on their own;
                exported as JumpReLU like BatchTopK (Bussmann et al. 2025; Nabeshima 2025)
    gated       pre is the gate π; f = H(π) · ReLU((π − b_gate) e^{r_mag} + b_mag) (one W_enc for
                both paths); penalty mean_b Σ ReLU(π)_i, plus the reconstruction from ReLU(π)
                through a detached decoder; unit-norm decoder (Rajamanoharan et al. 2024a)
    panneal     as relu with penalty mean_b Σ f_i^p, p stepped from 1 towards p_end by the
                trainer; when p changes, r_t is rescaled so the penalty keeps its recent size
                (Karvonen et al. 2024)

c is the member's l1_coeff or l0_coeff, s_t a schedule factor (sparsity warm-up) set by the
trainer, r_t the p-annealing rescale (1 elsewhere).

Width sweeps: members may differ in d_sae. The tensors are as wide as the widest member and a
[E, F] mask zeroes each member's latents beyond its own width (pre-activations and activations),
so those latents never fire, get no gradient and are sliced off at export.

Crosscoders (Lindsey et al. 2024): a member reading S sources (layers × models) sees their
concatenation, x = [x_1 … x_S], D = S·d_in wide, so W_enc [D, F] is W_enc [S, d_in, F] and W_dec
[F, D] is W_dec [F, S, d_in] laid flat. `crosscoder` is relu_april with its decoder norm taken per
source and summed, penalty mean_b Σ_i f_i Σ_s ‖W_dec[i, s]‖, and each source's decoder vector
initialised at norm decoder_init_norm; the other activations work over S sources unchanged (a
BatchTopK crosscoder is `batchtopk` over several sources). With S = 1 every formula is the SAE's. Unit-norm decoders: the gradient is projected onto each row's tangent space before the
step and rows are renormalised after it. The reconstruction term is averaged over d (λ from a
loss summed over d: λ_sum = λ · d).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F_
from torch import nn

LOSS_CONVENTION = "mse_mean_over_d+penalty_sum_over_latents_mean_over_batch"


@dataclass(frozen=True)
class ArchSpec:
    """What distinguishes one architecture from another: flags, not code."""

    activation: str  # relu | topk | batchtopk | jumprelu | gated
    penalty: str  # l1 | l1_decoder_norm | l1_gate | lp | l0 | none
    subtract_b_dec: bool  # encode x − b_dec (SAELens apply_b_dec_to_input)
    unit_norm_decoder: bool
    aux_k: bool  # AuxK loss on dead latents
    saelens: str  # architecture name of the export
    knobs: tuple[str, ...]  # MemberConfig fields this architecture reads (what a sweep may vary)
    betas: tuple[float, float] = (0.9, 0.99)  # Adam betas shared by the ensemble
    nested: bool = False  # reconstruction loss averaged over nested prefixes of the latents (Matryoshka)

    @property
    def resamples(self) -> bool:
        """Dead latents are resampled (Anthropic 2023) in the L1 family; the TopK family has
        AuxK and JumpReLU its thresholds instead."""
        return self.penalty in ("l1", "l1_decoder_norm", "l1_gate", "lp")


_COMMON = ("lr", "seed", "grad_clip", "d_sae")
ARCHS = {
    "relu": ArchSpec("relu", "l1", True, True, False, "standard", ("l1_coeff", *_COMMON)),
    "relu_april": ArchSpec("relu", "l1_decoder_norm", False, False, False, "standard",
                           ("l1_coeff", "decoder_init_norm", *_COMMON), (0.9, 0.999)),
    "topk": ArchSpec("topk", "none", True, True, True, "topk", ("k", "aux_coeff", *_COMMON), (0.9, 0.999)),
    "batchtopk": ArchSpec("batchtopk", "none", True, True, True, "jumprelu", ("k", "aux_coeff", *_COMMON), (0.9, 0.999)),
    "jumprelu": ArchSpec("jumprelu", "l0", False, False, False, "jumprelu",
                         ("l0_coeff", "bandwidth", "threshold_init", *_COMMON), (0.0, 0.999)),
    "matryoshka": ArchSpec("batchtopk", "none", True, True, True, "jumprelu", ("k", "aux_coeff", *_COMMON),
                           (0.9, 0.999), nested=True),
    "gated": ArchSpec("gated", "l1_gate", True, True, False, "gated", ("l1_coeff", *_COMMON), (0.0, 0.999)),
    "panneal": ArchSpec("relu", "lp", True, True, False, "standard", ("l1_coeff", "p_end", *_COMMON), (0.9, 0.999)),
    "crosscoder": ArchSpec("relu", "l1_decoder_norm", False, False, False, "standard",
                           ("l1_coeff", "decoder_init_norm", *_COMMON), (0.9, 0.999)),
}
PENALTY_QUEUE = 10  # recent penalties p-annealing rescales λ against


@dataclass(frozen=True)
class MemberConfig:
    """One dictionary of a sweep."""

    d_in: int
    """Width of each source it reads."""
    d_sae: int
    """Number of latents."""
    arch: str = "relu"
    """Architecture; one of ARCHS."""
    n_sources: int = 1
    """Sources read side by side (a crosscoder's layers × models); the input is S·d_in wide."""
    l1_coeff: float = 0.0
    """λ of the L1 penalties (relu, relu_april), on activations normalised to mean norm √d."""
    l0_coeff: float = 0.0
    """λ of the L0 penalty (jumprelu)."""
    k: int = 32
    """Active latents per row (topk), or per row on average over the batch (batchtopk)."""
    bandwidth: float = 1e-3
    """Rectangle-kernel width ε of the JumpReLU straight-through estimator."""
    threshold_init: float = 1e-3
    """Initial JumpReLU threshold θ."""
    aux_coeff: float = 1 / 32
    """α of the AuxK loss (topk, batchtopk)."""
    aux_k: int | None = None
    """Dead latents AuxK reconstructs from; default d_in // 2."""
    p_end: float = 0.2
    """Final exponent of the Lp penalty (panneal), reached in steps from p = 1."""
    decoder_init_norm: float = 0.1
    """Initial norm of each source's decoder vector where norms are free (relu_april, crosscoder)."""
    group_fractions: tuple[float, ...] = (1 / 32, 1 / 16, 1 / 8, 1 / 4)
    """Matryoshka: sizes of the nested groups as fractions of d_sae; the rest is the last group."""
    lr: float = 1e-4
    """Adam learning rate."""
    grad_clip: float | None = None
    """Clip this member's gradient norm (over all its parameters) to this value."""
    seed: int = 0
    """Seed of this member's initialisation."""

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ValueError(f"unknown architecture {self.arch!r}; choose one of {', '.join(ARCHS)}")
        if self.d_in < 1 or self.d_sae < 1 or self.n_sources < 1:
            raise ValueError(f"dictionary widths must be positive (d_in={self.d_in}, d_sae={self.d_sae}, "
                             f"n_sources={self.n_sources})")
        if self.n_sources > 1 and self.arch == "gated":
            raise ValueError("gated has no multi-source (crosscoder) form; use crosscoder, batchtopk, topk or jumprelu")
        for name in ("l1_coeff", "l0_coeff", "aux_coeff"):
            value = getattr(self, name)
            if value < 0 or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number ≥ 0, got {value}")
        if "k" in self.spec.knobs and not 1 <= self.k <= self.d_sae:
            raise ValueError(f"k must be between 1 and d_sae={self.d_sae}, got {self.k}")
        for name in ("lr", "bandwidth", "threshold_init", "decoder_init_norm"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0 < self.p_end <= 1:
            raise ValueError(f"p_end must be in (0, 1], got {self.p_end}")
        if any(f <= 0 for f in self.group_fractions) or sum(self.group_fractions) >= 1:
            raise ValueError(f"group_fractions must be positive and sum below 1, got {self.group_fractions}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ValueError(f"grad_clip must be positive, got {self.grad_clip}")

    @property
    def spec(self) -> ArchSpec:
        return ARCHS[self.arch]

    def to_dict(self) -> dict:
        return asdict(self)


class LossOutput(NamedTuple):
    total: torch.Tensor  # [E] the loss each member minimises
    mse: torch.Tensor  # [E] mean over batch and d of (x̂ − x)²
    sparsity: torch.Tensor  # [E] the penalty before its coefficient (L1, L0 or 0)
    l0: torch.Tensor  # [E] mean over batch of #{f_i > 0}
    f: torch.Tensor | None  # [E, B, F]; None where only the active latents are materialised (topk)
    x_hat: torch.Tensor  # [E, B, D]


class Dictionary(nn.Module):
    """E sparse dictionaries of one architecture as stacked parameters, as wide as the widest."""

    def __init__(self, members: list[MemberConfig], aux_dead_tokens: int = 10_000_000, threshold_start_step: int = 1000):
        """`aux_dead_tokens`: tokens without firing after which AuxK counts a latent dead;
        `threshold_start_step`: step from which BatchTopK's inference threshold is averaged."""
        super().__init__()
        _check_same(members, "d_in", "n_sources", "arch", "aux_k", "group_fractions")
        self.n_sources = S = members[0].n_sources
        E, D, F = len(members), S * members[0].d_in, max(m.d_sae for m in members)
        self.members = list(members)
        self.spec = members[0].spec
        if self.spec.nested and len({m.d_sae for m in members}) > 1:
            raise ValueError("matryoshka members must share d_sae (its groups are fractions of it); "
                             "train each width in its own run")
        self.aux_k = members[0].aux_k or max(1, D // 2)
        self.aux_dead_tokens = aux_dead_tokens
        self.threshold_start_step = threshold_start_step
        self.W_enc = nn.Parameter(torch.empty(E, D, F))
        self.b_enc = nn.Parameter(torch.zeros(E, F))  # b_gate for gated
        self.W_dec = nn.Parameter(torch.empty(E, F, D))
        self.b_dec = nn.Parameter(torch.zeros(E, D))
        if self.spec.activation == "jumprelu":
            # θ is trained directly (clamped positive after each step): Adam then moves it by ~lr
            # per step, on the scale of the normalised activations; a log-parameter would crawl.
            theta_E = torch.tensor([m.threshold_init for m in members])
            self.jump_threshold = nn.Parameter(theta_E.unsqueeze(1).repeat(1, F))
        if self.spec.activation == "gated":
            self.r_mag = nn.Parameter(torch.zeros(E, F))  # magnitude path: W_enc ⊙ exp(r_mag)
            self.b_mag = nn.Parameter(torch.zeros(E, F))
        for knob in ("l1_coeff", "l0_coeff", "k", "bandwidth", "aux_coeff", "p_end"):
            dtype = torch.long if knob == "k" else torch.float32
            self.register_buffer(knob, torch.tensor([getattr(m, knob) for m in members], dtype=dtype))
        self.register_buffer("sparsity_scale", torch.ones(E))  # schedule factor, set by the trainer
        self.register_buffer("k_active", self.k.clone())  # k in force this step (k annealing), set by the trainer
        self.register_buffer("p_active", torch.ones(E))  # Lp exponent in force (p-annealing), set by the trainer
        self.register_buffer("p_previous", torch.ones(E))  # exponent of the previous step
        self.register_buffer("coeff_rescale", torch.ones(E))  # p-annealing's λ rescale r_t
        self.register_buffer("penalty_queue", torch.zeros(E, PENALTY_QUEUE))  # recent penalties (p-annealing)
        self.prefix_ends = nested_prefix_ends(F, members[0].group_fractions) if self.spec.nested else [F]
        widths_E = torch.tensor([m.d_sae for m in members])
        self.register_buffer("width_mask", torch.arange(F) < widths_E.unsqueeze(1))  # [E, F] latents each member has
        self.masked = bool((widths_E < F).any())  # skip the mask's work when every member is full width
        self.register_buffer("tokens_since_fired", torch.zeros(E, F, dtype=torch.long))  # AuxK's dead latents
        self.register_buffer("threshold", torch.zeros(E))  # batchtopk inference threshold (EMA)
        self.register_buffer("steps", torch.zeros(E, dtype=torch.long))
        with torch.no_grad():
            self.W_dec.zero_()
            self.W_enc.zero_()
            for e, member in enumerate(members):
                f = member.d_sae
                if self.spec.unit_norm_decoder or self.spec.activation == "jumprelu":
                    # x̂ ≈ x at the start: for random unit rows w, E[ReLU(w·x) w] = x / (2D)
                    W_dec_fD = init_decoder(f, D, member.seed)
                    self.W_dec[e, :f], self.W_enc[e, :, :f] = W_dec_fD, W_dec_fD.T * (2 * D / f)
                else:
                    W_dec_fD = init_decoder(f, D, member.seed, n_sources=S) * member.decoder_init_norm
                    self.W_dec[e, :f], self.W_enc[e, :, :f] = W_dec_fD, W_dec_fD.T

    def latent_params(self) -> list[tuple[str, nn.Parameter, int]]:
        """(name, parameter, index of its latent axis) for every parameter with one."""
        axis = {"W_enc": 2, "W_dec": 1, "b_dec": None}
        return [(n, p, axis.get(n, 1)) for n, p in self.named_parameters() if axis.get(n, 1) is not None]

    def dead_latents(self, window: int) -> torch.Tensor:
        """Latents of each member's own width that have not fired for `window` tokens.  → [E, F] bool"""
        return (self.tokens_since_fired >= window) & self.width_mask

    def _masked(self, t_EBF: torch.Tensor) -> torch.Tensor:
        """Zero each member's latents beyond its width (width sweeps).  → [E, B, F]"""
        return t_EBF * self.width_mask.unsqueeze(1) if self.masked else t_EBF

    # ---------------------------------------------------------------- forward
    def pre_activation(self, x_BD: torch.Tensor) -> torch.Tensor:
        """x [B, D] → pre [E, B, F]"""
        E, B = self.W_enc.shape[0], x_BD.shape[0]
        return torch.baddbmm(self._encoder_bias(), x_BD.expand(E, B, -1), self.W_enc)

    def _encoder_bias(self) -> torch.Tensor:
        """→ [E, 1, F]. (x − b_dec) W_enc + b_enc = x W_enc + (b_enc − b_dec W_enc): the batch-sized
        product stays free of b_dec, so its gradient costs a vector product, not a third matmul."""
        bias_E1F = self.b_enc.unsqueeze(1)
        if self.spec.subtract_b_dec:
            bias_E1F = bias_E1F - torch.bmm(self.b_dec.unsqueeze(1), self.W_enc)
        return bias_E1F

    def activate(self, pre_EBF: torch.Tensor) -> torch.Tensor:
        """Latent activations from (masked) pre-activations (training-time rule).  → [E, B, F]"""
        kind = self.spec.activation
        if kind == "relu":
            return torch.relu(pre_EBF)
        if kind == "topk":
            return keep_top(torch.relu(pre_EBF), self.k_active)
        if kind == "batchtopk":
            E, B, F = pre_EBF.shape
            return keep_top(torch.relu(pre_EBF).reshape(E, 1, B * F), self.k_active * B).reshape(E, B, F)
        if kind == "gated":
            # π_mag = (x − b_dec)(W_enc ⊙ e^{r_mag}) + b_mag = (π − b_gate) ⊙ e^{r_mag} + b_mag
            magnitude_EBF = (pre_EBF - self.b_enc.unsqueeze(1)) * self.r_mag.exp().unsqueeze(1) + self.b_mag.unsqueeze(1)
            return (pre_EBF > 0) * torch.relu(magnitude_EBF)
        # the mask again on the output: a masked latent's θ must get no gradient either
        return self._masked(JumpReLU.apply(pre_EBF, self.jump_threshold.unsqueeze(1), self.bandwidth.view(-1, 1, 1)))

    def encode(self, x_BD: torch.Tensor) -> torch.Tensor:
        """Latent activations of every member.  x [B, D] → f [E, B, F]"""
        return self.activate(self._masked(self.pre_activation(x_BD)))

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
        bias_E1F = self._encoder_bias()
        if self.spec.activation == "topk":
            # Sparse path: only the k selected latents are decoded and receive gradients.
            mask_E1F = self.width_mask.unsqueeze(1) if self.masked else None
            vals_EBK, idx_EBK = TopKEncode.apply(x_BD, self.W_enc, bias_E1F, self.k_active, mask_E1F)
            x_hat_EBD = self._decode_sparse(vals_EBK, idx_EBK)
            f_EBF = None
            fires_EF = torch.zeros_like(self.tokens_since_fired, dtype=vals_EBK.dtype)
            fired_EF = fires_EF.scatter_add_(-1, idx_EBK.flatten(1), (vals_EBK > 0).flatten(1).to(vals_EBK.dtype)) > 0
            sparsity_E = torch.zeros_like(self.l1_coeff)
            l0_E = (vals_EBK > 0).float().sum(-1).mean(-1)
            mse_E = recon_E = (x_hat_EBD - x_BD).pow(2).mean(dim=(1, 2))
        else:
            pre_EBF = self._masked(torch.baddbmm(bias_E1F, x_BD.expand(self.W_enc.shape[0], -1, -1), self.W_enc))
            f_EBF = self.activate(pre_EBF)
            if self.spec.penalty == "lp" and self.training:
                self._rescale_for_new_p_(f_EBF.detach())
            x_hat_EBD, prefix_mse_GE = self._decode_nested(x_BD, f_EBF)
            mse_E, recon_E = prefix_mse_GE[-1], prefix_mse_GE.mean(0)  # one prefix (all latents) unless nested
            active_EBF = f_EBF > 0  # one pass, one byte per entry, for both statistics
            fired_EF = active_EBF.any(dim=1)
            sparsity_E = self._penalty(f_EBF, pre_EBF)
            l0_E = active_EBF.sum(-1).float().mean(-1)
        coeff_E = self.l0_coeff if self.spec.penalty == "l0" else self.l1_coeff
        total_E = recon_E + coeff_E * self.sparsity_scale * self.coeff_rescale * sparsity_E
        if self.spec.aux_k:
            total_E = total_E + self.aux_coeff * self._aux_k_loss(x_BD, x_hat_EBD, bias_E1F)
        if self.spec.penalty == "l1_gate":
            total_E = total_E + self._gate_aux_loss(x_BD, pre_EBF)
        if self.training:
            self._track_(fired_EF, f_EBF, sparsity_E.detach(), len(x_BD))
        return LossOutput(total_E, mse_E, sparsity_E, l0_E, f_EBF, x_hat_EBD)

    def _decode_nested(self, x_BD: torch.Tensor, f_EBF: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x̂, MSE of each prefix's reconstruction). With nested groups (Matryoshka; Bussmann et al.
        2025, Nabeshima 2025) the training loss is the mean over prefixes m_1 < … < m_G = F of the
        MSE of reconstructing from the first m_g latents alone; the partial sums cost no more than
        one full decode. Without groups the only prefix is all F latents.
        → x̂ [E, B, D], MSE [G, E]"""
        x_hat_EBD = self.b_dec.unsqueeze(1).expand(-1, x_BD.shape[0], -1)
        losses, start = [], 0
        for end in self.prefix_ends:
            x_hat_EBD = torch.baddbmm(x_hat_EBD, f_EBF[:, :, start:end], self.W_dec[:, start:end])
            losses.append((x_hat_EBD - x_BD).pow(2).mean(dim=(1, 2)))
            start = end
        return x_hat_EBD, torch.stack(losses)

    def _decode_sparse(self, vals_EBK: torch.Tensor, idx_EBK: torch.Tensor) -> torch.Tensor:
        """x̂ from the k active latents of each row: a gather-and-sum of decoder rows (B·k·D work
        instead of B·F·D).  → [E, B, D]"""
        rows = [F_.embedding_bag(idx_EBK[e], self.W_dec[e], per_sample_weights=vals_EBK[e], mode="sum")
                for e in range(len(vals_EBK))]
        return torch.stack(rows) + self.b_dec.unsqueeze(1)

    def _penalty(self, f_EBF: torch.Tensor, pre_EBF: torch.Tensor) -> torch.Tensor:
        kind = self.spec.penalty
        if kind == "l1":
            return f_EBF.sum(-1).mean(-1)
        if kind == "l1_decoder_norm":
            return (f_EBF * self.decoder_norms().unsqueeze(1)).sum(-1).mean(-1)
        if kind == "l1_gate":
            return torch.relu(pre_EBF).sum(-1).mean(-1)
        if kind == "lp":
            return lp_penalty(f_EBF, self.p_active)
        if kind == "l0":
            theta = self.jump_threshold.unsqueeze(1)
            return self._masked(Step.apply(pre_EBF, theta, self.bandwidth.view(-1, 1, 1))).sum(-1).mean(-1)
        return torch.zeros_like(self.l1_coeff)

    def decoder_norms(self) -> torch.Tensor:
        """Σ_s ‖W_dec[i, s]‖ per latent: the row norm for one source, summed per source for a
        crosscoder.  → [E, F]"""
        E, F, D = self.W_dec.shape
        return self.W_dec.view(E, F, self.n_sources, D // self.n_sources).norm(dim=-1).sum(-1)

    def _gate_aux_loss(self, x_BD: torch.Tensor, pre_EBF: torch.Tensor) -> torch.Tensor:
        """Gated SAE auxiliary loss (Rajamanoharan et al. 2024a, eq. 8): the reconstruction from
        ReLU(π_gate) through a frozen decoder, so the gate alone must carry the input.  → [E]"""
        x_hat_EBD = torch.baddbmm(self.b_dec.detach().unsqueeze(1), torch.relu(pre_EBF), self.W_dec.detach())
        return (x_hat_EBD - x_BD).pow(2).mean(dim=(1, 2))

    @torch.no_grad()
    def _rescale_for_new_p_(self, f_EBF: torch.Tensor) -> None:
        """When the trainer has moved p, scale λ by (recent penalty at the old p) / (this batch's
        penalty at the new p), so the sparsity term keeps its size across the change."""
        changed_E = self.p_active != self.p_previous
        if not changed_E.any():
            return
        filled_E = self.steps.clamp(max=PENALTY_QUEUE)
        recent_E = self.penalty_queue.sum(-1) / filled_E.clamp_min(1)
        new_E = lp_penalty(f_EBF, self.p_active)
        usable_E = changed_E & (filled_E > 0) & (recent_E > 0) & (new_E > 0)
        ratio_E = torch.where(usable_E, recent_E / new_E.clamp_min(1e-30), torch.ones_like(new_E))
        self.coeff_rescale.mul_(ratio_E)
        self.p_previous.copy_(self.p_active)
    def _aux_k_loss(self, x_BD: torch.Tensor, x_hat_EBD: torch.Tensor, bias_E1F: torch.Tensor) -> torch.Tensor:
        """AuxK (Gao et al. 2024, A.2): reconstruct the residual from the top-k_aux pre-activations
        among dead latents, normalised by the residual's variance. Only the dead latents' encoder
        columns are computed.  → [E]"""
        dead_EF = self.dead_latents(self.aux_dead_tokens)
        losses = []
        for e in range(len(dead_EF)):
            cols = dead_EF[e].nonzero().squeeze(1)
            if len(cols) == 0:
                losses.append(torch.zeros((), device=x_BD.device))
                continue
            residual_BD = (x_BD - x_hat_EBD[e]).detach()
            pre_dead = torch.addmm(bias_E1F[e, 0, cols], x_BD, self.W_enc[e][:, cols])  # [B, n_dead]
            vals, pos = torch.relu(pre_dead).topk(min(self.aux_k, len(cols)), dim=-1)
            residual_hat_BD = F_.embedding_bag(cols[pos], self.W_dec[e], per_sample_weights=vals, mode="sum")
            variance = (residual_BD - residual_BD.mean(0)).pow(2).sum().clamp_min(1e-12)
            losses.append((residual_hat_BD - residual_BD).pow(2).sum() / variance)
        return torch.stack(losses)

    @torch.no_grad()
    def _track_(self, fired_EF: torch.Tensor, f_EBF: torch.Tensor | None, penalty_E: torch.Tensor, batch_size: int) -> None:
        """Dead-latent counters (AuxK, resampling), the recent penalties (p-annealing) and the
        BatchTopK inference threshold (EMA of the smallest kept activation, from
        `threshold_start_step` on)."""
        self.tokens_since_fired.add_(batch_size).masked_fill_(fired_EF, 0)
        if self.spec.penalty == "lp":
            slot_E1 = (self.steps % PENALTY_QUEUE).unsqueeze(1)
            self.penalty_queue.scatter_(1, slot_E1, penalty_E.unsqueeze(1))
        self.steps.add_(1)
        if self.spec.activation == "batchtopk":
            smallest_E = torch.where(f_EBF > 0, f_EBF, torch.inf).amin(dim=(1, 2))
            smallest_E = torch.where(torch.isfinite(smallest_E), smallest_E, self.threshold)
            first = self.steps == self.threshold_start_step
            ema = 0.999 * self.threshold + 0.001 * smallest_E
            started = self.steps >= self.threshold_start_step
            self.threshold.copy_(torch.where(first, smallest_E, torch.where(started, ema, self.threshold)))

    # ---------------------------------------------------------------- constraints
    @torch.no_grad()
    def init_b_dec_(self, mean_D: torch.Tensor) -> None:
        """Start every member's b_dec at the data mean, so encoders see centred inputs from step 0
        (large constant directions, as in Gemma's residual stream, otherwise dominate early FVU)."""
        self.b_dec.copy_(mean_D.expand_as(self.b_dec))

    @torch.no_grad()
    def before_step_(self) -> None:
        """Remove from each decoder row's gradient its component along the row (unit-norm decoders)."""
        g = self.W_dec.grad
        if self.spec.unit_norm_decoder and g is not None:
            g -= (g * self.W_dec).sum(-1, keepdim=True) * self.W_dec

    @torch.no_grad()
    def after_step_(self) -> None:
        """Renormalise decoder rows to unit norm (unit-norm decoders); keep thresholds positive."""
        if self.spec.unit_norm_decoder:
            self.W_dec /= self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        if self.spec.activation == "jumprelu":
            self.jump_threshold.clamp_(min=1e-6)

    # ---------------------------------------------------------------- export
    @torch.no_grad()
    def member_tensors(self, e: int, scale: float | torch.Tensor = 1.0) -> dict[str, torch.Tensor]:
        """Member e's weights in SAELens names, for raw activations x_raw = scale · x; `scale` is
        one factor or one per source ([S]) for crosscoders, whose tensors keep the flat layout.

        The pre-activation is invariant: (x_raw − s·b_dec)(W_enc / s) + b_enc equals the
        normalised one (likewise without b_dec), so thresholds and k carry over unchanged,
        and the reconstruction scales by s.
        """
        f = self.members[e].d_sae  # its own width (width sweeps)
        scale_S = torch.as_tensor(scale, dtype=self.W_dec.dtype, device=self.W_dec.device).reshape(-1)
        scale_D = scale_S.repeat_interleave(self.W_dec.shape[-1] // len(scale_S))  # one factor per input column
        tensors = {
            "W_enc": (self.W_enc[e, :, :f] / scale_D.unsqueeze(1)).contiguous(),
            "b_enc": self.b_enc[e, :f].clone(),
            "W_dec": (self.W_dec[e, :f] * scale_D).contiguous(),
            "b_dec": self.b_dec[e] * scale_D,
        }
        if self.spec.activation == "jumprelu":
            tensors["threshold"] = self.jump_threshold[e, :f].clone()
        elif self.spec.activation == "batchtopk":
            tensors["threshold"] = self.threshold[e].expand(f).clone()
        elif self.spec.activation == "gated":
            tensors["b_gate"] = tensors.pop("b_enc")
            tensors.update(r_mag=self.r_mag[e, :f].clone(), b_mag=self.b_mag[e, :f].clone())
        return tensors

    def saelens_architecture(self, e: int) -> dict:
        """The architecture-specific part of member e's SAELens cfg.json."""
        fields = {"architecture": self.spec.saelens, "apply_b_dec_to_input": self.spec.subtract_b_dec}
        if self.spec.saelens == "topk":
            fields.update(k=int(self.k[e]), rescale_acts_by_decoder_norm=False)
        return fields


def nested_prefix_ends(d_sae: int, fractions: tuple[float, ...]) -> list[int]:
    """End of each nested prefix: cumulative group sizes, the last group taking the rest.
    E.g. 1024 latents, (1/32, 1/16) → [32, 96, 1024]."""
    ends, total = [], 0
    for fraction in fractions:
        total += max(1, round(fraction * d_sae))
        ends.append(min(total, d_sae))
    return sorted(set(ends) | {d_sae})


def lp_penalty(f_EBF: torch.Tensor, p_E: torch.Tensor) -> torch.Tensor:
    """mean_b Σ_i f_i^p per member, with f = 0 contributing 0 and no infinite gradient.  → [E]"""
    positive = f_EBF > 0
    powered = f_EBF.clamp_min(1e-12).pow(p_E.view(-1, 1, 1))
    return torch.where(positive, powered, 0.0).sum(-1).mean(-1)


def keep_top(values_EBN: torch.Tensor, k_E: torch.Tensor) -> torch.Tensor:
    """Keep the k_e largest entries of each row of member e, zero the rest.  → [E, B, N]

    One topk at the largest k, then a rank mask per member: members may differ in k."""
    k_max = int(k_E.max())
    top_values, top_index = values_EBN.topk(k_max, dim=-1, sorted=True)
    rank_mask = torch.arange(k_max, device=values_EBN.device) < k_E.view(-1, 1, 1)
    return torch.zeros_like(values_EBN).scatter(-1, top_index, top_values * rank_mask)


class TopKEncode(torch.autograd.Function):
    """(values, indices) of the k_e largest ReLU pre-activations of each row, pre = x W_enc + bias,
    with a sparse backward: only the B·k selected entries carry gradient, so W_enc's gradient is a
    sparse [F, B] × dense [B, D] product instead of a dense [D, B] × [B, F] one.
    x [B, D], W_enc [E, D, F], bias [E, 1, F], k [E], optional width mask [E, 1, F]
    → values [E, B, K], indices [E, B, K] (K = max k)."""

    @staticmethod
    def forward(ctx, x_BD, W_enc_EDF, bias_E1F, k_E, mask_E1F=None):
        E, B = W_enc_EDF.shape[0], x_BD.shape[0]
        pre_EBF = torch.baddbmm(bias_E1F, x_BD.expand(E, B, -1), W_enc_EDF)
        if mask_E1F is not None:
            pre_EBF = pre_EBF * mask_E1F
        values, index = torch.relu(pre_EBF).topk(int(k_E.max()), dim=-1)
        keep = (values > 0) & (torch.arange(values.shape[-1], device=values.device) < k_E.view(-1, 1, 1))
        ctx.save_for_backward(x_BD, index, keep)
        ctx.d_sae = W_enc_EDF.shape[-1]
        ctx.mark_non_differentiable(index)
        return values * keep, index

    @staticmethod
    def backward(ctx, grad_values, grad_index):
        x_BD, index, keep = ctx.saved_tensors
        g_EBK = grad_values * keep  # ReLU and rank mask
        E, B, K = g_EBK.shape
        grad_bias = g_EBK.new_zeros(E, 1, ctx.d_sae).scatter_add_(-1, index.reshape(E, 1, B * K), g_EBK.reshape(E, 1, B * K))
        rows = torch.arange(B, device=x_BD.device).repeat_interleave(K)
        grad_W = []
        for e in range(E):
            sparse_FB = torch.sparse_coo_tensor(torch.stack([index[e].reshape(-1), rows]), g_EBK[e].reshape(-1),
                                                (ctx.d_sae, B), check_invariants=False)  # valid by construction
            grad_W.append(torch.sparse.mm(sparse_FB, x_BD).T)  # [D, F]
        return None, torch.stack(grad_W), grad_bias, None, None


class JumpReLU(torch.autograd.Function):
    """f = z · H(z − θ). Straight-through estimator (Rajamanoharan et al. 2024, eq. 11):
    ∂f/∂z = H(z − θ); ∂f/∂θ = −(θ/ε) K((z − θ)/ε), K(u) = 1[|u| < ½]."""

    @staticmethod
    def forward(ctx, z, theta, eps):
        ctx.save_for_backward(z, theta, eps)
        return z * (z > theta)

    @staticmethod
    def backward(ctx, grad_f):
        z, theta, eps = ctx.saved_tensors
        in_window = ((z - theta).abs() < eps / 2).to(z.dtype)
        grad_theta = -(theta / eps) * in_window * grad_f
        return grad_f * (z > theta), _sum_to(grad_theta, theta.shape), None


class Step(torch.autograd.Function):
    """H(z − θ), with ∂H/∂θ = −(1/ε) K((z − θ)/ε) and no gradient to z (the L0 penalty trains
    thresholds only; Rajamanoharan et al. 2024, eq. 12)."""

    @staticmethod
    def forward(ctx, z, theta, eps):
        ctx.save_for_backward(z, theta, eps)
        return (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, grad_h):
        z, theta, eps = ctx.saved_tensors
        in_window = ((z - theta).abs() < eps / 2).to(z.dtype)
        return None, _sum_to(-(1 / eps) * in_window * grad_h, theta.shape), None


def _sum_to(grad: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Sum a broadcast gradient back to the shape of the tensor it came from."""
    dims = [i for i, (g, s) in enumerate(zip(grad.shape, shape)) if s == 1 and g != 1]
    return grad.sum(dim=dims, keepdim=True)


def init_decoder(d_sae: int, width: int, seed: int, n_sources: int = 1) -> torch.Tensor:
    """Random decoder rows whose part for each of `n_sources` sources has unit norm (one source:
    unit rows), from this member's own generator (so a member's init does not depend on its
    neighbours in the ensemble).  → [F, width]"""
    generator = torch.Generator().manual_seed(seed)
    W = torch.randn(d_sae, n_sources, width // n_sources, generator=generator)
    return (W / W.norm(dim=-1, keepdim=True)).reshape(d_sae, width)


def _check_same(members: list[MemberConfig], *fields: str) -> None:
    if not members:
        raise ValueError("an ensemble needs at least one member")
    for name in fields:
        values = {getattr(m, name) for m in members}
        if len(values) > 1:
            raise ValueError(f"members of one ensemble must share {name}; got {sorted(values, key=str)}")
