"""Activation rules, one record each: everything the code needs to know about a rule, so that
the dictionary, the ensemble, the trainer, the memory estimate and the export ask the record
instead of branching on its name. A new rule is a new record (and its architecture in
training/members.py's registry).

A record holds:
  * `forward(d, pre [U, B, F]) → f [U, B, F]`: the training activation; or, for a rule whose
    codes are no function of one pre-activation (matching pursuit), `encode(d, x [B, C]) → f`;
  * `infer(d, e, units) → InferenceRule`: how an exported member computes f (relu | topk |
    jumprelu | gated, the rules the formats know) and the tensors it needs;
  * `parameters(members, E, G, F) → {name: tensor}`: trained parameters beyond W_enc, b_enc,
    W_dec, b_dec, and `floats_per_latent`, their size per latent of a member (memory estimate);
    `after_step(d)` keeps them valid after each step; `load_tensors(d, e, tensors, f)` sets them
    from an export's tensors (the inverse of `infer`);
  * flags: `selects_k` (the top-k family: encoder init at the decoder's transpose),
    `unit_rows_at_init` (decoder rows start unit-norm whatever the architecture's norm),
    `batch_wide` (a row's code depends on the other rows of its batch: no data-parallel split),
    `calibrates_at_export` (its inference threshold is calibrated on training rows at the end),
    `sparse_decode` (may decode only its k active latents), `signed` (codes may be negative: a
    latent is active where f ≠ 0), `tied_encoder` (the encoder is the decoder: W_enc and b_enc
    are neither trained nor exported, decoder rows stay unit-norm in raw units, and the
    normalisation folds into the codes). Which rules have no transcoder or crosscoder form is
    training/members.py's SAE_ONLY (checked before torch loads);
  * `exports_as`: the inference rule an export carries (what the formats know: relu | topk |
    jumprelu | gated; batchtopk exports as jumprelu with its calibrated threshold). Where a
    format lacks it (SAELens's and circuit-tracer's transcoders have no topk), the export
    calibrates a JumpReLU threshold instead (training/export.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, NamedTuple

import torch
from torch import nn

from formats.saelens import matching_pursuit
from training.kernels import JumpReLU, keep_top

if TYPE_CHECKING:
    from training.dictionary import Dictionary


class InferenceRule(NamedTuple):
    """How an exported member computes f at inference, for the format writers: `activation` is
    relu | topk | jumprelu | gated; `tensors` what it needs beyond W_enc, b_enc, W_dec, b_dec."""

    activation: str
    tensors: dict[str, torch.Tensor]
    k: int | None = None
    residual_threshold: float | None = None  # matching pursuit: stop a row below this residual norm (raw units)


@dataclass(frozen=True)
class ActivationRule:
    name: str
    forward: Callable[["Dictionary", torch.Tensor], torch.Tensor]
    infer: Callable[["Dictionary", int, torch.Tensor], InferenceRule]
    parameters: Callable[[list, int, int, int], dict[str, torch.Tensor]] = lambda members, E, G, F: {}
    floats_per_latent: Callable[[int], int] = lambda G: 0  # size of `parameters` per latent of a member (G groups)
    after_step: Callable[["Dictionary"], None] = lambda d: None  # constraints on `parameters` after each step
    load_tensors: Callable[["Dictionary", int, dict, int], None] = lambda d, e, tensors, f: None  # exported → ours
    selects_k: bool = False
    unit_rows_at_init: bool = False
    batch_wide: bool = False
    calibrates_at_export: bool = False
    sparse_decode: bool = False
    signed: bool = False
    tied_encoder: bool = False
    encode: Callable[["Dictionary", torch.Tensor], torch.Tensor] | None = None
    exports_as: str = ""  # the inference rule `infer` gives (relu | topk | jumprelu | gated); default: its name

    def __post_init__(self):
        if not self.exports_as:
            object.__setattr__(self, "exports_as", self.name)


# ---------------------------------------------------------------- relu
def _relu(d: "Dictionary", pre_UBF: torch.Tensor) -> torch.Tensor:
    return torch.relu(pre_UBF)


def _infer_relu(d: "Dictionary", e: int, units: torch.Tensor) -> InferenceRule:
    return InferenceRule("relu", {})


# ---------------------------------------------------------------- topk, batchtopk
def _topk(d: "Dictionary", pre_UBF: torch.Tensor) -> torch.Tensor:
    return keep_top(torch.relu(pre_UBF), d.per_unit(d.k_active))


def _infer_topk(d: "Dictionary", e: int, units: torch.Tensor) -> InferenceRule:
    return InferenceRule("topk", {}, k=int(d.k[e]))


def _abstopk(d: "Dictionary", pre_UBF: torch.Tensor) -> torch.Tensor:
    # AbsTopK (arXiv 2510.00404): the k largest |pre|, their signs kept, no ReLU
    return keep_top(pre_UBF, d.per_unit(d.k_active), pre_UBF.abs())


def _infer_abstopk(d: "Dictionary", e: int, units: torch.Tensor) -> InferenceRule:
    return InferenceRule("abstopk", {}, k=int(d.k[e]))


def _batchtopk(d: "Dictionary", pre_UBF: torch.Tensor) -> torch.Tensor:
    U, B, F = pre_UBF.shape
    return keep_top(torch.relu(pre_UBF).reshape(U, 1, B * F), d.per_unit(d.k_active) * B).reshape(U, B, F)


def _infer_batchtopk(d: "Dictionary", e: int, units: torch.Tensor) -> InferenceRule:
    F = d.W_enc.shape[-1]
    return InferenceRule("jumprelu", {"threshold": d.threshold.view(-1)[units].unsqueeze(-1).expand(-1, F).reshape(-1).clone()})


# ---------------------------------------------------------------- jumprelu
def _jumprelu(d: "Dictionary", pre_UBF: torch.Tensor) -> torch.Tensor:
    # the mask again on the output: a masked latent's θ must get no gradient either
    theta_U1F = d.jump_threshold.view(-1, 1, pre_UBF.shape[-1])
    return d.masked(JumpReLU.apply(pre_UBF, theta_U1F, d.per_unit(d.bandwidth).view(-1, 1, 1)))


def _infer_jumprelu(d: "Dictionary", e: int, units: torch.Tensor) -> InferenceRule:
    return InferenceRule("jumprelu", {"threshold": d.jump_threshold[e].clone()})


def _jumprelu_after_step(d: "Dictionary") -> None:
    d.jump_threshold.clamp_(min=1e-6)


def _jumprelu_load(d: "Dictionary", e: int, tensors: dict, f: int) -> None:
    if "threshold" in tensors:
        d.jump_threshold[e, :f] = tensors["threshold"]


def _jumprelu_parameters(members: list, E: int, G: int, F: int) -> dict[str, torch.Tensor]:
    # θ is trained directly (clamped positive after each step): Adam then moves it by ~lr per
    # step, on the scale of the normalised activations; a log-parameter would crawl.
    theta_E = torch.tensor([m.threshold_init for m in members])
    return {"jump_threshold": nn.Parameter(theta_E.unsqueeze(1).repeat(1, G * F))}


# ---------------------------------------------------------------- gated
def _gated(d: "Dictionary", pre_UBF: torch.Tensor) -> torch.Tensor:
    # π_mag = (x − b_dec)(W_enc ⊙ e^{r_mag}) + b_mag = (π − b_gate) ⊙ e^{r_mag} + b_mag
    magnitude_UBF = (pre_UBF - d.b_enc.unsqueeze(1)) * d.r_mag.exp().unsqueeze(1) + d.b_mag.unsqueeze(1)
    return (pre_UBF > 0) * torch.relu(magnitude_UBF)


def _infer_gated(d: "Dictionary", e: int, units: torch.Tensor) -> InferenceRule:
    return InferenceRule("gated", {"r_mag": d.r_mag[e].clone(), "b_mag": d.b_mag[e].clone()})


def _gated_parameters(members: list, E: int, G: int, F: int) -> dict[str, torch.Tensor]:
    # the magnitude path: W_enc ⊙ exp(r_mag), its own bias
    return {"r_mag": nn.Parameter(torch.zeros(E, F)), "b_mag": nn.Parameter(torch.zeros(E, F))}


# ---------------------------------------------------------------- matching pursuit
def _matching_pursuit(d: "Dictionary", x_BC: torch.Tensor) -> torch.Tensor:
    # the pursuit runs on x − b_dec in normalised units; the decoder rows are kept unit-norm
    x_UBI = d.inputs(x_BC) - d.b_dec.unsqueeze(1)
    mask_U1F = d.width_mask.unsqueeze(1) if d.masked_widths else None
    return matching_pursuit(x_UBI, d.W_dec, d.k_active, d.residual_threshold, mask_U1F)


def _no_pre_activation(d: "Dictionary", pre_UBF: torch.Tensor) -> torch.Tensor:
    raise TypeError("matching pursuit codes come from the input (ActivationRule.encode), not one pre-activation")


def _infer_matching_pursuit(d: "Dictionary", e: int, units: torch.Tensor) -> InferenceRule:
    return InferenceRule("matching_pursuit", {}, k=int(d.k[e]), residual_threshold=float(d.residual_threshold[e]))


RULES: dict[str, ActivationRule] = {
    "relu": ActivationRule("relu", _relu, _infer_relu),
    "topk": ActivationRule("topk", _topk, _infer_topk, selects_k=True, sparse_decode=True),
    "abstopk": ActivationRule("abstopk", _abstopk, _infer_abstopk, selects_k=True, signed=True),
    "batchtopk": ActivationRule("batchtopk", _batchtopk, _infer_batchtopk, selects_k=True, batch_wide=True,
                                calibrates_at_export=True, exports_as="jumprelu"),
    "jumprelu": ActivationRule("jumprelu", _jumprelu, _infer_jumprelu, _jumprelu_parameters, lambda G: G,
                               _jumprelu_after_step, _jumprelu_load, unit_rows_at_init=True),
    "gated": ActivationRule("gated", _gated, _infer_gated, _gated_parameters, lambda G: 2),
    "matching_pursuit": ActivationRule("matching_pursuit", _no_pre_activation, _infer_matching_pursuit,
                                       tied_encoder=True, encode=_matching_pursuit),
}


def rule_of(spec) -> ActivationRule:
    """The activation rule of an architecture (training/members.py's Arch)."""
    return RULES[spec.activation]
