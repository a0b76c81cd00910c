"""Stage 2 CLI: train a sweep of sparse dictionaries on a cached activation store.

    python train_sweep.py --cache caches/p70m-l2 --l1_min -4 --l1_max -2 --n_models 8 --ratio 8 \
        --output_dir runs/l1-sweep

All members train together as one ensemble on shared batches; each is exported (a SAELens
directory, or the crosscoder format) under OUTPUT_DIR/members/, then evaluated (held-out
reconstruction, spliced CE/KL) into sweep.json, sweep.csv, plots and report.md beside them.
Defaults follow each architecture's reference recipe (training/schedules.py). Rerunning the
same command resumes from the last checkpoint. Heavy imports wait until the options are parsed,
so --help answers at once.
"""
from __future__ import annotations

import click

from cache.cli_options import (
    COUNT, SpaceSeparated, dist_timeout_option, refuse_if_locked, require_store, run_or_exit,
    storage_options_option, took)
from training.members import ARCHS


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--cache", "--dataset_dir", "cache", default="caches/demo",
              help="Activation store written by generate_activations.py (its default writes caches/demo).")
@click.option("--source", default=None, help="Source in the store to train on [default: the store's only source].")
@click.option("--sources", cls=SpaceSeparated, type=str, default=(),
              help="Several sources read side by side for crosscoders, e.g. base/blocks.6.hook_resid_post,chat/blocks.6.hook_resid_post.")
@click.option("--targets", cls=SpaceSeparated, type=str, default=(),
              help="What the members reconstruct when not their inputs: a transcoder, --sources IN --targets OUT.")
@click.option("--transcoder", is_flag=True, help="MLP transcoders at each of --layers (input: the MLP's input, target: its output).")
@click.option("--clt", is_flag=True, help="A cross-layer transcoder over --layers (also: --arch clt).")
@click.option("--layers", cls=SpaceSeparated, type=str, default=(), help="Layers of --kind / --transcoder / --clt: numbers, or all.")
@click.option("--kind", default=None, help="An SAE at each of --layers on the store's source of this kind (e.g. attn_out), in one ensemble.")
@click.option("--skip", is_flag=True, help="Transcoders: add a linear skip term x W_skip (skip transcoders).")
@click.option("--output_dir", default="runs/demo", help="Where checkpoints, members and the summary go.")
@click.option("--arch", type=click.Choice([*ARCHS, "clt"]), default="relu",
              help="Architecture of every member; clt = jumprelu_tanh with --clt (Anthropic's cross-layer transcoder).")
@click.option("--sweep", cls=SpaceSeparated, split_commas=False, type=str,
              help="Knob axes; members are their grid: --sweep k=16,32,64 'l1=logspace(-4,-2,8)' seed=0,1.")
@click.option("--l1_min", type=float, default=None,
              help="log10 of the smallest sparsity coefficient of the shorthand sweep [default: -4 when the shorthand applies].")
@click.option("--l1_max", type=float, default=None, help="log10 of the largest one [default: -2].")
@click.option("--n_models", "--members", "n_models", type=int, default=None,
              help="Members of the shorthand sweep, log-spaced between the bounds [default: 8]. The shorthand applies when "
                   "one of its flags is given, or when neither --sweep nor --l1_coeff/--l0_coeff sets the coefficient.")
@click.option("--l1_coeff", type=float, default=None, help="A fixed L1 coefficient (relu, relu_april, gated, panneal, crosscoder).")
@click.option("--l0_coeff", type=float, default=None, help="A fixed L0 coefficient (jumprelu) or tanh coefficient (jumprelu_tanh).")
@click.option("--k", type=int, default=32, help="Active latents per row (topk, batchtopk, matryoshka) unless swept.")
@click.option("--bandwidth", type=float, default=None,
              help="JumpReLU straight-through bandwidth [default: 1e-3·√d, the reference's 1e-3 on unit-norm² activations].")
@click.option("--threshold_init", type=float, default=None, help="Initial JumpReLU threshold [default: 1e-3·√d].")
@click.option("--grad_clip", type=float, default=None, help="Clip each member's gradient norm (0: off) [default: the recipe's].")
@click.option("--k_anneal_steps", type=int, default=0, help="TopK family: anneal k from d_in down to --k over this many steps.")
@click.option("--p_end", type=float, default=0.2, help="panneal: final exponent of the Lp penalty unless swept.")
@click.option("--decoder_init_norm", type=float, default=0.1,
              help="relu_april, crosscoder: initial norm of each source's decoder vector (e.g. 0.08 for 2 sources).")
@click.option("--p_anneal_start", type=float, default=0.2, help="panneal: fraction of training after which p starts to fall.")
@click.option("--p_anneal_updates", type=int, default=10, help="panneal: p reaches p_end in this many steps.")
@click.option("--resample_every", type=int, default=0, help="L1 architectures: resample dead latents every N steps (0: never).")
@click.option("--resample_stop", type=float, default=0.5, help="No resampling after this fraction of training.")
@click.option("--resample_pool", type=COUNT, default=819_200, help="Store rows dead latents draw their new inputs from.")
@click.option("--ratio", type=float, default=8.0, help="d_sae = ratio × d_in.")
@click.option("--d_sae", type=int, default=None, help="Number of latents (overrides --ratio).")
@click.option("--batch_size", type=int, default=4096, help="Rows per step, shared by every member.")
@click.option("--lr", type=float, default=None, help="Adam learning rate [default: the recipe's, see README].")
@click.option("--lr_warmup_steps", type=int, default=None, help="Linear learning-rate warm-up steps [default: the recipe's].")
@click.option("--lr_decay_start", type=float, default=None,
              help="Fraction of training after which the lr decays linearly to 0 (1: never) [default: the recipe's].")
@click.option("--sparsity_warmup_steps", type=int, default=None, help="Linear warm-up steps of the sparsity coefficient [default: the recipe's].")
@click.option("--b_dec_init", type=click.Choice(["mean", "zeros"]), default="mean", help="Initial decoder bias.")
@click.option("--n_epochs", type=int, default=1, help="Passes over the training rows.")
@click.option("--n_tokens", type=COUNT, default=None, help="Train on this many rows instead of --n_epochs.")
@click.option("--eval_tokens", type=COUNT, default=50_000, help="Rows of whole sequences held out for evaluation (at most a tenth of the store).")
@click.option("--exclude_tokens", cls=SpaceSeparated, type=str, default=(),
              help="Never train on or evaluate rows of these tokens: ids, or bos / eos, e.g. --exclude_tokens eos.")
@click.option("--shuffle_chunks", type=int, default=8, help="Store chunks shuffled together in memory.")
@click.option("--prefetch", type=int, default=8, help="Batches read ahead in the background.")
@click.option("--dead_window", type=COUNT, default=None,
              help="Tokens without firing after which a latent counts as dead [default: the recipe's, at most a quarter of the run].")
@click.option("--checkpoint_every", type=int, default=500, help="Steps between checkpoints.")
@click.option("--device", default="cpu", help="Training device (cpu, cuda, cuda:1, mps).")
@click.option("--seed", type=int, default=0, help="Seed of initialisation and data order.")
@click.option("--overwrite", is_flag=True, help="Replace an output directory that holds another run (the old one is moved aside).")
@click.option("--break_lock", is_flag=True, help="Take over the output's lock (OUTPUT_DIR.lock) even when another host holds it.")
@click.option("--eval/--no_eval", "run_eval", default=True, help="Evaluate the members when training ends.")
@click.option("--eval_sequences", type=int, default=64, help="Held-out sequences for spliced CE/KL (0 skips it).")
@click.option("--eval_batch_size", type=int, default=8, help="Sequences per model forward pass in evaluation.")
@click.option("--wandb_project", default=None, help="Log curves and results to this Weights & Biases project (optional).")
@storage_options_option("--cache")
@click.option("--cache_dir", default=None, help="A store at a URL: keep a local copy of every chunk read in this directory.")
@click.option("--data_parallel", type=int, default=1,
              help="Under torchrun: ranks that split each batch of the same members (default: every rank trains its "
                   "own members on whole batches).")
@dist_timeout_option()
def main(run_eval: bool, eval_sequences: int, eval_batch_size: int, wandb_project: str | None, dist_timeout: float,
         **options) -> None:
    """Train many sparse dictionaries at once on cached activations.

    Without options it trains 8 ReLU SAEs (λ 1e-4 … 1e-2) on caches/demo, the store that
    generate_activations.py writes by default, into runs/demo.
    """
    import time

    from cache.location import parse_storage_options

    start = time.perf_counter()
    options["storage_options"] = run_or_exit(lambda: parse_storage_options(options["storage_options"]))
    require_store(options["cache"], options["storage_options"], options["cache_dir"])  # before torch is imported
    refuse_if_locked(options["output_dir"])

    from dataclasses import asdict
    from pathlib import Path

    from cache.distributed import join, leave
    from evaluation.report import format_table
    from evaluation.runner import EvalConfig, evaluate_run, memory_needed
    from training.parallel import Layout
    from training.tracking import WandbTracker
    from training.trainer import SweepConfig, train_sweep

    for key in ("sweep", "sources", "exclude_tokens", "targets", "layers"):
        options[key] = tuple(options[key])
    if options["arch"] == "clt":
        options.update(arch="jumprelu_tanh", clt=True)
    cfg = run_or_exit(lambda: SweepConfig(**options))
    out = options["output_dir"]
    eval_cfg = run_or_exit(lambda: EvalConfig(run_dir=out, n_sequences=eval_sequences, batch_size=eval_batch_size,
                                              device=options["device"], storage_options=cfg.storage_options,
                                              cache_dir=cfg.cache_dir))
    processes = run_or_exit(lambda: join(dist_timeout))
    layout = run_or_exit(lambda: Layout(processes, cfg.data_parallel))
    lead = processes.rank == 0  # under torchrun, rank 0 evaluates, logs and reports
    tracker = (run_or_exit(lambda: WandbTracker(wandb_project, Path(out).name, asdict(cfg)))
               if wandb_project and lead else None)
    needs = (lambda info, parameters, context: memory_needed(info, eval_cfg, parameters, context)) if run_eval else None
    rows = run_or_exit(lambda: train_sweep(cfg, tracker, layout, evaluation_bytes=needs))
    leave(processes)
    if not lead:
        return
    if run_eval and "fvu" not in rows[0]:
        rows = run_or_exit(lambda: evaluate_run(eval_cfg))
    if tracker is not None:
        tracker.log_members(rows)
        tracker.finish()
    click.echo("\n" + format_table(rows))
    click.echo(f"\ndone {took(start)}: " + (f"members, sweep.csv and report.md in {out} (open {out}/report.md)" if run_eval
                                           else f"members in {out}; evaluate with python evaluate.py --run_dir {out}"))


if __name__ == "__main__":
    main()
