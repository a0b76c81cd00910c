"""Write one member as a SAELens 6.x directory: `cfg.json` + `sae_weights.safetensors`
(+ `sparsity.safetensors` with log10 feature density), and read it back. Loads with SAELens's
`SAE.load_from_disk(dir)`; `load_member` + `sae_forward` give the same outputs without SAELens.

Weights are written for *raw* activations: the store's normalisation factor is folded in by the
dictionary (`member_tensors(e, scale)`), so `normalize_activations` is "none".
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

# The SAELens config format these files follow (its loader drops `metadata` below 6.0.0).
SAELENS_FORMAT_VERSION = "6.0.0"


def saelens_cfg(
    *, arch_fields: dict, d_in: int, d_sae: int, store_info: dict, hook_name: str, member: dict
) -> dict:
    """cfg.json contents for one member."""
    return {
        **arch_fields,
        "d_in": d_in,
        "d_sae": d_sae,
        "dtype": "float32",
        "device": "cpu",
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {
            "sae_lens_version": SAELENS_FORMAT_VERSION,
            "model_name": store_info["model_name"],
            "hook_name": hook_name,
            "hook_head_index": None,
            "context_size": store_info["context_length"],
            "prepend_bos": store_info["prepend_bos"],
            "dataset_path": store_info["dataset"],
            "model_from_pretrained_kwargs": {},
            "seqpos_slice": [1 if store_info["exclude_bos"] else 0, None],
            "exclude_special_tokens": bool(store_info["exclude_bos"]),
            "sae_sweep": member,
        },
    }


def save_saelens(
    directory: str | Path, tensors: dict[str, torch.Tensor], cfg: dict, density_F: torch.Tensor | None = None
) -> Path:
    """Write cfg.json, sae_weights.safetensors and, given a density, sparsity.safetensors."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}, directory / "sae_weights.safetensors")
    if density_F is not None:
        log10_density = torch.log10(density_F.float().cpu().clamp_min(1e-10))
        save_file({"sparsity": log10_density.contiguous()}, directory / "sparsity.safetensors")
    (directory / "cfg.json").write_text(json.dumps(cfg, indent=2))
    return directory


def load_member(directory: str | Path, device: str | torch.device = "cpu") -> tuple[dict, dict[str, torch.Tensor]]:
    """(cfg.json contents, weights) of an exported member."""
    directory = Path(directory)
    cfg = json.loads((directory / "cfg.json").read_text())
    return cfg, load_file(directory / "sae_weights.safetensors", device=str(device))


def sae_forward(cfg: dict, w: dict[str, torch.Tensor], x_BD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SAELens inference semantics on raw activations.  x [B, D] → (f [B, F], x̂ [B, D])"""
    arch = cfg["architecture"]
    x_in = x_BD - w["b_dec"] if cfg.get("apply_b_dec_to_input", True) else x_BD
    if arch == "gated":
        gate_BF = x_in @ w["W_enc"] + w["b_gate"]
        f_BF = (gate_BF > 0) * torch.relu(x_in @ (w["W_enc"] * w["r_mag"].exp()) + w["b_mag"])
        return f_BF, f_BF @ w["W_dec"] + w["b_dec"]
    pre_BF = x_in @ w["W_enc"] + w["b_enc"]
    f_BF = torch.relu(pre_BF)
    if arch == "topk":
        values, index = f_BF.topk(cfg["k"], dim=-1)
        f_BF = torch.zeros_like(f_BF).scatter(-1, index, values)
    elif arch == "jumprelu":
        f_BF = f_BF * (pre_BF > w["threshold"])
    elif arch != "standard":
        raise ValueError(f"no reader for SAELens architecture {arch!r}")
    return f_BF, f_BF @ w["W_dec"] + w["b_dec"]
