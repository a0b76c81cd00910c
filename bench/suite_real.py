"""The sparsely connected suite on a real model: cache a block of layers, train the suite over it,
and report the CE of the model with the suite spliced over that block, on held-out sequences.

    python -m bench.suite_real                     # Gemma-3-270M (the embedded demo model), layers 0-3
    python -m bench.suite_real --small --model NAME --dataset DIR --out DIR   # toy sizes (its smoke test)

Two commands, both resumable (a rerun skips what is complete): generate_activations.py caches
attn_out, mlp_in_normalized and mlp_out of --layers; train_suite.py trains the attention SAEs and
MLP transcoders (TopK), finds the connections, fine-tunes each setting and evaluates it. Then one
table per setting from suite.json:

    clean                  the model's own block
    zero ablation (block)  every attention and MLP output of the block zeroed
    zero ablation (MLPs)   only the MLP outputs zeroed
    vanilla suite          every module of the block replaced by its SAE/transcoder
    pruned, before / after every transcoder on its C connections, before and after fine-tuning
    kept                   the fraction of connections kept: Σ_m F·C / Σ_m F·U_m over the block's
                           transcoders, U_m being transcoder m's upstream latents (every pair a
                           dense suite would connect)

The block starts at layer 0: the pruned pass rebuilds each transcoder's input from the token
embedding plus the suite's own upstream latents, so a block starting later would also need the
residual stream entering it (not implemented). What it does not do: choose widths or steps for
you (the defaults are what a 2-core CPU finishes in about an hour), or compare with other suites.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import click

# Gemma-3-270M, layers 0-3, on a shared 2-core CPU: caching ~4 min, training the 8 modules ~9 min,
# connections ~1 min, fine-tuning and evaluation per setting ~15 min.
FULL = {"layers": "0 1 2 3", "n_tokens": 160_000, "context_length": 128, "k": 32, "ratio": 4, "connections": 100,
        "batch_size": 512, "train_epochs": 2, "connection_tokens": 100_000, "finetune_tokens": 150_000,
        "eval_tokens": 8_000, "eval_sequences": 32, "lr": "1e-3"}
SMALL = {"layers": "0 1", "n_tokens": 6_000, "context_length": 16, "k": 4, "ratio": 2, "connections": 8,
         "batch_size": 64, "train_epochs": 1, "connection_tokens": 2_000, "finetune_tokens": 2_000,
         "eval_tokens": 600, "eval_sequences": 8, "lr": "1e-3"}


def commands(out: Path, sizes: dict, model: str | None, dataset: str | None) -> tuple[list[str], list[str]]:
    """(generate_activations.py's arguments, train_suite.py's) for a store at out/store and a run at out/suite."""
    store, run = out / "store", out / "suite"
    gen = ["--layers", *sizes["layers"].split(), "--hook", "attn_out", "mlp_in_normalized", "mlp_out",
           "--n_tokens", str(sizes["n_tokens"]), "--context_length", str(sizes["context_length"]), "--out", str(store)]
    if model:
        gen += ["--model", model]
    if dataset:
        gen += ["--dataset", dataset]
    if sizes is SMALL:
        gen += ["--chunk_mb", "0.01", "--chunks_per_block", "3", "--batch_size", "8"]
    suite = ["--cache", str(store), "--output_dir", str(run), "--layers", *sizes["layers"].split()]
    for name in ("k", "ratio", "connections", "batch_size", "train_epochs", "connection_tokens", "finetune_tokens",
                 "eval_tokens", "eval_sequences", "lr"):
        suite += [f"--{name}", str(sizes[name])]
    return gen, suite


def kept_fraction(n_layers: int, parallel: bool, C: int, F: int) -> float:
    """Connections kept over connections a dense suite has, over the block's transcoders."""
    upstream = [((m if parallel else m + 1) + m) * F for m in range(n_layers)]
    return sum(min(C, u) for u in upstream) / sum(upstream)


def table(summary: dict, d_sae: int) -> list[str]:
    layout = summary["layout"]
    rows = []
    for result in summary["settings"]:
        ce, s = result["ce"], result["setting"]
        kept = kept_fraction(len(layout["attn"]), layout["parallel"], s["n_connections"], d_sae)
        rows += [f"setting {result['name']} ({s['steps']} fine-tuning steps), connections kept {kept:.4f}",
                 "| spliced over the block | CE | KL(clean ‖ ·) | recovered vs block zero ablation |",
                 "| --- | ---: | ---: | ---: |"]
        for label, key in (("clean", "clean"), ("zero ablation (block)", "zero_ablation_block"),
                           ("zero ablation (MLPs)", "zero_ablation"), ("vanilla suite, before fine-tuning", "vanilla_suite_untuned"),
                           ("vanilla suite, after", "vanilla_suite"), ("pruned suite, before fine-tuning", "pruned_suite_untuned"),
                           ("pruned suite, after", "pruned_suite")):
            kl = ce.get(f"kl_{key}")
            rec = ce.get(f"ce_recovered_{key}_vs_block")
            rows.append(f"| {label} | {ce[f'ce_{key}']:.4f} | {'-' if kl is None else f'{kl:.4f}'} | "
                        f"{'-' if rec is None else f'{rec:.3f}'} |")
        fvu = {name: entry["vanilla"]["fvu"] for name, entry in result["modules"].items()}
        pruned = {name: entry[f"pruned_C{s['n_connections']}"]["fvu"] for name, entry in result["modules"].items()
                  if name.startswith("mlp")}
        rows.append("held-out FVU vanilla: " + ", ".join(f"{n} {v:.3f}" for n, v in sorted(fvu.items())))
        rows.append("held-out FVU pruned: " + ", ".join(f"{n} {v:.3f}" for n, v in sorted(pruned.items())))
    return rows


def run(command, args: list[str], script: str) -> float:
    """One of the two CLIs, in this process; its wall time in seconds."""
    start = time.perf_counter()
    print("$ python", script, " ".join(args), flush=True)
    command.main(args, standalone_mode=False)
    return time.perf_counter() - start


@click.command()
@click.option("--out", default="runs/suite-real", show_default=True, help="Folder of the store and the suite run.")
@click.option("--small", is_flag=True, help="Toy sizes (layers 0-1, a few thousand tokens): the smoke test's.")
@click.option("--model", default=None, help="TransformerLens model name [default: the embedded demo model].")
@click.option("--dataset", default=None, help="Text for generate_activations.py [default: its default].")
def main(out: str, small: bool, model: str | None, dataset: str | None) -> None:
    """Cache a block of layers, train the suite over it, print the CE table."""
    sizes = SMALL if small else FULL
    gen, suite = commands(Path(out), sizes, model, dataset)
    import generate_activations
    import train_suite

    t_cache = run(generate_activations.main, gen, "generate_activations.py")
    t_suite = run(train_suite.main, suite, "train_suite.py")
    summary = json.loads((Path(out) / "suite" / "suite.json").read_text())
    d_sae = summary["config"]["d_sae"] or round(summary["config"]["ratio"] * _d_model(Path(out) / "store"))
    lines = table(summary, d_sae) + [f"wall time: caching {t_cache:.0f} s, suite {t_suite:.0f} s"]
    (Path(out) / "suite_real.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _d_model(store: Path) -> int:
    from store.zarr_store import ActivationStore

    return ActivationStore.open(str(store)).info["d_model"]


if __name__ == "__main__":
    main()
