"""Suite CLI: train a sparsely connected suite (SCAE) on a store, as resumable stages.

    python generate_activations.py --model pythia-70m --layers all --hook attn_out mlp_in_normalized mlp_out \
        --out caches/p70m-suite
    python train_suite.py --cache caches/p70m-suite --output_dir runs/p70m-suite --k 32 --connections 100

At every layer a TopK SAE on the attention output and a TopK transcoder from the MLP's input to
its output; then each transcoder latent's C strongest upstream connections; then fine-tuning with
the pruned pass in the loss; then evaluation (suite.json, report.md). Rerunning the same command
resumes; finished stages are skipped.
"""
from __future__ import annotations

import click

from runtime.cli_options import COUNT, SpaceSeparated, refuse_if_locked, require_store, run_or_exit, took


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--cache", required=True, help="Store with attn_out, mlp_in_normalized and mlp_out at every layer.")
@click.option("--output_dir", required=True, help="Directory of the suite's stages and report.")
@click.option("--k", type=int, default=32, help="Active latents per row of every module.")
@click.option("--ratio", type=float, default=8.0, help="Latents per module = ratio × d_model.")
@click.option("--d_sae", type=int, default=None, help="Latents per module (overrides --ratio).")
@click.option("--connections", type=int, default=100, help="C: upstream latents each transcoder latent keeps.")
@click.option("--c", "c", type=float, default=1.0, help="Weight of the pruned MSE in fine-tuning.")
@click.option("--lr", type=float, default=1e-4, help="Fine-tuning learning rate.")
@click.option("--sweep", cls=SpaceSeparated, split_commas=False, type=str,
              help="Fine-tuning settings as a grid, one after another: --sweep c=0.5,1 connections=50,100 lr=1e-4,3e-4.")
@click.option("--train_epochs", type=int, default=1, help="Passes over the training rows when training the modules.")
@click.option("--connection_tokens", type=COUNT, default=1_000_000, help="Rows the connection scores average over.")
@click.option("--finetune_tokens", type=COUNT, default=1_000_000, help="Rows of fine-tuning per setting.")
@click.option("--batch_size", type=int, default=4096, help="Rows per step.")
@click.option("--eval_tokens", type=COUNT, default=50_000, help="Rows of whole sequences held out for evaluation.")
@click.option("--eval_sequences", type=int, default=64, help="Held-out sequences for the CE/KL of the spliced suite (0 skips it).")
@click.option("--eval_batch_size", type=int, default=8, help="Sequences per forward pass in evaluation.")
@click.option("--device", default="cpu", help="Device (cpu, cuda, cuda:1, mps).")
@click.option("--seed", type=int, default=0, help="Seed of initialisation and data order.")
@click.option("--overwrite", is_flag=True, help="Replace an output directory that holds another suite (moved aside).")
@click.option("--break_lock", is_flag=True, help="Take over the output's lock (OUTPUT_DIR.lock) even when another host holds it.")
def main(**options) -> None:
    """Train a sparsely connected suite: per-layer attention SAEs and MLP transcoders, connections, fine-tuning."""
    import time

    start = time.perf_counter()
    require_store(options["cache"])  # before torch is imported
    refuse_if_locked(options["output_dir"])
    from suite.runner import SuiteConfig, run_suite

    options["sweep"] = tuple(options["sweep"] or ())
    cfg = run_or_exit(lambda: SuiteConfig(**options))
    summary = run_or_exit(lambda: run_suite(cfg))
    click.echo(f"done {took(start)}: suite in {cfg.output_dir} ({len(summary['settings'])} fine-tuned settings); "
               f"open {cfg.output_dir}/report.md")


if __name__ == "__main__":
    main()
