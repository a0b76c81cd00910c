"""Stage 1 CLI: cache a model's activations to a pre-shuffled zarr store.

    python generate_activations.py --model pythia-70m --layers 2 --dataset NeelNanda/pile-10k \
        --n_tokens 2_000_000 --out caches/p70m-l2
    python generate_activations.py --model pythia-70m --layers all --hook mlp_in_normalized mlp_out attn_out \
        --out caches/p70m-mlp       # every layer's MLP input and output and attention output, one forward pass
    python generate_activations.py --verify --out caches/p70m-l2    # check every chunk of a store
    torchrun --nproc_per_node 4 generate_activations.py …   # 4 processes (one model each) share the blocks
    python generate_activations.py … --out s3://bucket/caches/p70m-l2   # any fsspec URL: pip install 'sae-sweep[s3]'

Model diffing: `--paired_model google/gemma-3-270m-it` (or `--paired_model_path`) also runs a
second model that shares the tokenizer on the same tokens, writing `base/<hook>` and
`chat/<hook>` sources with aligned rows (`--labels` renames them).

With no --model and no --model_path it runs the embedded demo: Gemma-3-270M (GGUF, from the
`demo` extra) over the Python standard library's docstrings, layer 6 unless --layers/--hooks say
otherwise. Rerunning the same command resumes an interrupted store; a complete one is left as it
is. Options are generated from cache/config.py's fields. Heavy imports wait until the options are
parsed, so --help answers at once.
"""
from __future__ import annotations

import click

from runtime.cli_options import dataclass_options, dist_timeout_option, refuse_if_locked, require_store, run_or_exit, took
from cache.config import GenerateConfig
from cache.models import DEMO_LAYER, DEMO_MODEL_NAME


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@dataclass_options(GenerateConfig, off_flags={"exclude_bos": "--include_bos"}, aliases={"out": ("--output_dir",)})
@dist_timeout_option()
@click.option("--verify", is_flag=True, help="Check every chunk of the store at --out (presence, size, checksum, finite values) and exit.")
def main(verify: bool, dist_timeout: float, **options) -> None:
    """Cache activations of a TransformerLens model to a pre-shuffled zarr store.

    Without options it caches 2M tokens of the embedded demo model's layer 6 over the Python
    standard library's docstrings into caches/demo (about 30 minutes on a 2-core CPU; the
    README's demo command caches 50k).
    """
    import time

    from runtime.location import parse_storage_options

    start = time.perf_counter()
    options["storage_options"] = run_or_exit(lambda: parse_storage_options(options["storage_options"]))
    if verify:
        require_store(options["out"], options["storage_options"])  # before torch is imported
        run_or_exit(lambda: _verify(options["out"], options["storage_options"]))
        return
    refuse_if_locked(options["out"])  # before torch is imported
    from cache.model_config import check_layers
    from cache.models import default_gguf_path

    if options["model"] is None and options["model_path"] is None:
        demo_path = str(run_or_exit(default_gguf_path))
        no_hooks = not options["layers"] and not options["hooks"]
        options.update(model=DEMO_MODEL_NAME, model_path=demo_path, layers=(str(DEMO_LAYER),) if no_hooks else options["layers"])
    if not options["layers"] and not options["hooks"]:
        raise click.UsageError("choose what to cache: --layers 2 [--hook resid_post] or --hooks blocks.2.hook_resid_post")
    cfg = run_or_exit(lambda: GenerateConfig(**options))
    run_or_exit(lambda: check_layers(cfg))  # from the model's config, before torch and the weights load
    from runtime.distributed import join, leave
    from cache.generate import generate

    processes = run_or_exit(lambda: join(dist_timeout))
    store = run_or_exit(lambda: generate(cfg, processes))
    leave(processes)
    if processes.rank == 0:
        click.echo(f"store {store.path}: {store.n_rows:,} rows of {_describe_sources(store)}, {took(start)}\n"
                   f"next: python train_sweep.py --cache {options['out']}")


def _describe_sources(store) -> str:
    """Each source with its width and scale; many (every layer's hooks) as a count per hook kind."""
    if len(store.sources) <= 6:
        return ", ".join(f"{s.name} (d={s.d}, scale {store.norm_scale(s.name):.3g})" for s in store.sources)
    kinds: dict[tuple[str, int], int] = {}
    for s in store.sources:
        kind = s.name.split(".", 2)[2] if s.layer is not None and s.name.startswith("blocks.") else s.name
        kinds[kind, s.d] = kinds.get((kind, s.d), 0) + 1
    return f"{len(store.sources)} sources: " + ", ".join(f"{kind} ×{n} (d={d})" for (kind, d), n in kinds.items())


def _verify(out: str, storage_options: dict) -> None:
    """Check a store fully; one line per problem and exit 1 if there is any."""
    import sys

    from runtime.location import location
    from store.zarr_store import ActivationStore

    store = ActivationStore.open(location(out, storage_options), allow_incomplete=True)
    if not store.complete:
        raise ValueError(f"store {out} is incomplete ({store.rows_written:,} of {store.n_rows:,} rows): "
                         "rerun the generate_activations.py command that wrote it to finish it")
    problems = store.verify()
    for problem in problems:
        click.echo(f"error: {problem}", err=True)
    n_chunks = sum(len(store.chunk_keys(a)) for a in store.array_names())
    if problems:
        click.echo(f"store {out}: {len(problems)} of {n_chunks} chunk files are damaged", err=True)
        sys.exit(1)
    checks = "size, checksum and finite values" if store.manifest is not None else \
        "presence, size and finite values (a store written before checksums)"
    click.echo(f"store {out}: all {n_chunks} chunk files verified ({checks})")


if __name__ == "__main__":
    main()
