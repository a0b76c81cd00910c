"""Several architectures in one run: one pass over the store, each architecture its own
ensemble, every member the same as trained alone; one output; runs compared."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from click.testing import CliRunner

import evaluate
import train_sweep
from store.zarr_store import ActivationStore
from tests.test_architectures import _assert_same_members

ROOT = Path(__file__).resolve().parents[1]
AXES = ["relu:l1=1e-3,3e-2", "topk:k=2,4", "jumprelu:l0=1e-3,1e-2"]


def _args(store, out, *extra) -> list[str]:
    return ["--cache", str(store), "--source", "blocks.1.hook_resid_post", "--output_dir", str(out), "--ratio", "2",
            "--batch_size", "64", "--lr", "1e-2", "--n_epochs", "2", "--eval_tokens", "400", "--checkpoint_every", "5",
            "--dead_window", "128", "--threshold_init", "0.1", "--bandwidth", "0.05", *extra]


def _counting_reads(monkeypatch) -> list:
    reads = []
    original = ActivationStore.read_rows

    def counted(self, name, start, stop):
        reads.append((name, start, stop))
        return original(self, name, start, stop)

    monkeypatch.setattr(ActivationStore, "read_rows", counted)
    return reads


def test_three_architectures_in_one_pass_equal_each_trained_alone(small_store, tmp_path, monkeypatch):
    reads = _counting_reads(monkeypatch)
    together = CliRunner().invoke(train_sweep.main, _args(small_store, tmp_path / "all", "--arch", "relu", "topk",
                                                          "jumprelu", "--sweep", *AXES, "--no_eval"))
    assert together.exit_code == 0, together.output
    read_together = len(reads)
    rows = json.loads((tmp_path / "all" / "sweep.json").read_text())["members"]
    assert [r["arch"] for r in rows] == ["relu"] * 2 + ["topk"] * 2 + ["jumprelu"] * 2
    assert [r["name"] for r in rows] == ["relu_00_l1_0.001", "relu_01_l1_0.03", "topk_00_k_2", "topk_01_k_4",
                                         "jumprelu_00_l0_0.001", "jumprelu_01_l0_0.01"]
    for arch, axis in zip(("relu", "topk", "jumprelu"), AXES):
        reads.clear()
        alone = CliRunner().invoke(train_sweep.main, _args(small_store, tmp_path / arch, "--arch", arch, "--sweep",
                                                           axis.split(":", 1)[1], "--no_eval"))
        assert alone.exit_code == 0, alone.output
        assert len(reads) == read_together  # the store was read once for all three architectures
        solo = json.loads((tmp_path / arch / "sweep.json").read_text())["members"]
        mine = [r for r in rows if r["arch"] == arch]
        _assert_same_members_rows(tmp_path / "all", mine, tmp_path / arch, solo)


def _assert_same_members_rows(a_dir, rows_a, b_dir, rows_b) -> None:
    import torch
    from safetensors.torch import load_file

    for ra, rb in zip(rows_a, rows_b, strict=True):
        a, b = load_file(a_dir / ra["dir"] / "sae_weights.safetensors"), load_file(b_dir / rb["dir"] / "sae_weights.safetensors")
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (ra["name"], key)


def test_a_multi_architecture_run_killed_with_sigkill_resumes_to_the_uninterrupted_run(small_store, tmp_path):
    args = lambda out: _args(small_store, out, "--arch", "relu", "topk", "jumprelu", "--sweep", *AXES, "--no_eval",  # noqa: E731
                             "--n_epochs", "6")
    whole = subprocess.run([sys.executable, str(ROOT / "train_sweep.py"), *args(tmp_path / "whole")], capture_output=True,
                           text=True, cwd=ROOT)
    assert whole.returncode == 0, whole.stderr
    out = tmp_path / "killed"
    first = subprocess.Popen([sys.executable, str(ROOT / "train_sweep.py"), *args(out)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, cwd=ROOT)
    deadline = time.monotonic() + 120
    while not (out / "checkpoint.pt").exists():
        assert first.poll() is None and time.monotonic() < deadline
        time.sleep(0.005)
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    resumed = subprocess.run([sys.executable, str(ROOT / "train_sweep.py"), *args(out)], capture_output=True, text=True,
                             cwd=ROOT)
    assert resumed.returncode == 0 and "resuming" in resumed.stdout, resumed.stdout + resumed.stderr
    _assert_same_members(tmp_path / "whole", out)


def test_one_output_one_report_with_a_series_per_architecture_and_runs_compared(small_store, tmp_path):
    result = CliRunner().invoke(train_sweep.main, _args(small_store, tmp_path / "multi", "--arch", "relu", "topk",
                                                        "--sweep", AXES[0], AXES[1], "--eval_sequences", "2"))
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "multi" / "sweep.json").read_text())
    assert summary["archs"] == ["relu", "topk"] and {r["arch"] for r in summary["members"]} == {"relu", "topk"}
    assert "arch" in (tmp_path / "multi" / "sweep.csv").read_text().splitlines()[0].split(",")
    report = (tmp_path / "multi" / "report.md").read_text()
    assert "| relu |" in report and "| topk |" in report
    from evaluation.plots import series

    assert {series(r) for r in summary["members"]} == {"relu d_sae=64", "topk d_sae=64"}  # one curve each
    single = CliRunner().invoke(train_sweep.main, _args(small_store, tmp_path / "gated", "--arch", "gated",
                                                        "--sweep", "l1=1e-3,3e-2", "--eval_sequences", "2"))
    assert single.exit_code == 0, single.output
    compared = CliRunner().invoke(evaluate.main, ["--compare", str(tmp_path / "multi"), str(tmp_path / "gated"),
                                                  "--out", str(tmp_path / "cmp")])
    assert compared.exit_code == 0, compared.output
    table = (tmp_path / "cmp" / "compare.csv").read_text().splitlines()
    assert len(table) == 1 + 6 and table[0].startswith("run,")
    for plot in ("compare_l0_vs_fvu.png", "compare_l0_vs_ce_recovered.png", "compare_l0_vs_ce_recovered_mean.png"):
        assert (tmp_path / "cmp" / plot).stat().st_size > 1000
    markdown = (tmp_path / "cmp" / "compare.md").read_text()
    assert "| multi | relu_00_l1_0.001 | relu |" in markdown and "| gated | 00_l1_0.001 | gated |" in markdown


def test_runs_of_different_hooks_are_refused_unless_forced(small_store, tmp_path):
    for name, source in (("a", "blocks.1.hook_resid_post"), ("b", "blocks.2.hook_mlp_out")):
        args = _args(small_store, tmp_path / name, "--no_eval", "--l1_min", "-3", "--l1_max", "-2", "--n_models", "2")
        args[args.index("--source") + 1] = source
        assert CliRunner().invoke(train_sweep.main, args).exit_code == 0
        CliRunner().invoke(evaluate.main, ["--run_dir", str(tmp_path / name), "--n_sequences", "0"])
    refused = CliRunner().invoke(evaluate.main, ["--compare", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "c")])
    assert refused.exit_code == 1 and "measures other hooks" in refused.output and "--force" in refused.output
    forced = CliRunner().invoke(evaluate.main, ["--compare", str(tmp_path / "a"), str(tmp_path / "b"), "--out",
                                                str(tmp_path / "c"), "--force"])
    assert forced.exit_code == 0, forced.output


def test_compare_states_what_differs_and_marks_the_figures_that_are_not_like_for_like(small_store, tmp_path):
    for name, held_out, width in (("a", "300", "2"), ("b", "100", "4")):
        args = _args(small_store, tmp_path / name, "--l1_min", "-3", "--l1_max", "-2", "--n_models", "2",
                     "--eval_sequences", "0")
        args[args.index("--eval_tokens") + 1] = held_out
        args[args.index("--ratio") + 1] = width
        assert CliRunner().invoke(train_sweep.main, args).exit_code == 0
    compared = CliRunner().invoke(evaluate.main, ["--compare", str(tmp_path / "a"), str(tmp_path / "b"), "--out",
                                                  str(tmp_path / "c")])
    assert compared.exit_code == 0, compared.output
    assert "not like for like: held-out rows differ" in compared.output
    assert "not like for like: widths (d_sae) differ (a: 64; b: 128)" in compared.output
    markdown = (tmp_path / "c" / "compare.md").read_text()
    assert "## Not like for like" in markdown and "| FVU † |" in markdown and "| L0 † |" in markdown
    assert "**training steps**" in markdown  # more held out, fewer rows to train on
    assert "spliced sequences" not in markdown and "**model**" not in markdown  # what is alike is not listed
