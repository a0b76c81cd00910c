"""Stage 1's configuration, stated once: a frozen dataclass with a docstring under each field.
generate_activations.py generates its options, defaults and help from these fields
(runtime/cli_options.py `dataclass_options`), and the store records them as its identity.

    cfg = GenerateConfig(out="caches/p70m-l2", model="pythia-70m", layers=(2,))

No torch here: the CLI answers --help and parses its options before importing it.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Literal, get_args

from cache.text import STDLIB_DOCSTRINGS
from store.hooks import HOOK_KINDS, HookKind

if TYPE_CHECKING:
    from runtime.location import Location

StorageDtype = Literal["float16", "bfloat16", "float32"]  # store.zarr_store.STORAGE_DTYPES (asserted in cache/generate.py)
# Fields of GenerateConfig that do not change the stored bytes: they may differ on resume.
_RUNTIME_FIELDS = ("out", "device", "batch_size", "overwrite", "require_equal_widths", "storage_options", "break_lock")
# Fields that only mean something for a paired run: left out of an unpaired store's identity,
# so stores written before pairing existed still resume.
_PAIRED_FIELDS = ("paired_model", "paired_model_path", "labels")


@dataclass(frozen=True)
class GenerateConfig:
    out: str = "caches/demo"
    """Where the zarr store goes (or the one to check with --verify): a directory, or an fsspec URL such as
    s3://bucket/prefix."""
    model: str | None = None
    """TransformerLens model name or alias (pythia-70m, gpt2-small, ...), or with the transformers backend any Hugging
    Face name [default: without --model and --model_path, the embedded demo model google/gemma-3-270m (GGUF),
    layer 6]."""
    model_path: str | None = None
    """Local Hugging Face directory or .gguf file (with a .gguf, --model names its architecture)."""
    backend: Literal["auto", "transformer_lens", "transformers"] = "auto"
    """How the model runs: transformer_lens, transformers (AutoModelForCausalLM; hooks are module paths such as
    model.layers.2), or auto: TransformerLens where it knows the architecture, transformers otherwise."""
    paired_model: str | None = None
    """Second model run on the same tokens (same tokenizer), e.g. the chat fine-tune of --model."""
    paired_model_path: str | None = None
    """Local Hugging Face directory or .gguf file of the paired model."""
    labels: tuple[str, ...] = ("base", "chat")
    """Source-name prefixes of --model and --paired_model: base/<hook>, chat/<hook> (paired runs only)."""
    require_equal_widths: bool = False
    """Refuse a pair whose activation widths differ (crosscoders need them equal)."""
    layers: tuple[int | str, ...] = ()
    """Layers to cache, e.g. --layers 2 3, or --layers all."""
    hook: tuple[HookKind, ...] = ("resid_post",)
    """Hook kinds cached at each of --layers (several: --hook mlp_in_normalized mlp_out); mlp_in_normalized brings
    its norm's scale."""
    hooks: tuple[str, ...] = ()
    """Full TransformerLens hook names, besides --layers, e.g. --hooks blocks.2.hook_resid_post."""
    dataset: str = STDLIB_DOCSTRINGS
    """HF dataset name (streamed), local .txt/.jsonl/.parquet file or folder, or stdlib-docstrings."""
    text_column: str = "text"
    """Column with the text in record datasets."""
    split: str = "train"
    """Split of a HF dataset."""
    context_length: int = 128
    """Tokens per sequence, BOS included."""
    prepend_bos: bool | None = None
    """Start each sequence with BOS [default: the model's TransformerLens default]."""
    exclude_bos: bool = True
    """Store no rows for the BOS position (its activations are outliers that dominate norms)."""
    n_tokens: int = 2_000_000
    """Rows (tokens) to store, rounded up to whole chunks; fewer if the dataset runs out."""
    n_chunks: int | None = None
    """Store exactly this many chunks instead of --n_tokens."""
    chunk_mb: float = 8.0
    """Target size of one chunk over all sources, in MB (whole sequences per chunk)."""
    chunks_per_block: int = 16
    """Chunks shuffled together before writing (the on-disk mixing window)."""
    batch_size: int = 32
    """Sequences per forward pass."""
    device: str = "cpu"
    """Device of the model (cpu, cuda, cuda:1, mps)."""
    model_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype the model runs in."""
    dtype: StorageDtype = "float16"
    """Storage dtype of activations."""
    seed: int = 0
    """Seed of the row shuffle."""
    overwrite: bool = False
    """Replace an existing store written with another configuration."""
    storage_options: dict = field(default_factory=dict)
    """--out at a URL (s3://…): JSON options of its fsspec filesystem, e.g. '{"endpoint_url": "http://127.0.0.1:9000"}'
    [default: credentials and endpoint from the environment, AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL, …]."""
    break_lock: bool = False
    """Take over the store's lock (--out.lock) even when another host holds it."""

    def __post_init__(self):
        from runtime.devices import check_device

        if self.dtype not in get_args(StorageDtype):
            raise ValueError(f"--dtype {self.dtype!r}: choose one of {', '.join(get_args(StorageDtype))}")
        object.__setattr__(self, "hook", (self.hook,) if isinstance(self.hook, str) else tuple(self.hook))
        unknown = [k for k in self.hook if k not in HOOK_KINDS]
        if unknown or not self.hook:
            raise ValueError(f"unknown --hook {unknown[0] if unknown else ''!r}; choose from: {', '.join(HOOK_KINDS)}")
        layers = tuple(int(x) if str(x).lstrip("-").isdigit() else str(x).lower() for x in self.layers)
        if any(x != "all" and not isinstance(x, int) for x in layers) or ("all" in layers and len(layers) > 1):
            raise ValueError(f"--layers {' '.join(map(str, self.layers))}: give layer numbers, or all")
        object.__setattr__(self, "layers", layers)
        for name, value in (("context_length", self.context_length), ("n_tokens", self.n_tokens),
                            ("batch_size", self.batch_size), ("chunks_per_block", self.chunks_per_block)):
            if value < 1:
                raise ValueError(f"--{name} must be positive, got {value}")
        if self.context_length < 2:
            raise ValueError("--context_length must be at least 2")
        if self.n_chunks is not None and self.n_chunks < 1:
            raise ValueError(f"--n_chunks must be positive, got {self.n_chunks}")
        check_device(self.device)
        if self.chunk_mb <= 0:
            raise ValueError(f"--chunk_mb must be positive, got {self.chunk_mb}")
        labels = tuple(self.labels)
        if len(labels) != 2 or len(set(labels)) != 2 or not all(labels) or any("/" in x for x in labels):
            raise ValueError(f"--labels {','.join(labels)}: give two different names without '/', e.g. --labels base,chat")

    @property
    def where(self) -> Location:
        from runtime.location import location

        return location(self.out, self.storage_options)

    @property
    def paired(self) -> bool:
        return self.paired_model is not None or self.paired_model_path is not None

    def identity(self) -> dict:
        """The fields that determine the store's contents (one hook kind written as a string, as
        stores written before several kinds existed record it; the backend when chosen, so that
        stores written before there was a choice resume)."""
        skip = _RUNTIME_FIELDS + (() if self.paired else _PAIRED_FIELDS) + (("backend",) if self.backend == "auto" else ())
        identity = {k: v for k, v in asdict(self).items() if k not in skip}
        if len(self.hook) == 1:
            identity["hook"] = self.hook[0]
        return identity
