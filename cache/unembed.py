"""The unembedding alone, read from disk without building the model: what the feature browser
needs for a decoder direction's logit effects.

    unembedding = load_unembedding(store.info["models"][0], dtype="float32")
    unembedding.W_U          # [D, V]: the final norm's weight folded in, centred over the vocabulary

Where it is read from, by what the store recorded of its model:
  * a GGUF file loaded through TransformerLens: the kept converted copy (cache/converted.py), whose
    `unembed.W_U` is exactly the model's (norm folded, centred); only that tensor is read;
  * a Hugging Face checkpoint (a local directory, or a name in the Hugging Face cache), either
    backend: the output embedding (or the tied input embedding) and the final norm's weight, from
    its safetensors files; the model's skeleton is built on the meta device only to learn their
    names, and the norm module itself (d parameters) tells its effective weight (Gemma's 1 + w
    included) and whether it centres its input (a LayerNorm).
What it does not do: read a GGUF file's tensors without its converted copy, or a checkpoint
without safetensors (`UnembeddingError` says so; the caller decides), or model the final norm's
1/RMS scale (it depends on the whole residual, not on the direction) or logit soft-capping.

Dimension key: D d_model, V vocabulary.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cache.converted import CONFIG, TOKENIZER, TOKENIZER_KWARGS, entry_for, is_kept, read_kept_tensor


OLDER_UNEMBED_NAMES = ("embed_out.weight", "lm_head.weight")


class UnembeddingError(ValueError):
    """A model whose unembedding cannot be read on its own."""


@dataclass(frozen=True)
class Unembedding:
    W_U: torch.Tensor  # [D, V] float32: the final norm's weight folded in, centred over the vocabulary
    centre_input: bool  # the final norm is a LayerNorm: a direction is centred before W_U reads it
    tokenizer: Any
    read_from: str  # what was read, for the terminal


def load_unembedding(entry: dict, dtype: str) -> Unembedding:
    """The unembedding of a store's model (an entry of its info["models"])."""
    path = entry.get("model_path")
    if path is not None and Path(path).suffix == ".gguf":
        kept = entry_for(Path(path).expanduser(), entry["model"], dtype) if entry.get("backend") != "transformers" else None
        if kept is None or not is_kept(kept):
            raise UnembeddingError(f"{Path(path).name} is a GGUF file and no converted copy of it is kept "
                                   "(cache/converted.py): its unembedding cannot be read alone")
        return _from_converted(kept)
    return _from_checkpoint(_checkpoint_dir(entry))


def _from_converted(kept: Path) -> Unembedding:
    from transformers import AutoTokenizer

    values = json.loads((kept / CONFIG).read_text())
    W_U_DV = read_kept_tensor(kept, "unembed.W_U").float()
    tokenizer = AutoTokenizer.from_pretrained(str(kept / TOKENIZER), **values.get(TOKENIZER_KWARGS, {}))
    return Unembedding(W_U_DV, values["normalization_type"] in ("LN", "LNPre"), tokenizer, f"unembed.W_U of {kept}")


def _checkpoint_dir(entry: dict) -> Path:
    """The local directory of a store's model: its recorded path, or its snapshot in the Hugging
    Face cache (a TransformerLens name resolved to the hub name it stands for)."""
    if entry.get("model_path"):
        return Path(entry["model_path"]).expanduser()
    name = entry["model"]
    if entry.get("backend") != "transformers":
        from transformer_lens.loading_from_pretrained import get_official_model_name

        name = get_official_model_name(name)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, local_files_only=True))
    except Exception as err:  # not in the cache: which error depends on the hub library's version
        raise UnembeddingError(f"{name} is not in the Hugging Face cache ({str(err).splitlines()[0]})") from None


@torch.no_grad()
def _from_checkpoint(directory: Path) -> Unembedding:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(str(directory))
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    names = {id(p): n for n, p in skeleton.named_parameters(remove_duplicate=False)}
    norm = _final_norm(skeleton)
    norm_names = {k: names[id(p)] for k, p in norm.named_parameters()}
    tied = config.get_text_config().tie_word_embeddings
    # where the checkpoint keeps the output embedding: its module's name, or a name older
    # checkpoints use (GPT-NeoX's embed_out, which transformers renames on load); tied: the input's
    unembed_names = ([names[id(skeleton.get_input_embeddings().weight)]] if tied else
                     [names[id(skeleton.get_output_embeddings().weight)], *OLDER_UNEMBED_NAMES])
    tensors = _read_tensors(directory, [*unembed_names, *norm_names.values()], f"{skeleton.base_model_prefix}.")
    found = [n for n in unembed_names if n in tensors]
    missing = [n for n in norm_names.values() if n not in tensors]
    if not found or missing:
        raise UnembeddingError(f"{directory}: no {' or '.join(unembed_names) if not found else missing[0]} among its "
                               "weights (names this code does not know)")
    W_VD = tensors[found[0]]
    norm.to_empty(device="cpu").float()
    norm.load_state_dict({k: tensors[n].float() for k, n in norm_names.items()}, strict=False)
    weight_D, centres = _norm_effect(norm, W_VD.shape[1])
    W_U_DV = W_VD.float().T.mul_(weight_D[:, None])  # the norm's weight folded in, as TransformerLens folds it
    if centres:  # a LayerNorm reads centred inputs: W_U's mean over D reads nothing (TransformerLens drops it too)
        W_U_DV.sub_(W_U_DV.mean(0, keepdim=True))
    W_U_DV.sub_(W_U_DV.mean(1, keepdim=True))  # centred over the vocabulary, as TransformerLens's center_unembed
    return Unembedding(W_U_DV, centres, AutoTokenizer.from_pretrained(str(directory)),
                       f"{found[0]} and {norm_names.get('weight', 'no norm weight')} of {directory}")


def _final_norm(skeleton) -> torch.nn.Module:
    """The norm the unembedding reads: the base model's last child that is a norm (model.norm,
    transformer.ln_f, gpt_neox.final_layer_norm, …)."""
    norms = [m for m in skeleton.base_model.children() if "norm" in type(m).__name__.lower()]
    if not norms:
        raise UnembeddingError(f"{type(skeleton).__name__}: no final norm found among its base model's modules")
    return norms[-1]


def _norm_effect(norm: torch.nn.Module, D: int) -> tuple[torch.Tensor, bool]:
    """(the norm's effective weight [D], whether it centres its input), read off its own forward:
    an input z of ±1 and −z give norm(z) − norm(−z) = 2·ẑ·w for ẑ = z normalised (centred first by
    a LayerNorm, whose output on a constant input is its bias alone), whatever the norm's
    parametrisation (w, 1 + w, with or without a bias)."""
    ones = torch.ones(1, D)
    centres = torch.allclose(norm(ones), norm(-ones))
    z = torch.ones(D)
    z[1::2] = -1
    z_hat = z - z.mean() if centres else z
    z_hat = z_hat / z_hat.pow(2).mean().sqrt()
    return ((norm(z[None])[0] - norm(-z[None])[0]) / (2 * z_hat)).float(), centres


def _read_tensors(directory: Path, names: list[str], prefix: str) -> dict[str, torch.Tensor]:
    """The named tensors that the checkpoint's safetensors files hold, each under its name or
    without the base model's `prefix` (as older checkpoints store them); others are left out."""
    from safetensors import safe_open

    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
    elif (directory / "model.safetensors").is_file():
        with safe_open(str(directory / "model.safetensors"), "pt") as handle:
            weight_map = dict.fromkeys(handle.keys(), "model.safetensors")
    else:
        raise UnembeddingError(f"{directory} holds no safetensors weights: its unembedding cannot be read alone")
    stored = {n: key for n in names for key in (n, n.removeprefix(prefix)) if key in weight_map}
    out = {}
    for name, key in stored.items():
        with safe_open(str(directory / weight_map[key]), "pt") as handle:
            out[name] = handle.get_tensor(key)
    return out
