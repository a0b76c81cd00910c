"""Any Hugging Face causal LM through transformers' AutoModelForCausalLM, for the architectures
TransformerLens does not know (and for any other, with --backend transformers).

Hook names are module paths, as SAELens's `AutoModelForCausalLM` path (`HookedProxyLM`) names
them: a module's output, its first element when the output is a tuple. `model.layers.2` is the
residual stream after block 2, `model.layers.2.mlp` and `model.layers.2.self_attn` the MLP and
attention outputs. `--layers L --hook KIND` maps to those paths for any family: the decoder
blocks are the module list of `config.num_hidden_layers` blocks, and their children are found by
their usual names (KIND_CHILDREN); `mlp_in` is the output of the norm the MLP reads. The forward
stops after the deepest block a hook needs.
"""
from __future__ import annotations

import re
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from store.hooks import parse_layers

# The children of a decoder block that each kind names, by the names families use, first match wins.
KIND_CHILDREN = {
    "attn_out": ("self_attn", "attn", "attention", "self_attention"),
    "mlp_out": ("mlp", "feed_forward", "ffn", "block_sparse_moe"),
    "mlp_in": ("pre_feedforward_layernorm", "post_attention_layernorm", "ln_2", "ffn_norm"),
}
HF_KINDS = ("resid_post", *KIND_CHILDREN)


class HFModelError(ValueError):
    """A Hugging Face model or module path that cannot be loaded or found."""


class _Stop(Exception):
    """Raised by the hook on the deepest block needed: the rest of the forward is not run."""


@dataclass
class HFModel:
    """A transformers causal LM with what stage 1 needs of it: its tokenizer, its decoder blocks,
    and a forward that records module outputs."""

    name: str  # what AutoModelForCausalLM.from_pretrained loads it by: a hub name or an absolute path
    model: Any  # PreTrainedModel
    tokenizer: Any
    blocks_path: str  # e.g. "model.layers"
    load_kwargs: dict  # what from_pretrained needs beyond the dtype (a GGUF file's name)
    backend = "transformers"

    def hook_kind(self, path: str) -> tuple[int | None, str | None]:
        """(layer, kind) of a module path: model.layers.3.mlp → (3, mlp_out); (None, None) outside the blocks."""
        match = re.fullmatch(rf"{re.escape(self.blocks_path)}\.(\d+)(\..+)?", path)
        if match is None:
            return None, None
        layer = int(match.group(1))
        for kind in HF_KINDS:
            try:
                if self._kind_path(layer, kind) == path:
                    return layer, kind
            except HFModelError:  # this family's block has no module of that kind
                continue
        return layer, None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def n_layers(self) -> int:
        return len(self.model.get_submodule(self.blocks_path))

    @property
    def d_model(self) -> int:
        return self.model.config.hidden_size

    @property
    def d_vocab(self) -> int:
        return self.model.config.vocab_size

    @property
    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @property
    def default_prepend_bos(self) -> bool:
        """Whether the tokenizer starts a text with BOS by itself (what the model was trained on)."""
        bos = self.tokenizer.bos_token_id
        return bos is not None and self.tokenizer("a")["input_ids"][:1] == [bos]

    def loading_record(self, dtype: str, prepend_bos: bool) -> dict:
        """How SAELens's load_model rebuilds this model: `load_model("AutoModelForCausalLM", name,
        model_from_pretrained_kwargs=…)` → `AutoModelForCausalLM.from_pretrained(name, **kwargs)`
        (no weight processing; BOS is the cache's business, recorded as the store's prepend_bos)."""
        return {"model_class_name": "AutoModelForCausalLM", "model_from_pretrained_kwargs": {"dtype": dtype, **self.load_kwargs}}

    def resolve_hooks(self, layers: tuple, kinds: tuple[str, ...], paths: tuple[str, ...]) -> list[str]:
        """Module paths from `--layers L.. --hook KIND..` and/or `--hooks PATH..`; a path the model
        lacks is refused with the paths it has."""
        names: list[str] = []
        if layers:
            unknown = [k for k in kinds if k not in HF_KINDS]
            if unknown:
                raise HFModelError(f"--hook {unknown[0]} is not available with the transformers backend; "
                                   f"choose from: {', '.join(HF_KINDS)}, or name module paths with --hooks")
            for layer in parse_layers(tuple(layers), self.n_layers):
                names += [self._kind_path(layer, kind) for kind in kinds]
        names.extend(paths)
        if not names:
            raise HFModelError("no hook selected: pass --layers (with --hook) or --hooks")
        modules = dict(self.model.named_modules())
        for name in names:
            if name not in modules:
                raise HFModelError(_missing_path_message(name, modules, self.blocks_path))
        return list(dict.fromkeys(names))

    def _kind_path(self, layer: int, kind: str) -> str:
        block = f"{self.blocks_path}.{layer}"
        if kind == "resid_post":
            return block
        children = dict(self.model.get_submodule(block).named_children())
        child = next((c for c in KIND_CHILDREN[kind] if c in children), None)
        if child is None:
            raise HFModelError(f"--hook {kind}: block {block} has none of {', '.join(KIND_CHILDREN[kind])}; "
                               f"its children are {', '.join(children)}: name one with --hooks {block}.<child>")
        return f"{block}.{child}"

    @torch.inference_mode()
    def record(self, tokens: torch.Tensor, paths: list[str]) -> dict[str, torch.Tensor]:
        """One forward pass, stopped after the deepest needed block.  → path: [batch·ctx, d] float32"""
        saved: dict[str, torch.Tensor] = {}
        modules = [(path, self.model.get_submodule(path)) for path in paths]

        def saver(path: str):
            def hook(module, args, output):
                act = output[0] if isinstance(output, tuple) else output
                saved[path] = act.reshape(act.shape[0] * act.shape[1], -1).float()
            return hook

        handles = [module.register_forward_hook(saver(path)) for path, module in modules]
        stop_at = _deepest_block(paths, self.blocks_path)
        if stop_at is not None:
            def stop(module, args, output):
                raise _Stop
            handles.append(self.model.get_submodule(f"{self.blocks_path}.{stop_at}").register_forward_hook(stop))
        try:
            self.model(input_ids=tokens.to(self.device), use_cache=False)
        except _Stop:
            pass
        finally:
            for handle in handles:
                handle.remove()
        return saved


def knows_architecture(name: str | None, path: str | None) -> bool:
    """Whether TransformerLens can load this model (`--backend auto` uses it then), from the name
    or the local config alone, without loading weights."""
    from transformer_lens import loading_from_pretrained as loading

    if path is not None and Path(path).expanduser().suffix == ".gguf":
        return True  # a GGUF file is read through TransformerLens with --model naming its architecture
    try:
        if path is not None and name is None:
            loading.convert_hf_model_config(str(Path(path).expanduser()))
        else:
            loading.get_official_model_name(name)
    except Exception:  # noqa: BLE001 - any failure of TransformerLens's own config conversion: it cannot load it
        return False
    return True


def load_hf_model(name: str | None, path: str | None, *, device: str, dtype: str = "float32") -> HFModel:
    """AutoModelForCausalLM and its tokenizer from a hub name (through the Hugging Face cache), a
    local directory, or a .gguf file (dequantized by transformers)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from cache.gguf_file import gguf_read_lean

    where = str(Path(path).expanduser().resolve()) if path is not None else name
    if where is None:
        raise HFModelError("give --model (a Hugging Face name) or --model_path (a local directory)")
    load_kwargs = {}
    if path is not None and Path(where).suffix == ".gguf" and Path(where).is_file():
        where, load_kwargs = str(Path(where).parent), {"gguf_file": Path(where).name}
    elif path is not None and not (Path(where) / "config.json").is_file():
        raise HFModelError(f"--model_path {path}: the transformers backend reads a Hugging Face directory with "
                           "config.json, or a .gguf file")
    hf_logging.disable_progress_bar()
    try:
        with gguf_read_lean() if load_kwargs else nullcontext():  # the gguf package is needed for GGUF files only
            model = AutoModelForCausalLM.from_pretrained(where, dtype=getattr(torch, dtype), **load_kwargs)
            tokenizer = AutoTokenizer.from_pretrained(where, **load_kwargs)
        model = model.to(device).eval()
    except (OSError, ValueError) as err:
        reason = str(err).splitlines()[0]
        if path is None:
            raise HFModelError(f"unknown model {name!r}: not a TransformerLens name, and transformers cannot load it "
                               f"({reason}); check the name, download it once with network, or pass --model_path "
                               "for a local checkpoint") from None
        raise HFModelError(f"cannot load {where!r} with transformers: {reason}") from None
    return HFModel(where, model, tokenizer, _blocks_path(model), load_kwargs)


def _blocks_path(model) -> str:
    """The module list of config.num_hidden_layers decoder blocks (the shortest such path)."""
    n_layers = model.config.num_hidden_layers
    found = [name for name, module in model.named_modules()
             if isinstance(module, torch.nn.ModuleList) and len(module) == n_layers]
    if not found:
        raise HFModelError(f"{type(model).__name__}: no module list of {n_layers} decoder blocks found; "
                           "name the modules to cache with --hooks")
    return min(found, key=lambda n: (n.count("."), n))


def _deepest_block(paths: list[str], blocks_path: str) -> int | None:
    """The deepest block index any path lies in; None when one lies outside the blocks (e.g. the
    final norm), which only the full forward reaches."""
    deepest = -1
    for path in paths:
        match = re.match(rf"{re.escape(blocks_path)}\.(\d+)(\.|$)", path)
        if match is None:
            return None
        deepest = max(deepest, int(match.group(1)))
    return deepest


def _missing_path_message(path: str, modules: dict, blocks_path: str) -> str:
    match = re.match(rf"{re.escape(blocks_path)}\.(\d+)", path)
    if match is not None and f"{blocks_path}.{match.group(1)}" in modules:
        block = f"{blocks_path}.{match.group(1)}"
        children = [n for n in modules if n.startswith(block + ".") and n.count(".") == block.count(".") + 1]
        return f"{path} is not a module of this model; {block} has: {', '.join([block, *children])}"
    examples = [f"{blocks_path}.0", *[n for n in modules if n.startswith(f"{blocks_path}.0.") and
                                      n.count(".") == blocks_path.count(".") + 2]]
    return f"{path} is not a module of this model; module paths look like: {', '.join(examples)}, ..."
