"""circuit-tracer 0.5's on-disk formats for transcoders: a set of per-layer transcoders, and a
cross-layer transcoder (CLT). Their writer, our reader and forward pass (for evaluation);
circuit-tracer's own loaders read what is written here (tested in an environment of its own,
tests/test_circuit_tracer.py).

Both are a directory with `config.yaml` (`model_kind`, `feature_input_hook` and
`feature_output_hook` relative to a block, e.g. `ln2.hook_normalized` and `hook_mlp_out`, and
`model_name`) and float32 safetensors; sizes come from the tensors. Our record of the member is in
`sae_sweep.json` beside them.

    transcoder_set           layer_{l}.safetensors: W_enc [F, d], W_dec [F, d], b_enc [F], b_dec [d],
                             optional activation_function.threshold [F], optional W_skip [d_out, d_in]
    cross_layer_transcoder   W_enc_{l}.safetensors: W_enc_{l} [F, d], b_enc_{l} [F], b_dec_{l} [d] (layer l's
                             output bias), optional threshold_{l} [F] (then on every layer);
                             W_dec_{l}.safetensors: W_dec_{l} [F, L − l, d] (slot j writes layer l + j)

Semantics (what circuit-tracer computes, and `forward` here): f_l = σ(x_l W_enc_lᵀ + b_enc_l) with
σ = ReLU, or JumpReLU x·1[x > θ] where thresholds are present; no input centring or scaling at
load, so every normalisation is folded into the weights before writing. A transcoder set writes
ŷ_l = f_l W_dec_l + b_dec_l (+ x_l W_skipᵀ); a CLT writes ŷ_m = Σ_{l ≤ m} f_l W_dec_l[m − l] + b_dec_m.
circuit-tracer needs every layer 0 … L−1 with one F.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from runtime.disk import save_tensors

INFERENCE_RULES = ("relu", "jumprelu")  # what circuit-tracer runs (JumpReLU where thresholds are present)
TRANSCODER_SET = "transcoder_set"
CLT = "cross_layer_transcoder"
RECORD = "sae_sweep.json"


def save_transcoder_set(directory: str | Path, layers: dict[int, dict[str, torch.Tensor]], *, input_hook: str,
                        output_hook: str, model_name: str, record: dict, describe: bool = True) -> Path:
    """One layer_{l}.safetensors per layer (tensors in circuit-tracer's names and layout).
    `describe`: also write config.yaml and the record (processes that each write some of a
    set's layers leave it to one of them)."""
    if describe:
        directory = _start(directory, TRANSCODER_SET, input_hook, output_hook, model_name, record)
    else:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
    for layer, tensors in layers.items():
        save_tensors(_contiguous(tensors), directory / f"layer_{layer}.safetensors")
    return directory


def save_clt(directory: str | Path, layers: dict[int, dict[str, torch.Tensor]], *, input_hook: str, output_hook: str,
             model_name: str, record: dict) -> Path:
    """W_enc_{l} and W_dec_{l} files per layer; `layers[l]` holds W_enc [F, d], b_enc, b_dec,
    W_dec [F, L − l, d] and optionally threshold [F]."""
    directory = _start(directory, CLT, input_hook, output_hook, model_name, record)
    for layer, t in layers.items():
        encoder = {f"W_enc_{layer}": t["W_enc"], f"b_enc_{layer}": t["b_enc"], f"b_dec_{layer}": t["b_dec"]}
        if "threshold" in t:
            encoder[f"threshold_{layer}"] = t["threshold"]
        save_tensors(_contiguous(encoder), directory / f"W_enc_{layer}.safetensors")
        save_tensors(_contiguous({f"W_dec_{layer}": t["W_dec"]}), directory / f"W_dec_{layer}.safetensors")
    return directory


def is_circuit_tracer_dir(directory: str | Path) -> bool:
    return (Path(directory) / "config.yaml").is_file()


def load(directory: str | Path, device: str | torch.device = "cpu") -> tuple[dict, list[dict[str, torch.Tensor]]]:
    """(config, per-layer tensors in the layout above, keys without the layer suffix)."""
    directory = Path(directory)
    config = _read_config(directory / "config.yaml")
    layers = []
    if config["model_kind"] == TRANSCODER_SET:
        files = sorted(directory.glob("layer_*.safetensors"), key=lambda p: int(p.stem.split("_")[1]))
        for path in files:
            t = load_file(path, device=str(device))
            if "activation_function.threshold" in t:
                t["threshold"] = t.pop("activation_function.threshold")
            layers.append(t)
    elif config["model_kind"] == CLT:
        n = len(list(directory.glob("W_enc_*.safetensors")))
        for layer in range(n):
            enc = load_file(directory / f"W_enc_{layer}.safetensors", device=str(device))
            dec = load_file(directory / f"W_dec_{layer}.safetensors", device=str(device))
            layers.append({k.rsplit("_", 1)[0]: v for k, v in {**enc, **dec}.items()})
    else:
        raise ValueError(f"{directory}: model_kind {config['model_kind']!r} is neither {TRANSCODER_SET} nor {CLT}")
    return config, layers


def forward(config: dict, layers: list[dict[str, torch.Tensor]], x_BLd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every layer's features and outputs from every layer's input.  x [B, L, d] → (f [B, L·F], ŷ [B, L·d_out])"""
    fs = []
    for layer, t in enumerate(layers):
        pre = x_BLd[:, layer] @ t["W_enc"].T + t["b_enc"]
        f = torch.relu(pre) if "threshold" not in t else pre * (pre > t["threshold"])
        fs.append(f)
    outs = []
    for m, t in enumerate(layers):
        if config["model_kind"] == TRANSCODER_SET:
            y = fs[m] @ t["W_dec"] + t["b_dec"]
            if "W_skip" in t:
                y = y + x_BLd[:, m] @ t["W_skip"].T
        else:
            y = t["b_dec"] + sum(fs[l] @ layers[l]["W_dec"][:, m - l] for l in range(m + 1))
        outs.append(y)
    return torch.cat(fs, dim=-1), torch.cat(outs, dim=-1)


def _start(directory, kind: str, input_hook: str, output_hook: str, model_name: str, record: dict) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # JSON strings are valid YAML scalars: no YAML library needed to write these four keys
    lines = [f"model_kind: {kind}", f"feature_input_hook: {json.dumps(input_hook)}",
             f"feature_output_hook: {json.dumps(output_hook)}", f"model_name: {json.dumps(model_name)}"]
    (directory / "config.yaml").write_text("\n".join(lines) + "\n")
    (directory / RECORD).write_text(json.dumps(record, indent=2))
    return directory


def _read_config(path: Path) -> dict:
    """The flat `key: value` YAML written by `_start` (values are JSON scalars or bare words)."""
    config = {}
    for line in path.read_text().splitlines():
        if ":" in line and not line.lstrip().startswith("#"):
            key, value = line.split(":", 1)
            value = value.strip()
            try:
                config[key.strip()] = json.loads(value)
            except ValueError:
                config[key.strip()] = value
    return config


def _contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}
