"""A suite's configuration, stated once: frozen dataclasses with a docstring under each field.
train_suite.py generates its options, defaults and help from SuiteConfig's fields
(runtime/cli_options.py `dataclass_options`); each fine-tuning setting of its grid is a
FinetuneSettings.

No torch here: the CLI answers --help and parses its options before importing it.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class FinetuneSettings:
    c: float = 1.0
    """Weight of the pruned-MSE term."""
    n_connections: int = 100
    """Connections per transcoder latent (the first C of the index)."""
    lr: float = 1e-4
    """Adam learning rate."""
    steps: int = 100
    """Fine-tuning steps."""

    @property
    def name(self) -> str:
        return f"c_{self.c:g}_C_{self.n_connections}_lr_{self.lr:g}"


@dataclass(frozen=True)
class SuiteConfig:
    cache: str
    """A complete store with attn_out, mlp_in_normalized and mlp_out at every layer."""
    output_dir: str
    """Directory of the suite's stages and report."""
    layers: tuple[str, ...] = ("all",)
    """Layers of the suite: all, or a consecutive block from layer 0 (--layers 0 1 2 3); the pruned
    pass starts from the token embedding, so a block cannot start later. Evaluation splices that
    block only; the layers above it run as they are."""
    k: int = 32
    """Active latents per row of every module (TopK)."""
    ratio: float = 8.0
    """Latents per module = ratio × d_model (unless --d_sae)."""
    d_sae: int | None = None
    """Latents per module (overrides --ratio)."""
    connections: int = 100
    """C: upstream latents each transcoder latent keeps."""
    c: float = 1.0
    """Weight of the pruned-MSE term in fine-tuning."""
    lr: float = 1e-4
    """Fine-tuning learning rate (training uses the TopK recipe's)."""
    sweep: tuple[str, ...] = ()
    """Fine-tuning settings as a grid, one after another: --sweep c=0.5,1 connections=50,100 lr=1e-4,3e-4."""
    train_epochs: int = 1
    """Passes over the store's training rows when training the modules."""
    connection_tokens: int = 1_000_000
    """Rows over which connection scores are averaged (at most one pass over the training rows)."""
    finetune_tokens: int = 1_000_000
    """Rows of fine-tuning per setting."""
    batch_size: int = 4096
    """Rows per step."""
    eval_tokens: int = 50_000
    """Rows of whole sequences held out for evaluation."""
    eval_sequences: int = 64
    """Held-out sequences for the CE/KL of the spliced suite (0 skips it)."""
    eval_batch_size: int = 8
    """Sequences per forward pass in evaluation."""
    device: str = "cpu"
    """Device (cpu, cuda, cuda:1, mps)."""
    seed: int = 0
    """Seed of initialisation and data order."""
    overwrite: bool = False
    """Replace an output directory that holds another suite (the old one is moved aside)."""
    break_lock: bool = False
    """Take over the output's lock (OUTPUT_DIR.lock) even when another host holds it."""

    def __post_init__(self):
        from runtime.devices import check_device

        for name in ("k", "connections", "train_epochs", "connection_tokens", "finetune_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be positive, got {getattr(self, name)}")
        if self.c < 0 or self.lr <= 0 or self.ratio <= 0:
            raise ValueError("--c must be ≥ 0, --lr and --ratio positive")
        check_device(self.device)
        self.settings()  # validates --sweep

    def settings(self) -> list[FinetuneSettings]:
        """The fine-tuning settings: the grid of --sweep over the fixed values."""
        axes = {"c": [self.c], "connections": [self.connections], "lr": [self.lr]}
        for spec in self.sweep:
            name, _, values = spec.partition("=")
            if name not in axes or not values:
                raise ValueError(f"--sweep {spec!r}: write c=…, connections=… or lr=… with comma-separated values")
            cast = int if name == "connections" else float
            try:
                axes[name] = [cast(v) for v in values.split(",") if v.strip()]
            except ValueError:
                raise ValueError(f"--sweep {spec!r}: values must be numbers") from None
        steps = math.ceil(self.finetune_tokens / self.batch_size)
        return [FinetuneSettings(c, C, lr, steps) for c, C, lr in itertools.product(axes["c"], axes["connections"], axes["lr"])]

    def identity(self) -> dict:
        from store.zarr_store import json_normal

        return json_normal({k: v for k, v in asdict(self).items() if k not in ("output_dir", "device", "overwrite", "break_lock")})
