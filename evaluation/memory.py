"""What a sweep's evaluation will need in memory, so that a run which cannot fit is refused
before training starts (training/memory.py adds it to training's own needs)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from cache.models import converted_model_kept
from evaluation.splice import CHUNK_ELEMENTS, STACK_SEQUENCES

if TYPE_CHECKING:
    from store.zarr_store import ActivationStore
    from evaluation.config import EvalConfig

MODEL_LOAD_FACTOR = 2.0  # peak RSS of loading a model ÷ its float32 weights (1.9 measured on the demo model)
ACTIVATION_FLOATS = 32  # floats per position per stacked sequence alive in a spliced pass (block intermediates)


def memory_needed(store: ActivationStore, cfg: EvalConfig, member_parameters: int) -> int | None:
    """Bytes the evaluation of a sweep needs at its peak, beyond the process itself: loading the
    store's models (their float32 weights × MODEL_LOAD_FACTOR, or × 1 where a GGUF model is kept
    converted, cache/converted.py), or, once loaded, the weights and one
    spliced pass (up to `STACK_SEQUENCES` sequences through the later blocks, and the tiles of
    logits of evaluation/splice.py), plus the members' weights. None when the store does not record
    its models' sizes (stores written before it did). The models load in the store's model dtype,
    as evaluation/runner.py loads them."""
    info, members = store.info, 4 * member_parameters
    if cfg.n_sequences == 0:
        return members
    sizes = [m.get("n_parameters") for m in info.get("models", [])]
    if not sizes or None in sizes:
        return None
    weights = 4 * sum(sizes)
    dtype = store.identity["model_dtype"]
    kept = all(converted_model_kept(m.get("model"), m.get("model_path"), dtype) for m in info["models"])
    load = weights if kept else int(MODEL_LOAD_FACTOR * weights)  # a kept model is assigned, not converted
    stacked = max(min(cfg.batch_size, cfg.n_sequences), STACK_SEQUENCES)  # sequences in one spliced pass, at most
    passes = 4 * stacked * store.attrs["context_length"] * info["d_model"] * ACTIVATION_FLOATS + 4 * 6 * CHUNK_ELEMENTS
    return members + max(load, weights + passes)
