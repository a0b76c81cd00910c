"""Convert a Hugging Face model to a HookedTransformer without holding its weights three times over.

TransformerLens's `from_pretrained(hf_model=…)` converts the HF weights to a state dict, builds a
randomly initialisable model (a full set of parameters), then processes the state dict (folding
norms, centring the unembedding, …) with functions that each begin with a deep copy of every
tensor, and copies the result into the model. For Gemma-3-270M in float32 (436M parameters once
its embedding is untied, 1.75 GB) the load peaked at 7.3 GB of RSS, on top of the HF model.

`lean(cls, hf_model)` is `cls` with these changes, so that the same TransformerLens code runs and
gives the same model (tested bit for bit against the plain load):
  * the HF model's modules let go of their parameters once the converted state dict exists (which
    holds them or views of them: each goes when processing replaces it);
  * the model is built with its large parameters on the meta device (no memory, no
    initialisation) and filled by assignment (`load_state_dict(assign=True)`, TransformerLens's own path for
    quantised models) instead of copying;
  * inside the weight processing, `Tensor.clone` returns its tensor: the deep copies only guard the
    caller's dict, which nothing uses afterwards;
  * the processing runs without autograd: the HF weights require gradients, so each processed
    tensor's graph would keep the one it replaced alive until the load ends;
  * the unembedding's norm fold (W_U · w) is done in W_U's own storage where no other weight
    shares it and no norm bias is folded from it: otherwise its old and new copies and the
    embedding are alive at once (3 × 671 MB for Gemma-3's 262k vocabulary, the load's peak);
  * the unembedding is centred in place once loaded, instead of through a copy of W_U.
Measured on the demo model: a 2.7 GiB peak (with the GGUF read, cache/gguf_file.py) instead of 7.3 GB,
outputs identical (bench/RESULTS.md "End-to-end demo").
"""
from __future__ import annotations

import contextlib
import ctypes
import gc

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

META_MIN_ELEMENTS = 2**16  # parameters this large are built on the meta device (weights, embeddings)


def lean(cls: type, hf_model) -> type:
    """`cls` (HookedTransformer) loading `hf_model`'s weights in about one copy of them."""

    class LeanLoaded(cls):
        def __init__(self, cfg, *args, **kwargs):
            # The converted state dict exists by now (from_pretrained converts, then builds): the
            # HF modules let go of their weights; what the state dict holds (the same tensors, or
            # views of them) stays, and the rest is freed.
            for module in hf_model.modules():
                for name in module._parameters:
                    module._parameters[name] = None
            with parameters_on_meta():
                super().__init__(cfg, *args, **kwargs)

        def load_and_process_state_dict(self, state_dict, center_unembed: bool = True, **kwargs):
            was = self.cfg.load_in_4bit
            self.cfg.load_in_4bit = True  # its assign-instead-of-copy path
            try:
                with torch.no_grad(), _NoCopies(in_place=_sole_unembedding(state_dict)):
                    super().load_and_process_state_dict(state_dict, center_unembed=False, **kwargs)
            finally:
                self.cfg.load_in_4bit = was
            if center_unembed:
                _center_unembed_in_place(self.unembed)
            unloaded = [name for name, p in self.named_parameters() if p.is_meta]
            if unloaded:
                raise RuntimeError(f"the checkpoint left {len(unloaded)} parameters without weights, e.g. {unloaded[0]}")

    LeanLoaded.__name__ = LeanLoaded.__qualname__ = cls.__name__
    return LeanLoaded


@torch.no_grad()
def _center_unembed_in_place(unembed: nn.Module) -> None:
    """TransformerLens's `center_unembed` (W_U minus its mean over the vocabulary, b_U minus its
    mean), the same arithmetic done in place: its out-of-place version holds a second
    [d_model, d_vocab] copy, the load's peak (a 671 MB transient for Gemma-3's 262k vocabulary)."""
    unembed.W_U.sub_(unembed.W_U.mean(-1, keepdim=True))
    if getattr(unembed, "b_U", None) is not None:
        unembed.b_U.sub_(unembed.b_U.mean())


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc), so the RSS after a load
    reflects what is held rather than the load's transient peak."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


@contextlib.contextmanager
def parameters_on_meta(min_elements: int | None = None):
    """Modules built inside get their large parameters on the meta device. Small ones (biases,
    norm weights) and buffers stay real: where a checkpoint lacks one, TransformerLens fills it
    with the model's own initial value, which must exist."""
    register = nn.Module.register_parameter
    min_elements = META_MIN_ELEMENTS if min_elements is None else min_elements

    def on_meta(module, name, param):
        if param is not None and param.numel() >= min_elements:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _sole_unembedding(state_dict: dict) -> tuple[torch.Tensor, ...]:
    """(W_U,) where its fold may be done in place: no other entry shares its storage (an untied
    copy, unlike GPT-2's tied W_E = W_Uᵀ) and no final-norm bias is folded from it (LayerNorm
    models read the old W_U for b_U after scaling it); else ()."""
    unembed = state_dict.get("unembed.W_U")
    if unembed is None or "ln_final.b" in state_dict:
        return ()
    storage = unembed.untyped_storage().data_ptr()
    shared = any(value is not unembed and isinstance(value, torch.Tensor) and not value.is_meta
                 and value.untyped_storage().data_ptr() == storage for value in state_dict.values())
    return () if shared else (unembed,)


class _NoCopies(TorchFunctionMode):
    """`Tensor.clone` returns its tensor, and `a * b` or `a - b` with `a` one of `in_place` (and
    the result of a's shape and dtype) is computed into a: the same arithmetic, the same values."""
    IN_PLACE = {torch.Tensor.mul: torch.Tensor.mul_, torch.Tensor.sub: torch.Tensor.sub_}

    def __init__(self, in_place: tuple[torch.Tensor, ...] = ()):
        super().__init__()
        self.in_place = {id(t) for t in in_place}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.clone:
            return args[0]
        if (func in self.IN_PLACE and not kwargs and len(args) == 2 and id(args[0]) in self.in_place
                and isinstance(args[1], torch.Tensor) and args[1].dtype == args[0].dtype
                and torch.broadcast_shapes(args[0].shape, args[1].shape) == args[0].shape):
            return self.IN_PLACE[func](*args)
        return func(*args, **(kwargs or {}))
