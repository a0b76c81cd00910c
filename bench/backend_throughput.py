"""Caching throughput of the transformers backend against TransformerLens: the same model, the
same tokens, the same batch, the same store settings.

    python -m bench.backend_throughput                  # stand-in pythia-70m (random weights), layer 2, 3 rounds
    python -m bench.backend_throughput --quick          # tiny stand-in, a smoke test
    python -m bench.backend_throughput --model pythia-70m --hf_model EleutherAI/pythia-70m   # a real one, cached

Each round runs `generate(...)` once per backend, in alternating order (A B, then B A, …), so a
slow spell of a shared machine falls on both; each run writes a fresh store of the same rows.
Caching time excludes the model load (timed separately, once per backend and round, by loading
the model the way generate does). Printed: per-round tokens/s of each backend, and the median
ratio transformers ÷ TransformerLens with its min and max over the rounds.
"""
from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import click

if not __package__:  # run as a file: make the repository's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import format_table  # noqa: E402
from bench._fixtures import HF_REPO_ID, PYTHIA_70M_SHAPE, TINY_SHAPE, TL_NAME, build_hf_cache, use_offline_hf_home  # noqa: E402

BACKEND_NAMES = ("transformer_lens", "transformers")


def _run(backend: str, name: str, out: Path, layer: int, n_tokens: int, context_length: int, batch_size: int,
         chunk_mb: float) -> tuple[float, float, int]:
    """(seconds caching without the load, seconds loading, tokens run through the model) of one generation."""
    from cache.config import GenerateConfig
    from cache.generate import generate
    from cache.models import load_for_caching

    t0 = time.perf_counter()
    load_for_caching(backend, name, None, device="cpu", dtype="float32")
    load = time.perf_counter() - t0
    t0 = time.perf_counter()
    store = generate(GenerateConfig(out=str(out), model=name, backend=backend, layers=(layer,), n_tokens=n_tokens,
                                    context_length=context_length, batch_size=batch_size, chunk_mb=chunk_mb))
    whole = time.perf_counter() - t0
    return whole - load, load, store.attrs["n_sequences"] * context_length


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--model", default=None, help="TransformerLens name of a real model in the HF cache [default: the stand-in].")
@click.option("--hf_model", default=None, help="Its Hugging Face name, for the transformers backend.")
@click.option("--layer", type=int, default=2, help="Layer whose resid_post is cached.")
@click.option("--n_tokens", type=int, default=50_000, help="Rows stored per run.")
@click.option("--context_length", type=int, default=128, help="Tokens per sequence.")
@click.option("--batch_size", type=int, default=32, help="Sequences per forward pass.")
@click.option("--rounds", type=int, default=3, help="Rounds of one run per backend, in alternating order.")
@click.option("--quick", is_flag=True, help="Tiny stand-in model, 2k tokens, 2 rounds (smoke test).")
def main(model, hf_model, layer, n_tokens, context_length, batch_size, rounds, quick) -> None:
    """Tokens/s of generate_activations.py through transformers against TransformerLens."""
    if quick:
        n_tokens, context_length, batch_size, rounds, layer = 2_000, 32, 8, 2, 1
    with tempfile.TemporaryDirectory(prefix="bench_backend_") as tmp:
        tmp_path = Path(tmp)
        if model is None:
            use_offline_hf_home(tmp_path / "hf_home")  # before transformers is first imported
            build_hf_cache(tmp_path / "hf_home", TINY_SHAPE if quick else PYTHIA_70M_SHAPE)
            model, hf_model = TL_NAME, HF_REPO_ID
        names = {"transformer_lens": model, "transformers": hf_model or model}
        rates: dict[str, list[float]] = {b: [] for b in BACKEND_NAMES}
        loads: dict[str, list[float]] = {b: [] for b in BACKEND_NAMES}
        for r in range(rounds):
            order = BACKEND_NAMES if r % 2 == 0 else BACKEND_NAMES[::-1]
            for backend in order:
                seconds, load, tokens = _run(backend, names[backend], tmp_path / f"{backend}-{r}", layer, n_tokens,
                                             context_length, batch_size, 0.05 if quick else 8.0)
                rates[backend].append(tokens / seconds)
                loads[backend].append(load)
                print(f"round {r + 1} {backend}: {tokens / seconds:,.0f} tok/s caching, load {load:.1f} s")
        ratios = [hf / tl for hf, tl in zip(rates["transformers"], rates["transformer_lens"])]
        rows = [[b, f"{statistics.median(rates[b]):,.0f}", f"{min(rates[b]):,.0f} … {max(rates[b]):,.0f}",
                 f"{statistics.median(loads[b]):.1f}"] for b in BACKEND_NAMES]
        print()
        print(format_table(["backend", "median tok/s (caching, excl. load)", "min … max", "load s"], rows))
        print(f"\ntransformers ÷ TransformerLens: median ×{statistics.median(ratios):.2f} "
              f"(min ×{min(ratios):.2f}, max ×{max(ratios):.2f}, {rounds} rounds); model {model}, layer {layer}, "
              f"{n_tokens:,} tokens, context {context_length}, batch {batch_size}")


if __name__ == "__main__":
    main()
