"""Any Hugging Face causal LM: the transformers backend caches module outputs (SAELens's
AutoModelForCausalLM hook names), equal to TransformerLens's unprocessed activations where both
know the model, and exports load with SAELens's own AutoModelForCausalLM path."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import train_sweep
from cache.config import GenerateConfig
from cache.generate import generate
from cache.hf_models import HFModelError, load_hf_model
from cache.models import load_for_caching
from store.zarr_store import ActivationStore
from tests.conftest import TINY_D, TINY_LAYERS, TINY_NAME, _hub_snapshot

HOOKS = ("resid_post", "mlp_out", "attn_out", "mlp_in")


def _save(directory: Path, arch: str, tokenizer) -> Path:
    """A tiny random model of `arch` with the test tokenizer, as a local Hugging Face directory."""
    import transformers

    common = dict(vocab_size=len(tokenizer), bos_token_id=0, eos_token_id=0)
    configs = {
        "llama": transformers.LlamaConfig(hidden_size=TINY_D, intermediate_size=64, num_hidden_layers=TINY_LAYERS,
                                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, **common),
        "qwen3": transformers.Qwen3Config(hidden_size=TINY_D, intermediate_size=64, num_hidden_layers=TINY_LAYERS,
                                          num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                          max_position_embeddings=256, **common),
        "gpt2": transformers.GPT2Config(n_embd=TINY_D, n_layer=TINY_LAYERS, n_head=4, n_positions=256, n_ctx=256, **common),
        "granite": transformers.GraniteConfig(hidden_size=TINY_D, intermediate_size=64, num_hidden_layers=TINY_LAYERS,
                                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                              **common),
    }
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(configs[arch])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:  # norms' gains and biases away from 1 and 0, so a wrong hook cannot pass
                p.uniform_(0.5, 1.5) if "weight" in name or name.endswith(".g") else p.uniform_(-0.5, 0.5)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def _generate(out: Path, text_dir: Path, **kw):
    return generate(GenerateConfig(out=str(out), dataset=str(text_dir), layers=(1,), hook=HOOKS, context_length=16,
                                   n_tokens=1500, chunk_mb=0.01, chunks_per_block=3, batch_size=8, **kw))


EXPECTED = {
    "llama": ["model.layers.1.self_attn", "model.layers.1.post_attention_layernorm", "model.layers.1.mlp", "model.layers.1"],
    "qwen3": ["model.layers.1.self_attn", "model.layers.1.post_attention_layernorm", "model.layers.1.mlp", "model.layers.1"],
    "gpt2": ["transformer.h.1.attn", "transformer.h.1.ln_2", "transformer.h.1.mlp", "transformer.h.1"],
}


@pytest.mark.parametrize("arch", sorted(EXPECTED))
def test_tiny_models_cache_module_outputs_through_transformers(arch, tokenizer, text_dir, tmp_path):
    """Llama, Qwen3 and GPT-2: the kinds map to their module paths; the stored residual rows are
    the model's own hidden states (transformers' output_hidden_states, not our hooks)."""
    directory = _save(tmp_path / arch, arch, tokenizer)
    store = _generate(tmp_path / "store", text_dir, model_path=str(directory), backend="transformers")
    assert [s.name for s in store.sources] == EXPECTED[arch]
    assert {s.kind for s in store.sources} == set(HOOKS) and {s.layer for s in store.sources} == {1}
    assert store.info["backend"] == "transformers" and store.loaded_with(store.sources[0].name) == {
        "model_class_name": "AutoModelForCausalLM", "model_from_pretrained_kwargs": {"dtype": "float32"}}
    model = load_hf_model(None, str(directory), device="cpu")
    tokens = torch.from_numpy(store.read_sequences(0, 2)).long()
    with torch.no_grad():
        hidden = model.model(input_ids=tokens, output_hidden_states=True).hidden_states[2]  # after block 1
    sequence, positions = store.read_column("sequence"), store.read_column("positions")
    rows = np.flatnonzero(sequence < 2)
    stored = store.read_rows(EXPECTED[arch][-1], 0, store.n_rows)[torch.from_numpy(rows)].float()
    torch.testing.assert_close(stored, hidden[sequence[rows], positions[rows]], rtol=2e-3, atol=2e-3)


def test_a_path_the_model_lacks_is_refused_with_the_paths_it_has(tokenizer, tmp_path):
    model = load_hf_model(None, str(_save(tmp_path / "llama", "llama", tokenizer)), device="cpu")
    with pytest.raises(HFModelError, match=r"model.layers.1.mlpp is not a module of this model; model.layers.1 has: "
                                           r"model.layers.1, model.layers.1.self_attn, model.layers.1.mlp"):
        model.resolve_hooks((), (), ("model.layers.1.mlpp",))
    with pytest.raises(HFModelError, match="--hook mlp_in_normalized is not available with the transformers backend"):
        model.resolve_hooks((1,), ("mlp_in_normalized",), ())
    with pytest.raises(ValueError, match="layer 7 is out of range: the model has 3 layers"):
        model.resolve_hooks((7,), ("resid_post",), ())


def test_the_forward_stops_after_the_deepest_block_needed(tokenizer, tmp_path):
    model = load_hf_model(None, str(_save(tmp_path / "llama", "llama", tokenizer)), device="cpu")
    ran = []
    model.model.get_submodule("model.layers.2").register_forward_hook(lambda *a: ran.append(2))
    acts = model.record(torch.zeros((2, 5), dtype=torch.long), ["model.layers.0.mlp", "model.layers.1"])
    assert ran == [] and acts["model.layers.1"].shape == (10, TINY_D)
    model.record(torch.zeros((2, 5), dtype=torch.long), ["model.norm"])  # outside the blocks: the whole forward
    assert ran == [2]


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox"])
def test_where_both_backends_know_a_model_transformers_equals_transformer_lens_without_processing(
        arch, tokenizer, pytestconfig):
    from transformer_lens import HookedTransformer

    if arch == "gpt2":
        snapshot = pytestconfig._sae_sweep_hf_root / "hub" / "models--gpt2"
        if not snapshot.exists():
            _save(_hub_snapshot(pytestconfig._sae_sweep_hf_root, "gpt2"), "gpt2", tokenizer)
        tl_name = hf_name = "gpt2"
        paths = {"transformer.h.1": "blocks.1.hook_resid_post", "transformer.h.1.mlp": "blocks.1.hook_mlp_out",
                 "transformer.h.1.attn": "blocks.1.hook_attn_out"}
    else:
        tl_name, hf_name = TINY_NAME, "EleutherAI/pythia-70m"
        paths = {"gpt_neox.layers.1": "blocks.1.hook_resid_post", "gpt_neox.layers.1.mlp": "blocks.1.hook_mlp_out",
                 "gpt_neox.layers.1.attention": "blocks.1.hook_attn_out"}
    hf = load_for_caching("transformers", hf_name, None, device="cpu", dtype="float32")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tl = HookedTransformer.from_pretrained_no_processing(tl_name, device="cpu")
    tokens = torch.randint(0, len(tokenizer), (3, 12), generator=torch.Generator().manual_seed(0))
    ours = hf.record(tokens, list(paths))
    with torch.no_grad():
        _, cache = tl.run_with_cache(tokens, names_filter=list(paths.values()))
    for path, hook in paths.items():
        torch.testing.assert_close(ours[path], cache[hook].reshape(-1, cache[hook].shape[-1]), rtol=1e-4, atol=1e-4)


def test_an_architecture_transformer_lens_does_not_know_caches_sweeps_and_exports_through_auto(
        tokenizer, text_dir, tmp_path):
    """Granite, through --backend auto: cached, swept, exported with module-path hooks; SAELens's
    own AutoModelForCausalLM loader, from the member's cfg, reproduces the stored rows."""
    from sae_lens import SAE
    from sae_lens.load_model import load_model

    directory = _save(tmp_path / "granite", "granite", tokenizer)
    store = _generate(tmp_path / "store", text_dir, model_path=str(directory))
    assert store.info["backend"] == "transformers"
    out = tmp_path / "run"
    result = CliRunner().invoke(train_sweep.main, [
        "--cache", str(tmp_path / "store"), "--source", "model.layers.1", "--output_dir", str(out), "--n_models", "1",
        "--batch_size", "64", "--eval_tokens", "300", "--eval_sequences", "2"])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "sweep.json").read_text())
    member = out / summary["members"][0]["dir"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        metadata = SAE.load_from_disk(member).cfg.metadata
    assert metadata.model_class_name == "AutoModelForCausalLM" and metadata.hook_name == "model.layers.1"
    assert metadata.model_name == str(directory.resolve())
    model = load_model(metadata.model_class_name, metadata.model_name, device="cpu",
                       model_from_pretrained_kwargs=metadata.model_from_pretrained_kwargs, hook_names=[metadata.hook_name])
    start = summary["store"]["eval_sequence_start"]
    tokens = torch.from_numpy(store.read_sequences(start, start + 2)).long()
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=[metadata.hook_name])
    sequence, positions = store.read_column("sequence"), store.read_column("positions")
    rows = np.flatnonzero((sequence >= start) & (sequence < start + 2))
    stored = store.read_rows("model.layers.1", 0, store.n_rows)[torch.from_numpy(rows)].float()
    theirs = cache[metadata.hook_name][sequence[rows] - start, positions[rows]].float()
    error = torch.linalg.vector_norm(theirs - stored, dim=-1) / torch.linalg.vector_norm(stored, dim=-1)
    assert error.max() < 2e-3
    row = summary["members"][0]  # evaluated through the same module hooks: spliced CE, both baselines
    assert np.isfinite(row["ce_recovered"]) and np.isfinite(row["kl"]) and row["ce_spliced"] > 0


def test_spliced_losses_through_module_hooks_equal_transformer_lens_spliced_losses():
    """The same splices (an ablation, a scaled output, a transcoder-like output from an input
    recorded earlier in the pass) on the same model: CE and KL through transformers' module hooks
    equal TransformerLens's (unprocessed weights, so the hooked activations are the same)."""
    from transformer_lens import HookedTransformer

    from evaluation.splice import Splice, single, spliced_losses, spliced_losses_hf

    hf = load_for_caching("transformers", "EleutherAI/pythia-70m", None, device="cpu", dtype="float32")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tl = HookedTransformer.from_pretrained_no_processing(TINY_NAME, device="cpu")

    def splices(mlp_out: str, mlp_in: str) -> dict:
        return {"zero": single(mlp_out, lambda x, _: torch.zeros_like(x)),
                "half": single(mlp_out, lambda x, _: 0.5 * x),
                "from_input": Splice(((mlp_out, lambda x, rec, b: 0.3 * rec[mlp_in]),), record=(mlp_in,))}

    sequences = torch.randint(1, 300, (5, 12), generator=torch.Generator().manual_seed(1))
    kwargs = dict(first_pos=1, exclude_tokens=(7,), batch_size=2)
    ours = spliced_losses_hf(hf, sequences, splices("gpt_neox.layers.1.mlp", "gpt_neox.layers.1.post_attention_layernorm"),
                             **kwargs)
    theirs = spliced_losses(tl, sequences, splices("blocks.1.hook_mlp_out", "blocks.1.ln2.hook_normalized"), **kwargs)
    assert ours.keys() == theirs.keys()
    for name in theirs:
        for key, value in theirs[name].items():
            assert ours[name][key] == pytest.approx(value, rel=1e-4, abs=1e-6), (name, key)
    assert ours["zero"]["kl"] > 1e-4 and ours["from_input"]["kl"] > 1e-4  # the splices change the (random) model


def test_a_base_chat_pair_runs_through_transformers_on_identical_tokens(tokenizer, text_dir, tmp_path):
    """Paired models keep their guarantees through transformers: row-aligned sources named by
    label and module path, each model's rows its own hidden states on the same tokens."""
    import transformers

    base = _save(tmp_path / "base", "llama", tokenizer)
    chat = tmp_path / "chat"
    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.1)  # another model with the same tokenizer
    model.save_pretrained(chat)
    tokenizer.save_pretrained(chat)
    store = generate(GenerateConfig(out=str(tmp_path / "store"), dataset=str(text_dir), model_path=str(base),
                                    paired_model_path=str(chat), backend="transformers", layers=(1,), context_length=16,
                                    n_tokens=800, chunk_mb=0.01, chunks_per_block=3, batch_size=8))
    assert [s.name for s in store.sources] == ["base/model.layers.1", "chat/model.layers.1"]
    tokens = torch.from_numpy(store.read_sequences(0, 1)).long()
    sequence, positions = store.read_column("sequence"), store.read_column("positions")
    rows = np.flatnonzero(sequence == 0)
    for label, directory in (("base", base), ("chat", chat)):
        with torch.no_grad():
            hidden = load_hf_model(None, str(directory), device="cpu").model(input_ids=tokens, output_hidden_states=True)
        stored = store.read_rows(f"{label}/model.layers.1", 0, store.n_rows)[torch.from_numpy(rows)].float()
        torch.testing.assert_close(stored, hidden.hidden_states[2][0, positions[rows]], rtol=2e-3, atol=2e-3)


def test_auto_runs_through_transformers_a_directory_transformer_lens_cannot_convert(tokenizer, tmp_path):
    """A GPT-2 saved without `n_ctx` (transformers 5 no longer writes it): TransformerLens's config
    conversion fails on it, so auto loads it through transformers instead of stopping."""
    import transformers

    directory = _save(tmp_path / "gpt2", "gpt2", tokenizer)
    config = transformers.AutoConfig.from_pretrained(directory)
    del config.n_ctx
    config.save_pretrained(directory)
    assert load_for_caching("auto", None, str(directory), device="cpu", dtype="float32").backend == "transformers"
    assert load_for_caching("auto", TINY_NAME, None, device="cpu", dtype="float32").backend == "transformer_lens"
