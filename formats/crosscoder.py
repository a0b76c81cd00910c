"""The crosscoder file format: a directory of `config.json` + `model.safetensors`, its writer, its
loader and its forward pass (evaluation/model_diff.py analyses the decoders it holds).

Dimension key: B batch, S sources (layers × models), D d_in per source, M d_sae (latents).

A crosscoder (Lindsey et al. 2024, "Sparse Crosscoders", Anthropic) reads S activation vectors at
once through one shared set of latents; each latent owns one decoder vector per source:

    pre_BM  = Σ_s (x_s − b_dec[s] if apply_b_dec_to_input else x_s) W_enc[s] + b_enc
    f_BM    = relu(pre)                      "relu"
              relu(pre) · 1[pre > threshold] "jumprelu"
              top k of relu(pre) per row     "topk"
    x̂_BSD  = Σ_i f_i W_dec[i, s] + b_dec[s]

Tensors: W_enc [S, D, M], b_enc [M], W_dec [M, S, D], b_dec [S, D], threshold [M] (jumprelu only),
float32. The weights act on RAW activations x_BSD: the trainer folds its per-source normalisation in
before saving, so nothing here rescales inputs (a "normalisation" key in the config is a record only).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from runtime.disk import save_tensors

CROSSCODER_FORMAT = "sae-sweep-crosscoder"
CROSSCODER_FORMAT_VERSION = 1
ARCHITECTURES = ("relu", "jumprelu", "topk")
_REQUIRED = ("format", "format_version", "architecture", "apply_b_dec_to_input", "n_sources", "d_in", "d_sae",
             "sources")


def expected_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Name → shape of every tensor a member with this config stores."""
    S, D, M = config["n_sources"], config["d_in"], config["d_sae"]
    shapes = {"W_enc": (S, D, M), "b_enc": (M,), "W_dec": (M, S, D), "b_dec": (S, D)}
    if config["architecture"] == "jumprelu":
        shapes["threshold"] = (M,)
    return shapes


def _check_config(config: dict, where: str) -> None:
    """Raise ValueError unless `config` is a crosscoder config this reader understands."""
    if not isinstance(config, dict) or config.get("format") != CROSSCODER_FORMAT:
        found = config.get("format") if isinstance(config, dict) else type(config).__name__
        raise ValueError(f"{where}: format {found!r} is not a {CROSSCODER_FORMAT} "
                         "(SAELens SAE directories load with formats.saelens.load_saelens)")
    version = config.get("format_version")
    if not isinstance(version, int) or version > CROSSCODER_FORMAT_VERSION:
        raise ValueError(f"{where}: format_version {version!r} is newer than this reader, which reads integer "
                         f"versions up to {CROSSCODER_FORMAT_VERSION}; load it with the sae-sweep that wrote it")
    missing = [key for key in _REQUIRED if key not in config]
    if missing:
        raise ValueError(f"{where}: config lacks required keys {missing}")
    if config["architecture"] not in ARCHITECTURES:
        raise ValueError(f"{where}: architecture {config['architecture']!r} is not one of {ARCHITECTURES}")
    if config["architecture"] == "topk" and not isinstance(config.get("k"), int):
        raise ValueError(f"{where}: a topk crosscoder needs an integer 'k' in its config")
    sources = config["sources"]
    if len(sources) != config["n_sources"] or any(not {"name", "model", "hook"} <= set(s) for s in sources):
        raise ValueError(f"{where}: 'sources' must be {config['n_sources']} dicts with name, model and hook")


def _check_tensors(config: dict, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Raise ValueError unless `tensors` are exactly the ones `config` describes, with its shapes."""
    shapes = expected_shapes(config)
    if set(tensors) != set(shapes):
        raise ValueError(f"{where}: got tensors {sorted(tensors)}, but a {config['architecture']} crosscoder "
                         f"stores exactly {sorted(shapes)}")
    for name, shape in shapes.items():
        if tuple(tensors[name].shape) != shape:
            raise ValueError(f"{where}: tensor {name} should have shape {list(shape)} "
                             f"(from n_sources, d_in, d_sae), got {list(tensors[name].shape)}")


def save_crosscoder(directory: str | Path, tensors: dict[str, torch.Tensor], config: dict) -> Path:
    """Write `config.json` (format keys filled in; other keys kept as given) and `model.safetensors`."""
    directory = Path(directory)
    config = {"format": CROSSCODER_FORMAT, "format_version": CROSSCODER_FORMAT_VERSION, **config}
    _check_config(config, f"save_crosscoder({directory})")
    _check_tensors(config, tensors, f"save_crosscoder({directory})")
    directory.mkdir(parents=True, exist_ok=True)
    save_tensors({k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}, directory / "model.safetensors")
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    return directory


def load_crosscoder(directory: str | Path, device: str | torch.device = "cpu") -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json contents, weights) of an exported crosscoder, checked against each other."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"no crosscoder directory at {directory}")
    for name in ("config.json", "model.safetensors"):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory} lacks {name}: a crosscoder directory holds config.json and "
                                    "model.safetensors, as written by save_crosscoder")
    config = json.loads((directory / "config.json").read_text())
    _check_config(config, str(directory))
    w = load_file(directory / "model.safetensors", device=str(device))
    _check_tensors(config, w, str(directory))
    return config, w


def is_crosscoder_dir(directory: str | Path) -> bool:
    """True if `directory` holds a config.json that declares our format."""
    try:
        config = json.loads((Path(directory) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("format") == CROSSCODER_FORMAT


def crosscoder_forward(
    config: dict, w: dict[str, torch.Tensor], x_BSD: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inference on raw activations.  x [B, S, D] → (f [B, M], x̂ [B, S, D])"""
    arch = config["architecture"]
    if arch not in ARCHITECTURES:
        raise ValueError(f"no crosscoder forward for architecture {arch!r}; known: {ARCHITECTURES}")
    x_in_BSD = x_BSD - w["b_dec"] if config["apply_b_dec_to_input"] else x_BSD
    pre_BM = torch.einsum("bsd,sdm->bm", x_in_BSD, w["W_enc"]) + w["b_enc"]
    f_BM = torch.relu(pre_BM)
    if arch == "jumprelu":
        f_BM = f_BM * (pre_BM > w["threshold"])
    elif arch == "topk":
        values_BK, index_BK = f_BM.topk(config["k"], dim=-1)
        f_BM = torch.zeros_like(f_BM).scatter(-1, index_BK, values_BK)
    return f_BM, torch.einsum("bm,msd->bsd", f_BM, w["W_dec"]) + w["b_dec"]
