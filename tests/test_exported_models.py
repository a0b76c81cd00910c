"""Exports say how to load their model so that it computes the activations they were trained on.

Checked with SAELens's own code, as a downstream tool would do it: `SAE.load_from_disk` reads the
member's cfg.json, and `sae_lens.load_model.load_model(model_class_name, model_name, …,
model_from_pretrained_kwargs)` loads the model; run on the held-out sequences, its activations at
the exported hooks equal the store's rows to float16 precision. For a LayerNorm model (GPT-NeoX)
and an RMSNorm one (Qwen2), a plain SAE and a transcoder.
"""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import generate_activations
import train_sweep
from tests.conftest import RMS_NAME, TINY_NAME, gen_args

FLOAT16_TOLERANCE = 2e-3  # relative L2 error of a row stored in float16 (2^-11 per value, plus the sum)


@pytest.fixture(scope="module", params=[TINY_NAME, RMS_NAME], ids=["layernorm", "rmsnorm"])
def exported(request, tmp_path_factory, text_dir):
    """(store path, {"sae": member dir, "transcoder": member dir}) for one model: layer 1's
    residual stream, MLP input and output, one short sweep each."""
    root = tmp_path_factory.mktemp("exported")
    store = root / "store"
    args = gen_args(store, text_dir, **{"--model": request.param}) + ["--hook", "resid_post", "mlp_in_normalized", "mlp_out"]
    result = CliRunner().invoke(generate_activations.main, args)
    assert result.exit_code == 0, result.output
    dirs = {}
    for kind, extra in (("sae", ["--source", "blocks.1.hook_resid_post"]), ("transcoder", ["--transcoder", "--layers", "1"])):
        out = root / kind
        result = CliRunner().invoke(train_sweep.main, [
            "--cache", str(store), "--output_dir", str(out), "--ratio", "2", "--batch_size", "64", "--eval_tokens", "400",
            "--eval_sequences", "2", "--arch", "relu", "--n_models", "1", *extra])
        assert result.exit_code == 0, result.output
        summary = json.loads((out / "sweep.json").read_text())
        dirs[kind] = out / summary["members"][0]["dir"]
        dirs["eval_sequence_start"] = summary["store"]["eval_sequence_start"]
    return store, dirs


def _held_out_rows(store_path, hook_names: list[str], first_sequence: int, n_sequences: int = 3):
    """{hook: stored rows} of sequences first…first+n, and the (sequence, position) of each row."""
    from store.zarr_store import ActivationStore

    store = ActivationStore.open(store_path)
    sequence, positions = store.read_column("sequence"), store.read_column("positions")
    rows = np.flatnonzero((sequence >= first_sequence) & (sequence < first_sequence + n_sequences))
    by_hook = {s.hook: s.name for s in store.sources}
    stored = {h: store.read_rows(by_hook[h], 0, store.n_rows)[torch.from_numpy(rows)].float() for h in hook_names}
    return store, stored, sequence[rows], positions[rows]


def _saelens_activations(member_dir, hook_names: list[str], store, sequences, positions) -> dict[str, torch.Tensor]:
    """The model loaded the SAELens way from the member's own cfg, run on the stored sequences."""
    from sae_lens import SAE
    from sae_lens.load_model import load_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        metadata = SAE.load_from_disk(member_dir).cfg.metadata
        model = load_model(metadata.model_class_name, metadata.model_name, device="cpu",
                           model_from_pretrained_kwargs=metadata.model_from_pretrained_kwargs)
    if any(h.endswith("hook_mlp_in") for h in hook_names):
        model.set_use_hook_mlp_in(True)
    tokens = torch.from_numpy(store.read_sequences(int(sequences.min()), int(sequences.max()) + 1)).long()
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=hook_names)
    index = (torch.from_numpy(sequences - sequences.min()).long(), torch.from_numpy(positions).long())
    return {h: cache[h][index].reshape(len(sequences), -1).float() for h in hook_names}


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(a - b, dim=-1) / torch.linalg.vector_norm(b, dim=-1).clamp_min(1e-6)


@pytest.mark.parametrize("kind", ["sae", "transcoder"])
def test_the_exported_kwargs_reproduce_the_stored_activations_through_saelens_load_model(exported, kind):
    store_path, dirs = exported
    cfg = json.loads((dirs[kind] / "cfg.json").read_text())
    metadata = cfg["metadata"]
    assert metadata["model_class_name"] == "HookedTransformer"
    kwargs = metadata["model_from_pretrained_kwargs"]
    assert kwargs["fold_ln"] is True and kwargs["dtype"] == "float32" and "default_prepend_bos" in kwargs
    hooks = [metadata["hook_name"]] + ([metadata["hook_name_out"]] if kind == "transcoder" else [])
    store, stored, sequences, positions = _held_out_rows(store_path, hooks, dirs["eval_sequence_start"])
    assert len(sequences) > 0
    theirs = _saelens_activations(dirs[kind], hooks, store, sequences, positions)
    for hook in hooks:
        error = _relative_error(theirs[hook], stored[hook])
        assert error.max() < FLOAT16_TOLERANCE, (hook, error.max().item())


@pytest.mark.parametrize("exported", [TINY_NAME], ids=["layernorm"], indirect=True)
def test_without_the_kwargs_a_layernorm_models_activations_differ(exported):
    """The check above can fail: SAELens's default (no weight processing) gives other residuals
    on a LayerNorm model, where TransformerLens centres the writing weights (RMSNorm models are
    unaffected: TransformerLens centres LayerNorm models only)."""
    from sae_lens.load_model import load_model

    store_path, dirs = exported
    metadata = json.loads((dirs["sae"] / "cfg.json").read_text())["metadata"]
    hook = metadata["hook_name"]
    store, stored, sequences, positions = _held_out_rows(store_path, [hook], dirs["eval_sequence_start"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = load_model("HookedTransformer", metadata["model_name"], device="cpu", model_from_pretrained_kwargs={})
    tokens = torch.from_numpy(store.read_sequences(int(sequences.min()), int(sequences.max()) + 1)).long()
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=[hook])
    index = (torch.from_numpy(sequences - sequences.min()).long(), torch.from_numpy(positions).long())
    assert _relative_error(cache[hook][index].float(), stored[hook]).mean() > 0.01


def test_an_export_from_a_store_written_before_the_record_states_the_old_processing(exported, tmp_path):
    """Stores written before each model's loading was recorded: exports state the processing the
    code of that time applied (TransformerLens's from_pretrained defaults, which it used)."""
    import shutil

    from store.zarr_store import ActivationStore

    store_path, _ = exported
    source = ActivationStore.open(store_path).sources[0].name
    recorded = ActivationStore.open(store_path).loaded_with(source)
    old = tmp_path / "old-store"
    shutil.copytree(store_path, old)
    store = ActivationStore.open(old, writable=True)
    info = {k: v for k, v in store.info.items() if k != "loaded_with"}
    info["models"] = [{k: v for k, v in m.items() if k != "loaded_with"} for m in info["models"]]
    store.group.attrs["info"] = info  # as such a store reads
    assert ActivationStore.open(old).loaded_with(source) == recorded
