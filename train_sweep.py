"""Stage 2 CLI: train a sweep of sparse dictionaries on a cached activation store.

    python train_sweep.py --cache caches/p70m-l2 --l1_min -4 --l1_max -2 --n_models 8 --ratio 8 \
        --output_dir runs/l1-sweep

All members train together on shared batches, read once (one ensemble per architecture, e.g.
--arch relu topk batchtopk jumprelu gated); each is exported (a SAELens
directory, or the crosscoder format) under OUTPUT_DIR/members/, then evaluated (held-out
reconstruction, spliced CE/KL) into sweep.json, sweep.csv, plots and report.md beside them.
Options are generated from training/config.py's fields; defaults follow each architecture's
reference recipe (training/members.py). Rerunning the
same command resumes from the last checkpoint. Heavy imports wait until the options are parsed,
so --help answers at once.
"""
from __future__ import annotations

import click

from evaluate import repo_id_option
from evaluation.config import EvalConfig
from runtime.cli_options import (dataclass_options, dist_timeout_option, field_docs, refuse_if_locked, require_store, run_or_exit,
                                 took)
from training.config import SweepConfig


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@dataclass_options(SweepConfig, aliases={"cache": ("--dataset_dir",), "n_models": ("--members",), "output_dir": ("--out",)},
                   whole_words=("sweep",),
                   extra_choices={"arch": ("clt",)})
@click.option("--eval/--no_eval", "run_eval", default=True, help="Evaluate the members when training ends.")
@click.option("--eval_sequences", "--n_sequences", "eval_sequences", type=int, default=EvalConfig.n_sequences,
              help=field_docs(EvalConfig)["n_sequences"])
@click.option("--eval_budget", type=float, default=EvalConfig.eval_budget, help=field_docs(EvalConfig)["eval_budget"])
@click.option("--eval_batch_size", type=int, default=EvalConfig.batch_size,
              help=field_docs(EvalConfig)["batch_size"].rstrip(".") + " in evaluation.")
@click.option("--browser", is_flag=True, help="After evaluation, write browser/: a static feature browser of every latent.")
@click.option("--wandb_project", default=None, help="Log curves and results to this Weights & Biases project (optional).")
@click.option("--hf_repo_id", default=None, metavar="USER/NAME", callback=lambda ctx, param, value: repo_id_option(value),
              help="When the run ends, upload it to this Hugging Face Hub repository (members, sweep.json, report.md, "
                   "plots, a model card); needs a token (HF_TOKEN or `hf auth login`).")
@dist_timeout_option()
def main(run_eval: bool, eval_sequences: int, eval_budget: float, eval_batch_size: int, browser: bool, wandb_project: str | None,
         hf_repo_id: str | None, dist_timeout: float, **options) -> None:
    """Train many sparse dictionaries at once on cached activations.

    Without options it trains 8 ReLU SAEs (λ 1e-4 … 1e-2) on caches/demo, the store that
    generate_activations.py writes by default, into runs/demo.
    """
    import time

    from runtime.location import parse_storage_options

    start = time.perf_counter()
    options["storage_options"] = run_or_exit(lambda: parse_storage_options(options["storage_options"]))
    require_store(options["cache"], options["storage_options"], options["cache_dir"])  # before torch is imported
    refuse_if_locked(options["output_dir"])

    from pathlib import Path

    from runtime.distributed import join, leave
    from evaluation.report import format_table
    from evaluation.memory import memory_needed
    from evaluation.runner import evaluate_run
    from training.parallel import Layout
    from training.tracking import WandbTracker
    from training.trainer import train_sweep

    cfg = run_or_exit(lambda: _config(options))
    out = options["output_dir"]
    eval_cfg = run_or_exit(lambda: EvalConfig(run_dir=out, n_sequences=eval_sequences, eval_budget=eval_budget,
                                              batch_size=eval_batch_size,
                                              device=options["device"], storage_options=cfg.data.storage_options,
                                              cache_dir=cfg.data.cache_dir))
    processes = run_or_exit(lambda: join(dist_timeout))
    layout = run_or_exit(lambda: Layout(processes, cfg.data_parallel))
    lead = processes.rank == 0  # under torchrun, rank 0 evaluates, logs and reports
    tracker = (run_or_exit(lambda: WandbTracker(wandb_project, Path(out).name, cfg.flat()))
               if wandb_project and lead else None)
    needs = (lambda store, parameters: memory_needed(store, eval_cfg, parameters)) if run_eval else None
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
    if browser and run_eval:
        from evaluate import write_browser

        write_browser(out, None, "site", options["device"], serve=False)
    click.echo(f"\ndone {took(start)}: " + (f"members, sweep.csv and report.md in {out} (open {out}/report.md)" if run_eval
                                           else f"members in {out}; evaluate with python evaluate.py --run_dir {out}"))
    if hf_repo_id:
        from evaluate import push_to_hub

        push_to_hub(out, hf_repo_id)


def _config(options: dict) -> SweepConfig:
    """The options as a SweepConfig: --arch clt is jumprelu_tanh with --clt."""
    archs = tuple(options["arch"])
    if "clt" in archs:
        options = {**options, "arch": tuple("jumprelu_tanh" if a == "clt" else a for a in archs), "clt": True}
    return SweepConfig.from_flat(**options)


if __name__ == "__main__":
    main()
