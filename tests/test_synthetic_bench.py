"""bench/synthetic.py at its --quick toy size, so that the ground-truth bench cannot rot: both
settings, every architecture, ours and SAELens's trainers, scored by SAELens's own
`eval_sae_on_synthetic_data`. The full-size figures are a bench (bench/RESULTS.md "Quality on
ground truth"), not a timed test."""
from __future__ import annotations

import json

from click.testing import CliRunner


def test_the_synthetic_bench_scores_ours_and_saelens_against_the_true_features(tmp_path):
    from bench import synthetic

    out = tmp_path / "synthetic.json"
    result = CliRunner().invoke(synthetic.main, ["--quick", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "MCC at equal L0" in result.output
    report = json.loads(out.read_text())
    assert set(report) == {"independent", "hierarchy+correlation"}
    for setting, part in report.items():
        assert 1 <= part["true_l0"] <= 10, setting  # the toy size's Zipfian firing: ≈ 4 active features a row
        assert set(part["results"]) == set(synthetic.ARCHS)
        for arch, results in part["results"].items():
            size = synthetic.QUICK
            knobs = len(size.k_factors) if arch not in synthetic.KNOB else len(size.coeffs[arch].split(","))
            assert [r["trainer"] for r in results] == ["ours"] * knobs + ["saelens"] * knobs, (setting, arch)
            for r in results:
                for key in ("mcc", "precision", "recall", "f1", "dead", "uniqueness"):
                    assert 0 <= r[key] <= 1, (setting, arch, r)
                assert r["l0"] >= 0 and r["shrinkage"] > 0, (setting, arch, r)
            assert len(part["comparison"][arch]) == knobs
    independent = report["independent"]
    topk = [r for r in independent["results"]["topk"] if r["trainer"] == "ours"]
    ks = sorted({max(1, round(f * independent["true_l0"])) for f in synthetic.QUICK.k_factors})  # k swept around the true L0
    assert [r["knob"] for r in topk] == [f"k={k}" for k in ks]
    assert all(r["l0"] <= k + 1e-6 for r, k in zip(topk, ks))
    # ours recovers the true features: TopK's MCC far above what random directions match by chance
    assert min(r["mcc"] for r in topk) > independent["random_mcc"] + 0.15, (topk, independent["random_mcc"])
