"""Paired (base/chat) stores for model diffing: two models on identical token rows, side by side."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import generate_activations
from cache.models import load_model
from store.zarr_store import ActivationStore
from tests.conftest import OTHER_TOKENIZER_NAME, TINY_NAME, TWIN_NAME, fail_at_call, gen_args

HOOKS = ("blocks.1.hook_resid_post", "blocks.2.hook_mlp_out")
MODELS = {"base": TINY_NAME, "chat": TWIN_NAME}


def paired_args(out, text_dir, **extra) -> list[str]:
    """CLI arguments of a small paired store of the tiny model and its same-tokenizer twin."""
    return gen_args(out, text_dir, **{"--paired_model": TWIN_NAME, **extra}) + ["--hooks", HOOKS[1]]


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert [line for line in result.output.splitlines() if line.startswith("error:")] == [result.output.strip()]
    for fragment in fragments:
        assert fragment in result.output, result.output


def _state(path):
    """None when nothing was written, else whether the store is marked complete."""
    return ActivationStore.open(path, allow_incomplete=True).complete if (path / "zarr.json").exists() else None


@pytest.fixture(scope="module")
def paired_store(tmp_path_factory, text_dir) -> ActivationStore:
    out = tmp_path_factory.mktemp("paired") / "store"
    result = CliRunner().invoke(generate_activations.main, paired_args(out, text_dir))
    assert result.exit_code == 0, result.output
    assert "base/blocks.1.hook_resid_post (d=32" in result.output and "chat/blocks.2.hook_mlp_out" in result.output
    return ActivationStore.open(out)


def test_paired_store_names_sources_by_label_and_records_both_models(paired_store):
    assert [(s.name, s.model, s.hook) for s in paired_store.sources] == [
        (f"{label}/{hook}", model, hook) for label, model in MODELS.items() for hook in HOOKS
    ]
    assert [(m["label"], m["model_name"]) for m in paired_store.info["models"]] == list(MODELS.items())
    assert paired_store.info["model_name"] == TINY_NAME  # the model whose tokenizer made the ids
    assert paired_store.identity["paired_model"] == TWIN_NAME and paired_store.identity["labels"] == ["base", "chat"]


def test_unpaired_stores_keep_plain_names_and_their_identity(small_store):
    store = ActivationStore.open(small_store)
    assert [s.name for s in store.sources] == list(HOOKS)
    assert not {"paired_model", "paired_model_path", "labels"} & set(store.identity)  # old stores still resume
    assert [m["label"] for m in store.info["models"]] == [None]


def test_row_i_of_both_models_is_the_activation_of_the_same_token(paired_store):
    """Recompute sampled rows from their stored (sequence, position) with each model."""
    store = paired_store
    rows = np.arange(0, store.n_rows, 89)
    seq, pos = store.read_column("sequence")[rows], store.read_column("positions")[rows]
    sequences = torch.from_numpy(store.read_sequences(0, store.attrs["n_sequences"])).long()
    assert (store.read_column("tokens")[rows] == sequences[seq, pos].numpy()).all()
    stored = {}
    for label, name in MODELS.items():
        model = load_model(name, None, device="cpu")
        _, cache = model.run_with_cache(sequences[seq], names_filter=lambda n: n in HOOKS)
        for hook in HOOKS:
            expected = cache[hook][torch.arange(len(rows)), torch.from_numpy(pos).long()]  # [rows, d]
            stored[label, hook] = torch.stack([store.read_rows(f"{label}/{hook}", r, r + 1)[0].float() for r in rows])
            torch.testing.assert_close(stored[label, hook], expected.half().float())
    assert not torch.allclose(stored["base", HOOKS[0]], stored["chat", HOOKS[0]])  # two different models


def test_each_source_is_normalised_by_its_own_scale(paired_store):
    scales = {}
    for src in paired_store.sources:
        x = paired_store.read_rows(src.name, 0, paired_store.n_rows).double()  # [N, d]
        scales[src.name] = paired_store.norm_scale(src.name)
        mean_norm = (x / scales[src.name]).norm(dim=1).mean().item()
        assert mean_norm == pytest.approx(math.sqrt(src.d), rel=2e-3)  # fp16 storage vs fp32 sums
    assert scales["base/blocks.1.hook_resid_post"] != pytest.approx(scales["chat/blocks.1.hook_resid_post"])


def test_pair_with_another_tokenizer_is_refused_before_anything_is_written(tmp_path, text_dir):
    out = tmp_path / "mismatch"
    result = CliRunner().invoke(generate_activations.main, paired_args(out, text_dir, **{"--paired_model": OTHER_TOKENIZER_NAME}))
    assert_one_line_error(result, "do not share a tokenizer", "vocabularies differ", OTHER_TOKENIZER_NAME, "same tokenizer")
    assert _state(out) is None


@pytest.mark.parametrize("method", ["write_block", "_record"], ids=["before a block", "inside a block"])
def test_paired_generation_resumes_to_the_uninterrupted_store(paired_store, tmp_path, text_dir, monkeypatch, method):
    from tests.test_cache import assert_identical_stores

    crashed = tmp_path / "crashed"
    original = fail_at_call(monkeypatch, ActivationStore, method, 3, KeyboardInterrupt())  # after 2 blocks
    assert CliRunner().invoke(generate_activations.main, paired_args(crashed, text_dir)).exit_code == 130
    assert _state(crashed) is False
    monkeypatch.setattr(ActivationStore, method, original)
    assert CliRunner().invoke(generate_activations.main, paired_args(crashed, text_dir)).exit_code == 0
    assert_identical_stores(paired_store, ActivationStore.open(crashed))


def test_paired_model_path_with_own_labels_and_another_width(tmp_path, text_dir, wide_twin_dir):
    out = tmp_path / "wide"
    extra = {"--paired_model_path": str(wide_twin_dir), "--labels": "pre,post", "--n_chunks": "2"}
    args = gen_args(out, text_dir, **extra)
    result = CliRunner().invoke(generate_activations.main, args)
    assert result.exit_code == 0, result.output
    store = ActivationStore.open(out)
    assert [(s.name, s.model, s.d) for s in store.sources] == [
        (f"pre/{HOOKS[0]}", TINY_NAME, 32), (f"post/{HOOKS[0]}", wide_twin_dir.name, 64)
    ]
    refused = CliRunner().invoke(generate_activations.main, gen_args(tmp_path / "eq", text_dir, **extra) + ["--require_equal_widths"])
    assert_one_line_error(refused, "--require_equal_widths", "(32 vs 64)")
    assert _state(tmp_path / "eq") is None


@pytest.mark.parametrize("labels", ["base", "base,base", "a/b,c"])
def test_bad_labels_are_refused(tmp_path, text_dir, labels):
    result = CliRunner().invoke(generate_activations.main, paired_args(tmp_path / "x", text_dir, **{"--labels": labels}))
    assert_one_line_error(result, "--labels", "two different names")


def test_a_sweep_on_the_chat_source_exports_and_evaluates_against_the_chat_model(paired_store, tmp_path):
    """The exported metadata and the spliced CE use the model that wrote the source."""
    import json

    import train_sweep

    out = tmp_path / "chat-run"
    args = ["--cache", str(paired_store.path), "--source", "chat/blocks.1.hook_resid_post", "--output_dir", str(out),
            "--n_models", "2", "--ratio", "2", "--batch_size", "64", "--lr", "1e-2", "--eval_tokens", "300",
            "--eval_sequences", "4"]
    result = CliRunner().invoke(train_sweep.main, args)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "sweep.json").read_text())
    member = summary["members"][0]
    cfg = json.loads((out / member["dir"] / "cfg.json").read_text())
    assert cfg["metadata"]["model_name"] == "pythia-160m"
    assert cfg["metadata"]["hook_name"] == "blocks.1.hook_resid_post"
    base_args = [a.replace("chat/", "base/") if a.startswith("chat/") else a for a in args]
    base_args[base_args.index(str(out))] = str(tmp_path / "base-run")
    assert CliRunner().invoke(train_sweep.main, base_args).exit_code == 0
    base = json.loads((tmp_path / "base-run" / "sweep.json").read_text())
    assert summary["eval"]["clean_ce"] != pytest.approx(base["eval"]["clean_ce"])  # another model's loss
