"""Both CLIs end to end, the SAELens round trip, and one-line errors for bad input."""
from __future__ import annotations

import json
import warnings

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import generate_activations
import train_sweep
from store.zarr_store import ActivationStore
from tests.conftest import fail_at_call, gen_args

SOURCE = "blocks.1.hook_resid_post"


def sweep_args(cache, out, **extra) -> list[str]:
    args = {
        "--cache": str(cache), "--source": SOURCE, "--output_dir": str(out), "--l1_min": "-3", "--l1_max": "-1",
        "--n_models": "3", "--ratio": "2", "--batch_size": "64", "--lr": "1e-2", "--n_epochs": "2",
        "--eval_tokens": "400",
    }
    args.update({k: str(v) for k, v in extra.items()})
    return [item for pair in args.items() for item in pair]


@pytest.fixture(scope="module")
def sweep_dir(small_store, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "sweep"
    result = CliRunner().invoke(train_sweep.main, sweep_args(small_store, out))
    assert result.exit_code == 0, result.output
    return out


def test_sweep_writes_members_summary_and_plots(sweep_dir):
    summary = json.loads((sweep_dir / "sweep.json").read_text())
    rows = summary["members"]
    assert [r["l1_coeff"] for r in rows] == pytest.approx([1e-3, 1e-2, 1e-1])
    for r in rows:
        assert {"l0", "mse", "fvu", "dead_fraction"} <= set(r) and 0 <= r["fvu"] < 0.6  # far better than the mean
        assert (sweep_dir / r["dir"] / "cfg.json").exists()
    assert rows[0]["fvu"] < 0.1  # the least penalised member reconstructs well (measured 0.03)
    assert rows[0]["l0"] > rows[-1]["l0"]  # more penalty, sparser
    assert (sweep_dir / "sweep.csv").read_text().count("\n") == 4
    assert (sweep_dir / "l1_vs_l0.png").stat().st_size > 1000


def test_members_load_in_saelens_with_equal_reconstructions(sweep_dir, small_store):
    from sae_lens import SAE

    store = ActivationStore.open(small_store)
    x = store.read_rows(SOURCE, 0, 256).float()  # raw, un-normalised activations
    for member in sorted((sweep_dir / "members").iterdir()):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sae = SAE.load_from_disk(member)
        w = load_file(member / "sae_weights.safetensors")
        ours = torch.relu((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]) @ w["W_dec"] + w["b_dec"]
        with torch.no_grad():
            torch.testing.assert_close(sae(x), ours, atol=1e-5, rtol=1e-5)
        assert sae.cfg.metadata.hook_name == SOURCE and sae.cfg.metadata.model_name == "pythia-70m"
        assert sae.cfg.metadata.context_size == 16


def test_export_folds_the_normalisation_into_the_weights():
    """Raw-space outputs of the exported weights equal s × the normalised-space outputs."""
    from training.dictionary import Dictionary
    from training.members import MemberConfig

    torch.manual_seed(0)
    d = Dictionary([MemberConfig(d_in=5, d_sae=7, l1_coeff=1e-3)])
    with torch.no_grad():
        d.b_dec.normal_()
        d.b_enc.normal_(std=0.1)
    s = 3.7
    x_norm = torch.randn(11, 5)
    w = d.member_tensors(0, s)
    f_raw = torch.relu((s * x_norm - w["b_dec"]) @ w["W_enc"] + w["b_enc"])
    torch.testing.assert_close(f_raw, d.encode(x_norm)[0])
    torch.testing.assert_close(f_raw @ w["W_dec"] + w["b_dec"], s * d.reconstruct(x_norm)[0])


def test_sweep_resumes_from_a_checkpoint_to_the_same_weights(small_store, tmp_path, monkeypatch):
    import training.trainer as trainer

    whole = tmp_path / "whole"
    assert CliRunner().invoke(train_sweep.main, sweep_args(small_store, whole, **{"--checkpoint_every": 3})).exit_code == 0
    broken = tmp_path / "broken"
    original = fail_at_call(monkeypatch, trainer.Ensemble, "step", 8, KeyboardInterrupt())
    result = CliRunner().invoke(train_sweep.main, sweep_args(small_store, broken, **{"--checkpoint_every": 3}))
    assert result.exit_code == 130 and (broken / "checkpoint.pt").exists()
    monkeypatch.setattr(trainer.Ensemble, "step", original)
    result = CliRunner().invoke(train_sweep.main, sweep_args(small_store, broken, **{"--checkpoint_every": 3}))
    assert result.exit_code == 0 and "resuming" in result.output
    for member in (whole / "members").iterdir():
        a = load_file(member / "sae_weights.safetensors")
        b = load_file(broken / "members" / member.name / "sae_weights.safetensors")
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    finished = CliRunner().invoke(train_sweep.main, sweep_args(small_store, broken, **{"--checkpoint_every": 3}))
    assert finished.exit_code == 0 and "already holds this finished sweep" in finished.output


# ---------------------------------------------------------------- bad input


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.exit_code != 0
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    lines = [line for line in result.output.splitlines() if line.startswith("error:") or "Error" in line]
    assert len(lines) == 1, result.output
    for fragment in fragments:
        assert fragment in result.output, result.output


def _store_state(path):
    if not (path / "zarr.json").exists():
        return None
    return ActivationStore.open(path, allow_incomplete=True).complete


@pytest.mark.parametrize(
    "extra, fragments",
    [
        ({"--model": "no-such-model"}, ["unknown model", "--model_path"]),
        ({"--layers": "7"}, ["layer 7 is out of range", "3 layers"]),
        ({"--layers": "0", "--hook": "resid_sideways"}, ["resid_sideways"]),
        ({"--dataset": "/does/not/exist.txt"}, ["does not exist"]),
        ({"--dataset": "someone/not-cached-here"}, ["cannot load dataset", "not a local file or folder"]),
        ({"--context_length": "100000"}, ["short of one sequence", "60 documents"]),
        ({"--device": "not-a-device"}, ["is not a device name"]),
    ],
)
def test_bad_generation_input_gives_one_line_error_and_no_complete_store(tmp_path, text_dir, extra, fragments):
    out = tmp_path / "bad"
    result = CliRunner().invoke(generate_activations.main, gen_args(out, text_dir, **extra))
    assert_one_line_error(result, *fragments)
    assert _store_state(out) in (None, False)


def test_unknown_full_hook_name_is_refused(tmp_path, text_dir):
    result = CliRunner().invoke(generate_activations.main, gen_args(tmp_path / "x", text_dir) + ["--hooks", "blocks.1.hook_nope"])
    assert_one_line_error(result, "blocks.1.hook_nope is not a hook of this model", "block 1 has", "hook_resid_post")


def test_missing_text_column_is_refused(tmp_path, text_jsonl):
    result = CliRunner().invoke(generate_activations.main, gen_args(tmp_path / "x", text_jsonl, **{"--text_column": "body"}))
    assert_one_line_error(result, "no column 'body'", "--text_column")


def test_empty_dataset_folder_is_refused(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = CliRunner().invoke(generate_activations.main, gen_args(tmp_path / "x", empty))
    assert_one_line_error(result, "holds no")


def test_existing_store_with_another_config_is_refused(small_store, text_dir):
    result = CliRunner().invoke(generate_activations.main, gen_args(small_store, text_dir, **{"--context_length": "24"}))
    assert_one_line_error(result, "another configuration", "context_length", "--overwrite")
    assert ActivationStore.open(small_store).complete


@pytest.mark.parametrize("values, fragments", [(float("nan"), ["non-finite"]), (1e6, ["beyond the float16 maximum", "--dtype"])])
def test_bad_activations_are_refused_and_the_store_stays_incomplete(tmp_path, text_dir, monkeypatch, values, fragments):
    from cache.models import TLModel

    original = TLModel.record
    monkeypatch.setattr(TLModel, "record", lambda *a: {k: torch.full_like(v, values) for k, v in original(*a).items()})
    out = tmp_path / "bad"
    assert_one_line_error(CliRunner().invoke(generate_activations.main, gen_args(out, text_dir)), *fragments)
    assert _store_state(out) in (None, False)


def test_incomplete_store_is_refused_by_the_trainer(tmp_path, small_store):
    import shutil

    partial = tmp_path / "partial"
    shutil.copytree(small_store, partial)
    store = ActivationStore.open(partial, writable=True)
    store.group.attrs["complete"] = False
    result = CliRunner().invoke(train_sweep.main, sweep_args(partial, tmp_path / "run"))
    assert_one_line_error(result, "incomplete", "rerun the same generate_activations.py command")


@pytest.mark.parametrize(
    "extra, fragments",
    [
        ({"--source": "blocks.9.hook_resid_post"}, ["not in store", SOURCE]),
        ({"--l1_min": "-1", "--l1_max": "-3"}, ["--l1_min", "larger than --l1_max"]),
        ({"--d_sae": "0"}, ["--d_sae must be positive"]),
        ({"--ratio": "-2"}, ["--ratio must be positive"]),
        ({"--device": "cuda:7"} if not torch.cuda.is_available() else {"--device": "gpu0"}, ["--device"]),
    ],
)
def test_bad_sweep_input_gives_one_line_error(small_store, tmp_path, extra, fragments):
    assert_one_line_error(CliRunner().invoke(train_sweep.main, sweep_args(small_store, tmp_path / "run", **extra)), *fragments)


def test_store_with_several_sources_needs_a_source(small_store, tmp_path):
    args = [a for a in sweep_args(small_store, tmp_path / "run") if a not in ("--source", SOURCE)]
    assert_one_line_error(CliRunner().invoke(train_sweep.main, args), "several sources", "--source")


def test_missing_store_is_refused(tmp_path):
    result = CliRunner().invoke(train_sweep.main, sweep_args(tmp_path / "nowhere", tmp_path / "run"))
    assert_one_line_error(result, "no activation store", "generate_activations.py")


def test_output_dir_of_another_run_is_refused(sweep_dir, small_store):
    result = CliRunner().invoke(train_sweep.main, sweep_args(small_store, sweep_dir, **{"--l1_min": "-4"}))
    assert_one_line_error(result, "holds another run", "l1_min", "--overwrite")


def test_a_run_written_before_a_config_field_existed_is_still_this_run(sweep_dir, small_store):
    """Fields added to SweepConfig later count as their defaults in an older sweep_config.json."""
    config = json.loads((sweep_dir / "sweep_config.json").read_text())
    older = {k: v for k, v in config.items() if k not in ("p_end", "sources", "resample_every")}
    (sweep_dir / "sweep_config.json").write_text(json.dumps(older))
    try:
        result = CliRunner().invoke(train_sweep.main, sweep_args(small_store, sweep_dir))
        assert result.exit_code == 0 and "already holds this finished sweep" in result.output, result.output
    finally:
        (sweep_dir / "sweep_config.json").write_text(json.dumps(config))
