"""The GPU path, tested on the CPU: precision as a recorded choice (bf16 autocast agrees with
fp32), torch.compile agrees with eager, groups limited by the device's free memory and sized by
their measured cost, both TopK decodes give the same members, and bench.gpu_suite's smoke run."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import train_sweep
from training.ensemble import Ensemble, candidate_group_sizes, choose_group_size, group_size, time_topk_decodes
from training.memory import step_bytes_per_member
from training.members import MemberConfig

ROOT = Path(__file__).resolve().parents[1]


def _members(arch: str, n: int = 2) -> list[MemberConfig]:
    return [MemberConfig(d_in=16, d_sae=64, arch=arch, k=4, l1_coeff=1e-3, l0_coeff=1e-3, lr=3e-3, seed=s) for s in range(n)]


def _rows(n: int = 256, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 16, generator=torch.Generator().manual_seed(seed))


def _params(e: Ensemble) -> list[torch.Tensor]:
    return [p.detach() for p in e.dictionary.parameters()]


def test_bf16_training_agrees_with_fp32_and_the_precision_is_recorded(small_store, tmp_path):
    """bf16 autocast (the products in bfloat16, weights, moments and losses float32) trains to
    within 5% of the fp32 run's held-out FVU on a tiny run; the choice is in sweep.json and in
    every member's cfg.json."""
    runs = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / precision
        args = ["--cache", str(small_store), "--source", "blocks.1.hook_resid_post", "--output_dir", str(out),
                "--arch", "relu", "topk", "--sweep", "relu:l1=1e-3", "topk:k=4", "--ratio", "2", "--batch_size", "64",
                "--lr", "1e-2", "--n_epochs", "3", "--eval_tokens", "400", "--eval_sequences", "0", "--precision", precision,
                "--dead_window", "256"]  # a short window, so that AuxK's dead-latent products run too
        result = CliRunner().invoke(train_sweep.main, args)
        assert result.exit_code == 0, result.output
        runs[precision] = json.loads((out / "sweep.json").read_text())
        assert runs[precision]["precision"] == precision
        for row in runs[precision]["members"]:
            assert json.loads((out / row["dir"] / "cfg.json").read_text())["metadata"]["sae_sweep"]["precision"] == precision
    for a, b in zip(runs["fp32"]["members"], runs["bf16"]["members"]):
        assert b["fvu"] == pytest.approx(a["fvu"], rel=0.05), a["name"]
        assert a["fvu"] != b["fvu"]  # bf16 really ran


def test_tf32_is_refused_off_cuda():
    from training.config import SweepConfig

    with pytest.raises(ValueError, match="tf32 is a CUDA matmul mode"):
        SweepConfig.from_flat(precision="tf32")
    assert SweepConfig.from_flat().resolved_precision() == "fp32"


@pytest.mark.parametrize("arch", ["relu", "topk", "jumprelu"])
def test_compiled_steps_agree_with_eager_steps(arch):
    eager, compiled = Ensemble(_members(arch)), Ensemble(_members(arch), compile=True)
    for step in range(4):
        x = _rows(seed=step)
        a, b = eager.step(x), compiled.step(x)
        torch.testing.assert_close(a.total, b.total, rtol=1e-5, atol=1e-6)
    for p, q in zip(_params(eager), _params(compiled)):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)  # float reassociation in the fused kernels


def test_both_topk_decodes_train_the_same_members():
    sparse, dense = Ensemble(_members("topk"), topk_decode="sparse"), Ensemble(_members("topk"), topk_decode="dense")
    for step in range(4):
        sparse.step(_rows(seed=step))
        dense.step(_rows(seed=step))
    for p, q in zip(_params(sparse), _params(dense)):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
    times = time_topk_decodes(_members("topk"), "cpu", 256, None, repeats=1)
    assert set(times) == {"sparse", "dense"} and all(t > 0 for t in times.values())


def test_gpu_groups_are_sized_from_the_free_memory_and_an_impossible_sweep_is_refused():
    members = [MemberConfig(d_in=512, d_sae=4096, l1_coeff=1e-3, seed=s) for s in range(64)]
    per_member, weights = step_bytes_per_member(members, 4096), 16 * 64 * (512 * 4096 * 2 + 4096 + 512)
    cuda = torch.device("cuda")
    free = int((weights + 10.5 * per_member) / 0.8)  # room for 10 members' steps beside all 64 members' state
    assert group_size(members, 4096, cuda, free_bytes=free) == 10
    assert group_size(members, 4096, cuda, free_bytes=10**13) == 64  # everything fits: one group
    with pytest.raises(ValueError, match="do not fit on cuda"):
        group_size(members, 4096, cuda, free_bytes=int(weights / 0.8))  # the state alone fills it


def test_groups_take_the_size_whose_measured_cost_per_member_is_lowest():
    """On a fake cost model: one member per group where bigger groups cost more per member (a
    CPU's caches overflowing), every member in one group where they cost less (a GPU filling up),
    the middle where it is cheapest; never more than the memory limit, and nothing timed at 1."""
    def cost(per_member):
        asked = []

        def seconds_per_member(sizes):
            asked.extend(sizes)
            return {g: per_member(g) for g in sizes}
        return seconds_per_member, asked

    growing, _ = cost(lambda g: 1.0 + 0.1 * g)
    shrinking, asked = cost(lambda g: 1.0 / g)
    assert choose_group_size(16, growing) == 1
    assert choose_group_size(16, shrinking) == 16 and asked == [1, 4, 16] == candidate_group_sizes(16)
    assert choose_group_size(9, cost(lambda g: abs(g - 3) + 1.0)[0]) == 3
    assert choose_group_size(5, shrinking) == 5  # the limit memory sets, not every member
    untimed, asked = cost(lambda g: 1.0)
    assert choose_group_size(1, untimed) == 1 and asked == []


def test_an_ensemble_times_its_groups_once_per_batch_size_unless_told():
    x = _rows()
    timed, fixed = Ensemble(_members("relu", 4)), Ensemble(_members("relu", 4), member_chunk=3)
    timed.step(x), fixed.step(x)
    assert timed.group_sizes[256] in candidate_group_sizes(4) and fixed.group_sizes == {256: 3}


def test_the_gpu_suite_runs_at_toy_sizes():
    done = subprocess.run([sys.executable, "-m", "bench.gpu_suite", "--smoke", "--device", "cpu"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    for part in ("(a) ensemble", "(b) 16 relu SAEs from a store: ours", "(b) 16 relu SAEs: SAELens MultiSAETrainer",
                 "(b) 4 topk SAEs: SAELens MultiSAETrainer", "(c) seed demo job, fp32", "(c) seed demo job, bf16",
                 "(d) waiting", "(e) caching"):
        assert part in done.stdout, part
    assert "rounds) SAELens MultiSAETrainer" in done.stdout  # the median ratio with its spread


def test_the_training_throughput_bench_runs_against_saelens_multi_sae_trainer_at_toy_size():
    """Every variant, SAELens's MultiSAETrainer among them, timed in interleaved rounds, and the
    peak RSS of each from its own child process."""
    done = subprocess.run([sys.executable, "-m", "bench.train_throughput", "--quick", "--arch", "topk"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rows = {line.split("  ")[0]: line.split() for line in done.stdout.splitlines() if line.startswith("(")}
    assert {"(a) ours, vectorised", "(b) ours, sequential", "(d) SAELens MultiSAETrainer"} <= set(rows)
    assert all(float(row[-2].replace(",", "")) > 100 for name, row in rows.items() if name.startswith("(d)"))  # MiB
    assert "vectorised / SAELens MultiSAETrainer" in done.stdout
