"""Sparse dictionaries with a leading member axis: E dictionaries of one architecture in one set
of tensors, differing only in the values of their knobs and in which columns of a batch they read
and write.

Dimension key: B batch, E members, G encoder groups of a member (a cross-layer transcoder's
layers; 1 elsewhere), U = E·G units (one encoder each), F latents per unit (d_sae), I a unit's
input width, O the width a member writes (all its targets), C the columns of a stream batch.

Every architecture is the same mechanism with different parameters: its activation rule (one
record each in training/rules.py: forward, inference, extra parameters, flags) and the tables
PENALTIES and EXTRA_LOSSES below, one function each:

    pre = (x − b_dec) W_enc + b_enc        (x W_enc + b_enc where `subtract_b_dec` is off)
    f   = activation(pre)                  relu | topk | batchtopk | jumprelu | gated
    ŷ   = f W_dec + b_dec (+ x W_skip)
    L   = recon(ŷ, y) + c · s_t · r_t · penalty(f) + extra losses (AuxK, gated auxiliary, pre-activation)

    relu        penalty mean_b Σ_i f_i, unit-norm decoder rows (Bricken et al. 2023)
    relu_april  penalty mean_b Σ_i f_i ‖W_dec,i‖, free decoder norms (Anthropic, April 2024)
    topk        f = the k largest of ReLU(pre) per row; AuxK on dead latents (Gao et al. 2024)
    batchtopk   the k·B largest of ReLU(pre) over the batch; exported as JumpReLU with one
                inference threshold θ, calibrated on training rows at the end so that it keeps
                k latents a row on average (Bussmann et al. 2024 average θ over training)
    jumprelu    f = z·H(z − θ), θ > 0 learned through a straight-through estimator with a
                rectangle kernel of bandwidth ε; penalty L0 (Rajamanoharan et al. 2024)
    jumprelu_tanh  JumpReLU with penalty mean_b Σ_i tanh(c·f_i·‖W_dec,i‖) and a pre-activation
                term λ_p·mean_b Σ_i ReLU(θ_i − pre_i)‖W_dec,i‖ against dead latents (Anthropic,
                "Circuit Tracing", 2025: the cross-layer transcoder recipe)
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

What a member reads and writes (its wiring), in the columns of a batch that holds every source
the ensemble needs side by side, each normalised by its own factor:
  * an SAE reads one source and reconstructs it: recon = mean_{b,d} (x̂ − x)²;
  * a crosscoder (Lindsey et al. 2024) reads S sources as one concatenated input of S·d_in and
    reconstructs all of them (W_enc [S·d_in, F] is W_enc [S, d_in, F] laid flat, W_dec likewise);
    `crosscoder` is relu_april with the decoder norm taken per source and summed; with S = 1
    every formula is the SAE's;
  * a transcoder reads its input sources and reconstructs other `targets` (e.g. an MLP's input
    and output); its b_dec lives in output space and is never subtracted from the input;
    `skip` adds a linear term x W_skip (starts at 0);
  * a cross-layer transcoder (CLT; Anthropic, "Circuit Tracing", 2025) has one encoder group per
    layer l reading that layer's input, whose latents write to the targets of layers l … L−1:
    ŷ_m = Σ_{l ≤ m} f_l W_dec[l→m] + b_dec,m; recon = Σ_m mean_{b,d} (ŷ_m − y_m)². Its decoder is
    stored packed ([F, Σ_l (L−l)·d_out]; group l's slab is a contiguous column range), so it
    costs L(L+1)/2 blocks, not L².
Members of one ensemble share their shapes and may differ in which sources they read (a
transcoder per layer, all in one ensemble).

Width sweeps: members may differ in d_sae. The tensors are as wide as the widest member and a
[E, F] mask zeroes each member's latents beyond its own width (pre-activations and activations),
so those latents never fire, get no gradient and are sliced off at export.

`loss()` is pure: it returns the step's statistics (latents that fired, BatchTopK's smallest kept
activation, the p-annealing penalty and rescale) and the ensemble applies them with `observe_`
after the optimiser step, so a step is either wholly applied or not at all. Unit-norm decoders:
the gradient is projected onto each row's tangent space before the step and rows are
renormalised after it. The reconstruction term is averaged over d (λ from a loss summed over d:
λ_sum = λ · d).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F_
from torch import nn

from training.kernels import Step, TopKEncode
from training.members import MemberConfig
from training.rules import InferenceRule, rule_of

PENALTY_QUEUE = 10  # recent penalties p-annealing rescales λ against


class Stats(NamedTuple):
    """What one step observed, applied by `Dictionary.observe_` after the optimiser step."""

    fired: torch.Tensor  # [E, G·F] bool: latents that fired on the batch
    penalty: torch.Tensor  # [E] the penalty before coefficients (p-annealing's queue)
    coeff_rescale: torch.Tensor  # [E] p-annealing's λ rescale in force this step


class Codes(NamedTuple):
    """Latent activations, dense ([U, B, F]) or as the k active ones per row (values, indices [U, B, K])."""

    dense: torch.Tensor | None
    values: torch.Tensor | None = None
    index: torch.Tensor | None = None

    def fired(self, n_latents: int) -> torch.Tensor:
        """Latents that fired on at least one row.  → [U, F] bool"""
        if self.dense is not None:
            return (self.dense != 0).any(dim=1)
        fires = torch.zeros(len(self.values), n_latents, dtype=self.values.dtype, device=self.values.device)
        return fires.scatter_add_(-1, self.index.flatten(1), (self.values != 0).flatten(1).to(self.values.dtype)) > 0

    def l0(self) -> torch.Tensor:
        """Active latents per row, averaged over the batch.  → [U]"""
        active = self.dense if self.dense is not None else self.values
        return (active != 0).sum(-1).float().mean(-1)

    def to_dense(self, n_latents: int) -> torch.Tensor:
        """The activations as a dense tensor (differentiable in the kept values).  → [U, B, F]"""
        if self.dense is not None:
            return self.dense
        zeros = self.values.new_zeros(*self.values.shape[:2], n_latents)
        return zeros.scatter(-1, self.index, self.values)


class LossOutput(NamedTuple):
    total: torch.Tensor  # [E] the loss each member minimises
    mse: torch.Tensor  # [E] mean over batch and d of (ŷ − y)², over everything the member writes
    sparsity: torch.Tensor  # [E] the penalty before its coefficient (L1, L0, tanh or 0)
    l0: torch.Tensor  # [E] mean over batch of #{f_i ≠ 0} (over all its layers for a CLT)
    codes: Codes  # the latent activations: dense [U, B, F], or only the k active ones (topk)
    x_hat: torch.Tensor  # [E, B, O]
    stats: Stats


# ---------------------------------------------------------------- the penalties: one function each
def lp_penalty(f_UBF: torch.Tensor, p_U: torch.Tensor) -> torch.Tensor:
    """mean_b Σ_i f_i^p per unit, with f = 0 contributing 0 and no infinite gradient.  → [U]"""
    positive = f_UBF > 0
    powered = f_UBF.clamp_min(1e-12).pow(p_U.view(-1, 1, 1))
    return torch.where(positive, powered, 0.0).sum(-1).mean(-1)


def _pen_none(d, f_UBF, pre_UBF):
    return torch.zeros(len(d.per_unit(d.l1_coeff)), device=d.l1_coeff.device)


def _pen_l1(d, f_UBF, pre_UBF):
    return f_UBF.sum(-1).mean(-1)


def _pen_l1_decoder_norm(d, f_UBF, pre_UBF):
    return (f_UBF * d.decoder_norms(per_target=True).unsqueeze(1)).sum(-1).mean(-1)


def _pen_l1_gate(d, f_UBF, pre_UBF):
    return torch.relu(pre_UBF).sum(-1).mean(-1)


def _pen_lp(d, f_UBF, pre_UBF):
    return lp_penalty(f_UBF, d.per_unit(d.p_active))


def _pen_l0(d, f_UBF, pre_UBF):
    theta_U1F = d.jump_threshold.view(-1, 1, pre_UBF.shape[-1])
    return d.masked(Step.apply(pre_UBF, theta_U1F, d.per_unit(d.bandwidth).view(-1, 1, 1))).sum(-1).mean(-1)


def _pen_tanh(d, f_UBF, pre_UBF):
    """mean_b Σ_i tanh(c · f_i · ‖W_dec,i‖), ‖W_dec,i‖ over every target latent i writes to."""
    scaled_UBF = d.per_unit(d.tanh_c).view(-1, 1, 1) * f_UBF * d.decoder_norms().unsqueeze(1)
    return torch.tanh(scaled_UBF).sum(-1).mean(-1)


PENALTIES = {"none": _pen_none, "l1": _pen_l1, "l1_decoder_norm": _pen_l1_decoder_norm, "l1_gate": _pen_l1_gate,
             "lp": _pen_lp, "l0": _pen_l0, "tanh": _pen_tanh}


class Dictionary(nn.Module):
    """E sparse dictionaries of one architecture as stacked parameters, as wide as the widest."""

    def __init__(self, members: list[MemberConfig], columns: dict[str, tuple[int, int]] | None = None,
                 aux_dead_tokens: int = 10_000_000):
        """`columns`: source name → (first column, width) in the batches this dictionary is fed
        (default: the first member's inputs, then its other targets, side by side);
        `aux_dead_tokens`: tokens without firing after which AuxK counts a latent dead."""
        super().__init__()
        _check_same(members, "d_in", "d_out", "n_sources", "n_targets", "arch", "aux_k", "group_fractions",
                    "cross_layer", "skip", "is_transcoder")
        first = members[0]
        self.members = list(members)
        self.spec = first.spec
        self.G, self.I, self.O = first.n_groups, first.unit_in, first.member_out
        self.n_targets, self.d_out = first.n_targets, first.width_out
        self.subtract_b_dec = first.subtract_b_dec
        E, G, F = len(members), self.G, max(m.d_sae for m in members)
        if self.spec.nested and len({m.d_sae for m in members}) > 1:
            raise ValueError("matryoshka members must share d_sae (its groups are fractions of it); "
                             "train each width in its own run")
        self.aux_k = first.aux_k or max(1, self.O // 2)
        self.aux_dead_tokens = aux_dead_tokens
        self._wire(columns or default_columns(first))
        self.W_enc = nn.Parameter(torch.zeros(E, G * self.I, F))  # group g's encoder: rows g·I … (g+1)·I
        self.b_enc = nn.Parameter(torch.zeros(E, G * F))  # b_gate for gated
        self.W_dec = nn.Parameter(torch.zeros(E, F, self.slab_starts[-1]))  # group g's decoder: a column slab
        self.b_dec = nn.Parameter(torch.zeros(E, self.O))
        if first.skip:
            self.W_skip = nn.Parameter(torch.zeros(E, self.I, self.O))
        self.rule = rule_of(self.spec)
        for name, parameter in self.rule.parameters(members, E, G, F).items():  # θ (jumprelu), r_mag, b_mag (gated)
            setattr(self, name, parameter)
        for knob in ("l1_coeff", "l0_coeff", "k", "bandwidth", "aux_coeff", "p_end", "tanh_c", "preact_coeff",
                     "residual_threshold"):
            dtype = torch.long if knob == "k" else torch.float32
            self.register_buffer(knob, torch.tensor([getattr(m, knob) for m in members], dtype=dtype))
        self.register_buffer("sparsity_scale", torch.ones(E))  # schedule factor, set by the trainer
        self.register_buffer("k_active", self.k.clone())  # k in force this step (k annealing), set by the trainer
        self.register_buffer("p_active", torch.ones(E))  # Lp exponent in force (p-annealing), set by the trainer
        self.register_buffer("p_previous", torch.ones(E))  # exponent of the previous step
        self.register_buffer("coeff_rescale", torch.ones(E))  # p-annealing's λ rescale r_t
        self.register_buffer("penalty_queue", torch.zeros(E, PENALTY_QUEUE))  # recent penalties (p-annealing)
        self.prefix_ends = nested_prefix_ends(F, first.group_fractions) if self.spec.nested else [F]
        widths_E = torch.tensor([m.d_sae for m in members])
        mask_EF = torch.arange(F) < widths_E.unsqueeze(1)
        self.register_buffer("width_mask", mask_EF.repeat(1, G))  # [E, G·F] latents each member has
        self.masked_widths = bool((widths_E < F).any())  # skip the mask's work when every member is full width
        self.register_buffer("tokens_since_fired", torch.zeros(E, G * F, dtype=torch.long))  # AuxK's dead latents
        self.register_buffer("threshold", torch.zeros(E, G))  # batchtopk inference threshold per group (calibrate_thresholds_)
        self.register_buffer("steps", torch.zeros(E, dtype=torch.long))
        self.sparse_topk = True  # TopK decodes only its k active latents (training/ensemble.py chooses per device)
        with torch.no_grad():
            for e, member in enumerate(members):
                self._init_member_(e, member)

    # ---------------------------------------------------------------- wiring
    def _wire(self, columns: dict[str, tuple[int, int]]) -> None:
        """Column indices each member reads ([E, G, I]) and writes ([E, O]) in a batch, plus the
        slices that replace the gathers when every member reads and writes the same columns."""
        def cols(names: tuple[str, ...], width: int) -> list[int]:
            out = []
            for name in names:
                if name not in columns:
                    raise ValueError(f"source {name!r} is not among the batch's columns: {', '.join(columns)}")
                start, w = columns[name]
                if w != width:
                    raise ValueError(f"source {name} is {w} wide; this dictionary expects {width}")
                out.extend(range(start, start + w))
            return out

        inputs = [cols(m.input_names(), self.members[0].d_in) for m in self.members]  # [E][G·I]
        targets = [cols(m.target_names(), self.d_out) for m in self.members]  # [E][O]
        self.register_buffer("input_index", torch.tensor(inputs).view(len(inputs), self.G, self.I))
        self.register_buffer("target_index", torch.tensor(targets))
        self._shared_inputs = _as_slices(inputs, self.G)
        self._shared_targets = _as_slices(targets, 1)
        # slab g of the packed decoder: group g writes targets g … T−1 (cross-layer), else all of them
        widths = [(self.n_targets - g) * self.d_out if self.G > 1 else self.O for g in range(self.G)]
        self.slab_starts = [0]
        for w in widths:
            self.slab_starts.append(self.slab_starts[-1] + w)

    def inputs(self, x_BC: torch.Tensor) -> torch.Tensor:
        """Each unit's input.  x [B, C] → [U, B, I], or [1, B, I] when every unit reads the same columns"""
        if self._shared_inputs is not None and self.G == 1:
            return x_BC[:, self._shared_inputs[0]].unsqueeze(0)
        E = self.input_index.shape[0]
        if self._shared_inputs is not None:
            x_GBI = torch.stack([x_BC[:, s] for s in self._shared_inputs])
            return x_GBI.unsqueeze(0).expand(E, -1, -1, -1).reshape(E * self.G, *x_GBI.shape[1:])
        return x_BC[:, self.input_index].permute(1, 2, 0, 3).reshape(E * self.G, len(x_BC), self.I)

    def targets(self, x_BC: torch.Tensor) -> torch.Tensor:
        """What each member reconstructs.  x [B, C] → [E, B, O], or [1, B, O] when shared"""
        if self._shared_targets is not None:
            return x_BC[:, self._shared_targets[0]].unsqueeze(0)
        return x_BC[:, self.target_index].permute(1, 0, 2)

    def per_unit(self, t_E: torch.Tensor) -> torch.Tensor:
        """A per-member tensor repeated for each of its encoder groups.  [E, ...] → [U, ...]"""
        return t_E if self.G == 1 else t_E.repeat_interleave(self.G, dim=0)

    def per_member(self, t_U: torch.Tensor) -> torch.Tensor:
        """Sum a per-unit quantity over each member's groups.  [U] → [E]"""
        return t_U if self.G == 1 else t_U.view(-1, self.G).sum(-1)

    def slab(self, g: int) -> torch.Tensor:
        """Group g's decoder: its latents' rows over the targets it writes.  → [E, F, width]"""
        return self.W_dec[:, :, self.slab_starts[g]: self.slab_starts[g + 1]]

    def target_start(self, g: int) -> int:
        """First output column group g writes."""
        return g * self.d_out if self.G > 1 else 0

    # ---------------------------------------------------------------- initialisation
    def _init_member_(self, e: int, member: MemberConfig) -> None:
        """Decoder rows are random directions (per target for per-source norms), unit norm where
        norms are fixed or thresholds learned, `decoder_init_norm` where norms are free; the
        encoder of an SAE is the decoder's transpose (scaled by 2·I/F where rows are unit: for
        random unit rows w, E[ReLU(w·x) w] = x / (2I), so x̂ ≈ x at the start), except where k
        latents are chosen: the top-k family's encoder is the transpose itself (measured in
        bench/RESULTS.md "Quality": the ReLU scale, 2I/F, left 38.6% of a long TopK run's latents
        silent on held-out rows, the transpose 21.6%); a transcoder's encoder has directions of its
        own (it reads another space)."""
        f, G = member.d_sae, self.G
        unit_rows = self.spec.unit_norm_decoder or self.rule.unit_rows_at_init
        norm = 1.0 if unit_rows else member.decoder_init_norm
        transpose_scale = 1.0 if self.rule.selects_k else 2 * self.I / f
        blocks = 1 if unit_rows else self.n_targets
        for g in range(G):
            width = self.slab_starts[g + 1] - self.slab_starts[g]
            W_dec_fW = init_decoder(f, width, member.seed + 7919 * g, n_blocks=blocks if G == 1 else 1) * norm
            self.slab(g)[e, :f] = W_dec_fW
            rows = slice(g * self.I, (g + 1) * self.I)
            if self.rule.tied_encoder:  # the decoder is the encoder: W_enc stays unused
                continue
            if not member.is_transcoder:
                self.W_enc[e, rows, :f] = W_dec_fW.T * (transpose_scale if unit_rows else 1.0)
            else:
                W_enc_fI = init_decoder(f, self.I, member.seed + 104729 + 7919 * g)
                self.W_enc[e, rows, :f] = W_enc_fI.T * (2 * self.I / f if unit_rows else norm)

    @torch.no_grad()
    def init_b_dec_(self, mean_C: torch.Tensor) -> None:
        """Start every member's b_dec at the mean of what it writes, so encoders see centred inputs
        from step 0 (large constant directions, as in Gemma's residual stream, otherwise dominate
        early FVU).  mean [C] over a batch's columns"""
        self.b_dec.copy_(mean_C[self.target_index])

    # ---------------------------------------------------------------- forward
    def full(self, t: torch.Tensor) -> torch.Tensor:
        """`t` in the weights' own dtype: a product made under bf16 autocast comes back to float32,
        so every loss term and everything computed from it stays in full precision."""
        return t.to(self.b_dec.dtype)

    def masked(self, t_UBF: torch.Tensor) -> torch.Tensor:
        """Zero each member's latents beyond its width (width sweeps).  → [U, B, F]"""
        if not self.masked_widths:
            return t_UBF
        return t_UBF * self.width_mask.view(-1, 1, t_UBF.shape[-1])

    def _encoder_bias(self) -> torch.Tensor:
        """→ [U, 1, F]. (x − b_dec) W_enc + b_enc = x W_enc + (b_enc − b_dec W_enc): the batch-sized
        product stays free of b_dec, so its gradient costs a vector product, not a third matmul."""
        F = self.W_enc.shape[-1]
        bias_U1F = self.b_enc.view(-1, 1, F)
        if self.subtract_b_dec:
            bias_U1F = bias_U1F - torch.bmm(self.b_dec.unsqueeze(1), self.W_enc)
        return bias_U1F

    def _W_enc_units(self) -> torch.Tensor:
        return self.W_enc.view(-1, self.I, self.W_enc.shape[-1])  # [U, I, F]

    def pre_activation(self, x_BC: torch.Tensor) -> torch.Tensor:
        """x [B, C] → pre [U, B, F] (masked beyond each member's width)"""
        x_UBI = self.inputs(x_BC)
        U = self._W_enc_units().shape[0]
        return self.masked(torch.baddbmm(self._encoder_bias(), x_UBI.expand(U, -1, -1), self._W_enc_units()))

    def activate(self, pre_UBF: torch.Tensor) -> torch.Tensor:
        """Latent activations from (masked) pre-activations (training-time rule).  → [U, B, F]"""
        return self.rule.forward(self, pre_UBF)

    def encode(self, x_BC: torch.Tensor) -> torch.Tensor:
        """Latent activations of every unit.  x [B, C] → f [U, B, F]"""
        if self.rule.encode is not None:
            return self.rule.encode(self, x_BC)
        return self.activate(self.pre_activation(x_BC))

    def decode(self, f_UBF: torch.Tensor, x_BC: torch.Tensor | None = None) -> torch.Tensor:
        """Reconstructions (plus the skip term of x, for skip transcoders).  f [U, B, F] → ŷ [E, B, O]"""
        return self._decode_prefixes(f_UBF, x_BC, None)[0]

    def reconstruct(self, x_BC: torch.Tensor) -> torch.Tensor:
        """x [B, C] → ŷ [E, B, O]"""
        return self.decode(self.encode(x_BC), x_BC)

    def forward(self, x_BC: torch.Tensor) -> LossOutput:
        """The training objective (what `torch.func.functional_call` evaluates)."""
        return self.loss(x_BC)

    def loss(self, x_BC: torch.Tensor) -> LossOutput:
        """Every member's loss on the batch, and what the step observed (no state is changed)."""
        y_EBO = self.targets(x_BC)
        bias_U1F = self._encoder_bias()
        pre_UBF = None
        if self.rule.sparse_decode and self.G == 1 and self.sparse_topk:
            # Sparse path: only the k selected latents are decoded and receive gradients.
            mask = self.width_mask.unsqueeze(1) if self.masked_widths else None
            vals, idx = TopKEncode.apply(self.inputs(x_BC), self._W_enc_units(), bias_U1F, self.k_active, mask)
            vals = self.full(vals)  # under bf16 autocast the products are bfloat16; everything after them is not
            codes = Codes(None, vals, idx)
            x_hat_EBO = self.full(self._decode_sparse(vals, idx) + self._skip(x_BC))
            mse_E = recon_E = (x_hat_EBO - y_EBO).pow(2).mean(dim=(1, 2))
        else:
            if self.rule.encode is not None:
                codes = Codes(self.full(self.rule.encode(self, x_BC)))
            else:
                x_UBI = self.inputs(x_BC)
                W_UIF = self._W_enc_units()
                pre_UBF = self.full(self.masked(torch.baddbmm(bias_U1F, x_UBI.expand(len(W_UIF), -1, -1), W_UIF)))
                codes = Codes(self.activate(pre_UBF))
            x_hat_EBO, prefix_mse_PE = self._decode_prefixes(codes.dense, x_BC, y_EBO)
            mse_E = prefix_mse_PE[-1]
            # the mean over prefixes (one prefix, all latents, unless nested); Σ_m MSE_m for a CLT
            recon_E = prefix_mse_PE.mean(0) * (self.n_targets if self.G > 1 else 1)
        F = self.W_enc.shape[-1]
        sparsity_E = self.per_member(PENALTIES[self.spec.penalty](self, codes.dense, pre_UBF))
        rescale_E = self._p_rescale(codes.dense) if self.spec.penalty == "lp" else self.coeff_rescale
        field_name = self.spec.coefficient
        coeff_E = getattr(self, field_name) if field_name else torch.zeros_like(self.l1_coeff)
        total_E = recon_E + coeff_E * self.sparsity_scale * rescale_E * sparsity_E
        for name in self.spec.extra_losses:
            total_E = total_E + EXTRA_LOSSES[name](self, x_BC, y_EBO, x_hat_EBO, pre_UBF)
        stats = Stats(codes.fired(F).view(len(total_E), -1), sparsity_E.detach(), rescale_E.detach())
        return LossOutput(total_E, mse_E, sparsity_E, self.per_member(codes.l0()), codes, x_hat_EBO, stats)

    def _skip(self, x_BC: torch.Tensor | None) -> torch.Tensor | float:
        if not hasattr(self, "W_skip") or x_BC is None:
            return 0.0
        return torch.bmm(self.inputs(x_BC).expand(len(self.W_skip), -1, -1), self.W_skip)

    def _decode_prefixes(self, f_UBF: torch.Tensor, x_BC: torch.Tensor | None,
                         y_EBO: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(ŷ, the MSE of each prefix's reconstruction). With nested groups
        (Matryoshka; Bussmann et al. 2025, Nabeshima 2025) the training loss is the mean over
        prefixes m_1 < … < m_G = F of the MSE of reconstructing from the first m_g latents
        alone; the partial sums cost no more than one full decode. Without groups the only prefix
        is all F latents. A cross-layer transcoder adds each group's slab into the targets it
        writes.  → ŷ [E, B, O], MSE [P, E] (None without y)"""
        E, B = self.b_dec.shape[0], f_UBF.shape[1]
        x_hat_EBO = self.b_dec.unsqueeze(1).expand(-1, B, -1) + self._skip(x_BC)
        if self.G > 1:
            f_EGBF = f_UBF.view(E, self.G, B, -1)
            parts = [F_.pad(torch.bmm(f_EGBF[:, g], self.slab(g)), (self.target_start(g), 0)) for g in range(self.G)]
            x_hat_EBO = self.full(x_hat_EBO + sum(parts))
            return x_hat_EBO, None if y_EBO is None else (x_hat_EBO - y_EBO).pow(2).mean(dim=(1, 2)).unsqueeze(0)
        losses, start = [], 0
        for end in self.prefix_ends:
            x_hat_EBO = self.full(torch.baddbmm(x_hat_EBO, f_UBF[:, :, start:end], self.W_dec[:, start:end]))
            if y_EBO is not None:
                losses.append((x_hat_EBO - y_EBO).pow(2).mean(dim=(1, 2)))
            start = end
        return x_hat_EBO, torch.stack(losses) if losses else None

    def _decode_sparse(self, vals_EBK: torch.Tensor, idx_EBK: torch.Tensor) -> torch.Tensor:
        """ŷ from the k active latents of each row: a gather-and-sum of decoder rows (B·k·O work
        instead of B·F·O).  → [E, B, O]"""
        rows = [F_.embedding_bag(idx_EBK[e], self.W_dec[e], per_sample_weights=vals_EBK[e], mode="sum")
                for e in range(len(vals_EBK))]
        return torch.stack(rows) + self.b_dec.unsqueeze(1)

    @property
    def summed_loss_scale(self) -> int:
        """The loss summed over the values a member writes ÷ ours, which averages them: O for
        an SAE or crosscoder (mean over S·d), d_out for a CLT (already summed over its layers)."""
        return self.d_out if self.G > 1 else self.O

    def decoder_norms(self, per_target: bool = False) -> torch.Tensor:
        """Norm of each latent's decoder over everything it writes; with `per_target`, the norms
        of its vector for each target summed (a crosscoder's Σ_s ‖W_dec[i, s]‖).  → [U, F]"""
        if self.G > 1:
            return torch.stack([self.slab(g).norm(dim=-1) for g in range(self.G)], dim=1).flatten(0, 1)
        E, F, O = self.W_dec.shape
        if per_target:
            return self.W_dec.view(E, F, self.n_targets, O // self.n_targets).norm(dim=-1).sum(-1)
        return self.W_dec.norm(dim=-1)

    def _p_rescale(self, f_UBF: torch.Tensor) -> torch.Tensor:
        """The λ rescale in force this step: when the trainer has moved p, the previous one times
        (recent penalty at the old p) / (this batch's penalty at the new p), so the sparsity term
        keeps its size across the change.  → [E]"""
        with torch.no_grad():
            changed_E = self.p_active != self.p_previous
            filled_E = self.steps.clamp(max=PENALTY_QUEUE)
            recent_E = self.penalty_queue.sum(-1) / filled_E.clamp_min(1)
            new_E = lp_penalty(f_UBF.detach(), self.p_active)
            usable_E = changed_E & (filled_E > 0) & (recent_E > 0) & (new_E > 0)
            ratio_E = torch.where(usable_E, recent_E / new_E.clamp_min(1e-30), torch.ones_like(new_E))
            return self.coeff_rescale * ratio_E

    @torch.no_grad()
    def calibrated_thresholds(self, rows_NC: torch.Tensor, units: list[int] | None = None,
                              row_batch: int = 1024) -> torch.Tensor:
        """For each unit, the JumpReLU threshold that keeps k latents a row on average on `rows`:
        the (k·N)-th largest ReLU pre-activation over the member's own width (what the TopK
        family is exported with). Rows are encoded `row_batch` at a time, keeping a running top
        k·N, so memory stays O(k·N + row_batch·F) per unit.  → [len(units)] (default: every unit)"""
        units = list(range(len(self.per_unit(self.k)))) if units is None else units
        k_U, width_U = self.per_unit(self.k), self.per_unit(self.width_mask.sum(-1) // self.G)
        W_UIF, bias_U1F = self._W_enc_units(), self._encoder_bias()
        out = []
        for u in units:
            quota = int(k_U[u]) * len(rows_NC)
            kept = rows_NC.new_empty(0)
            for x_BC in rows_NC.split(row_batch):
                x_BI = self.inputs(x_BC)
                pre_BF = torch.relu(torch.addmm(bias_U1F[u, 0], x_BI[u if len(x_BI) > 1 else 0], W_UIF[u]))
                candidates = torch.cat([kept, pre_BF[:, : int(width_U[u])].flatten()])
                kept = candidates.topk(min(quota, len(candidates))).values
            out.append(kept[-1].clamp_min(1e-12) if len(kept) else rows_NC.new_tensor(1e-12))
        return torch.stack(out)

    def dead_latents(self, window: int) -> torch.Tensor:
        """Latents of each member's own width that have not fired for `window` tokens.  → [E, G·F] bool"""
        return (self.tokens_since_fired >= window) & self.width_mask

    def lr_multiplier(self, name: str) -> float:
        """Learning-rate factor of a parameter. JumpReLU thresholds live in activation units; the
        reference recipes (lr 7e-5, θ₀ = ε = 1e-3; Rajamanoharan et al. 2024, dictionary_learning)
        train on activations of unit mean squared norm, and ours have mean norm √I, so θ moves
        √I times as far per step for the same relative move."""
        return math.sqrt(self.I) if name == "jump_threshold" else 1.0

    def latent_params(self) -> list[tuple[str, nn.Parameter, int]]:
        """(name, parameter, index of its latent axis) for every parameter with one (single group)."""
        axis = {"W_enc": 2, "W_dec": 1, "b_dec": None, "W_skip": None}
        return [(n, p, axis.get(n, 1)) for n, p in self.named_parameters() if axis.get(n, 1) is not None]

    # ---------------------------------------------------------------- state changes after a step
    @torch.no_grad()
    def observe_(self, stats: Stats, batch_size: int) -> None:
        """Apply what a step observed: dead-latent counters (AuxK, resampling) and the recent
        penalties and λ rescale (p-annealing)."""
        self.tokens_since_fired.add_(batch_size).masked_fill_(stats.fired, 0)
        if self.spec.penalty == "lp":
            slot_E1 = (self.steps % PENALTY_QUEUE).unsqueeze(1)
            self.penalty_queue.scatter_(1, slot_E1, stats.penalty.unsqueeze(1))
            self.coeff_rescale.copy_(stats.coeff_rescale)
            self.p_previous.copy_(self.p_active)
        self.steps.add_(1)

    @torch.no_grad()
    def calibrate_thresholds_(self, rows_NC: torch.Tensor) -> None:
        """Set the BatchTopK (and Matryoshka) inference threshold of every unit so that it keeps
        k latents a row on average on `rows` (training rows, at the end of training). The
        references' running mean of each batch's smallest kept activation lags the encoder,
        whose activations grow while it trains: exported, it kept 16–22 latents a row at k 32
        (bench/RESULTS.md "Quality")."""
        self.threshold.copy_(self.calibrated_thresholds(rows_NC).view_as(self.threshold))

    @torch.no_grad()
    def before_step_(self) -> None:
        """Remove from each decoder row's gradient its component along the row (unit-norm decoders)."""
        g = self.W_dec.grad
        if self.spec.unit_norm_decoder and g is not None:
            for s in range(self.G):
                W, grad = self.slab(s), g[:, :, self.slab_starts[s]: self.slab_starts[s + 1]]
                grad -= (grad * W).sum(-1, keepdim=True) * W

    @torch.no_grad()
    def after_step_(self) -> None:
        """Renormalise decoder rows to unit norm (unit-norm decoders); keep thresholds positive."""
        if self.spec.unit_norm_decoder:
            for s in range(self.G):
                W = self.slab(s)
                W /= W.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        self.rule.after_step(self)

    # ---------------------------------------------------------------- export
    @torch.no_grad()
    def member_tensors(self, e: int, in_scale=1.0, out_scale=None) -> dict[str, torch.Tensor]:
        """Member e's weights for raw activations (x_raw = s_in · x, y_raw = s_out · y), sliced to
        its own width: W_enc [G·I, F], b_enc [G·F], W_dec [F, slabs], b_dec [O] (+ W_skip [I, O],
        and the tensors of its inference rule: threshold [G·F] | r_mag, b_mag [F]). Scales are one
        factor, one per source, or one per column; `out_scale` defaults to `in_scale` (an SAE).

        The pre-activation is invariant: (x_raw − s·b_dec)(W_enc / s) + b_enc equals the
        normalised one (likewise without b_dec), so thresholds and k carry over unchanged,
        and the reconstruction scales by s_out. A tied encoder (matching pursuit) keeps its
        unit-norm decoder rows and takes the scale in its codes instead (f_raw = s·f), so it has
        no W_enc or b_enc of its own.
        """
        member = self.members[e]
        f, F = member.d_sae, self.W_enc.shape[-1]
        s_in = _per_column(in_scale, self.G * self.I, self.W_enc)
        s_out = s_in if out_scale is None and not member.is_transcoder else _per_column(
            in_scale if out_scale is None else out_scale, self.O, self.W_enc)
        s_slab = torch.cat([s_out[self.target_start(g): self.target_start(g) + self.slab_starts[g + 1] - self.slab_starts[g]]
                            for g in range(self.G)])
        latents = (torch.arange(self.G).unsqueeze(1) * F + torch.arange(f)).flatten()  # its latents in every group
        tensors = {"b_dec": self.b_dec[e] * s_out}
        if self.rule.tied_encoder:
            tensors["W_dec"] = self.W_dec[e, :f].clone()
        else:
            tensors.update(W_enc=(self.W_enc[e, :, :f] / s_in.unsqueeze(1)).contiguous(), b_enc=self.b_enc[e, latents].clone(),
                           W_dec=(self.W_dec[e, :f] * s_slab).contiguous())
        if member.skip:
            tensors["W_skip"] = (self.W_skip[e] * s_out / s_in.unsqueeze(1)).contiguous()
        rule = self.inference_rule(e)
        for name, t in rule.tensors.items():
            tensors[name] = t[latents] if t.shape[0] == self.G * F else t[:f]
        return tensors

    @torch.no_grad()
    def load_member_tensors_(self, e: int, tensors: dict[str, torch.Tensor], in_scale=1.0, out_scale=None) -> None:
        """Set member e from raw-space tensors as `member_tensors` writes them (W_enc [I, F],
        b_enc, W_dec [F, O], b_dec, and threshold / W_skip where the member has them), taking the
        normalisation back out: the inverse of the fold. Single encoder group only."""
        if self.G > 1:
            raise ValueError("loading exported tensors is for single-layer members")
        member = self.members[e]
        f = member.d_sae
        s_in = _per_column(in_scale, self.I, self.W_enc)
        s_out = s_in if out_scale is None and not member.is_transcoder else _per_column(
            in_scale if out_scale is None else out_scale, self.O, self.W_enc)
        if self.rule.tied_encoder:
            self.W_dec[e, :f] = tensors["W_dec"]
        else:
            self.W_enc[e, :, :f] = tensors["W_enc"] * s_in.unsqueeze(1)
            self.b_enc[e, :f] = tensors["b_enc"]
            self.W_dec[e, :f] = tensors["W_dec"] / s_out
        self.b_dec[e] = tensors["b_dec"] / s_out
        if member.skip:
            self.W_skip[e] = tensors["W_skip"] * s_in.unsqueeze(1) / s_out
        self.rule.load_tensors(self, e, tensors, f)

    def inference_rule(self, e: int) -> InferenceRule:
        """Member e's inference rule (activation name and its tensors, at full width)."""
        units = torch.arange(e * self.G, (e + 1) * self.G)
        return self.rule.infer(self, e, units)


# ---------------------------------------------------------------- extra losses
def aux_k_loss(d: Dictionary, x_BC, y_EBO, x_hat_EBO, pre_UBF) -> torch.Tensor:
    """α · AuxK (Gao et al. 2024, A.2): reconstruct the residual y − ŷ from the top-k_aux
    pre-activations among dead latents (by magnitude, signed, for a signed rule), normalised by the residual's variance. Only the dead
    latents' encoder columns are computed.  → [E]"""
    dead_UF = d.dead_latents(d.aux_dead_tokens).view(-1, d.W_enc.shape[-1])
    x_UBI, W_UIF, bias_U1F = d.inputs(x_BC), d._W_enc_units(), d._encoder_bias()
    losses = []
    for e in range(len(x_hat_EBO)):
        residual_BO = (y_EBO[e if len(y_EBO) > 1 else 0] - x_hat_EBO[e]).detach()
        estimate_BO = None
        for g in range(d.G):
            u = e * d.G + g
            cols = dead_UF[u].nonzero().squeeze(1)
            if len(cols) == 0:
                continue
            pre_dead = d.full(torch.addmm(bias_U1F[u, 0, cols], x_UBI[u if len(x_UBI) > 1 else 0], W_UIF[u][:, cols]))  # [B, n_dead]
            if d.rule.signed:  # by |pre|, signs kept, as the rule selects
                pos = pre_dead.abs().topk(min(d.aux_k, len(cols)), dim=-1).indices
                vals = pre_dead.gather(-1, pos)
            else:
                vals, pos = torch.relu(pre_dead).topk(min(d.aux_k, len(cols)), dim=-1)
            part = F_.embedding_bag(cols[pos], d.slab(g)[e], per_sample_weights=vals, mode="sum")
            part = F_.pad(part, (d.target_start(g), 0))
            estimate_BO = part if estimate_BO is None else estimate_BO + part
        if estimate_BO is None:
            losses.append(torch.zeros((), device=x_BC.device))
            continue
        variance = (residual_BO - residual_BO.mean(0)).pow(2).sum().clamp_min(1e-12)
        losses.append((estimate_BO - residual_BO).pow(2).sum() / variance)
    return d.aux_coeff * torch.stack(losses)


def gate_aux_loss(d: Dictionary, x_BC, y_EBO, x_hat_EBO, pre_UBF) -> torch.Tensor:
    """Gated SAE auxiliary loss (Rajamanoharan et al. 2024a, eq. 8): the reconstruction from
    ReLU(π_gate) through a frozen decoder, so the gate alone must carry the input.  → [E]"""
    gate_hat_EBO = torch.baddbmm(d.b_dec.detach().unsqueeze(1), torch.relu(pre_UBF), d.W_dec.detach())
    return (gate_hat_EBO - y_EBO).pow(2).mean(dim=(1, 2))


def preact_loss(d: Dictionary, x_BC, y_EBO, x_hat_EBO, pre_UBF) -> torch.Tensor:
    """λ_p · mean_b Σ_i ReLU(θ_i − pre_i) · ‖W_dec,i‖: pulls latents below threshold towards
    firing, against dead latents (the pre-activation loss of Anthropic's "Circuit Tracing", 2025).  → [E]"""
    theta_U1F = d.jump_threshold.view(-1, 1, pre_UBF.shape[-1])
    gap_UBF = d.masked(torch.relu(theta_U1F - pre_UBF)) * d.decoder_norms().unsqueeze(1)
    return d.preact_coeff * d.per_member(gap_UBF.sum(-1).mean(-1))


EXTRA_LOSSES = {"auxk": aux_k_loss, "gate_aux": gate_aux_loss, "preact": preact_loss}


# ---------------------------------------------------------------- helpers
def nested_prefix_ends(d_sae: int, fractions: tuple[float, ...]) -> list[int]:
    """End of each nested prefix: cumulative group sizes, the last group taking the rest.
    E.g. 1024 latents, (1/32, 1/16) → [32, 96, 1024]."""
    ends, total = [], 0
    for fraction in fractions:
        total += max(1, round(fraction * d_sae))
        ends.append(min(total, d_sae))
    return sorted(set(ends) | {d_sae})


def init_decoder(d_sae: int, width: int, seed: int, n_blocks: int = 1) -> torch.Tensor:
    """Random rows whose part in each of `n_blocks` equal blocks has unit norm (one block: unit
    rows), from this member's own generator (so a member's init does not depend on its
    neighbours in the ensemble).  → [F, width]"""
    generator = torch.Generator().manual_seed(seed)
    W = torch.randn(d_sae, n_blocks, width // n_blocks, generator=generator)
    return (W / W.norm(dim=-1, keepdim=True)).reshape(d_sae, width)


def default_columns(member: MemberConfig) -> dict[str, tuple[int, int]]:
    """Columns of a batch holding `member`'s inputs, then its other targets, side by side."""
    columns, start = {}, 0
    for name, width in [(n, member.d_in) for n in member.input_names()] + [(n, member.width_out) for n in member.target_names()]:
        if name not in columns:
            columns[name] = (start, width)
            start += width
    return columns


def _as_slices(index: list[list[int]], n_groups: int) -> list[slice] | None:
    """One slice per group when every member uses the same contiguous columns, else None."""
    if any(row != index[0] for row in index):
        return None
    per_group = len(index[0]) // n_groups
    slices = []
    for g in range(n_groups):
        part = index[0][g * per_group: (g + 1) * per_group]
        if part != list(range(part[0], part[0] + per_group)):
            return None
        slices.append(slice(part[0], part[0] + per_group))
    return slices


def _per_column(scale, width: int, like: torch.Tensor) -> torch.Tensor:
    """A factor, one per source, or one per column, as one per column.  → [width]"""
    s = torch.as_tensor(scale, dtype=like.dtype, device=like.device).reshape(-1)
    return s.repeat_interleave(width // len(s)) if len(s) != width else s


def _check_same(members: list[MemberConfig], *fields: str) -> None:
    if not members:
        raise ValueError("an ensemble needs at least one member")
    for name in fields:
        values = {getattr(m, name) for m in members}
        if len(values) > 1:
            raise ValueError(f"members of one ensemble must share {name}; got {sorted(values, key=str)}")
