"""Stage 1: text → token sequences, model and hook resolution, the store, resume."""
from __future__ import annotations

import os
import socket
import subprocess

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import generate_activations
from cache.config import GenerateConfig
from cache.generate import generate
from cache.models import load_model, resolve_hooks, stop_layer
from store.zarr_store import ActivationStore, from_storage, to_storage
from cache.text import iter_documents, token_sequences
from tests.conftest import TINY_LAYERS, TINY_NAME, fail_at_call, gen_args


def test_token_sequences_join_documents_with_eos_and_start_rows_with_bos():
    docs = ["a b c", "d e", "f g h i"]
    tokenize = lambda texts: [[ord(w) for w in t.split()] for t in texts]  # noqa: E731
    rows = list(token_sequences(docs, tokenize, context_length=4, bos_id=0, eos_id=1))
    a, b, c, d, e, f, g, h, i = (ord(x) for x in "abcdefghi")
    # stream: a b c EOS d e EOS f g h i EOS → rows of 3 text tokens after BOS; the tail is dropped
    assert [r.tolist() for r in rows] == [[0, a, b, c], [0, 1, d, e], [0, 1, f, g], [0, h, i, 1]]
    rows = list(token_sequences(docs, tokenize, context_length=3, bos_id=None, eos_id=None))
    assert [r.tolist() for r in rows] == [[a, b, c], [d, e, f], [g, h, i]]


def test_local_sources_read_through_files_folders_and_datasets(text_dir, text_jsonl):
    from_folder = list(iter_documents(str(text_dir)))
    assert len(from_folder) == 60 and from_folder[0] == (text_dir / "doc000.txt").read_text()
    from_jsonl = list(iter_documents(str(text_jsonl)))
    assert len(from_jsonl) == 60 and all(isinstance(t, str) and t for t in from_jsonl)
    assert next(iter_documents("stdlib-docstrings")).strip()


def test_model_loads_by_name_from_the_hf_cache_and_from_a_local_directory(tiny_model_dir):
    by_name = load_model(TINY_NAME, None, device="cpu")
    by_path = load_model(None, str(tiny_model_dir), device="cpu")
    tokens = torch.randint(0, by_name.cfg.d_vocab, (2, 10))
    assert by_name.cfg.n_layers == TINY_LAYERS
    torch.testing.assert_close(by_name(tokens), by_path(tokens))


def _every_hook(model, tokens) -> dict:
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens)
    return {"logits": logits, **dict(cache.items())}


def test_the_lean_load_gives_transformer_lens_own_model_bit_for_bit(tiny_model_dir, tmp_path, monkeypatch):
    """cache/lean_load.py changes where weights live while loading, never what they are: every
    hook and the logits equal HookedTransformer.from_pretrained's, for GPT-NeoX, for a GPT-2
    with tied embeddings (whose untying the no-copy processing must not corrupt), and for a
    Llama (RMSNorm, its own unembedding: the norm is folded into W_U in place)."""
    from transformer_lens import HookedTransformer
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(3)
    gpt2_dir, llama_dir = tmp_path / "gpt2", tmp_path / "rms"  # TransformerLens reads "llama" in a path as Meta's own checkpoints
    GPT2LMHeadModel(GPT2Config(vocab_size=400, n_positions=64, n_ctx=64, n_embd=32, n_layer=2, n_head=4,
                               tie_word_embeddings=True)).save_pretrained(gpt2_dir)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                         tie_word_embeddings=False))
    with torch.no_grad():
        for norm in (p for p in llama.parameters() if p.dim() == 1):
            norm.add_(0.1 * torch.randn_like(norm))  # norms away from 1, so that folding them matters
    llama.save_pretrained(llama_dir)
    for directory in (gpt2_dir, llama_dir):
        AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(directory)
    import cache.lean_load
    from cache.models import _from_local_dir

    monkeypatch.setattr(cache.lean_load, "META_MIN_ELEMENTS", 2000)  # the tiny models' weights go to meta too
    folded_in_place, sole = [], cache.lean_load._sole_unembedding

    def spied(state_dict):
        found = sole(state_dict)
        folded_in_place.append(len(found))
        return found

    monkeypatch.setattr(cache.lean_load, "_sole_unembedding", spied)

    def plain(name, directory):  # the same two paths with TransformerLens's own class
        hf, tokenizer = AutoModelForCausalLM.from_pretrained(directory), AutoTokenizer.from_pretrained(directory)
        if name is None:
            return _from_local_dir(HookedTransformer, directory, hf, tokenizer, "cpu", "float32")
        return HookedTransformer.from_pretrained(name, hf_model=hf, tokenizer=tokenizer, device="cpu")

    for name, directory in ((TINY_NAME, tiny_model_dir), (None, gpt2_dir), (None, llama_dir)):
        ours, theirs = load_model(name, str(directory), device="cpu"), plain(name, directory)
        assert not any(p.is_meta for p in ours.parameters())
        tokens = torch.randint(0, 400, (2, 12), generator=torch.Generator().manual_seed(1))
        a, b = _every_hook(ours, tokens), _every_hook(theirs, tokens)
        assert a.keys() == b.keys()
        for key in b:
            assert torch.equal(a[key], b[key]), (name, key)
    assert folded_in_place == [0, 0, 1]  # LayerNorm biases (GPT-NeoX), W_U tied to W_E (GPT-2), in place (Llama)


def test_a_kept_converted_model_loads_bit_for_bit_once_whatever_the_writers_or_the_disk(tiny_model_dir, tmp_path,
                                                                                       monkeypatch, capsys):
    """cache/converted.py: the kept model gives every hook of the model it was saved from; a
    second writer leaves the first entry whole; a disk without room keeps nothing and says so;
    the key follows the file and the dtype; SAE_SWEEP_MODEL_CACHE=off keeps nothing; a killed
    writer's temporary directory is removed by the next writer."""
    import shutil as shutil_

    from cache import converted

    monkeypatch.setenv("SAE_SWEEP_MODEL_CACHE", str(tmp_path / "kept"))
    model = load_model(None, str(tiny_model_dir), device="cpu")
    source = tmp_path / "tiny.gguf"
    source.write_bytes(b"GGUF stand-in")
    entry = converted.entry_for(source, TINY_NAME, "float32")
    assert converted.load_converted(entry, "cpu") is None  # nothing kept yet
    converted.save_converted(model, entry)
    assert "kept the converted model" in capsys.readouterr().err
    again = converted.load_converted(entry, "cpu")
    assert not any(p.is_meta for p in again.parameters()) and again.cfg.to_dict() == model.cfg.to_dict()
    strides = {k: v.stride() for k, v in model.state_dict().items()}
    assert {k: v.stride() for k, v in again.state_dict().items()} == strides  # the HF layout kept (speed)
    assert any(s[-1] != 1 for s in strides.values())  # there were transposed weights to keep
    tokens = torch.randint(0, model.cfg.d_vocab, (2, 12), generator=torch.Generator().manual_seed(2))
    a, b = _every_hook(again, tokens), _every_hook(model, tokens)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in b)
    assert again.to_tokens("a b c").tolist() == model.to_tokens("a b c").tolist()

    written = (entry / converted.WEIGHTS).stat().st_mtime_ns
    converted.save_converted(model, entry)  # a second writer, finishing after the first
    assert (entry / converted.WEIGHTS).stat().st_mtime_ns == written
    assert [p.name for p in entry.parent.iterdir()] == [entry.name]  # no partial entry left

    finished = subprocess.Popen(["true"])
    finished.wait()
    host = socket.gethostname()
    left = {who: entry.with_name(f"{entry.name}.partial-{who}") for who in
            (f"{host}-{finished.pid}", f"{host}-{os.getppid()}", f"elsewhere-{finished.pid}")}
    for partial in left.values():
        partial.mkdir()
        (partial / converted.WEIGHTS).write_bytes(b"half")
    converted.save_converted(model, entry)  # a killed writer's directory goes; a live or remote one's stays
    assert {who for who, partial in left.items() if partial.exists()} == {f"{host}-{os.getppid()}", f"elsewhere-{finished.pid}"}

    other = converted.entry_for(source, TINY_NAME, "bfloat16")
    monkeypatch.setattr(shutil_, "disk_usage", lambda path: shutil_._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    converted.save_converted(model, other)
    assert "not keeping the converted model" in capsys.readouterr().err and not other.exists()
    assert other != entry
    source.write_bytes(b"GGUF stand-in, changed")
    assert converted.entry_for(source, TINY_NAME, "float32") != entry
    monkeypatch.setenv("SAE_SWEEP_MODEL_CACHE", "off")
    assert converted.entry_for(source, TINY_NAME, "float32") is None


def test_hooks_resolve_from_layers_and_names_and_stop_after_the_deepest_layer():
    model = load_model(TINY_NAME, None, device="cpu")
    hooks = resolve_hooks(model, (0, 2), "mlp_out", ("blocks.1.hook_resid_post",))
    assert hooks == ["blocks.0.hook_mlp_out", "blocks.2.hook_mlp_out", "blocks.1.hook_resid_post"]
    assert stop_layer(hooks) == 3
    assert stop_layer(["blocks.0.hook_resid_pre"]) == 1
    assert stop_layer(["ln_final.hook_normalized"]) is None
    assert resolve_hooks(model, (1,), "mlp_in", ()) == ["blocks.1.hook_mlp_in"]


def test_storage_dtypes_round_trip():
    x = torch.randn(5, 3)
    for dtype in ("float16", "bfloat16", "float32"):
        back = from_storage(to_storage(x, dtype), dtype).float()
        torch.testing.assert_close(back, x.to(getattr(torch, dtype)).float())


def test_store_rows_are_the_model_activations_of_their_tokens(small_store, tmp_path):
    """Every stored row equals the activation recomputed from its (sequence, position)."""
    store = ActivationStore.open(small_store)
    assert store.complete and [s.name for s in store.sources] == ["blocks.1.hook_resid_post", "blocks.2.hook_mlp_out"]
    model = load_model(TINY_NAME, None, device="cpu")
    rows = np.arange(0, store.n_rows, 97)
    seq = store.read_column("sequence")[rows]
    pos = store.read_column("positions")[rows]
    sequences = torch.from_numpy(store.read_sequences(0, store.attrs["n_sequences"])).long()
    assert (store.read_column("tokens")[rows] == sequences[seq, pos].numpy()).all()
    _, cache = model.run_with_cache(sequences[seq], names_filter=lambda n: n in ("blocks.1.hook_resid_post", "blocks.2.hook_mlp_out"))
    for name in ("blocks.1.hook_resid_post", "blocks.2.hook_mlp_out"):
        expected = cache[name][torch.arange(len(rows)), torch.from_numpy(pos).long()]
        stored = torch.stack([store.read_rows(name, r, r + 1)[0].float() for r in rows])
        torch.testing.assert_close(stored, expected.half().float())


def test_rows_are_shuffled_across_sequences_and_norm_scale_matches_the_data(small_store):
    store = ActivationStore.open(small_store)
    seq = store.read_column("sequence", 0, store.chunk_rows)
    rows_per_seq = store.n_rows // store.attrs["n_sequences"]
    # an unshuffled chunk holds chunk_rows / rows_per_seq whole sequences; a chunk drawn from a
    # shuffled block of 3 chunks touches nearly every sequence of the block (≈ 3×)
    assert len(np.unique(seq)) > 2 * store.chunk_rows / rows_per_seq
    assert not (np.diff(seq) >= 0).all() and not (np.diff(store.read_column("positions", 0, 50)) >= 0).all()
    name = "blocks.1.hook_resid_post"
    x = store.read_rows(name, 0, store.n_rows).double()
    expected = x.norm(dim=1).mean().item() / np.sqrt(x.shape[1])
    assert store.norm_scale(name) == pytest.approx(expected, rel=2e-3)  # fp16 storage vs fp32 sums


def test_bos_rows_are_excluded_when_asked(tmp_path, text_dir):
    out = tmp_path / "bos"
    result = CliRunner().invoke(generate_activations.main, gen_args(out, text_dir) + ["--prepend_bos"])
    assert result.exit_code == 0, result.output
    store = ActivationStore.open(out)
    positions = store.read_column("positions")
    assert positions.min() == 1 and positions.max() == 15
    assert (store.read_sequences(0, 5)[:, 0] == store.info["bos_token_id"]).all()
    assert store.info["exclude_bos"] is True


def store_digest(path) -> dict[str, str]:
    """sha256 of every file of a local store, by relative path."""
    import hashlib
    from pathlib import Path

    root = Path(path)
    return {str(f.relative_to(root)): hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(root.rglob("*")) if f.is_file()}


def assert_identical_stores(a: ActivationStore, b: ActivationStore) -> None:
    """Byte-identical files (for local stores); every array and the normalisation attributes equal."""
    if not a.location.remote and not b.location.remote:
        assert store_digest(a.path) == store_digest(b.path)
    assert a.n_rows == b.n_rows and a.attrs["norm_scale"] == b.attrs["norm_scale"]
    assert a.attrs["norm_sums"] == b.attrs["norm_sums"]
    for name in ("tokens", "positions", "sequence"):
        assert (a.read_column(name) == b.read_column(name)).all()
    n = a.attrs["n_sequences"]
    assert n == b.attrs["n_sequences"] and (a.read_sequences(0, n) == b.read_sequences(0, n)).all()
    for source in a.sources:
        assert torch.equal(a.read_rows(source.name, 0, a.n_rows), b.read_rows(source.name, 0, b.n_rows))


@pytest.mark.parametrize("where", ["before a block", "inside a block"])
def test_interrupted_generation_resumes_to_an_identical_store(tmp_path, text_dir, monkeypatch, where):
    """Killed before the third block starts writing, or after its data is on disk but before its
    progress is recorded: the rerun rewrites that block and the store is identical."""
    args = gen_args(tmp_path / "full", text_dir)
    assert CliRunner().invoke(generate_activations.main, args).exit_code == 0
    crashed = tmp_path / "crashed"
    method = "write_block" if where == "before a block" else "_record"
    original = fail_at_call(monkeypatch, ActivationStore, method, 3, KeyboardInterrupt())  # after 2 blocks
    result = CliRunner().invoke(generate_activations.main, gen_args(crashed, text_dir))
    assert result.exit_code == 130 and "rerun the same command" in result.output
    partial = ActivationStore.open(crashed, allow_incomplete=True)
    assert not partial.complete and partial.rows_written == 2 * partial.block_rows
    monkeypatch.setattr(ActivationStore, method, original)
    assert CliRunner().invoke(generate_activations.main, gen_args(crashed, text_dir)).exit_code == 0
    assert_identical_stores(ActivationStore.open(tmp_path / "full"), ActivationStore.open(crashed))
    # a complete store is a no-op
    again = CliRunner().invoke(generate_activations.main, gen_args(crashed, text_dir))
    assert again.exit_code == 0 and "nothing to do" in again.output


def test_memory_is_bounded_by_the_block_not_the_run(tmp_path, text_dir, monkeypatch):
    """The writer never holds more than one block of sequences."""
    import cache.generate as gen

    seen = []
    original = gen._block_rows

    def spy(*args):
        rows = original(*args)
        seen.append(0 if rows is None else len(rows.sequences))
        return rows

    monkeypatch.setattr(gen, "_block_rows", spy)
    cfg = GenerateConfig(out=str(tmp_path / "s"), model=TINY_NAME, layers=(1,), dataset=str(text_dir),
                         context_length=16, n_tokens=3000, chunk_mb=0.01, chunks_per_block=2)
    store = generate(cfg)
    seqs_per_block = store.block_rows // 16
    assert len(seen) > 2 and max(seen) == seqs_per_block


def test_forward_batch_size_does_not_change_the_store(tmp_path, text_dir):
    """batch_size is a runtime knob: a resume may change it, so rows must not depend on it."""
    stores = []
    for size in (3, 8):
        out = tmp_path / f"b{size}"
        assert CliRunner().invoke(generate_activations.main, gen_args(out, text_dir, **{"--batch_size": size})).exit_code == 0
        stores.append(ActivationStore.open(out))
    a, b = stores
    for name in ("tokens", "positions", "sequence"):
        assert (a.read_column(name) == b.read_column(name)).all()
    torch.testing.assert_close(a.read_rows("blocks.1.hook_resid_post", 0, a.n_rows).float(),
                               b.read_rows("blocks.1.hook_resid_post", 0, b.n_rows).float(), atol=2e-3, rtol=2e-3)


def test_the_evaluation_estimate_counts_a_kept_model_once_and_a_converted_one_at_its_load_peak(monkeypatch):
    """evaluation.memory.memory_needed: a GGUF model kept converted is assigned (its weights, once);
    one still to convert costs MODEL_LOAD_FACTOR × its weights while it loads."""
    from types import SimpleNamespace

    from evaluation import memory
    from evaluation.config import EvalConfig

    store = SimpleNamespace(info={"models": [{"model": TINY_NAME, "model_path": "m.gguf", "n_parameters": 10**9}],
                                  "d_model": 64},
                            attrs={"context_length": 16}, identity={"model_dtype": "bfloat16"})
    cfg = EvalConfig(run_dir="run", n_sequences=8, batch_size=8)
    asked = []
    for kept, load in ((False, memory.MODEL_LOAD_FACTOR * 4e9), (True, 4e9)):
        monkeypatch.setattr(memory, "converted_model_kept",
                            lambda name, path, dtype, kept=kept: asked.append(dtype) or kept)
        needed = memory.memory_needed(store, cfg, member_parameters=1000)
        assert needed >= 4000 + load and (kept or needed == 4000 + int(load)), (kept, needed)
    assert asked == ["bfloat16", "bfloat16"]  # the kept entry looked up in the store's model dtype
    assert memory.memory_needed(store, EvalConfig(run_dir="run", n_sequences=0), 1000) == 4000
