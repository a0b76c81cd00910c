"""Both stages under torchrun (gloo, CPU): the same command as one process, split across ranks.

Each test launches real `torchrun` jobs as subprocesses on 127.0.0.1. torchrun gives every
worker one thread (OMP_NUM_THREADS=1), so the single-process references run with one thread as
well: bit-for-bit comparisons then hold on CPU.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from runtime.distributed import Processes, share
from store.zarr_store import ActivationStore
from training.parallel import Layout
from tests.conftest import free_port, gen_args
from tests.test_cache import assert_identical_stores

ROOT = Path(__file__).resolve().parents[1]
SOURCE = "blocks.1.hook_resid_post"
SWEEP = ["--source", SOURCE, "--l1_min", "-3", "--l1_max", "-2", "--n_models", "3", "--ratio", "2", "--batch_size", "64",
         "--eval_tokens", "400", "--no_eval", "--checkpoint_every", "10"]


def test_members_split_into_contiguous_near_equal_shares():
    assert [list(share(10, 4, p)) for p in range(4)] == [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9]]
    layouts = [Layout(Processes(rank, 8), data_parallel=2) for rank in range(8)]
    assert [(lay.group, lay.data_slice, lay.writes) for lay in layouts[2:4]] == [(1, 0, True), (1, 1, False)]
    assert [list(lay.members(10)) for lay in layouts[::2]] == [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9]]
    assert [list(layouts[0].rows(n)) for n in (10, 1)] == [[0, 1, 2, 3, 4], [0]]  # a 1-row batch: every rank, whole
    assert list(layouts[1].rows(10)) == [5, 6, 7, 8, 9]
    with pytest.raises(ValueError, match="8 processes make 4 member groups for 3 members"):
        layouts[0].members(3)
    with pytest.raises(ValueError, match="does not divide"):
        Layout(Processes(0, 6), data_parallel=4)


def test_a_resume_takes_the_newest_step_every_group_wrote_and_refuses_another_layout(tmp_path):
    def touch(group: int, groups: int, step: int) -> None:
        (tmp_path / f"checkpoint.group-{group}-of-{groups}.step-{step:09d}.pt").touch()

    two = Layout(Processes(1, 2))
    assert two.resume_path(tmp_path) is None
    for group, step in ((0, 20), (0, 40), (1, 20)):  # group 1 died before writing step 40
        touch(group, 2, step)
    assert two.resume_path(tmp_path).name == "checkpoint.group-1-of-2.step-000000020.pt"
    touch(1, 2, 40)
    two.prune_checkpoints(tmp_path, 40)  # rank 1 prunes its own group's only
    assert sorted(p.name[17:] for p in tmp_path.iterdir()) == ["0-of-2.step-000000020.pt", "0-of-2.step-000000040.pt",
                                                               "1-of-2.step-000000040.pt"]
    assert two.resume_path(tmp_path).name.endswith("step-000000040.pt")
    with pytest.raises(ValueError, match=r"split into \[2\] member group\(s\), and this one has 1"):
        Layout(Processes()).resume_path(tmp_path)
    with pytest.raises(ValueError, match="rerun with the layout that wrote them"):
        Layout(Processes(0, 4)).resume_path(tmp_path)


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


def _torchrun(script: str, args: list[str], nproc: int = 2, nnodes: int = 1, node_rank: int = 0,
              endpoint: str | None = None) -> list[str]:
    rendezvous = (["--standalone"] if nnodes == 1 else
                  ["--nnodes", str(nnodes), "--node_rank", str(node_rank), "--rdzv_backend", "c10d",
                   "--rdzv_endpoint", endpoint, "--rdzv_id", "loopback"])
    return [sys.executable, "-m", "torch.distributed.run", *rendezvous, "--nproc_per_node", str(nproc),
            str(ROOT / script), *args]


def _run(command: list[str], timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    result = subprocess.run(command, env=_env(**env), capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _single(script: str, args: list[str]) -> subprocess.CompletedProcess:
    return _run([sys.executable, str(ROOT / script), *args])


def _weights(run: Path) -> dict[str, dict[str, torch.Tensor]]:
    members = json.loads((run / "sweep.json").read_text())["members"]
    return {m["name"]: load_file(run / m["dir"] / "sae_weights.safetensors") for m in members}


def _assert_equal_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        for key in wa[name]:
            assert torch.equal(wa[name][key], wb[name][key]), (name, key, (wa[name][key] - wb[name][key]).abs().max())


@pytest.fixture(scope="module")
def reference(small_store, tmp_path_factory) -> Path:
    """The sweep trained by one process with one thread."""
    out = tmp_path_factory.mktemp("reference") / "run"
    _single("train_sweep.py", ["--cache", str(small_store), "--output_dir", str(out), *SWEEP])
    return out


def test_two_ranks_train_disjoint_members_bit_for_bit_as_one_process(small_store, reference, tmp_path):
    """3 members on 2 ranks (2 + 1): each rank names its share; weights equal the 1-process run's."""
    out = tmp_path / "run"
    result = _run(_torchrun("train_sweep.py", ["--cache", str(small_store), "--output_dir", str(out), *SWEEP]))
    assert "rank 0/2: members 00_l1_0.001, 01_l1_0.00316 (2 of 3)" in result.stdout
    assert "rank 1/2: members 02_l1_0.01 (1 of 3)" in result.stdout
    _assert_equal_weights(reference, out)
    summary = json.loads((out / "sweep.json").read_text())
    assert summary["layout"] == {"world_size": 2, "data_parallel": 1, "member_groups": 2}
    assert [m["rank"] for m in summary["members"]] == [0, 0, 1]
    assert not list(out.glob("checkpoint*")), "checkpoints outlive the finished run"


def test_a_grid_of_member_groups_and_batch_slices_matches_one_process_up_to_summation_order(small_store, reference,
                                                                                             tmp_path):
    """4 ranks, --data_parallel 2: two member groups (2 + 1 members), each of two ranks stepping
    half of every batch and all-reducing the gradients within the group. Tolerance: every weight
    within 1e-5 of its tensor's largest magnitude (float32 sums in another order, through ~40 Adam
    steps; measured 2e-7 … 2e-6)."""
    out = tmp_path / "run"
    result = _run(_torchrun("train_sweep.py", ["--cache", str(small_store), "--output_dir", str(out), *SWEEP,
                                                "--data_parallel", "2"], nproc=4))
    assert "rank 3/4: members 02_l1_0.01 (1 of 3; member group 2/2, batch slice 2/2)" in result.stdout
    wa, wb = _weights(reference), _weights(out)
    for name in wa:
        for key, a in wa[name].items():
            assert (a - wb[name][key]).abs().max() <= 1e-5 * a.abs().max(), (name, key)
    summary = json.loads((out / "sweep.json").read_text())
    assert summary["layout"] == {"world_size": 4, "data_parallel": 2, "member_groups": 2}
    assert [m["rank"] for m in summary["members"]] == [0, 0, 2]  # the first rank of each group writes


def test_data_parallel_refuses_a_batch_wide_top_k(small_store, tmp_path):
    result = subprocess.run(_torchrun("train_sweep.py", ["--cache", str(small_store), "--output_dir", str(tmp_path / "r"),
                                                         "--source", SOURCE, "--arch", "batchtopk", "--data_parallel", "2", "--batch_size", "64",
                                                         "--no_eval"]),
                            env=_env(), capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode != 0
    assert "error: --data_parallel cannot split the batch of batchtopk" in result.stderr
    assert not (tmp_path / "r").exists(), "a refused run wrote its output directory"


def test_two_ranks_cache_a_store_byte_identical_to_one_process(text_dir, tmp_path):
    single, double = tmp_path / "single", tmp_path / "double"
    _single("generate_activations.py", gen_args(single, text_dir))
    result = _run(_torchrun("generate_activations.py", gen_args(double, text_dir)))
    assert "rank 0/2: blocks" in result.stdout and "rank 1/2: blocks" in result.stdout
    assert_identical_stores(ActivationStore.open(single), ActivationStore.open(double))


def _pid_of_rank(job: str, rank: int) -> int | None:
    """The worker process of torchrun job `job` (an environment marker) with RANK=rank."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"SAE_SWEEP_TEST_JOB={job}".encode() in environ and f"RANK={rank}".encode() in environ \
                and b"TORCHELASTIC_RUN_ID=" in b" ".join(environ):
            return int(entry.name)
    return None


def test_kill_9_of_one_rank_ends_the_job_and_the_rerun_resumes_to_the_same_weights(small_store, tmp_path):
    long = [*SWEEP, "--checkpoint_every", "20", "--n_epochs", "60"]  # ~2,600 steps
    reference = tmp_path / "reference"
    _single("train_sweep.py", ["--cache", str(small_store), "--output_dir", str(reference), *long])
    out = tmp_path / "run"
    command = _torchrun("train_sweep.py", ["--cache", str(small_store), "--output_dir", str(out), *long])
    job = uuid.uuid4().hex
    process = subprocess.Popen(command, env=_env(SAE_SWEEP_TEST_JOB=job), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    deadline = time.monotonic() + 120
    while max((int(p.name.split("step-")[1][:-3]) for p in out.glob("checkpoint.group-1-of-2.step-*.pt")), default=0) < 200:
        assert process.poll() is None and time.monotonic() < deadline, "the job ended before it could be killed"
        time.sleep(0.02)
    os.kill(_pid_of_rank(job, 1), signal.SIGKILL)
    killed_at = time.monotonic()
    output, _ = process.communicate(timeout=120)
    assert process.returncode != 0
    assert time.monotonic() - killed_at < 60, "the surviving rank did not stop in bounded time"
    assert "SIGKILL" in output or "rank 0/2: lost the other ranks" in output, output[-2000:]
    assert not (out / "sweep.json").exists()
    result = _run(command)
    assert "resuming" in result.stdout
    _assert_equal_weights(reference, out)


def test_two_single_process_nodes_on_loopback_train_as_two_ranks(small_store, reference, tmp_path):
    """torchrun --nnodes 2 with a c10d rendezvous on 127.0.0.1: two "nodes" of one process each."""
    out = tmp_path / "run"
    endpoint = f"127.0.0.1:{free_port()}"
    args = ["--cache", str(small_store), "--output_dir", str(out), *SWEEP]
    nodes = [subprocess.Popen(_torchrun("train_sweep.py", args, nproc=1, nnodes=2, node_rank=r, endpoint=endpoint),
                              env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
             for r in range(2)]
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    assert all(node.returncode == 0 for node in nodes), "\n".join(o[-2000:] for o in outputs)
    _assert_equal_weights(reference, out)
    assert json.loads((out / "sweep.json").read_text())["layout"]["world_size"] == 2
