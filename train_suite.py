"""Suite CLI: train a sparsely connected suite (SCAE) on a store, as resumable stages.

    python generate_activations.py --model pythia-70m --layers all --hook attn_out mlp_in_normalized mlp_out \
        --out caches/p70m-suite
    python train_suite.py --cache caches/p70m-suite --output_dir runs/p70m-suite --k 32 --connections 100

At every layer a TopK SAE on the attention output and a TopK transcoder from the MLP's input to
its output; then each transcoder latent's C strongest upstream connections; then fine-tuning with
the pruned pass in the loss; then evaluation (suite.json, report.md). Rerunning the same command
resumes; finished stages are skipped. Options are generated from suite/config.py's fields.
"""
from __future__ import annotations

import click

from runtime.cli_options import dataclass_options, refuse_if_locked, require_store, run_or_exit, took
from suite.config import SuiteConfig


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@dataclass_options(SuiteConfig, whole_words=("sweep",), aliases={"output_dir": ("--out",), "eval_sequences": ("--n_sequences",)})
def main(**options) -> None:
    """Train a sparsely connected suite: per-layer attention SAEs and MLP transcoders, connections, fine-tuning."""
    import time

    start = time.perf_counter()
    require_store(options["cache"])  # before torch is imported
    refuse_if_locked(options["output_dir"])
    from suite.runner import run_suite

    cfg = run_or_exit(lambda: SuiteConfig(**options))
    summary = run_or_exit(lambda: run_suite(cfg))
    click.echo(f"done {took(start)}: suite in {cfg.output_dir} ({len(summary['settings'])} fine-tuned settings); "
               f"open {cfg.output_dir}/report.md")


if __name__ == "__main__":
    main()
