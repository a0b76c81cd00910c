"""An evaluation's configuration, stated once: a frozen dataclass with a docstring under each field.
evaluate.py generates its options, defaults and help from these fields (runtime/cli_options.py
`dataclass_options`); train_sweep.py builds one to evaluate when training ends.

    evaluate_run(EvalConfig(run_dir="runs/l1-sweep"))

No torch here: the CLI answers --help and parses its options before importing it.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class EvalConfig:
    run_dir: str
    """Output directory of train_sweep.py."""
    n_sequences: int = 64
    """Held-out sequences for spliced CE/KL, which loads the model (0 skips it)."""
    eval_budget: float = 10.0
    """Minutes the spliced CE/KL may take: after its first batch it estimates the whole, and splices only as many
    sequences as fit (the report says how many); 0 lifts the limit."""
    batch_size: int = 8
    """Sequences per model forward pass."""
    row_batch_size: int = 2048
    """Held-out rows per batch for reconstruction metrics."""
    device: str = "cpu"
    """Device for the model and the dictionaries."""
    storage_options: dict = field(default_factory=dict, hash=False)
    """The run's store at a URL (s3://…): JSON options of its fsspec filesystem, e.g.
    '{"endpoint_url": "http://127.0.0.1:9000"}' [default: credentials and endpoint from the environment,
    AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL, …]."""
    cache_dir: str | None = None
    """A store at a URL: keep a local copy of every chunk read in this directory."""

    def __post_init__(self):
        from runtime.devices import check_device

        if self.n_sequences < 0 or self.batch_size < 1 or self.row_batch_size < 1:
            raise ValueError("n_sequences must be ≥ 0, batch sizes positive")
        if self.eval_budget < 0:
            raise ValueError(f"--eval_budget must be minutes ≥ 0 (0: no limit), got {self.eval_budget}")
        check_device(self.device)
