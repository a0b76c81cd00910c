"""Which learning rate gives each architecture a usable sparsity frontier: train the same sweep at
several learning rates on one store and print held-out L0 and FVU per member, side by side.

    python -m bench.recipes --cache caches/demo --arch relu --lrs 1e-4,3e-4,1e-3,3e-3
    python -m bench.recipes --cache caches/demo --arch jumprelu --lrs 7e-5,3e-4,1e-3 --sweep 'l0=logspace(-4,-2,4)'
    python -m bench.recipes --cache caches/demo --arch topk --lrs recipe,1e-3 --sweep k=16,32,64,128
    python -m bench.recipes --cache caches/mlp --arch jumprelu_tanh --clt_layers all --lrs recipe,1e-3

Everything else is the recipe's default (warm-ups, decay, clip; training/schedules.py), so a row
with `recipe` is exactly what a user gets without --lr. The table is what bench/RESULTS.md
records to justify the defaults.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import click


@click.command()
@click.option("--cache", required=True, help="A complete activation store.")
@click.option("--arch", default="relu")
@click.option("--lrs", default="recipe", help="Comma-separated learning rates; 'recipe' for the architecture's default.")
@click.option("--sweep", "sweep", multiple=True, help="Sweep axes as for train_sweep.py (default: the λ shorthand).")
@click.option("--ratio", type=float, default=4.0)
@click.option("--batch_size", type=int, default=1024)
@click.option("--n_epochs", type=int, default=1)
@click.option("--n_models", type=int, default=4, help="Members of the λ shorthand when no --sweep is given.")
@click.option("--eval_tokens", type=int, default=10_000)
@click.option("--clt_layers", default="", help="e.g. all, or 0,1,2: train cross-layer transcoders over these layers.")
def main(cache, arch, lrs, sweep, ratio, batch_size, n_epochs, n_models, eval_tokens, clt_layers):
    from evaluation.config import EvalConfig
    from evaluation.runner import evaluate_run
    from training.config import SweepConfig
    from training.trainer import train_sweep

    lines = []
    for lr in lrs.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "run"
            cfg = SweepConfig.from_flat(cache=cache, output_dir=str(out), arch=arch, sweep=tuple(sweep), ratio=ratio,
                              batch_size=batch_size, n_epochs=n_epochs, eval_tokens=eval_tokens,
                              lr=None if lr == "recipe" else float(lr),
                              n_models=None if sweep else n_models,
                              clt=bool(clt_layers), layers=tuple(clt_layers.split(",")) if clt_layers else ())
            start = time.perf_counter()
            train_sweep(cfg)
            rows = evaluate_run(EvalConfig(run_dir=str(out), n_sequences=0))
            seconds = time.perf_counter() - start
        for r in rows:
            knob = next((f"{k}={r[k]:.3g}" for k in ("l1_coeff", "l0_coeff", "k") if k in r and k in r["name"]), r["name"])
            lines.append(f"| {arch} | {lr} ({r['lr']:.2g}) | {knob} | {r['l0']:.1f} | {r['fvu']:.3f} | {r['dead_fraction']:.1%} | {seconds:.0f} |")
    print("| arch | lr | member | held-out L0 | FVU | dead | s (whole sweep) |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
