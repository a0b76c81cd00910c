"""Do our dictionaries find the true features? Activations from SAELens's synthetic models (known
feature directions, Zipfian firing, optional hierarchy and correlation), written to a store with
`store.write.write_store`, swept by `train_sweep` at every architecture's defaults, and each member
scored by SAELens's own `eval_sae_on_synthetic_data` through our exported files; SAELens's own
trainers train on the same rows, with the same steps, batch, lr and schedule (bench/quality.py's
plans), and are scored the same way.

    python -m bench.synthetic --quick          # toy size (256 features in d 64): about a minute on 2 CPU cores
    python -m bench.synthetic                  # 4,096 features in d 256, 1,000 steps: ~12 min per architecture
                                               # and setting on 2 CPU cores (at 200 steps nobody leaves the random floor)

Settings: `independent` (features fire independently) and `hierarchy+correlation` (a forest of
parent → child features, children firing only under their parent, plus a low-rank correlation
between all features). The true L0 (mean active features per row) is measured on the generator and
printed; TopK-family k is swept at ½×, 1× and 2× it (--quick: 1× and 2×), the L1 family's and
JumpReLU's coefficient over a few values (the size's, or `--coeffs`). The comparison is made at
equal L0: our MCC interpolated in log L0 along our frontier (bench/quality.py's `at_equal_l0`) at
each SAELens point's L0. A dictionary of random unit vectors
of the same width is the floor MCC.
"""
from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import click
import torch

from bench._common import format_table
from bench.quality import KNOB, Replay, at_equal_l0, held_out_rows, plans, run_ours
from bench.references import fit_saelens
from runtime.cli_options import SpaceSeparated

ARCHS = ("topk", "abstopk", "batchtopk", "matryoshka", "matching_pursuit", "relu", "jumprelu", "gated")
SOURCE = "synthetic"
DATA_SEED = 1_000  # the synthetic model's seed is the trainers' + this (see synthetic_model)
HELD_OUT = 4096  # rows the store holds out (train_sweep's FVU; at most a tenth of the store)


@dataclass(frozen=True)
class Size:
    """How big the problem and the training are."""

    num_features: int
    hidden_dim: int
    steps: int
    batch_size: int
    eval_samples: int  # fresh rows from the generator for eval_sae_on_synthetic_data
    max_prob: float  # Zipfian firing probabilities, from max_prob (the commonest) to min_prob
    min_prob: float
    hierarchy_roots: int  # hierarchy+correlation: trees, each of branching² descendants over 2 levels
    branching: int
    correlation_rank: int
    k_factors: tuple[float, ...]  # TopK-family k as multiples of the true L0
    coeffs: dict[str, str]  # L1 family's and JumpReLU's coefficients, ours and SAELens's alike (our convention)

    @property
    def rows(self) -> int:
        """Rows written: every training batch once, plus the held-out rows."""
        return self.steps * self.batch_size + HELD_OUT


# above λ 0.08 the L1 family collapses to L0 < 2 in runs this short
QUICK = Size(num_features=256, hidden_dim=64, steps=150, batch_size=128, eval_samples=4096, max_prob=0.2, min_prob=0.01,
             hierarchy_roots=16, branching=3, correlation_rank=8, k_factors=(1.0, 2.0),
             coeffs={"relu": "0.02,0.06", "gated": "0.02,0.06", "jumprelu": "0.01,0.1"})
FULL = Size(num_features=4096, hidden_dim=256, steps=1000, batch_size=512, eval_samples=20_000, max_prob=0.2, min_prob=0.002,
            hierarchy_roots=128, branching=4, correlation_rank=32, k_factors=(0.5, 1.0, 2.0),
            coeffs={"relu": "0.02,0.04,0.08", "gated": "0.02,0.04,0.08", "jumprelu": "0.01,0.03,0.1"})


def synthetic_model(size: Size, setting: str, seed: int):
    """SAELens's `SyntheticModel` for a setting: `independent` or `hierarchy+correlation`. Its
    feature vectors are `torch.randn` from a generator seeded with its seed: a dictionary
    initialised by `torch.randn` under the same seed would start at the true features, so the model
    draws from `seed + DATA_SEED`."""
    from sae_lens.synthetic import (HierarchyConfig, LowRankCorrelationConfig, SyntheticModel, SyntheticModelConfig,
                                    ZipfianFiringProbabilityConfig)

    structured = setting == "hierarchy+correlation"
    cfg = SyntheticModelConfig(
        num_features=size.num_features, hidden_dim=size.hidden_dim,
        firing_probability=ZipfianFiringProbabilityConfig(max_prob=size.max_prob, min_prob=size.min_prob),
        hierarchy=HierarchyConfig(total_root_nodes=size.hierarchy_roots, branching_factor=size.branching, max_depth=2,
                                  compensate_probabilities=True) if structured else None,
        correlation=LowRankCorrelationConfig(rank=size.correlation_rank, seed=seed + DATA_SEED) if structured else None,
        seed=seed + DATA_SEED)
    return SyntheticModel(cfg)


def write_rows(model, rows: int, out: Path, chunk: int = 8192):
    """`rows` samples of the model's hidden activations as a store (one source, float32)."""
    from store.write import write_store

    torch.manual_seed(0)

    def batches():
        for start in range(0, rows, chunk):
            yield {SOURCE: model.sample(min(chunk, rows - start))}

    return write_store(batches(), out, dataset=f"sae_lens.synthetic {model.cfg.num_features} features",
                       dtype="float32", progress=False)


def true_l0(model, samples: int) -> float:
    """Mean number of true features active per row (on samples of their own: the k swept follow it)."""
    torch.manual_seed(2)
    return float((model.activation_generator.sample(samples) > 0).sum(-1).float().mean())


def ground_truth_score(sae, model, samples: int, scale: float | None = None) -> dict:
    """SAELens's `eval_sae_on_synthetic_data` on fresh rows; `scale`: the factor the SAE's inputs
    were multiplied by in training (None: it reads raw activations, as our exports do)."""
    from sae_lens.synthetic import eval_sae_on_synthetic_data
    from sae_lens.training.activation_scaler import ActivationScaler

    torch.manual_seed(1)  # every dictionary of a setting sees the same evaluation rows
    r = eval_sae_on_synthetic_data(sae, model.feature_dict, model.activation_generator, num_samples=samples,
                                   batch_size=4096, activation_scaler=ActivationScaler(scaling_factor=scale))
    c = r.classification
    return {"l0": r.sae_l0, "mcc": r.mcc, "precision": c.precision, "recall": c.recall, "f1": c.f1_score,
            "dead": r.dead_latents / sae.cfg.d_sae, "shrinkage": r.shrinkage, "explained_variance": r.explained_variance,
            "uniqueness": r.uniqueness}


def random_mcc(model, d_sae: int, seed: int) -> float:
    """MCC of `d_sae` random unit directions: what matching finds by chance."""
    from sae_lens.synthetic import mean_correlation_coefficient

    random = torch.randn(d_sae, model.cfg.hidden_dim, generator=torch.Generator().manual_seed(seed))
    return mean_correlation_coefficient(random, model.feature_dict.feature_vectors.detach())


def sweep_arch(arch: str, store_path: Path, model, size: Size, l0: float, coeffs: str | None, seed: int, work: Path) -> list[dict]:
    """Ours (train_sweep, the recipe's defaults) and SAELens's trainer at each of our points, scored
    against the ground truth."""
    from sae_lens import SAE

    from training.config import SweepConfig
    from training.trainer import open_training_stream, training_batches

    ks = sorted({max(1, round(f * l0)) for f in size.k_factors})
    axis = f"{KNOB[arch]}={coeffs or size.coeffs[arch]}" if arch in KNOB else "k=" + ",".join(map(str, ks))
    cfg = SweepConfig.from_flat(cache=str(store_path), output_dir=str(work / arch), arch=arch, sweep=(axis,),
                                ratio=size.num_features / size.hidden_dim, batch_size=size.batch_size,
                                n_tokens=size.steps * size.batch_size, eval_tokens=HELD_OUT, seed=seed)
    _, _, stream, _ = open_training_stream(cfg)
    ours, resolved, _ = run_ours(cfg, held_out_rows(stream, HELD_OUT))
    results = [{"trainer": "ours", "knob": r["knob"],
                **ground_truth_score(SAE.load_from_disk(r["dir"], device="cpu"), model, size.eval_samples)} for r in ours]
    threshold_start = min(1000, resolved["total_steps"] // 2)
    for plan in plans(arch, stream.d, resolved, ours, threshold_start, seed):
        print(f"  {arch}: saelens {plan.knob} …", flush=True)
        replay = Replay(stream, resolved["total_steps"], training_batches)
        sae = fit_saelens(plan, replay, size.batch_size, replay.rows())
        results.append({"trainer": "saelens", "knob": plan.knob,
                        **ground_truth_score(sae, model, size.eval_samples, scale=1 / stream.scale)})
    return results


def compare(results: list[dict]) -> list[dict]:
    """Our MCC at each SAELens point's L0 (None outside our frontier) against SAELens's; a point of
    ours within 1% of that L0 (the same k) stands for itself."""
    ours = [r for r in results if r["trainer"] == "ours"]

    def ours_at(l0: float) -> float | None:
        near = [r["mcc"] for r in ours if abs(r["l0"] - l0) <= 0.01 * l0]
        return near[0] if near else at_equal_l0(ours, l0, "mcc")

    return [{"knob": r["knob"], "l0": r["l0"], "mcc_saelens": r["mcc"], "mcc_ours": ours_at(r["l0"])}
            for r in results if r["trainer"] == "saelens"]


def report(setting: str, l0: float, floor: float, per_arch: dict[str, list[dict]]) -> str:
    """One table of every member, then ours vs SAELens at equal L0."""
    rows, lines = [], []
    for arch, results in per_arch.items():
        rows += [[arch, r["trainer"], r["knob"], f"{r['l0']:.1f}", f"{r['mcc']:.3f}", f"{r['precision']:.3f}",
                  f"{r['recall']:.3f}", f"{r['f1']:.3f}", f"{r['dead']:.1%}", f"{r['shrinkage']:.3f}",
                  f"{r['explained_variance']:.3f}"] for r in results]
        for c in compare(results):
            ours = "outside ours' L0 range" if c["mcc_ours"] is None else f"ours {c['mcc_ours']:.3f}"
            lines.append(f"  {arch} {c['knob']}: L0 {c['l0']:.1f}  MCC saelens {c['mcc_saelens']:.3f}  {ours}")
    table = format_table(["arch", "trainer", "knob", "L0", "MCC", "prec", "recall", "F1", "dead", "shrink", "EV"], rows)
    return "\n".join([f"## {setting}: true L0 {l0:.1f}, random-dictionary MCC {floor:.3f}", table, "",
                      "MCC at equal L0 (SAELens's point; ours interpolated in log L0):", *lines])


@click.command()
@click.option("--quick", is_flag=True, help="Toy size: 256 features in d 64, 150 steps of 128 rows, two points a sweep.")
@click.option("--setting", "settings", cls=SpaceSeparated, type=click.Choice(["independent", "hierarchy+correlation"]),
              default=("independent", "hierarchy+correlation"), show_default=True)
@click.option("--arch", "archs", cls=SpaceSeparated, type=click.Choice(ARCHS), default=ARCHS, show_default=True)
@click.option("--steps", type=int, default=None, help="Training steps, shared by every trainer [default: the size's].")
@click.option("--coeffs", default=None, help="Comma-separated sparsity coefficients (L1 family, JumpReLU), ours and "
              "SAELens's alike (in our convention; SAELens's is λ·d) [default: per architecture and size].")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", "out_json", default=None, help="Write every result as JSON here.")
def main(quick, settings, archs, steps, coeffs, seed, out_json):
    size = QUICK if quick else FULL
    if steps:
        size = replace(size, steps=steps)
    print(f"size: {asdict(size)}", flush=True)
    everything = {}
    for setting in settings:
        model = synthetic_model(size, setting, seed)
        l0 = true_l0(model, 20_000)
        floor = random_mcc(model, size.num_features, seed)
        with tempfile.TemporaryDirectory() as tmp:
            store_path = Path(tmp) / "store"
            write_rows(model, size.rows, store_path)
            per_arch = {}
            for arch in archs:
                print(f"{setting}: {arch} …", flush=True)
                per_arch[arch] = sweep_arch(arch, store_path, model, size, l0, coeffs, seed, Path(tmp))
        print(report(setting, l0, floor, per_arch), flush=True)
        everything[setting] = {"true_l0": l0, "random_mcc": floor, "size": asdict(size),
                               "results": per_arch, "comparison": {a: compare(r) for a, r in per_arch.items()}}
    if out_json:
        Path(out_json).write_text(json.dumps(everything, indent=2))


if __name__ == "__main__":
    main()
