"""Activations from anywhere: store/write.py's write_store writes the store generate_activations.py
writes (chunks, pre-shuffle, checksums, statistics, resume), from batches of arrays."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import train_sweep
from store.write import BatchError, write_store
from store.zarr_store import ActivationStore, StoreError
from tests.conftest import fail_at_call

HOOK = "blocks.2.hook_resid_post"
SMALL = {"chunk_mb": 0.01, "chunks_per_block": 3, "progress": False}


def _rows(n: int = 5000, d: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)


def _batches(rows: np.ndarray, size: int, tokens: bool = True):
    for start in range(0, len(rows), size):
        part = {HOOK: rows[start:start + size]}
        yield {**part, "tokens": np.arange(start, start + len(part[HOOK]))} if tokens else part


def _files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_written_rows_come_back_as_the_same_multiset_shuffled_each_with_its_token(tmp_path):
    rows = _rows()
    store = write_store(_batches(rows, 333), tmp_path / "s", **SMALL)
    assert store.complete and store.n_rows == len(rows) and store.n_blocks > 1
    back = store.read_rows(HOOK, 0, store.n_rows).float().numpy()
    tokens = store.read_column("tokens")
    assert sorted(tokens) == list(range(len(rows)))  # every row once
    assert not np.array_equal(tokens, np.arange(len(rows)))  # physically shuffled
    np.testing.assert_array_equal(back, rows[tokens].astype(np.float16).astype(np.float32))  # each row with its token
    norms = np.linalg.norm(rows.astype(np.float64), axis=1)  # before the storage cast, as the generator measures them
    assert store.norm_scale(HOOK) == pytest.approx(norms.mean() / np.sqrt(rows.shape[1]), rel=1e-9)
    assert store.verify(progress=False) == []  # checksums and manifest


def test_the_store_depends_on_the_rows_not_on_how_they_were_batched(tmp_path):
    rows = _rows(3000)
    write_store(_batches(rows, 333), tmp_path / "a", **SMALL)
    write_store(_batches(rows, 1000), tmp_path / "b", **SMALL)
    assert _files(tmp_path / "a") == _files(tmp_path / "b")


def test_sequences_stay_whole_with_their_positions_and_tokens(tmp_path):
    rng = np.random.default_rng(1)
    acts = rng.normal(size=(40, 12, 8)).astype(np.float32)  # 40 sequences of 12 positions
    ids = rng.integers(0, 100, size=(40, 12))
    store = write_store(({"x": acts[i:i + 7], "tokens": ids[i:i + 7]} for i in range(0, 40, 7)), tmp_path / "s", **SMALL)
    sequence, positions = store.read_column("sequence"), store.read_column("positions")
    np.testing.assert_array_equal(store.read_sequences(0, 40), ids)
    np.testing.assert_array_equal(store.read_column("tokens"), ids[sequence, positions])
    np.testing.assert_array_equal(store.read_rows("x", 0, store.n_rows).float().numpy(),
                                  acts[sequence, positions].astype(np.float16).astype(np.float32))


def test_a_store_from_arrays_trains_to_the_same_weights_as_the_generators_from_the_same_rows(small_store, tmp_path):
    """The generator's rows, read back in sequence order and written as [sequences, positions, d]
    batches, make the same on-disk row order; a sweep on either gives the same weights (to the
    normalisation statistic's float16 difference)."""
    generated = ActivationStore.open(small_store)
    source = "blocks.1.hook_resid_post"
    sequence, positions = generated.read_column("sequence"), generated.read_column("positions")
    first = int(positions.min())
    ctx = generated.attrs["context_length"] - first
    order = torch.from_numpy(np.lexsort((positions, sequence)))  # rows in sequence order
    acts = {s.name: generated.read_rows(s.name, 0, generated.n_rows)[order].view(-1, ctx, s.d) for s in generated.sources}
    tokens = generated.read_sequences(0, generated.attrs["n_sequences"])[:, first:]
    written = write_store(({**{n: a[i:i + 5] for n, a in acts.items()}, "tokens": tokens[i:i + 5]} for i in range(0, len(tokens), 5)),
                          tmp_path / "from-arrays", model="pythia-70m", chunk_mb=0.01, chunks_per_block=3, progress=False)
    np.testing.assert_array_equal(written.read_column("tokens"), generated.read_column("tokens"))
    for s in generated.sources:  # the same physical order, row for row
        assert torch.equal(written.read_rows(s.name, 0, written.n_rows), generated.read_rows(s.name, 0, generated.n_rows))
    # the normalisation statistic is measured before the storage cast: the generator's on float32
    # model outputs, write_store's on the float16 rows given here
    assert written.norm_scale(source) == pytest.approx(generated.norm_scale(source), rel=1e-4)
    weights = {}
    for name, store in (("generated", small_store), ("written", tmp_path / "from-arrays")):
        result = CliRunner().invoke(train_sweep.main, [
            "--cache", str(store), "--source", source, "--output_dir", str(tmp_path / name), "--n_models", "2",
            "--batch_size", "64", "--eval_tokens", "400", "--no_eval"])
        assert result.exit_code == 0, result.output
        summary = json.loads((tmp_path / name / "sweep.json").read_text())
        weights[name] = [load_file(tmp_path / name / r["dir"] / "sae_weights.safetensors") for r in summary["members"]]
    for ours, theirs in zip(weights["written"], weights["generated"]):
        for key in theirs:
            torch.testing.assert_close(ours[key], theirs[key], rtol=1e-4, atol=1e-6)  # the scales' 1e-5 difference


def test_a_store_without_model_or_tokens_trains_and_evaluation_says_what_it_skips(tmp_path):
    write_store(_batches(_rows(6000), 500, tokens=False), tmp_path / "s", **SMALL)
    result = CliRunner().invoke(train_sweep.main, [
        "--cache", str(tmp_path / "s"), "--output_dir", str(tmp_path / "run"), "--n_models", "2", "--batch_size", "256",
        "--eval_tokens", "500", "--browser"])
    assert result.exit_code == 0, result.output
    assert "spliced CE/KL: skipped: store" in result.output and "records no model" in result.output
    assert "no logit effects" in result.output and "no token texts" in result.output
    rows = json.loads((tmp_path / "run" / "sweep.json").read_text())["members"]
    assert all(r["l0"] > 0 and 0 <= r["fvu"] < 1 and "dead_fraction" in r for r in rows)


def test_a_kill_while_writing_then_a_rerun_gives_a_byte_identical_store(tmp_path, monkeypatch):
    rows = _rows()
    write_store(_batches(rows, 333), tmp_path / "whole", **SMALL)
    original = fail_at_call(monkeypatch, ActivationStore, "write_block", 3, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        write_store(_batches(rows, 333), tmp_path / "resumed", **SMALL)
    monkeypatch.setattr(ActivationStore, "write_block", original)
    with pytest.raises(StoreError, match="incomplete"):
        ActivationStore.open(tmp_path / "resumed")  # nothing marked complete
    write_store(_batches(rows, 500), tmp_path / "resumed", **SMALL)  # the same rows, batched otherwise
    assert _files(tmp_path / "resumed") == _files(tmp_path / "whole")


def test_resuming_with_other_rows_is_refused(tmp_path, monkeypatch):
    fail_at_call(monkeypatch, ActivationStore, "write_block", 3, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        write_store(_batches(_rows(), 333), tmp_path / "s", **SMALL)
    monkeypatch.undo()
    with pytest.raises(StoreError, match="block 0 was written from other rows"):
        write_store(_batches(_rows(seed=1), 333), tmp_path / "s", **SMALL)


@pytest.mark.parametrize("batches, message", [
    ([], "the batches are empty"),
    ([{HOOK: np.ones((10, 16))}, {HOOK: np.ones((10, 8))}], r"batch 1: blocks.2.hook_resid_post has shape \[10, 8\]"),
    ([{HOOK: np.full((3, 16), np.nan)}], "batch 0: blocks.2.hook_resid_post has non-finite values"),
    ([{HOOK: np.ones((10, 16)), "y": np.ones((9, 4))}], "batch 0: y has 9 rows, blocks.2.hook_resid_post has 10"),
    ([{HOOK: np.ones((10, 16))}, {HOOK: np.ones((10, 16)), "tokens": np.arange(10)}], "batch 1 holds"),
    ([{HOOK: np.full((3, 16), 1e6)}], "beyond the float16 maximum"),
], ids=["empty", "shape-changes", "nan", "unequal-rows", "sources-change", "overflow"])
def test_bad_batches_are_one_line_naming_the_batch_and_leave_nothing(tmp_path, batches, message):
    with pytest.raises(BatchError, match=message):
        write_store(iter(batches), tmp_path / "s", **SMALL)
    assert not (tmp_path / "s").exists()


def test_a_fault_after_blocks_were_written_leaves_the_store_incomplete(tmp_path):
    rows = _rows()

    def batches():
        yield from _batches(rows, 1000)
        yield {HOOK: np.full((5, 16), np.inf), "tokens": np.arange(5)}

    with pytest.raises(BatchError, match="batch 5: blocks.2.hook_resid_post has non-finite values"):
        write_store(batches(), tmp_path / "s", **SMALL)
    with pytest.raises(StoreError, match="incomplete"):
        ActivationStore.open(tmp_path / "s")
