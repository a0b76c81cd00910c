"""What a dictionary is, before any tensor exists: its architecture's flags (`Arch`, the table
`ARCHS`) and one member's configuration (`MemberConfig`: shape, wiring, knobs). Plain
dataclasses, so the CLIs can name the architectures without importing torch; the mechanism
they configure is training/dictionary.py.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal, get_args

LOSS_CONVENTION = "mse_mean_over_d+penalty_sum_over_latents_mean_over_batch"
ArchName = Literal["relu", "relu_april", "topk", "abstopk", "batchtopk", "jumprelu", "jumprelu_tanh", "matryoshka",
                   "gated", "panneal", "crosscoder", "matching_pursuit"]  # the keys of ARCHS (asserted below)


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
    """Per-member gradient-norm clip, on the loss summed over d (training/ensemble.py)."""
    dead_tokens: int
    """Tokens without firing after which a latent is dead (AuxK, resampling, reports)."""
    scale_lr_with_width: bool = False
    """lr ∝ 1/√(d_sae / 2¹⁴) (Gao et al. 2024)."""
    preact_coeff: float = 0.0
    """λ_p of the pre-activation loss against dead latents, for architectures that have it."""
    reference: str = ""

    def learning_rate(self, d_sae: int) -> float:
        return self.lr / math.sqrt(d_sae / 2**14) if self.scale_lr_with_width else self.lr


@dataclass(frozen=True)
class Arch:
    """Everything that distinguishes one architecture: entries of training/dictionary.py's tables,
    flags, the knobs a sweep may vary, and its recipe. Adding an architecture is one entry here
    (and, for a new rule, a function in each table it uses)."""

    activation: str  # key of ACTIVATIONS (and of INFERENCE_RULES)
    penalty: str  # key of PENALTIES
    subtract_b_dec: bool  # encode x − b_dec (SAELens apply_b_dec_to_input); never for transcoders
    unit_norm_decoder: bool
    knobs: tuple[str, ...]  # MemberConfig fields this architecture reads (what a sweep may vary)
    recipe: Recipe
    betas: tuple[float, float] = (0.9, 0.999)  # Adam betas shared by the ensemble
    extra_losses: tuple[str, ...] = ()  # keys of EXTRA_LOSSES
    nested: bool = False  # reconstruction loss averaged over nested prefixes of the latents (Matryoshka)
    reads_every_source: bool = False  # without --sources, it reads every source of the store (a crosscoder)
    k_axis: tuple[int, ...] = (20, 40, 80, 160, 320, 640)  # the default axis of k where k is a knob: the L0 range
    # frontiers are compared on (matching pursuit's k is its steps, each a full encoder product: a shorter one)

    @property
    def coefficient(self) -> str | None:
        """The MemberConfig field that scales the penalty (None: no penalty)."""
        return {"none": None, "l0": "l0_coeff", "tanh": "l0_coeff"}.get(self.penalty, "l1_coeff")

    @property
    def resamples(self) -> bool:
        """Dead latents are resampled (Anthropic 2023) in the L1 family; the TopK family has
        AuxK and JumpReLU its thresholds instead."""
        return self.penalty in ("l1", "l1_decoder_norm", "l1_gate", "lp")

    @property
    def aux_k(self) -> bool:
        return "auxk" in self.extra_losses


# Recipes. References: dictionary_learning's trainers (lr warm-up 1000 steps, sparsity warm-up 2000
# steps, decay over the last 20%, clip 1, on runs of ~10k–25k steps: ≈ 5% and 10%); Anthropic's
# April 2024 update and crosscoder recipe (λ warm-up 5%, decay over the last 20%, clip 1);
# Gao et al. 2024 for TopK (lr ∝ 1/√m, dead after 10M tokens); Rajamanoharan et al. 2024
# / dictionary_learning for JumpReLU (lr 7e-5) and Gated (lr 5e-5); Anthropic's "Circuit Tracing"
# (2025) for the cross-layer transcoder (λ warms up over the whole run).
_L1 = Recipe(1e-3, 0.05, 0.8, 0.10, 1.0, 1_000_000, reference="dictionary_learning standard: lr 1e-3")
_APRIL = Recipe(1e-3, 0.0, 0.8, 0.05, 1.0, 1_000_000, reference="Anthropic April 2024 update, crosscoders (Lindsey et al. 2024)")
_GAO = Recipe(8e-4, 0.05, 0.8, 0.0, 1.0, 10_000_000, scale_lr_with_width=True,
              reference="Gao et al. 2024 (lr 2e-4/√(m/2¹⁴); 4× that measured better here at 0.4M and 4.1M tokens, "
                        "bench/RESULTS.md); Bussmann et al. 2024 (BatchTopK), 2025 (Matryoshka)")
_JUMP = Recipe(1e-3, 0.05, 0.8, 0.10, 1.0, 10_000_000, preact_coeff=3e-7,
               reference="Rajamanoharan et al. 2024 use 7e-5; 1e-3 measured better here, and the pre-activation "
                         "loss at 3e-7 (dead latents 20-36% -> 3-15%, FVU no worse; bench/RESULTS.md)")
_COMMON = ("lr", "seed", "grad_clip", "d_sae")
_TOPK = ("k", "aux_coeff", *_COMMON)
_JUMP_KNOBS = ("l0_coeff", "preact_coeff", "bandwidth", "threshold_init", *_COMMON)
ARCHS = {
    "relu": Arch("relu", "l1", True, True, ("l1_coeff", *_COMMON), _L1, betas=(0.9, 0.99)),
    "relu_april": Arch("relu", "l1_decoder_norm", False, False, ("l1_coeff", "decoder_init_norm", *_COMMON), _APRIL),
    "topk": Arch("topk", "none", True, True, _TOPK, _GAO, extra_losses=("auxk",)),
    "abstopk": Arch("abstopk", "none", True, True, _TOPK, _GAO, extra_losses=("auxk",)),
    "batchtopk": Arch("batchtopk", "none", True, True, _TOPK, _GAO, extra_losses=("auxk",)),
    "jumprelu": Arch("jumprelu", "l0", False, False, _JUMP_KNOBS, _JUMP, betas=(0.0, 0.999), extra_losses=("preact",)),
    "jumprelu_tanh": Arch("jumprelu", "tanh", False, False,
                          ("l0_coeff", "tanh_c", *_JUMP_KNOBS[1:]),
                          Recipe(1e-3, 0.05, 0.8, 1.0, 1.0, 10_000_000, preact_coeff=3e-6,
                                 reference="Anthropic, Circuit Tracing 2025 (schedule); 1e-3 measured better than 1e-4 "
                                           "here (bench/RESULTS.md)"),
                          extra_losses=("preact",)),
    "matryoshka": Arch("batchtopk", "none", True, True, _TOPK, _GAO, extra_losses=("auxk",), nested=True),
    "gated": Arch("gated", "l1_gate", True, True, ("l1_coeff", *_COMMON),
                  Recipe(1e-3, 0.05, 0.8, 0.10, 1.0, 1_000_000,
                         reference="Rajamanoharan et al. 2024a use 5e-5; 1e-3 measured better here (bench/RESULTS.md)"),
                  betas=(0.0, 0.999), extra_losses=("gate_aux",)),
    "panneal": Arch("relu", "lp", True, True, ("l1_coeff", "p_end", *_COMMON), _L1),
    "crosscoder": Arch("relu", "l1_decoder_norm", False, False, ("l1_coeff", "decoder_init_norm", *_COMMON), _APRIL,
                       reads_every_source=True),
    "matching_pursuit": Arch("matching_pursuit", "none", True, True, ("k", "residual_threshold", *_COMMON), _GAO,
                             k_axis=(8, 16, 32, 64)),
}
assert tuple(ARCHS) == get_args(ArchName), "ArchName must list ARCHS"
CLT_ACTIVATIONS = ("relu", "topk", "batchtopk", "jumprelu")  # what a cross-layer transcoder may use
SAE_ONLY = ("abstopk", "matching_pursuit")  # rules with no transcoder or crosscoder form in SAELens or circuit-tracer


@dataclass(frozen=True)
class MemberConfig:
    """One dictionary of a sweep: its architecture, shape, wiring and knobs."""

    d_in: int
    """Width of each input source."""
    d_sae: int
    """Number of latents (per layer for a cross-layer transcoder)."""
    arch: str = "relu"
    """Architecture; one of ARCHS."""
    n_sources: int = 1
    """Input sources: read side by side (a crosscoder's layers × models, input S·d_in wide), or one
    per encoder group (a cross-layer transcoder's layers)."""
    inputs: tuple[str, ...] = ()
    """Names of the input sources in the store (recorded; locate the member's columns)."""
    targets: tuple[str, ...] = ()
    """Names of the sources it reconstructs; () means its inputs (an SAE or crosscoder)."""
    d_out: int | None = None
    """Width of each target source (None: d_in)."""
    cross_layer: bool = False
    """Cross-layer transcoder: input source l feeds encoder group l, whose latents write to targets l … L−1."""
    skip: bool = False
    """Add a linear skip term x W_skip (skip transcoders; starts at 0)."""
    l1_coeff: float = 0.0
    """λ of the L1 penalties (relu, relu_april, gated, panneal, crosscoder)."""
    l0_coeff: float = 0.0
    """λ of the L0 penalty (jumprelu) or of the tanh penalty (jumprelu_tanh)."""
    k: int = 32
    """Active latents per row (topk, abstopk), or per row on average over the batch (batchtopk), or the
    most pursuit steps per row (matching_pursuit)."""
    residual_threshold: float = 1e-2
    """matching_pursuit: a row stops once its residual norm is below this (normalised units, where rows
    have norm ≈ √d; exported in raw units). SAELens's default."""
    bandwidth: float = 1e-3
    """Rectangle-kernel width ε of the JumpReLU straight-through estimator."""
    threshold_init: float = 1e-3
    """Initial JumpReLU threshold θ."""
    tanh_c: float = 4.0
    """c of the tanh penalty tanh(c·f·‖W_dec‖) (jumprelu_tanh)."""
    preact_coeff: float | None = None
    """λ_p of the pre-activation term against dead latents (jumprelu, jumprelu_tanh) [default: the
    architecture's recipe: 3e-7 for jumprelu (measured), 3e-6 for jumprelu_tanh (Anthropic's)]."""
    aux_coeff: float = 1 / 32
    """α of the AuxK loss (topk, batchtopk, matryoshka)."""
    aux_k: int | None = None
    """Dead latents AuxK reconstructs from; default half the width the member writes."""
    p_end: float = 0.2
    """Final exponent of the Lp penalty (panneal), reached in steps from p = 1."""
    decoder_init_norm: float = 0.1
    """Initial norm of each target's decoder vector where norms are free (relu_april, crosscoder)."""
    group_fractions: tuple[float, ...] = (1 / 32, 1 / 16, 1 / 8, 1 / 4)
    """Matryoshka: sizes of the nested groups as fractions of d_sae; the rest is the last group."""
    lr: float = 1e-3
    """Adam learning rate."""
    grad_clip: float | None = None
    """Clip this member's gradient norm (over all its parameters) to this value, as the references
    clip it: the gradient of the loss with the reconstruction summed over d (ours averages it)."""
    seed: int = 0
    """Seed of this member's initialisation."""

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ValueError(f"unknown architecture {self.arch!r}; choose one of {', '.join(ARCHS)}")
        if self.preact_coeff is None:  # frozen: resolved once, so the saved config states the value used
            object.__setattr__(self, "preact_coeff", ARCHS[self.arch].recipe.preact_coeff)
        if self.d_in < 1 or self.d_sae < 1 or self.n_sources < 1 or (self.d_out is not None and self.d_out < 1):
            raise ValueError(f"dictionary widths must be positive (d_in={self.d_in}, d_out={self.d_out}, "
                             f"d_sae={self.d_sae}, n_sources={self.n_sources})")
        if self.inputs and len(self.inputs) != self.n_sources:
            raise ValueError(f"{len(self.inputs)} input names for n_sources={self.n_sources}")
        self._check_wiring()
        for name in ("l1_coeff", "l0_coeff", "aux_coeff", "preact_coeff", "residual_threshold"):
            value = getattr(self, name)
            if value < 0 or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number ≥ 0, got {value}")
        if "k" in self.spec.knobs and not 1 <= self.k <= self.d_sae:
            raise ValueError(f"k must be between 1 and d_sae={self.d_sae}, got {self.k}")
        for name in ("lr", "bandwidth", "threshold_init", "decoder_init_norm", "tanh_c"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0 < self.p_end <= 1:
            raise ValueError(f"p_end must be in (0, 1], got {self.p_end}")
        if any(f <= 0 for f in self.group_fractions) or sum(self.group_fractions) >= 1:
            raise ValueError(f"group_fractions must be positive and sum below 1, got {self.group_fractions}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ValueError(f"grad_clip must be positive, got {self.grad_clip}")

    def _check_wiring(self) -> None:
        spec = self.spec
        if spec.activation in SAE_ONLY and (self.is_transcoder or self.n_sources > 1):
            raise ValueError(f"{self.arch} is for SAEs only (one source, reconstructed): SAELens has no transcoder or "
                             "crosscoder form of it; use topk or jumprelu")
        if self.n_sources > 1 and spec.activation == "gated" and not self.cross_layer:
            raise ValueError("gated has no multi-source (crosscoder) form; use crosscoder, batchtopk, topk or jumprelu")
        if self.skip and (not self.is_transcoder or self.cross_layer):
            raise ValueError("skip terms are for single-layer transcoders (set targets, not cross_layer)")
        if self.cross_layer:
            if not self.is_transcoder or self.n_targets != self.n_sources:
                raise ValueError(f"a cross-layer transcoder reads one input per layer and writes one target per layer; "
                                 f"got {self.n_sources} inputs and {self.n_targets} targets")
            if spec.activation not in CLT_ACTIVATIONS or spec.nested or spec.penalty in ("lp", "l1_decoder_norm"):
                raise ValueError(f"{self.arch} has no cross-layer form; use jumprelu_tanh (clt), jumprelu, topk or batchtopk")

    # ---------------------------------------------------------------- derived shape facts
    @property
    def spec(self) -> Arch:
        return ARCHS[self.arch]

    @property
    def is_transcoder(self) -> bool:
        return bool(self.targets) and tuple(self.targets) != tuple(self.inputs)

    @property
    def subtract_b_dec(self) -> bool:
        return self.spec.subtract_b_dec and not self.is_transcoder

    @property
    def n_targets(self) -> int:
        return len(self.targets) if self.is_transcoder else self.n_sources

    @property
    def width_out(self) -> int:
        """Width of each target source."""
        return self.d_out or self.d_in

    @property
    def n_groups(self) -> int:
        return self.n_sources if self.cross_layer else 1

    @property
    def unit_in(self) -> int:
        """Input width of one encoder group."""
        return self.d_in if self.cross_layer else self.n_sources * self.d_in

    @property
    def member_out(self) -> int:
        """Width of everything the member writes."""
        return self.n_targets * self.width_out

    def input_names(self) -> tuple[str, ...]:
        return self.inputs or tuple(f"input{i}" for i in range(self.n_sources))

    def target_names(self) -> tuple[str, ...]:
        return self.targets if self.is_transcoder else self.input_names()

    def to_dict(self) -> dict:
        return asdict(self)

    def record(self) -> dict:
        """The fields this member's architecture and wiring read (what cfg.json/sweep.json record)."""
        spec_knobs = set(self.spec.knobs) | {"d_in", "d_sae", "arch", "n_sources", "inputs", "lr", "seed", "grad_clip"}
        if self.spec.aux_k:
            spec_knobs.add("aux_k")
        if self.spec.nested:
            spec_knobs.add("group_fractions")
        if self.is_transcoder:
            spec_knobs |= {"targets", "d_out", "cross_layer", "skip"}
        return {k: v for k, v in asdict(self).items() if k in spec_knobs}

    @classmethod
    def from_dict(cls, values: dict) -> "MemberConfig":
        known = {f for f in cls.__dataclass_fields__}
        kw = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k in known}
        return cls(**kw)
