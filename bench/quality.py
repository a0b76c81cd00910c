"""Are our dictionaries as good as the reference trainers'? Train ours and each reference on the
same rows in the same order, with the same steps, batch, lr and schedule, and score every result
with one evaluator on the same held-out rows.

    bash install.sh bench                                   # sae-lens, eai-sparsify, dictionary_learning (no deps)
    python generate_activations.py --n_tokens 200_000 --out caches/gemma-l6
    python -m bench.quality --cache caches/gemma-l6 --arch topk batchtopk relu jumprelu gated --steps 400
    python -m bench.quality --cache caches/gemma-l6 --arch topk --steps 400 --references dictionary_learning

Ours is `train_sweep` itself (the recipe's defaults, one ensemble per architecture over its knob
axis), scored through its exported files; every reference gets the batches `train_sweep` read
(`training.trainer.training_batches` on the same stream) and the schedule it resolved to (lr,
warm-up, decay start, sparsity warm-up, BatchTopK's threshold start), in its own conventions
(bench/references.py). One evaluator (evaluation/metrics.py) scores all of them on the store's
held-out rows in our normalised space: FVU, L0 and the fraction of latents that never fire there.

Sparsity knobs: the TopK family shares k. The L1 family and JumpReLU have coefficients whose
meaning differs between libraries, so each trains a few values and the comparison is made at
equal L0: our FVU (and dead fraction) interpolated in log L0 along our frontier at each
reference point's L0, divided by the reference's. dictionary_learning's JumpReLU is told a target
L0 instead of a coefficient; it is given the L0s ours reached.

The report is one table per architecture and a line of ratios ours / reference (FVU below 1 is
ours better; dead below 1 is ours fewer dead), printed and, with --out, written as JSON.
"""
from __future__ import annotations

import json
import math
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import click
import torch

from bench._common import format_table
from runtime.cli_options import SpaceSeparated
from bench.references import Plan, available, train_dictionary_learning, train_saelens, train_sparsify
from training.sweep import parse_values

KNOB = {"relu": "l1", "gated": "l1", "jumprelu": "l0_coeff"}
DEFAULT_COEFFS = {"relu": "1e-4,4.6e-4,2.2e-3", "gated": "1e-4,4.6e-4,2.2e-3", "jumprelu": "1e-4,4.6e-4,2.2e-3"}
REFERENCES = ("dictionary_learning", "saelens", "sparsify")
SUPPORTS = {"dictionary_learning": {"topk", "batchtopk", "matryoshka", "relu", "jumprelu", "gated"},
            "saelens": {"topk", "abstopk", "batchtopk", "matryoshka", "matching_pursuit", "relu", "jumprelu", "gated"},
            "sparsify": {"topk"}}


def held_out_rows(stream, limit: int) -> torch.Tensor:
    """Up to `limit` of the stream's held-out rows, normalised.  → [N, d]"""
    parts, n = [], 0
    for x in stream.eval_batches():
        parts.append(x[: limit - n])
        n += len(parts[-1])
        if n >= limit:
            break
    return torch.cat(parts)


@torch.no_grad()
def score(forward, rows_ND: torch.Tensor, d_sae: int, batch: int = 4096) -> dict:
    """FVU, L0 and dead fraction of one dictionary on held-out rows (evaluation/metrics.py)."""
    from evaluation.metrics import MetricAccumulator

    acc = MetricAccumulator(1, rows_ND.shape[1], d_sae)
    for x in rows_ND.split(batch):
        f, x_hat = forward(x)
        acc.update(x, x_hat.unsqueeze(0), f.unsqueeze(0))
    r = acc.results()[0]
    return {"l0": r["l0"], "fvu": r["fvu"], "dead": r["dead_fraction"]}


def our_forward(member_dir: Path, scale: float):
    """An exported member as SAELens semantics read it, on rows of our normalised space."""
    from formats.saelens import load_saelens, saelens_forward

    cfg, w = load_saelens(member_dir)

    def forward(x):
        f, x_hat = saelens_forward(cfg, w, x * scale)
        return f, x_hat / scale

    return forward


def run_ours(cfg, rows_ND: torch.Tensor) -> tuple[list[dict], dict, float]:
    """Train our sweep as train_sweep.py would; → (one result per member, resolved schedule, seconds)."""
    from training.trainer import train_sweep

    start = time.perf_counter()
    members = train_sweep(cfg)
    seconds = time.perf_counter() - start
    summary = json.loads((Path(cfg.output_dir) / "sweep.json").read_text())
    scale = summary["store"]["norm_scale"]
    results = []
    for m in members:
        coeff = m.get("l0_coeff" if m["arch"] == "jumprelu" else "l1_coeff")
        knob = f"λ={coeff:.3g}" if m["arch"] in KNOB else f"k={m['k']}"
        forward = our_forward(Path(cfg.output_dir) / m["dir"], scale)
        results.append({"trainer": "ours", "knob": knob, **score(forward, rows_ND, m["d_sae"]),
                        "seconds": seconds / len(members), "coeff": coeff, "k": m.get("k"),
                        "dir": str(Path(cfg.output_dir) / m["dir"])})
    return results, summary["resolved"], seconds


def plans(arch: str, d: int, resolved: dict, ours: list[dict], threshold_start_step: int, seed: int,
          coeffs: list[float] | None = None) -> list[Plan]:
    """One plan per point of our sweep (or per coefficient of `coeffs`, in our convention), with the
    schedule ours resolved to."""
    T = resolved["total_steps"]
    decay = resolved["lr_decay_start"]
    base = Plan(arch=arch, d=d, d_sae=resolved["d_sae"], steps=T, lr=resolved["lr"], lr_warmup_steps=resolved["lr_warmup_steps"],
                lr_decay_start=T if decay is None or decay >= 1 else int(decay * T),
                sparsity_warmup_steps=resolved["sparsity_warmup_steps"], threshold_start_step=threshold_start_step, seed=seed)
    if arch in KNOB:
        return [replace(base, coeff=c) for c in (coeffs or [r["coeff"] for r in ours])]
    return [replace(base, k=r["k"]) for r in ours]


def run_reference(label: str, name: str, plan: Plan, batches, rows_ND: torch.Tensor, unit: float, batch_size: int) -> dict:
    start = time.perf_counter()
    if name == "dictionary_learning":
        forward = train_dictionary_learning(plan, batches, unit)
    elif name == "saelens":
        forward = train_saelens(plan, batches, batch_size, batches.rows())
    else:
        forward = train_sparsify(plan, batches)
    seconds = time.perf_counter() - start
    return {"trainer": label, "knob": plan.knob, **score(forward, rows_ND, plan.d_sae), "seconds": seconds,
            "coeff": plan.coeff, "k": plan.k}


def at_equal_l0(ours: list[dict], l0: float, key: str) -> float | None:
    """Our `key` interpolated linearly in log L0 along our frontier at `l0` (None outside it; one
    point of ours, e.g. a fixed k, counts when its L0 is within 10%)."""
    points = sorted((r["l0"], r[key]) for r in ours if r["l0"] > 0)
    if not points:
        return None
    if len(points) == 1:
        return points[0][1] if abs(points[0][0] - l0) <= 0.1 * l0 else None
    for (l0_a, v_a), (l0_b, v_b) in zip(points, points[1:]):
        if l0_a <= l0 <= l0_b:
            t = 0.0 if l0_b == l0_a else (math.log(l0) - math.log(l0_a)) / (math.log(l0_b) - math.log(l0_a))
            return v_a + t * (v_b - v_a)
    return None


def ratios(ours: list[dict], reference: list[dict]) -> list[dict]:
    """ours / reference at each reference point's L0."""
    out = []
    for r in reference:
        fvu, dead = at_equal_l0(ours, r["l0"], "fvu"), at_equal_l0(ours, r["l0"], "dead")
        out.append({"trainer": r["trainer"], "knob": r["knob"], "l0": r["l0"],
                    "fvu_ratio": None if fvu is None else fvu / r["fvu"],
                    "dead_ours": dead, "dead_reference": r["dead"]})
    return out


def report(arch: str, results: list[dict], comparison: list[dict]) -> str:
    table = format_table(["trainer", "knob", "L0", "FVU", "dead", "s / member"],
                         [[r["trainer"], r["knob"], f"{r['l0']:.1f}", f"{r['fvu']:.4f}", f"{r['dead']:.1%}", f"{r['seconds']:.0f}"]
                          for r in results])
    lines = [f"## {arch}", table, "", "ours / reference at equal L0 (FVU; dead fraction ours vs reference):"]
    for c in comparison:
        if c["fvu_ratio"] is None:
            lines.append(f"  {c['trainer']} {c['knob']}: L0 {c['l0']:.1f} outside ours' range")
        else:
            lines.append(f"  {c['trainer']} {c['knob']}: L0 {c['l0']:.1f}  FVU ×{c['fvu_ratio']:.3f}  "
                         f"dead {c['dead_ours']:.1%} vs {c['dead_reference']:.1%}")
    return "\n".join(lines)


@click.command()
@click.option("--cache", required=True, help="A complete activation store (one source).")
@click.option("--arch", "archs", cls=SpaceSeparated, default=("topk", "batchtopk", "relu", "jumprelu", "gated"),
              type=click.Choice(["topk", "abstopk", "batchtopk", "matryoshka", "matching_pursuit", "relu", "jumprelu", "gated"]),
              show_default=True)
@click.option("--references", default=",".join(REFERENCES), show_default=True, help="Comma-separated reference trainers.")
@click.option("--steps", type=int, default=400, show_default=True, help="Training steps, shared by every trainer.")
@click.option("--batch_size", type=int, default=1024, show_default=True)
@click.option("--ratio", type=float, default=4.0, show_default=True, help="d_sae = ratio × d.")
@click.option("--k", "ks", default="32", show_default=True, help="Comma-separated k (TopK family).")
@click.option("--coeffs", default=None, help="Comma-separated sparsity coefficients of ours (L1 family, JumpReLU); "
              "default per architecture.")
@click.option("--reference_coeffs", multiple=True, help="NAME=C1,C2,…: the coefficients (in our convention) a "
              "reference trains at instead of ours', where its L1 reaches other L0s than ours at the same λ, e.g. "
              "--reference_coeffs saelens=1e-3,1e-2; the comparison is at equal L0 either way.")
@click.option("--eval_tokens", type=int, default=20_000, show_default=True, help="Held-out rows (whole sequences).")
@click.option("--lr", type=float, default=None, help="Learning rate for every trainer [default: our recipe's].")
@click.option("--ours", "overrides", multiple=True, help="NAME=VALUE: a field of our SweepConfig for ours only (an "
              "ablation), e.g. --ours dead_window=10000000; the references keep the schedule ours resolved to.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--dl_rows", type=click.Choice(["both", "ours", "own"]), default="both", show_default=True,
              help="Rows dictionary_learning trains on: the same rows as everyone (ours, mean norm √d), scaled to "
                   "unit mean squared norm as its own pipeline scales them (own: its thresholds and its JumpReLU "
                   "penalty assume that scale), or both, as two references.")
@click.option("--out", "out_json", default=None, help="Write every result as JSON here.")
def main(archs, references, steps, batch_size, ratio, ks, coeffs, reference_coeffs, eval_tokens, lr, overrides, seed,
         dl_rows, out_json, cache):
    from training.config import SweepConfig
    from training.trainer import open_training_stream, training_batches

    wanted = [r for r in references.split(",") if r]
    problems = available()
    for name in wanted:
        if problems.get(name):
            print(f"skipping {name}: {problems[name]}")
    wanted = [r for r in wanted if not problems.get(r)]
    own_coeffs = _reference_coeffs(reference_coeffs, archs)
    everything = {}
    for arch in archs:
        with tempfile.TemporaryDirectory() as tmp:
            knob = KNOB.get(arch)
            axis = f"{knob}={coeffs or DEFAULT_COEFFS[arch]}" if knob else f"k={ks}"
            flat = dict(cache=cache, output_dir=str(Path(tmp) / arch), arch=arch, sweep=(axis,), ratio=ratio,
                        batch_size=batch_size, n_tokens=steps * batch_size, eval_tokens=eval_tokens, lr=lr, seed=seed)
            cfg = SweepConfig.from_flat(**{**flat, **_overrides(overrides)})
            store, _, stream, _ = open_training_stream(cfg)
            rows_ND = held_out_rows(stream, eval_tokens)
            ours, resolved, _ = run_ours(cfg, rows_ND)
            # the references' BatchTopK threshold averaging starts at step 1000: at most half of a short run
            threshold_start = min(1000, resolved["total_steps"] // 2)
            results, comparison = list(ours), []
            for label, name, unit in trainers(wanted, dl_rows, rows_ND):
                if arch not in SUPPORTS[name]:
                    continue
                runs = []
                for plan in plans(arch, stream.d, resolved, ours, threshold_start, seed, own_coeffs.get(name)):
                    if name == "dictionary_learning" and arch == "jumprelu":
                        plan = replace(plan, target_l0=round(next(r["l0"] for r in ours if r["coeff"] == plan.coeff), 1))
                    print(f"{arch}: {label} {plan.knob} …", flush=True)
                    runs.append(run_reference(label, name, plan, Replay(stream, resolved["total_steps"], training_batches),
                                              rows_ND, unit, batch_size))
                results += runs
                comparison += ratios(ours, runs)
            text = report(arch, results, comparison)
            print(text, flush=True)
            kept = [{k: v for k, v in r.items() if k != "dir"} for r in results]  # member dirs lie in a temporary folder
            everything[arch] = {"results": kept, "comparison": comparison, "resolved": resolved,
                                "store": store.path, "held_out_rows": len(rows_ND)}
    if out_json:
        Path(out_json).write_text(json.dumps(everything, indent=2))


def _overrides(pairs: tuple[str, ...]) -> dict:
    """--ours NAME=VALUE pairs; values are Python literals where they parse as one."""
    import ast

    out = {}
    for pair in pairs:
        name, _, value = pair.partition("=")
        try:
            out[name.strip()] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[name.strip()] = value
    return out


def _reference_coeffs(pairs: tuple[str, ...], archs: tuple[str, ...]) -> dict[str, list[float]]:
    """--reference_coeffs NAME=VALUES pairs (values as for --sweep: C1,C2 or logspace(a,b,n))."""
    out = {}
    for pair in pairs:
        name, _, values = pair.partition("=")
        if name not in REFERENCES:
            raise click.BadParameter(f"{name!r} is not a reference ({', '.join(REFERENCES)})", param_hint="--reference_coeffs")
        if name == "dictionary_learning" and "jumprelu" in archs:
            raise click.BadParameter("dictionary_learning's JumpReLU has no coefficient: it is given the L0s ours "
                                     "reached as targets", param_hint="--reference_coeffs")
        try:
            out[name] = parse_values(values)
        except ValueError as err:
            raise click.BadParameter(f"{pair!r}: {err}", param_hint="--reference_coeffs") from None
    return out


def trainers(wanted: list[str], dl_rows: str, rows_ND: torch.Tensor) -> list[tuple[str, str, float]]:
    """(label, reference, the factor our rows are divided by for it) for every reference run."""
    own = float(rows_ND.pow(2).sum(-1).mean().sqrt())  # dictionary_learning's normalisation: unit mean squared norm
    out = []
    for name in wanted:
        if name != "dictionary_learning":
            out.append((name, name, 1.0))
            continue
        if dl_rows in ("both", "ours"):
            out.append((f"{name} (our rows)" if dl_rows == "both" else name, name, 1.0))
        if dl_rows in ("both", "own"):
            out.append((f"{name} (its rows)" if dl_rows == "both" else name, name, own))
    return out


class Replay:
    """The batches train_sweep read, afresh on each iteration (each trainer reads them once)."""

    def __init__(self, stream, total: int, batches):
        self.stream, self.total, self.batches = stream, total, batches

    def __iter__(self):
        return self.batches(self.stream, 0, self.total)

    def rows(self) -> int:
        """Rows in all the batches: whole batches but for each epoch's last."""
        per_epoch, size = self.stream.batches_per_epoch, self.stream.cfg.batch_size
        last = self.stream.n_train - (per_epoch - 1) * size
        return sum(last if step % per_epoch == per_epoch - 1 else size for step in range(self.total))


if __name__ == "__main__":
    main()
