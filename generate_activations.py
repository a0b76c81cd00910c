"""Stage 1 CLI: cache a model's activations to a pre-shuffled zarr store.

    python generate_activations.py --model pythia-70m --layers 2 --dataset NeelNanda/pile-10k \
        --n_tokens 2_000_000 --out caches/p70m-l2

Model diffing: `--paired_model google/gemma-3-270m-it` (or `--paired_model_path`) also runs a
second model that shares the tokenizer on the same tokens, writing `base/<hook>` and
`chat/<hook>` sources with aligned rows (`--labels` renames them).

With no --model and no --model_path it runs the embedded demo: Gemma-3-270M (GGUF, from the
`demo` extra) over the Python standard library's docstrings. Rerunning the same command resumes
an interrupted store; a complete one is left as it is.
"""
from __future__ import annotations

import click

from cache.cli_options import COUNT, SpaceSeparated, run_or_exit
from cache.generate import GenerateConfig, generate
from cache.models import DEMO_MODEL_NAME, HOOK_KINDS, default_gguf_path
from cache.store import STORAGE_DTYPES
from cache.text import STDLIB_DOCSTRINGS


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--out", default="caches/demo", help="Directory of the zarr store to write.")
@click.option("--model", default=None, help="TransformerLens model name or alias (pythia-70m, gpt2-small, ...).")
@click.option("--model_path", default=None, help="Local Hugging Face directory or .gguf file (with --model naming its architecture).")
@click.option("--paired_model", default=None, help="Second model run on the same tokens (same tokenizer), e.g. the chat fine-tune of --model.")
@click.option("--paired_model_path", default=None, help="Local Hugging Face directory or .gguf file of the paired model.")
@click.option("--labels", cls=SpaceSeparated, type=str, default=("base", "chat"), help="Source-name prefixes of --model and --paired_model: base/<hook>, chat/<hook>.")
@click.option("--require_equal_widths", is_flag=True, help="Refuse a pair whose activation widths differ (crosscoders need them equal).")
@click.option("--layers", cls=SpaceSeparated, type=int, help="Layers to cache, e.g. --layers 2 3.")
@click.option("--hook", type=click.Choice(list(HOOK_KINDS)), default="resid_post", help="Hook kind cached at each of --layers.")
@click.option("--hooks", cls=SpaceSeparated, type=str, help="Full hook names, e.g. --hooks blocks.2.hook_resid_post.")
@click.option("--dataset", default=STDLIB_DOCSTRINGS, help="HF dataset name, local .txt/.jsonl/.parquet file or folder, or stdlib-docstrings.")
@click.option("--text_column", default="text", help="Column with the text in record datasets.")
@click.option("--split", default="train", help="Split of a HF dataset.")
@click.option("--context_length", type=int, default=128, help="Tokens per sequence, BOS included.")
@click.option("--prepend_bos/--no_prepend_bos", default=None, help="Start each sequence with BOS [default: the model's default].")
@click.option("--exclude_bos/--include_bos", default=True, help="Store no rows for the BOS position.")
@click.option("--n_tokens", type=COUNT, default=2_000_000, help="Rows (tokens) to store, rounded up to whole chunks.")
@click.option("--n_chunks", type=int, default=None, help="Store exactly this many chunks instead of --n_tokens.")
@click.option("--chunk_mb", type=float, default=8.0, help="Target chunk size in MB (whole sequences per chunk).")
@click.option("--chunks_per_block", type=int, default=16, help="Chunks shuffled together before writing (on-disk mixing window).")
@click.option("--batch_size", type=int, default=32, help="Sequences per forward pass.")
@click.option("--device", default="cpu", help="Device of the model (cpu, cuda, cuda:1, mps).")
@click.option("--model_dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", help="Dtype the model runs in.")
@click.option("--dtype", type=click.Choice(list(STORAGE_DTYPES)), default="float16", help="Storage dtype of activations.")
@click.option("--seed", type=int, default=0, help="Seed of the row shuffle.")
@click.option("--overwrite", is_flag=True, help="Replace an existing store written with another configuration.")
def main(**options) -> None:
    """Cache activations of a TransformerLens model to a pre-shuffled zarr store."""
    if options["model"] is None and options["model_path"] is None:
        demo_path = str(run_or_exit(default_gguf_path))
        options.update(model=DEMO_MODEL_NAME, model_path=demo_path, layers=options["layers"] or (6,))
    options["layers"], options["hooks"], options["labels"] = (tuple(options[k]) for k in ("layers", "hooks", "labels"))
    if not options["layers"] and not options["hooks"]:
        raise click.UsageError("choose what to cache: --layers 2 [--hook resid_post] or --hooks blocks.2.hook_resid_post")
    store = run_or_exit(lambda: generate(GenerateConfig(**options)))
    sources = ", ".join(f"{s.name} (d={s.d}, scale {store.norm_scale(s.name):.3g})" for s in store.sources)
    click.echo(f"store {store.path}: {store.n_rows:,} rows of {sources}")


if __name__ == "__main__":
    main()
