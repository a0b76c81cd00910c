"""Activation-caching speed and store size: our generator vs a bare forward pass of the same model.

    python -m bench.cache_throughput                       # stand-in pythia-70m, layer 2, ~100k tokens
    python -m bench.cache_throughput --quick               # tiny stand-in model, 1k tokens: a smoke test
    python -m bench.cache_throughput --model pythia-70m     # the real one, from your HF cache
    python -m bench.cache_throughput --model_path ~/models/my-hf-dir --layers 6

Two things are timed, alternately: a forward-only pass, then one generation per storage dtype
(--dtypes, default float16 bfloat16 float32), each followed by another forward-only pass:
  * generation: `cache.generate.generate(GenerateConfig(...))` into a fresh store in a temporary
    folder, timed end to end (model load, reading and tokenising the text, forward passes with
    hooks, checks, shuffling, casting, writing zarr);
  * forward only: the same model (loaded once, up front, by the project's `load_model`) over the
    first ⌈n_tokens / context_length⌉ sequences the generator runs (made the same way, from the
    same text and tokenizer), in the same batch size, `model(tokens, stop_at_layer=...)` stopped
    after the same block, under inference_mode, keeping nothing.
Each generation is compared with the mean of the forward-only passes just before and just after
it, so a slow spell of a shared machine shows up as a gap between those two (printed).
Tokens/s counts tokens through the model (sequences × context_length) for both, so their ratio
is what caching costs over the bare forward; generation is also shown without the model-load
time (the load time measured once, up front, subtracted). Disk use is reported per stored
activation value: acts/ arrays only, and the whole store (tokens, positions, sequence ids,
metadata included).

Without --model / --model_path it builds a stand-in for pythia-70m (random weights, the real
shape, a small BPE tokenizer; see bench/_fixtures.py) in a temporary Hugging Face cache,
sets HF_HOME there with HF_HUB_OFFLINE=1, and loads it by name "pythia-70m" through the project's
code, exactly as a cached real checkpoint would be loaded. Text: --dataset (default the built-in
stdlib-docstrings). This does not measure reading the store back (see training), GPU
generation unless --device says so, or anything about activation quality.
"""
from __future__ import annotations

import math
import sys
import tempfile
import time
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import click
import numpy as np
import torch

if not __package__:  # run as a file: make the repository's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import RssPeak, Stopwatch, format_table, mib, track_rss  # noqa: E402
from bench._fixtures import PYTHIA_70M_SHAPE, TINY_SHAPE, TL_NAME, build_hf_cache, use_offline_hf_home  # noqa: E402
from runtime.cli_options import SpaceSeparated  # noqa: E402
from cache.config import GenerateConfig  # noqa: E402
from cache.generate import generate  # noqa: E402
from cache.models import load_model, resolve_hooks, stop_layer  # noqa: E402
from store.zarr_store import STORAGE_DTYPES, ActivationStore  # noqa: E402
from cache.text import STDLIB_DOCSTRINGS, iter_documents, token_sequences  # noqa: E402


@dataclass(frozen=True)
class DtypeResult:
    dtype: str
    gen_tokens: int  # tokens the generator ran through the model (sequences × context)
    n_rows: int  # rows stored
    d: int  # stored values per row (all sources)
    gen_seconds: float
    fwd_rates: tuple[float, float]  # forward-only tokens/s just before and just after this generation
    acts_bytes: int
    store_bytes: int
    gen_peak_rss: int | None
    checksum_seconds: float  # of gen_seconds, spent checksumming chunk files

    @property
    def fwd_rate(self) -> float:
        return sum(self.fwd_rates) / 2


def dir_bytes(path: Path) -> int:
    """Bytes of all files under `path` (apparent sizes)."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def model_sequences(model, dataset: str, context_length: int, n_tokens: int) -> np.ndarray:
    """The first ⌈n_tokens / context_length⌉ sequences the generator would run, made the way it
    makes them (same text source, tokenizer, BOS/EOS handling).  -> [S, ctx] int32"""
    prepend_bos = model.cfg.default_prepend_bos
    sequences = token_sequences(
        iter_documents(dataset),
        lambda texts: model.tokenizer(texts, add_special_tokens=False)["input_ids"],
        context_length=context_length,
        bos_id=model.tokenizer.bos_token_id if prepend_bos else None,
        eos_id=model.tokenizer.eos_token_id,
    )
    return np.stack(list(islice(sequences, math.ceil(n_tokens / context_length))))


def forward_only_rate(model, sequences: np.ndarray, batch_size: int, stop_at: int | None) -> float:
    """Tokens/s of running `sequences` through `model` in batches, stopped after block `stop_at` - 1."""
    watch = Stopwatch()
    with torch.inference_mode():
        for start in range(0, len(sequences), batch_size):
            tokens = torch.from_numpy(sequences[start : start + batch_size]).to(model.cfg.device)
            with watch:
                model(tokens, stop_at_layer=stop_at)
    return sequences.size / watch.seconds


def measure_generation(cfg: GenerateConfig) -> tuple[float, ActivationStore, RssPeak, float]:
    """Seconds of one `generate(cfg)` call, end to end, and the seconds of it spent checksumming
    chunk files (store/integrity.py: each block's chunks, and the manifest at the end)."""
    from store import integrity

    checksum = Stopwatch()
    originals = {name: getattr(integrity, name) for name in ("block_checksums", "write_manifest")}

    def timed(fn):
        def run(*args, **kwargs):
            with checksum:
                return fn(*args, **kwargs)
        return run

    for name, fn in originals.items():
        setattr(integrity, name, timed(fn))
    try:
        with track_rss() as rss:
            t0 = time.perf_counter()
            store = generate(cfg)
            seconds = time.perf_counter() - t0
    finally:
        for name, fn in originals.items():
            setattr(integrity, name, fn)
    return seconds, store, rss, checksum.seconds


def print_report(results: list[DtypeResult], load_seconds: float) -> None:
    header = ["dtype", "tokens", "gen s", "gen tok/s", "gen tok/s excl. load", "fwd-only tok/s (before, after)",
              "gen/fwd", "gen excl. load/fwd", "checksums % of gen", "acts B/value", "store B/value", "store MiB",
              "gen peak RSS MiB"]
    rows = []
    for r in results:
        gen_rate = r.gen_tokens / r.gen_seconds
        gen_rate_no_load = r.gen_tokens / max(r.gen_seconds - load_seconds, 1e-9)
        values = r.n_rows * r.d
        rows.append([
            r.dtype, f"{r.gen_tokens:,}", f"{r.gen_seconds:.1f}", f"{gen_rate:,.0f}", f"{gen_rate_no_load:,.0f}",
            f"{r.fwd_rate:,.0f} ({r.fwd_rates[0]:,.0f}, {r.fwd_rates[1]:,.0f})",
            f"{gen_rate / r.fwd_rate:.2f}", f"{gen_rate_no_load / r.fwd_rate:.2f}",
            f"{100 * r.checksum_seconds / max(r.gen_seconds - load_seconds, 1e-9):.2f}",
            f"{r.acts_bytes / values:.3f}", f"{r.store_bytes / values:.3f}", mib(r.store_bytes), mib(r.gen_peak_rss),
        ])
    print()
    print(format_table(header, rows))
    print(f"\nmodel load (project's load_model, measured once): {load_seconds:.1f} s. 'fwd-only' is the mean of the "
          "forward-only passes just before and just after that generation; 'gen/fwd' = generation tokens/s ÷ "
          "forward-only tokens/s (1.00: caching costs nothing over the forward). B/value = bytes on disk ÷ "
          "(rows stored × width): acts/ arrays only, and the whole store. 'checksums % of gen' = time checksumming "
          "chunk files ÷ generation time excluding the load.")


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--model", default=None, help="TransformerLens name of a real model (from the HF cache) instead of the stand-in.")
@click.option("--model_path", default=None, help="Local HF directory or .gguf of a real model instead of the stand-in.")
@click.option("--layers", cls=SpaceSeparated, type=int, help="Layers whose resid_post is cached [default: 2].")
@click.option("--n_tokens", type=int, default=100_000, help="Rows to store per dtype (rounded up to whole chunks).")
@click.option("--context_length", type=int, default=128, help="Tokens per sequence.")
@click.option("--batch_size", type=int, default=32, help="Sequences per forward pass (both generation and forward-only).")
@click.option("--dtypes", cls=SpaceSeparated, type=click.Choice(list(STORAGE_DTYPES)), help="Storage dtypes [default: all three].")
@click.option("--dataset", default=STDLIB_DOCSTRINGS, help="Text source, as generate_activations.py --dataset.")
@click.option("--chunk_mb", type=float, default=8.0, help="Store chunk size in MB, as generate_activations.py --chunk_mb.")
@click.option("--device", default="cpu", help="Device of the model.")
@click.option("--quick", is_flag=True, help="Tiny stand-in model, ~1k tokens, context 32, small chunks (smoke test).")
def main(model, model_path, layers, n_tokens, context_length, batch_size, dtypes, dataset, chunk_mb, device, quick) -> None:
    """Tokens/s of activation caching vs a forward-only pass, and bytes on disk per stored value."""
    layers = tuple(layers) or (2,)
    dtypes = tuple(dtypes) or STORAGE_DTYPES
    stand_in = model is None and model_path is None
    if quick:
        n_tokens, context_length, batch_size, chunk_mb = 1_000, 32, 8, 0.05
    with tempfile.TemporaryDirectory(prefix="bench_cache_") as tmp:
        tmp_path = Path(tmp)
        if stand_in:
            shape = TINY_SHAPE if quick else PYTHIA_70M_SHAPE
            t0 = time.perf_counter()
            use_offline_hf_home(tmp_path / "hf_home")  # before transformers is first imported
            build_hf_cache(tmp_path / "hf_home", shape)
            model = TL_NAME
            print(f"stand-in {TL_NAME} (random weights, {shape}) built in {time.perf_counter() - t0:.1f} s")
        import transformer_lens  # noqa: F401  (imported before the timer: load time below is the load alone)

        t0 = time.perf_counter()
        tl_model = load_model(model, model_path, device=device)
        load_seconds = time.perf_counter() - t0
        hooks = resolve_hooks(tl_model, layers, ("resid_post",), ())
        print(f"model {model or model_path}: d_model={tl_model.cfg.d_model} n_layers={tl_model.cfg.n_layers} "
              f"hooks={hooks} stop_at_layer={stop_layer(hooks)} prepend_bos={tl_model.cfg.default_prepend_bos}; "
              f"n_tokens={n_tokens:,} context={context_length} batch={batch_size} device={device} "
              f"torch threads={torch.get_num_threads()}")
        stop_at = stop_layer(hooks)
        t0 = time.perf_counter()
        sequences = model_sequences(tl_model, dataset, context_length, n_tokens)
        print(f"forward-only input: {len(sequences)} sequences tokenised in {time.perf_counter() - t0:.1f} s")
        forward_only_rate(tl_model, sequences[:batch_size], batch_size, stop_at)  # warm-up
        fwd_rate = forward_only_rate(tl_model, sequences, batch_size, stop_at)
        results = []
        for dtype in dtypes:
            cfg = GenerateConfig(
                out=str(tmp_path / f"store-{dtype}"), model=model, model_path=model_path, layers=layers,
                dataset=dataset, context_length=context_length, n_tokens=n_tokens, chunk_mb=chunk_mb,
                batch_size=batch_size, device=device, dtype=dtype,
            )
            gen_seconds, store, rss, checksum_seconds = measure_generation(cfg)
            fwd_after = forward_only_rate(tl_model, sequences, batch_size, stop_at)
            results.append(DtypeResult(
                dtype=dtype,
                gen_tokens=store.attrs["n_sequences"] * context_length,
                n_rows=store.n_rows,
                d=sum(src.d for src in store.sources),
                gen_seconds=gen_seconds,
                fwd_rates=(fwd_rate, fwd_after),
                acts_bytes=dir_bytes(Path(cfg.out) / "acts"),
                store_bytes=dir_bytes(Path(cfg.out)),
                gen_peak_rss=rss.peak,
                checksum_seconds=checksum_seconds,
            ))
            print(f"{dtype}: generation {gen_seconds:.1f} s; forward-only {fwd_rate:,.0f} tok/s before, {fwd_after:,.0f} after")
            fwd_rate = fwd_after
        print_report(results, load_seconds)


if __name__ == "__main__":
    main()
