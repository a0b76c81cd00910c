"""What a model's configuration says before any weights load: its number of blocks, read from a
local config.json, a GGUF file's header, or the config.json of a hub name already in the local
Hugging Face cache. Torch-free, so that `generate_activations.py` refuses a layer out of range in
about a second instead of after loading the model (`check_layers`).

A GGUF header is read key by key and the read stops at the block count: `gguf.GGUFReader` parses
every field first, the 262,144-token vocabulary of the demo model included, which took over a
minute on a 2-core CPU.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import BinaryIO

LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")  # config.json's block count, by family

# GGUF metadata value types (the GGUF spec): scalar sizes in bytes; 8 is a string, 9 an array.
_GGUF_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_GGUF_STRING, _GGUF_ARRAY = 8, 9
_GGUF_INTEGER_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 10: "<Q", 11: "<q"}


class _Header:
    """Sequential reads of a GGUF header's little-endian fields."""

    def __init__(self, file: BinaryIO):
        self.file = file

    def unpack(self, fmt: str):
        size = struct.calcsize(fmt)
        data = self.file.read(size)
        if len(data) != size:
            raise ValueError("truncated GGUF header")
        return struct.unpack(fmt, data)[0]

    def string(self) -> str:
        return self.file.read(self.unpack("<Q")).decode("utf-8", errors="replace")

    def skip_value(self, kind: int) -> None:
        if kind == _GGUF_STRING:
            self.file.seek(self.unpack("<Q"), 1)
        elif kind == _GGUF_ARRAY:
            item, count = self.unpack("<I"), self.unpack("<Q")
            if item in _GGUF_SCALAR_SIZES:
                self.file.seek(count * _GGUF_SCALAR_SIZES[item], 1)
            else:
                for _ in range(count):
                    self.skip_value(item)
        elif kind in _GGUF_SCALAR_SIZES:
            self.file.seek(_GGUF_SCALAR_SIZES[kind], 1)
        else:
            raise ValueError(f"unknown GGUF value type {kind}")


def gguf_block_count(path: str | Path) -> int | None:
    """`<architecture>.block_count` from a GGUF file's header; None if the file is not GGUF (v2+)
    or lacks the key."""
    try:
        with open(path, "rb") as file:
            header = _Header(file)
            if file.read(4) != b"GGUF" or header.unpack("<I") < 2:
                return None
            header.unpack("<Q")  # tensor count
            for _ in range(header.unpack("<Q")):
                key, kind = header.string(), header.unpack("<I")
                if key.endswith(".block_count") and kind in _GGUF_INTEGER_FORMATS:
                    return int(header.unpack(_GGUF_INTEGER_FORMATS[kind]))
                header.skip_value(kind)
    except (OSError, ValueError):  # unreadable: the full load will say what is wrong
        return None
    return None


def _layers_in_config(config: Path) -> int | None:
    try:
        values = json.loads(config.read_text())
    except (OSError, ValueError):
        return None
    return next((values[k] for k in LAYER_KEYS if isinstance(values.get(k), int)), None)


def cached_config(name: str) -> Path | None:
    """config.json of a hub name in the local Hugging Face cache, without the network: the exact
    repository, or, for a bare name such as TransformerLens's `pythia-70m`, the one cached
    repository of any organisation whose name is that (case-insensitive)."""
    from huggingface_hub import constants, try_to_load_from_cache

    if "/" in name:
        found = try_to_load_from_cache(name, "config.json")
        return Path(found) if isinstance(found, str) else None
    hub = Path(constants.HF_HUB_CACHE)
    matches = [d for d in hub.glob("models--*--*") if d.name.split("--", 2)[-1].lower() == name.lower()] if hub.is_dir() else []
    if len(matches) != 1:
        return None
    found = try_to_load_from_cache(matches[0].name.split("--", 1)[1].replace("--", "/"), "config.json")
    return Path(found) if isinstance(found, str) else None


def n_layers_without_loading(name: str | None, path: str | None) -> int | None:
    """The model's number of blocks from its configuration alone (a local directory's config.json,
    a GGUF header, or a cached hub config), so a bad --layers costs a second; None where only
    loading the model can tell."""
    if path is not None:
        path_ = Path(path).expanduser()
        if path_.suffix == ".gguf" and path_.is_file():
            return gguf_block_count(path_)
        return _layers_in_config(path_ / "config.json")
    if name is None:
        return None
    if Path(name).expanduser().is_dir():
        return _layers_in_config(Path(name).expanduser() / "config.json")
    config = cached_config(name)
    return _layers_in_config(config) if config is not None else None


def check_layers(cfg) -> None:
    """Refuse --layers / --hooks beyond the model's blocks, from its configuration alone (a
    GenerateConfig; the paired model too). Silent where only loading can tell."""
    from cache.models import ModelError
    from store.hooks import hook_kind, parse_layers

    for name, path in ((cfg.model, cfg.model_path), (cfg.paired_model, cfg.paired_model_path)):
        n_layers = n_layers_without_loading(name, path) if (name, path) != (None, None) else None
        if n_layers is None:
            continue
        if cfg.layers:
            parse_layers(cfg.layers, n_layers)
        for hook in cfg.hooks:
            layer = hook_kind(hook)[0] if hook.startswith("blocks.") else _module_layer(hook)
            if layer is not None and layer >= n_layers:
                raise ModelError(f"{hook}: layer {layer} is out of range: {name or path} has {n_layers} layers "
                                 f"(0-{n_layers - 1})")


def _module_layer(path: str) -> int | None:
    """The block number of a transformers module path (model.layers.3.mlp → 3), if it has one."""
    parts = path.split(".")
    return next((int(p) for prev, p in zip(parts, parts[1:]) if p.isdigit() and prev in ("layers", "h", "blocks", "layer")), None)
