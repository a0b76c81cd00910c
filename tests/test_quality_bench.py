"""bench/quality.py at a toy size, so that the quality bench cannot rot: every architecture, every
reference library through its own code, one evaluator, a JSON report. The full table is a bench
(bench/RESULTS.md "Quality"), not a timed test."""
from __future__ import annotations

import json
import math

from click.testing import CliRunner

from tests.conftest import gen_args


def test_the_quality_bench_trains_ours_and_every_reference_and_scores_them_alike(tmp_path, text_dir):
    import generate_activations
    from bench import quality

    store = tmp_path / "store"
    made = CliRunner().invoke(generate_activations.main, gen_args(store, text_dir, **{"--n_tokens": "6000"}))
    assert made.exit_code == 0, made.output
    out = tmp_path / "quality.json"
    result = CliRunner().invoke(quality.main, ["--cache", str(store), "--steps", "6", "--batch_size", "64", "--ratio", "2",
                                               "--k", "4", "--coeffs", "1e-3,1e-1", "--eval_tokens", "512",
                                               "--reference_coeffs", "saelens=3e-2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "skipping" not in result.output  # the test extra installs every reference
    report = json.loads(out.read_text())
    assert set(report) == {"topk", "batchtopk", "relu", "jumprelu", "gated"}  # the default architectures
    for arch, part in report.items():
        trainers = {r["trainer"] for r in part["results"]}
        expected = {"ours", "dictionary_learning (our rows)", "dictionary_learning (its rows)", "saelens"}
        assert expected | ({"sparsify"} if arch == "topk" else set()) == trainers, arch
        for r in part["results"]:
            assert math.isfinite(r["fvu"]) and 0 <= r["dead"] <= 1 and r["l0"] >= 0, (arch, r)
        assert part["held_out_rows"] > 100  # at most --eval_tokens, at most a tenth of the store
    for arch in ("relu", "gated", "jumprelu"):  # each trainer at its own coefficients
        coeffs = {(r["trainer"], r["coeff"]) for r in report[arch]["results"]}
        assert {("ours", 1e-3), ("ours", 1e-1), ("saelens", 3e-2), ("dictionary_learning (our rows)", 1e-3)} <= coeffs
        assert ("saelens", 1e-3) not in coeffs
    topk = {r["trainer"]: r for r in report["topk"]["results"]}
    assert topk["ours"]["l0"] == topk["sparsify"]["l0"] == 4  # TopK keeps exactly k, in every library
    ratios = {c["trainer"]: c for c in report["topk"]["comparison"]}  # at equal k, every reference has a ratio
    assert set(ratios) == {t for t in topk if t != "ours"}
    assert all(c["fvu_ratio"] > 0 for c in ratios.values())


def test_the_quality_bench_compares_abstopk_and_matching_pursuit_with_saelens_own_trainers(tmp_path, text_dir):
    import generate_activations
    from bench import quality

    store = tmp_path / "store"
    made = CliRunner().invoke(generate_activations.main, gen_args(store, text_dir, **{"--n_tokens": "6000"}))
    assert made.exit_code == 0, made.output
    out = tmp_path / "quality.json"
    result = CliRunner().invoke(quality.main, ["--cache", str(store), "--arch", "abstopk", "matching_pursuit",
                                               "--references", "saelens", "--steps", "6", "--batch_size", "64",
                                               "--ratio", "2", "--k", "4", "--eval_tokens", "512", "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    for arch in ("abstopk", "matching_pursuit"):
        by_trainer = {r["trainer"]: r for r in report[arch]["results"]}
        assert set(by_trainer) == {"ours", "saelens"}, arch
        for r in by_trainer.values():
            assert math.isfinite(r["fvu"]) and 0 < r["l0"] <= 4 + 1e-6, (arch, r)
        assert report[arch]["comparison"] and all(c["fvu_ratio"] > 0 for c in report[arch]["comparison"])
    assert report["abstopk"]["results"][0]["l0"] == 4  # exactly k, signed latents counted


def test_reference_coefficients_that_give_no_values_are_refused_before_any_training(tmp_path):
    from bench import quality

    for values, says in (("saelens=", "no values given"), ("saelens=a,b", "values must be numbers"),
                         ("nobody=1e-3", "is not a reference")):
        result = CliRunner().invoke(quality.main, ["--cache", str(tmp_path / "absent"), "--arch", "relu",
                                                   "--reference_coeffs", values])
        assert result.exit_code == 2 and says in result.output, result.output
