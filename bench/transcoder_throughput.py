"""Transcoders and cross-layer transcoders: what a step costs, side by side in one process.

    python -m bench.transcoder_throughput --compare sae        # TopK transcoder vs TopK SAE of the same shape
    python -m bench.transcoder_throughput --compare sparsify   # ours vs EleutherAI sparsify's TopK transcoder
    python -m bench.transcoder_throughput --compare clt        # CLT step time and peak memory, d 512 × 6 layers, two F

Same in-memory batches (Gaussian rows at mean norm √d, input and target side by side) for every
variant; each timed batch goes through every variant, their order rotating, so a slow spell of a
shared machine falls on all of them alike (bench/train_throughput.py does the same for SAEs).

  sae       N TopK transcoders reading one width-d source and writing another vs N TopK SAEs
            reconstructing a width-d source: the same FLOPs except the loss's target; the ratio
            should be ~1 (goal ≥ 0.95).
  sparsify  eai-sparsify 1.3.3 (`pip install eai-sparsify==1.3.3`, the `bench` extra): one
            `SparseCoder(transcode=True)` per member, stepped by the body of its `Trainer.fit`
            hook for the `fvu` loss (forward with total_variance → fvu + auxk_alpha·auxk, backward,
            optimizer step, zero_grad, lr scheduler, dead-latent counters from the fired latents),
            with torch Adam at the same lr (its default optimizer, signum, is not Adam) and its
            default auxk_alpha 0 (ours has AuxK, which costs nothing until latents die). Its first-
            step bias initialisation is done once at build. No bf16 autocast on CPU, as in its code.
  clt       one CLT member (JumpReLU + tanh penalty) over L layers at each of two widths: seconds
            per step and peak RSS growth while it trains, beside our estimate (training/memory.py).
"""
from __future__ import annotations

import math

import click
import torch

from bench._common import Stopwatch, format_table, mib, track_rss
from training import memory
from training.ensemble import Ensemble
from training.members import MemberConfig


def batches(n: int, batch_size: int, width: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(batch_size, width, generator=g)
        out.append(x * math.sqrt(width) / x.norm(dim=1).mean())
    return out


def transcoders(n: int, d: int, F: int, k: int, lr: float) -> list[MemberConfig]:
    return [MemberConfig(d_in=d, d_out=d, d_sae=F, arch="topk", k=k, inputs=("x",), targets=("y",), lr=lr, seed=i)
            for i in range(n)]


def saes(n: int, d: int, F: int, k: int, lr: float) -> list[MemberConfig]:
    return [MemberConfig(d_in=d, d_sae=F, arch="topk", k=k, lr=lr, seed=i) for i in range(n)]


def sparsify_step(d: int, F: int, k: int, lr: float, seed: int, first: torch.Tensor):
    """One sparsify transcoder and its optimizer, stepped as its Trainer.fit hook steps it."""
    from sparsify import SparseCoder, SparseCoderConfig

    torch.manual_seed(seed)
    sae = SparseCoder(d, SparseCoderConfig(k=k, num_latents=F, transcode=True), "cpu", dtype=torch.float32)
    inputs, outputs = first[:, :d], first[:, d:]
    with torch.no_grad():  # what its first step does once
        sae.encoder.bias.data = -inputs.mean(0) @ sae.encoder.weight.data.T
        sae.b_dec.data = outputs.mean(0)
    optimizer = torch.optim.Adam(sae.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    tokens_since_fired = torch.zeros(F, dtype=torch.long)

    def step(x: torch.Tensor) -> None:
        inputs, outputs = x[:, :d], x[:, d:]
        total_variance = (outputs - outputs.mean(0)).pow(2).sum()
        out = sae(x=inputs, y=outputs, dead_mask=None, total_variance=total_variance)
        did_fire = torch.zeros(F, dtype=torch.bool)
        did_fire[out.latent_indices.flatten()] = True
        (out.fvu + 0.0 * out.auxk_loss + out.multi_topk_fvu / 8).backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
        with torch.no_grad():
            tokens_since_fired.add_(len(x))
            tokens_since_fired[did_fire] = 0

    return step


def timed(variants: dict[str, list], data: list[torch.Tensor]) -> dict[str, float]:
    """Seconds each variant spent on the data, the variants' order rotating batch by batch."""
    watches = {name: Stopwatch() for name in variants}
    names = list(variants)
    for i, x in enumerate(data):
        for name in names[i % len(names):] + names[: i % len(names)]:
            with watches[name]:
                for step in variants[name]:
                    step(x)
    return {name: w.seconds for name, w in watches.items()}


@click.command()
@click.option("--compare", type=click.Choice(["sae", "sparsify", "clt"]), default="sae")
@click.option("--d", type=int, default=512)
@click.option("--d_sae", type=int, default=16384)
@click.option("--k", type=int, default=32)
@click.option("--n_members", type=int, default=2)
@click.option("--batch_size", type=int, default=4096)
@click.option("--steps", type=int, default=3)
@click.option("--layers", type=int, default=6, help="CLT layers.")
@click.option("--clt_widths", default="2048,8192", help="CLT features per layer: the two widths measured.")
@click.option("--lr", type=float, default=2e-4)
def main(compare, d, d_sae, k, n_members, batch_size, steps, layers, clt_widths, lr):
    print(f"compare={compare} d={d} d_sae={d_sae} k={k} N={n_members} batch={batch_size} steps={steps} "
          f"torch {torch.__version__} threads={torch.get_num_threads()}")
    if compare == "clt":
        return clt(d, layers, [int(w) for w in clt_widths.split(",")], batch_size, steps, lr)
    data = batches(steps + 1, batch_size, 2 * d)
    warm, rest = data[0], data[1:]
    variants = {"ours: TopK transcoders, one ensemble": [Ensemble(transcoders(n_members, d, d_sae, k, lr),
                                                                   columns={"x": (0, d), "y": (d, d)}).step]}
    if compare == "sae":
        variants["ours: TopK SAEs of the same shape, one ensemble"] = [Ensemble(saes(n_members, d, d_sae, k, lr)).step]
    else:
        variants["sparsify 1.3.3: TopK transcoders, one after another"] = [
            sparsify_step(d, d_sae, k, lr, seed, warm) for seed in range(n_members)]
    for steps_ in variants.values():  # warm-up: first-step allocations, Adam state (SAEs read the first d columns)
        for step in steps_:
            step(warm)
    seconds = timed(variants, rest)
    rows = [[name, f"{s / steps:.3f}", f"{steps * batch_size * n_members / s:,.0f}"] for name, s in seconds.items()]
    print(format_table(["variant", "s/step (all members)", "token·members/s"], rows))
    (a, sa), (b, sb) = seconds.items()
    print(f"\n{a} / {b}: {sb / sa:.2f}x (token·members/s)")


def clt(d: int, L: int, widths: list[int], batch_size: int, steps: int, lr: float) -> None:
    columns = {name: (i * d, d) for i, name in enumerate([f"in{l}" for l in range(L)] + [f"out{l}" for l in range(L)])}
    data = batches(steps + 1, batch_size, 2 * L * d)
    rows = []
    for F in widths:
        member = MemberConfig(d_in=d, d_sae=F, arch="jumprelu_tanh", n_sources=L, inputs=tuple(f"in{l}" for l in range(L)),
                              targets=tuple(f"out{l}" for l in range(L)), cross_layer=True, lr=lr, l0_coeff=1e-3,
                              threshold_init=0.02, bandwidth=0.02)
        need = memory.estimate([member], batch_size, 1, 2 * L * d, 0)
        with track_rss() as rss:
            ensemble = Ensemble([member], columns=columns)
            ensemble.step(data[0])
            watch = Stopwatch()
            for x in data[1:]:
                with watch:
                    ensemble.step(x)
        rows.append([F, f"{need.parameters / 1e6:,.1f}M", f"{watch.seconds / steps:.2f}",
                     f"{steps * batch_size / watch.seconds:,.0f}", mib(rss.growth), mib(need.device_bytes)])
        del ensemble
    print(format_table(["F per layer", "weights", "s/step", "tokens/s", "peak RSS growth MiB", "estimate MiB"], rows))


if __name__ == "__main__":
    main()
