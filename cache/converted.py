"""Keep a dequantized GGUF model once, converted, so that later loads take seconds.

A GGUF file is quantized: every load dequantizes it and converts it to a HookedTransformer, 35 s
and a 3.4 GB peak for the demo model (bench/RESULTS.md "End-to-end demo"), and the demo loads it
twice (caching, then evaluation). The first load keeps the converted model (its state dict as
safetensors, its TransformerLens config, its tokenizer) under

    $SAE_SWEEP_MODEL_CACHE/<key>/     (default ~/.cache/sae-sweep/models; "off" keeps nothing)

where the key covers the file (path, size, modification time), the architecture name, the dtype
and the TransformerLens and transformers versions, so a changed file or library converts afresh.
A later load builds the model on the meta device and assigns the saved tensors: about one copy of
the weights, no conversion. Checkpoints in float (a Hugging Face directory or name) load fast
enough as they are, and are not copied.

The entry is written to a temporary directory and renamed into place, so a second writer or an
interrupted one never leaves a half entry; a disk without room for it (checked first) or a failed
write only costs the speed-up, with one line saying so. A temporary directory left by a writer
that was killed (its process gone, on this host) is removed by the next writer of that entry.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import sys
from pathlib import Path

WEIGHTS, CONFIG, TOKENIZER = "model.safetensors", "config.json", "tokenizer"
TOKENIZER_KWARGS = "sae_sweep_tokenizer_kwargs"  # in CONFIG beside TransformerLens's own fields
ORDERS = "dimension_orders"  # safetensors metadata: key → the order its tensor was stored in
HEADROOM_BYTES = 512 * 2**20  # left free on the disk after writing an entry


def cache_root() -> Path | None:
    """Where converted models are kept; None when SAE_SWEEP_MODEL_CACHE=off."""
    setting = os.environ.get("SAE_SWEEP_MODEL_CACHE", "")
    if setting.lower() in ("off", "0", "none"):
        return None
    if setting:
        return Path(setting).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sae-sweep" / "models"


def entry_for(gguf_path: Path, name: str, dtype: str) -> Path | None:
    """The cache entry of this file loaded as `name` in `dtype` (whether or not it exists yet)."""
    from importlib.metadata import version

    root = cache_root()
    if root is None:
        return None
    stat = gguf_path.stat()
    identity = {"file": str(gguf_path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                "name": name, "dtype": dtype, "transformer_lens": version("transformer_lens"),
                "transformers": version("transformers")}
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    return root / f"{gguf_path.stem}-{dtype}-{key}"


def is_kept(entry: Path) -> bool:
    """Whether `entry` holds a whole converted model (an entry is renamed into place complete)."""
    return (entry / WEIGHTS).is_file()


def load_converted(entry: Path, device: str, tokenizer=None):
    """The HookedTransformer kept at `entry`, on `device` (with `tokenizer` if given, else the kept
    one); None where there is no complete entry."""
    if not is_kept(entry):
        return None
    import torch
    from safetensors import safe_open
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformers import AutoTokenizer

    from cache.lean_load import parameters_on_meta

    values = json.loads((entry / CONFIG).read_text())
    tokenizer_kwargs = values.pop(TOKENIZER_KWARGS, {})
    values.update(dtype=getattr(torch, values["dtype"]), device=device)
    cfg = HookedTransformerConfig.from_dict(values)
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(str(entry / TOKENIZER), **tokenizer_kwargs)
    with parameters_on_meta(min_elements=0):
        model = HookedTransformer(cfg, tokenizer, move_to_device=False)
    with safe_open(str(entry / WEIGHTS), "pt") as file:
        orders = json.loads((file.metadata() or {}).get(ORDERS, "{}"))
        tensors = {k: _in_layout(file.get_tensor(k), orders.get(k)) for k in file.keys()}
    model.load_state_dict(tensors, strict=True, assign=True)
    model.move_model_modules_to_device()
    return model


def read_kept_tensor(entry: Path, key: str):
    """One tensor of the model kept at `entry` (e.g. "unembed.W_U"), as the model holds it,
    without reading the others."""
    from safetensors import safe_open

    with safe_open(str(entry / WEIGHTS), "pt") as file:
        orders = json.loads((file.metadata() or {}).get(ORDERS, "{}"))
        return _in_layout(file.get_tensor(key), orders.get(key))


def save_converted(model, entry: Path) -> None:
    """Keep `model` at `entry` (best effort: a full disk or a failed write says so and goes on)."""
    from safetensors.torch import save_file

    tensors, orders = {}, {}
    for key, value in model.state_dict().items():
        tensors[key], order = _as_stored(value.detach().cpu())
        if order is not None:
            orders[key] = order
    needed = sum(t.numel() * t.element_size() for t in tensors.values())
    entry.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_writers(entry)
    free = shutil.disk_usage(entry.parent).free
    if free < needed + HEADROOM_BYTES:
        _note(f"not keeping the converted model: {free / 2**30:.1f} GiB free at {entry.parent}, "
              f"it needs {needed / 2**30:.1f} GiB (the next load converts again)")
        return
    partial = entry.with_name(f"{entry.name}{_PARTIAL}{socket.gethostname()}-{os.getpid()}")
    try:
        partial.mkdir()
        values = dict(model.cfg.to_dict())  # to_dict hands out the config's own __dict__
        values["dtype"] = str(values["dtype"]).removeprefix("torch.")
        # TransformerLens reloads a tokenizer built without add_bos_token=True (4 s for the demo's
        # 262k vocabulary); the kept one is loaded with it, as TransformerLens would reload it.
        values[TOKENIZER_KWARGS] = {"add_bos_token": True} if model.tokenizer.bos_token is not None else {}
        (partial / CONFIG).write_text(json.dumps(values, default=str))
        model.tokenizer.save_pretrained(str(partial / TOKENIZER))
        save_file(tensors, str(partial / WEIGHTS), metadata={ORDERS: json.dumps(orders)})
        partial.rename(entry)
    except OSError as err:
        shutil.rmtree(partial, ignore_errors=True)
        if not is_kept(entry):  # not another writer's entry in place already
            _note(f"not keeping the converted model at {entry}: {err} (the next load converts again)")
        return
    _note(f"kept the converted model at {entry} ({needed / 2**30:.1f} GiB), so the next load takes seconds; "
          "SAE_SWEEP_MODEL_CACHE=off keeps nothing")


_PARTIAL = ".partial-"  # <entry>.partial-<host>-<pid>: an entry being written


def _remove_dead_writers(entry: Path) -> None:
    """Remove the temporary directories of `entry` left by writers of this host that no longer
    run (a killed write leaves one, as large as the model). A live writer's, or another host's
    (its process cannot be probed from here), stays."""
    host = socket.gethostname()
    for partial in entry.parent.glob(f"{entry.name}{_PARTIAL}*"):
        writer_host, _, pid = partial.name.removeprefix(f"{entry.name}{_PARTIAL}").rpartition("-")
        if writer_host == host and pid.isdigit() and not _running(int(pid)):
            shutil.rmtree(partial, ignore_errors=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _as_stored(tensor):
    """(a contiguous tensor safetensors can write, the dimension order that gives `tensor` back or
    None). Converted weights keep the Hugging Face [out, in] memory layout behind TransformerLens's
    [in, out] view, and a forward on them is ~1.5× faster than on contiguous copies (the demo
    model, 8 × 128 tokens: 5.5 s against 8.3 s), so the layout is kept, not the copy."""
    order = sorted(range(tensor.dim()), key=lambda i: -tensor.stride(i))
    stored = tensor.permute(order)
    if order == list(range(tensor.dim())) or not stored.is_contiguous():
        return tensor.contiguous(), None
    return stored, order


def _in_layout(stored, order: list[int] | None):
    """`_as_stored` undone: a view of `stored` in its saved dimension order."""
    if order is None:
        return stored
    inverse = sorted(range(len(order)), key=order.__getitem__)
    return stored.permute(inverse)


def _note(message: str) -> None:
    print(message, file=sys.stderr)
