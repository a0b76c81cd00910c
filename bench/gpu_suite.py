"""Everything the GPU path promises, measured in one command, printed as one table with the GPU's name.

    python -m bench.gpu_suite                 # on a GPU machine: ≤ 8 minutes on one H100/H200-class GPU
    python -m bench.gpu_suite --smoke         # toy sizes on any device (CI runs it on the CPU so it cannot rot)
    python -m bench.gpu_suite --device cpu    # smaller sizes a 2-core CPU measures in minutes

    (a) ensemble vs one member at a time: 16 ReLU SAEs, d 512 × 4,096, the same batches
    (b) ours vs SAELens, from an on-disk store: 16 ReLU SAEs and 4 TopK SAEs, on the batches our stream
        reads, against SAELens's MultiSAETrainer (its fit(), all SAEs in lockstep) and, as in earlier
        runs, its SAETrainer.step one SAE after another; peak RSS of each side run alone in a child
        process (bench.train_throughput --only, in-memory batches of the same size; host memory on a GPU too)
    (c) the seed demo's job (5 architectures × 6 sparsities, 16,384 latents, d 512) on 5M tokens,
        extrapolated to 50M, at each precision: its TFLOP/s against the GPU's dense peak
    (d) the fraction of step time the training loop waits for the prefetch thread (a local store)
    (e) cache generation tokens/s against a forward-only pass, on a pythia-70m-shaped model
    (f) the peak device memory of each (CUDA's max_memory_allocated; on a CPU, peak RSS)
    (g) --compile against eager, for 16 ReLU and 4 TopK SAEs (compilation itself is not timed)
    (h) the TopK decode, sparse and dense, against the encoder's GEMM alone (4 TopK SAEs, k 32)

(a) and (b) time their sides in rounds, the order alternating (A B, B A, …), and print the
median ratio over the rounds with its minimum and maximum (a shared machine's slow spells fall
on both sides alike). FLOPs of a step are counted as 6·B·I·F per member for the dense products (encoder and decoder,
forward and backward), so TFLOP/s is useful work, not kernel work. Peaks are the dense fp32 /
tf32 / bf16 rates of the GPU's data sheet (PEAKS); an unknown GPU prints none.
"""
from __future__ import annotations

import math
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import click
import numpy as np
import torch

from bench._common import Ratio, format_table, interleaved, track_rss
from training.ensemble import Ensemble, matmul_precision
from training.members import MemberConfig

# dense TFLOP/s (no sparsity) by GPU name fragment: fp32, tf32, bf16
PEAKS = {"H200": (67, 495, 989), "H100": (67, 495, 989), "A100": (19.5, 156, 312), "L40S": (91.6, 183, 366),
         "RTX 4090": (82.6, 82.6, 165), "RTX 3090": (35.6, 35.6, 71), "L4": (30.3, 60, 121), "A10": (31.2, 62.5, 125)}
# smoke: toy sizes for CI; cpu: sizes a 2-core CPU measures in minutes; cuda: the sizes
# (a) and (b) time `rounds` rounds of `steps` steps per side
SIZES = {"smoke": {"d": 32, "F": 128, "batch": 256, "steps": 2, "rounds": 2, "demo_F": 128, "gen_tokens": 2_000,
                   "smoke": True},
         "cpu": {"d": 256, "F": 2048, "batch": 1024, "steps": 2, "rounds": 5, "demo_F": 2048, "gen_tokens": 20_000,
                 "smoke": False},
         "cuda": {"d": 512, "F": 4096, "batch": 4096, "steps": 20, "rounds": 5, "demo_F": 16_384, "gen_tokens": 200_000,
                  "smoke": False}}
SEED_DEMO = {"archs": ("relu", "jumprelu", "batchtopk", "topk", "gated"), "per_arch": 6, "d_sae": 16_384, "d": 512}


@contextmanager
def peak_memory(device: torch.device):
    """Yields a dict whose 'bytes' is the block's peak device memory (peak RSS on a CPU)."""
    out = {}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        yield out
        torch.cuda.synchronize(device)
        out["bytes"] = torch.cuda.max_memory_allocated(device)
    else:
        with track_rss() as rss:
            yield out
        out["bytes"] = rss.peak


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_steps(ensembles: list[Ensemble], batches: list[torch.Tensor], device: torch.device) -> float:
    """Seconds for every ensemble to step on every batch (one warm-up step first, untimed)."""
    for e in ensembles:
        e.step(batches[0])
    sync(device)
    start = time.perf_counter()
    for x in batches:
        for e in ensembles:
            e.step(x)
    sync(device)
    return time.perf_counter() - start


def random_batches(n: int, batch: int, d: int, device: torch.device) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        x = torch.randn(batch, d, generator=g)
        out.append((x * math.sqrt(d) / x.norm(dim=1).mean()).to(device))
    return out


def warmed(ensembles: list[Ensemble], x: torch.Tensor) -> list[Ensemble]:
    """`ensembles` after one untimed step each (allocations, Adam state, the group sizing)."""
    for e in ensembles:
        e.step(x)
    return ensembles


def rounds_of(sides: dict[str, Callable[[torch.Tensor], object]], s: dict, batches: list[torch.Tensor],
              device: torch.device) -> dict[str, list[float]]:
    """Seconds of each side per round, every side stepping on every batch each round (`interleaved`)."""
    return interleaved({name: lambda r, step=step: [step(x) for x in batches] for name, step in sides.items()},
                       s["rounds"], lambda: sync(device))


def part_a(s: dict, device: torch.device) -> list[list]:
    members = [MemberConfig(d_in=s["d"], d_sae=s["F"], l1_coeff=1e-3 * (i + 1), lr=1e-3, seed=i) for i in range(16)]
    batches = random_batches(s["steps"], s["batch"], s["d"], device)
    memory = {}
    for side, build in (("alone", lambda: [Ensemble([m], device) for m in members]),
                        ("together", lambda: [Ensemble(members, device)])):
        with peak_memory(device) as memory[side]:  # each side alone in memory while measured
            warmed(build(), batches[0])
    alone = warmed([Ensemble([m], device) for m in members], batches[0])
    (together,) = warmed([Ensemble(members, device)], batches[0])
    seconds = rounds_of({"together": together.step, "alone": lambda x: [e.step(x) for e in alone]}, s, batches, device)
    tokens = 16 * s["steps"] * s["batch"] * s["rounds"]
    groups = together.group_sizes[s["batch"]]
    return [[f"(a) ensemble, 16 ReLU SAEs (groups of {groups})", f"{tokens / sum(seconds['together']):,.0f}",
             f"{Ratio.of(seconds['alone'], seconds['together'])} one at a time", _mib(memory["together"]["bytes"])],
            ["(a) one at a time, 16 ReLU SAEs", f"{tokens / sum(seconds['alone']):,.0f}", "1.00×",
             _mib(memory["alone"]["bytes"])]]


def synthetic_store(path: Path, rows: int, d: int, chunk_rows: int) -> Path:
    """A complete store of random rows (mean norm √d) with the format's every array, written directly."""
    from store.zarr_store import ActivationStore, RowBlock, SourceInfo

    ctx = 64
    store = ActivationStore.create(path, identity={}, sources=[SourceInfo("s", "m", "blocks.0.hook_resid_post", d)],
                                   n_rows=rows, n_sequences=rows // ctx, context_length=ctx, chunk_rows=chunk_rows,
                                   block_rows=rows, storage_dtype="float16",
                                   info={"exclude_bos": False, "context_length": ctx, "models": []})
    g = np.random.default_rng(0)
    values = (g.standard_normal((rows, d)) / math.sqrt(1.0)).astype(np.float16)
    ids = np.arange(rows, dtype=np.int32)
    norms = np.linalg.norm(values.astype(np.float64), axis=1)
    store.write_block(0, RowBlock(ids % 1000, ids % ctx, ids // ctx, {"s": values},
                                  {"s": (float(norms.sum()), float((norms**2).sum()), rows)},
                                  np.zeros((rows // ctx, ctx), dtype=np.int32)))
    store.finish()
    return path


def part_b(s: dict, device: torch.device, store: Path) -> list[list]:
    from bench.train_throughput import BenchConfig, make_members, peak_rss, saelens_multi_steps, saelens_steps
    from store.zarr_store import ActivationStore
    from store.stream import ActivationStream, StreamConfig

    stream = ActivationStream(ActivationStore.open(store), "s", StreamConfig(batch_size=s["batch"], eval_rows=0), device)
    batches = [x for _, x in zip(range(s["steps"] + 1), stream.train_batches(0))]
    rows = []
    for arch, n, F in (("relu", 16, s["F"]), ("topk", 4, 4 * s["F"])):
        cfg = BenchConfig(arch=arch, k=32, d_in=s["d"], d_sae=F, batch_size=s["batch"], n_members=n,
                          steps=s["steps"] * s["rounds"], warmup=1, lr=1e-3, device=str(device))
        members = make_members(cfg)
        (ours,) = warmed([Ensemble(members, device)], batches[0])
        single, (multi,) = saelens_steps(cfg, members), saelens_multi_steps(cfg, members)
        for step in single + [multi]:
            step(batches[0])
        seconds = rounds_of({"ours": ours.step, "multi": multi, "single": lambda x: [step(x) for step in single]},
                            s, batches[1:], device)
        tokens = n * s["steps"] * s["batch"] * s["rounds"]
        peaks = {key: peak_rss(cfg, key)[0] for key in ("a", "d")}
        rows += [[f"(b) {n} {arch} SAEs from a store: ours", f"{tokens / sum(seconds['ours']):,.0f}",
                  f"{Ratio.of(seconds['multi'], seconds['ours'])} SAELens MultiSAETrainer", _mib(peaks["a"])],
                 [f"(b) {n} {arch} SAEs: SAELens MultiSAETrainer", f"{tokens / sum(seconds['multi']):,.0f}", "1.00×",
                  _mib(peaks["d"])],
                 [f"(b) {n} {arch} SAEs: SAELens SAETrainer, one after another", f"{tokens / sum(seconds['single']):,.0f}",
                  f"ours {Ratio.of(seconds['single'], seconds['ours'])}", ""]]
    return rows


def part_c(s: dict, device: torch.device, peaks: tuple | None) -> list[list]:
    rows = []
    F, d = s["demo_F"], s["d"]
    batches = random_batches(s["steps"], s["batch"], d, device)
    precisions = ("fp32", "tf32", "bf16") if device.type == "cuda" else ("fp32", "bf16")
    for precision in precisions:
        ensembles = [Ensemble([MemberConfig(d_in=d, d_sae=F, arch=arch, k=32, l1_coeff=1e-3, l0_coeff=1e-3, lr=1e-3, seed=i)
                               for i in range(SEED_DEMO["per_arch"])], device, precision=precision)
                     for arch in SEED_DEMO["archs"]]
        with peak_memory(device) as mem, matmul_precision(device, precision):
            seconds = timed_steps(ensembles, batches, device)
        tokens = s["steps"] * s["batch"]
        members = len(SEED_DEMO["archs"]) * SEED_DEMO["per_arch"]
        tflops = 6 * tokens * d * F * members / seconds / 1e12
        minutes_50m = seconds / tokens * 50e6 / 60
        peak = peaks[("fp32", "tf32", "bf16").index(precision)] if peaks else None
        rows.append([f"(c) seed demo job, {precision}: 50M tokens in", f"{minutes_50m:,.1f} min", f"{tflops:.2f} TFLOP/s"
                     + (f" = {tflops / peak:.0%} of {peak}" if peak else ""), _mib(mem["bytes"])])
    return rows


def part_d(s: dict, device: torch.device, store: Path) -> list[list]:
    from store.zarr_store import ActivationStore
    from store.stream import ActivationStream, StreamConfig

    stream = ActivationStream(ActivationStore.open(store), "s", StreamConfig(batch_size=s["batch"], eval_rows=0), device)
    ensemble = Ensemble([MemberConfig(d_in=s["d"], d_sae=s["F"], l1_coeff=1e-3, lr=1e-3, seed=i) for i in range(16)], device)
    waited = stepped = 0.0
    batches = stream.train_batches(0)
    for _ in range(s["steps"]):
        start = time.perf_counter()
        x = next(batches)
        sync(device)
        middle = time.perf_counter()
        ensemble.step(x)
        sync(device)
        waited, stepped = waited + middle - start, stepped + time.perf_counter() - middle
    batches.close()
    return [["(d) waiting for the prefetch", f"{waited / (waited + stepped):.1%} of a step", "16 ReLU SAEs, local store", ""]]


def part_e(s: dict, device: torch.device) -> list[list]:
    from bench._fixtures import PYTHIA_70M_SHAPE, TINY_SHAPE, build_hf_cache
    from bench.cache_throughput import forward_only_rate, measure_generation, model_sequences
    from cache.config import GenerateConfig
    from cache.models import load_model

    with tempfile.TemporaryDirectory() as tmp:
        hf_home = build_hf_cache(Path(tmp), TINY_SHAPE if s["smoke"] else PYTHIA_70M_SHAPE)
        snapshot = str(next((hf_home / "hub").glob("models--*/snapshots/*")))  # loaded as a local directory
        cfg = GenerateConfig(out=str(Path(tmp) / "store"), model=None, model_path=snapshot, layers=("2",),
                             n_tokens=s["gen_tokens"], device=str(device), dataset="stdlib-docstrings")
        model = load_model(None, snapshot, device=str(device))
        forward = forward_only_rate(model, model_sequences(model, cfg.dataset, cfg.context_length, cfg.n_tokens),
                                    cfg.batch_size, 3)
        with peak_memory(device) as mem:
            seconds, store, _, _ = measure_generation(cfg)
        rate = store.n_rows / seconds
    return [["(e) caching, pythia-70m shape", f"{rate:,.0f} tok/s", f"{rate / forward:.2f}× forward-only", _mib(mem["bytes"])]]


def part_g(s: dict, device: torch.device) -> list[list]:
    batches = random_batches(s["steps"], s["batch"], s["d"], device)
    rows = []
    for arch, n, F in (("relu", 16, s["F"]), ("topk", 4, 4 * s["F"])):
        members = [MemberConfig(d_in=s["d"], d_sae=F, arch=arch, k=32, l1_coeff=1e-3, lr=1e-3, seed=i) for i in range(n)]
        eager = timed_steps([Ensemble(members, device)], batches, device)
        compiled = timed_steps([Ensemble(members, device, compile=True)], batches, device)
        rows.append([f"(g) --compile, {n} {arch} SAEs", f"{n * s['steps'] * s['batch'] / compiled:,.0f}",
                     f"{eager / compiled:.2f}× eager", ""])
    return rows


def part_h(s: dict, device: torch.device) -> list[list]:
    from training.ensemble import time_topk_decodes

    F = 4 * s["F"]
    members = [MemberConfig(d_in=s["d"], d_sae=F, arch="topk", k=32, lr=1e-3, seed=i) for i in range(4)]
    steps = time_topk_decodes(members, str(device), s["batch"], None)
    x, W = torch.randn(len(members), s["batch"], s["d"], device=device), torch.randn(len(members), s["d"], F, device=device)
    torch.bmm(x, W)
    sync(device)
    start = time.perf_counter()
    for _ in range(3):
        torch.bmm(x, W)
    sync(device)
    gemm = (time.perf_counter() - start) / 3
    return [[f"(h) TopK step, {decode} decode", f"{seconds * 1e3:,.1f} ms", f"{seconds / gemm:.1f}× the encoder GEMM", ""]
            for decode, seconds in steps.items()]


def _mib(n: int | None) -> str:
    return "" if n is None else f"{n / 2**20:,.0f} MiB"


@click.command()
@click.option("--smoke", is_flag=True, help="Toy sizes (a CI smoke test on any device).")
@click.option("--device", default=None, help="Torch device [default: cuda if available, else cpu].")
def main(smoke: bool, device: str | None) -> None:
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU (no GPU)"
    peaks = next((p for key, p in PEAKS.items() if key in name), None)
    s = SIZES["smoke" if smoke else dev.type if dev.type in SIZES else "cuda"]
    print(f"bench.gpu_suite on {name}" + (" (smoke sizes)" if smoke else f" ({dev.type} sizes)"), flush=True)
    started = time.perf_counter()
    rows = part_a(s, dev)
    with tempfile.TemporaryDirectory() as tmp:
        store = synthetic_store(Path(tmp) / "store", rows=max(16, 4 * s["steps"]) * s["batch"], d=s["d"],
                                chunk_rows=s["batch"])
        rows += part_b(s, dev, store)
        rows += part_d(s, dev, store)
    rows += part_c(s, dev, peaks)
    rows += part_e(s, dev)
    rows += part_g(s, dev)
    rows += part_h(s, dev)
    print(format_table(["measure", "rate", "against", "peak memory"], rows))
    print(f"{name}; {time.perf_counter() - started:.0f} s in all")


if __name__ == "__main__":
    main()
