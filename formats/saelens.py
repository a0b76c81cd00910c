"""The SAELens 6.x directory format: `cfg.json` + `sae_weights.safetensors` (+ `sparsity.safetensors`
with log10 feature density). Its writer, its reader and its forward pass; SAELens's own
`SAE.load_from_disk(dir)` loads what is written here (tested), and `load_saelens` +
`saelens_forward` give the same outputs without SAELens.

Architectures: SAEs `standard` | `topk` | `abstopk` | `jumprelu` | `gated` | `matching_pursuit`; single-layer transcoders
`transcoder` | `skip_transcoder` | `jumprelu_transcoder` | `jumprelu_skip_transcoder` (their b_dec
lives in output space, `d_out` wide, and is never subtracted from the input; W_skip is stored
[d_out, d_in] and applied as x W_skipᵀ).

Weights are for *raw* activations: the trainer folds its normalisation in before writing, so
`normalize_activations` is "none".

`matching_pursuit` is defined here (`matching_pursuit`, SAELens's encoder, vectorised over a
leading unit axis) and used by the trainer too, so a member computes what the exported file does.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from runtime.disk import save_tensors

# The SAELens config format these files follow (its loader drops `metadata` below 6.0.0).
SAELENS_FORMAT_VERSION = "6.0.0"
_SAE_ARCHITECTURES = {"relu": "standard", "topk": "topk", "abstopk": "abstopk", "jumprelu": "jumprelu", "gated": "gated",
                      "matching_pursuit": "matching_pursuit"}
_TIED = ("matching_pursuit",)  # encoder = W_decᵀ: no W_enc, b_enc in the file
_TRANSCODER_ARCHITECTURES = {("relu", False): "transcoder", ("relu", True): "skip_transcoder",
                             ("jumprelu", False): "jumprelu_transcoder", ("jumprelu", True): "jumprelu_skip_transcoder"}


_TENSOR_NAMES = {"gated": {"b_enc": "b_gate"}}  # our tensor → SAELens's, per inference rule where they differ


def saelens_has(activation: str, transcoder: bool = False, skip: bool = False) -> bool:
    """Whether SAELens has an architecture for this inference rule (its transcoders: ReLU and JumpReLU only)."""
    return (activation, skip) in _TRANSCODER_ARCHITECTURES if transcoder else activation in _SAE_ARCHITECTURES


def saelens_tensors(activation: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our tensors under SAELens's names for this inference rule (gated: b_enc is its b_gate)."""
    names = _TENSOR_NAMES.get(activation, {})
    return {names.get(name, name): t for name, t in tensors.items()}


def saelens_architecture(activation: str, transcoder: bool = False, skip: bool = False) -> str:
    """The SAELens architecture name of an inference rule (relu | topk | jumprelu | gated)."""
    if not saelens_has(activation, transcoder, skip):
        raise ValueError(f"SAELens has no {activation} {'transcoder' if transcoder else 'SAE'}; "
                         "export it as jumprelu (a calibrated threshold)")
    if transcoder:
        return _TRANSCODER_ARCHITECTURES[activation, skip]
    return _SAE_ARCHITECTURES[activation]


def saelens_cfg(*, architecture: str, d_in: int, d_sae: int, metadata: dict, apply_b_dec_to_input: bool,
                d_out: int | None = None, k: int | None = None, settings: dict | None = None) -> dict:
    """cfg.json contents. `metadata`: model_name, model_class_name and model_from_pretrained_kwargs
    (how the model is loaded to compute the activations trained on), hook_name (hook_name_out for
    transcoders), context_size, prepend_bos, dataset_path, seqpos_slice, exclude_special_tokens,
    and our record; `settings`: the architecture's own keys (matching_pursuit: max_iterations,
    residual_threshold)."""
    cfg = {
        "architecture": architecture,
        "d_in": d_in,
        "d_sae": d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": apply_b_dec_to_input,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {"sae_lens_version": SAELENS_FORMAT_VERSION, "hook_head_index": None, **metadata},
    }
    if d_out is not None:
        cfg["d_out"] = d_out
    if architecture in ("topk", "abstopk"):
        cfg.update(k=k, rescale_acts_by_decoder_norm=False)
    if architecture == "matching_pursuit":
        cfg.update(max_iterations=k, stop_on_duplicate_support=True)
    return {**cfg, **(settings or {})}


def save_saelens(directory: str | Path, tensors: dict[str, torch.Tensor], cfg: dict,
                 density_F: torch.Tensor | None = None) -> Path:
    """Write cfg.json, sae_weights.safetensors and, given a density, sparsity.safetensors.
    `tensors` in SAELens names (W_skip already [d_out, d_in])."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_tensors({k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}, directory / "sae_weights.safetensors")
    if density_F is not None:
        save_density(directory, density_F)
    (directory / "cfg.json").write_text(json.dumps(cfg, indent=2))
    return directory


def save_density(directory: str | Path, density_F: torch.Tensor) -> None:
    """sparsity.safetensors: tensor `sparsity` = log10 of each latent's firing density."""
    log10_density = torch.log10(density_F.float().cpu().clamp_min(1e-10))
    save_tensors({"sparsity": log10_density.contiguous()}, Path(directory) / "sparsity.safetensors")


def load_saelens(directory: str | Path, device: str | torch.device = "cpu") -> tuple[dict, dict[str, torch.Tensor]]:
    """(cfg.json contents, weights) of a SAELens directory."""
    directory = Path(directory)
    for name in ("cfg.json", "sae_weights.safetensors"):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory} lacks {name}: a SAELens directory holds cfg.json and sae_weights.safetensors")
    cfg = json.loads((directory / "cfg.json").read_text())
    return cfg, load_file(directory / "sae_weights.safetensors", device=str(device))


def saelens_forward(cfg: dict, w: dict[str, torch.Tensor], x_BD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SAELens inference semantics on raw activations.  x [B, d_in] → (f [B, F], x̂ [B, d_out])"""
    arch = cfg["architecture"]
    transcoder = "transcoder" in arch
    x_in = x_BD - w["b_dec"] if cfg.get("apply_b_dec_to_input", True) and not transcoder else x_BD
    if arch in _TIED:
        U1 = torch.ones(1, dtype=torch.long)
        f_BF = matching_pursuit(x_in.unsqueeze(0), w["W_dec"].unsqueeze(0), U1 * (cfg["max_iterations"] or x_BD.shape[-1]),
                                torch.tensor([cfg["residual_threshold"]], dtype=x_BD.dtype))[0]
        return f_BF, f_BF @ w["W_dec"] + w["b_dec"]
    if arch == "gated":
        gate_BF = x_in @ w["W_enc"] + w["b_gate"]
        f_BF = (gate_BF > 0) * torch.relu(x_in @ (w["W_enc"] * w["r_mag"].exp()) + w["b_mag"])
        return f_BF, f_BF @ w["W_dec"] + w["b_dec"]
    pre_BF = x_in @ w["W_enc"] + w["b_enc"]
    f_BF = torch.relu(pre_BF)
    if arch == "abstopk":  # the k largest |pre|, signed
        index = pre_BF.abs().topk(cfg["k"], dim=-1).indices
        f_BF = torch.zeros_like(pre_BF).scatter(-1, index, pre_BF.gather(-1, index))
    elif arch == "topk":
        values, index = f_BF.topk(cfg["k"], dim=-1)
        f_BF = torch.zeros_like(f_BF).scatter(-1, index, values)
    elif arch.startswith("jumprelu"):
        f_BF = f_BF * (pre_BF > w["threshold"])
    elif arch not in ("standard", "transcoder", "skip_transcoder"):
        raise ValueError(f"no reader for SAELens architecture {arch!r}")
    out = f_BF @ w["W_dec"] + w["b_dec"]
    if "W_skip" in w:
        out = out + x_BD @ w["W_skip"].T
    return f_BF, out


def matching_pursuit(x_UBD: torch.Tensor, W_dec_UFD: torch.Tensor, k_U: torch.Tensor, threshold_U: torch.Tensor,
                     allowed_U1F: torch.Tensor | None = None) -> torch.Tensor:
    """Matching pursuit codes, as SAELens's `matching_pursuit` computes them (MP-SAE, Costa et al.
    2025, arXiv 2506.03093), for U units at once. Each step picks, per row, the latent whose
    (unit-norm) decoder row best matches the residual, adds the residual's projection on it
    (ReLU'd) to that latent and subtracts its contribution. A row stops after k_u steps, once its
    residual norm is below threshold_u, or when a step adds no new latent (SAELens's
    stop_on_duplicate_support). Differentiable in the coefficients and decoder rows, as SAELens's.
    x [U, B, D] (already minus b_dec), W_dec [U, F, D], k [U], threshold [U], optional mask of the
    latents each unit has [U, 1, F]  → f [U, B, F]"""
    U, B, D = x_UBD.shape
    residual_UBD = x_UBD
    acts_UBF = x_UBD.new_zeros(U, B, W_dec_UFD.shape[1])
    done_UB = torch.zeros(U, B, dtype=torch.bool, device=x_UBD.device)
    threshold_U1 = threshold_U.view(U, 1).to(x_UBD.dtype)
    for step in range(int(k_U.max())):
        done_UB = done_UB | (step >= k_U.view(U, 1))
        if done_UB.all():
            break
        with torch.no_grad():  # which latent: no gradient through the choice
            score_UBF = torch.bmm(residual_UBD, W_dec_UFD.transpose(1, 2)).relu()
            if allowed_U1F is not None:
                score_UBF = score_UBF * allowed_U1F
            index_UB1 = score_UBF.max(dim=-1, keepdim=True).indices
        row_UBD = torch.gather(W_dec_UFD, 1, index_UB1.expand(-1, -1, D))
        value_UB1 = (residual_UBD * row_UBD).sum(-1, keepdim=True).relu() * (~done_UB).unsqueeze(-1)
        with torch.no_grad():
            new_UB = (value_UB1.squeeze(-1) > 0) & (acts_UBF.gather(-1, index_UB1).squeeze(-1) == 0)
        acts_UBF = acts_UBF.scatter_add(-1, index_UB1, value_UB1)
        residual_UBD = residual_UBD - value_UB1 * row_UBD
        with torch.no_grad():
            done_UB = done_UB | ~new_UB | (residual_UBD.norm(dim=-1) < threshold_U1)
    return acts_UBF
