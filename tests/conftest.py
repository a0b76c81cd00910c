"""Offline fixtures: a tiny randomly initialised GPT-NeoX saved as `EleutherAI/pythia-70m` in a
temporary Hugging Face cache, a tokenizer trained on the spot, and small text files; a tiny
Qwen2 as `Qwen/Qwen2-0.5B` (RMSNorm). For paired
(base/chat) stores two more: `pythia-160m`, the same tokenizer with other random weights (a
stand-in chat model), and `pythia-410m`, with a tokenizer trained to another vocabulary.

HF_HOME must be set before huggingface_hub is imported (it reads it once), so the cache is
built in `pytest_configure`, before any test module imports transformers.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

TINY_NAME = "pythia-70m"  # TransformerLens alias of EleutherAI/pythia-70m
TINY_LAYERS = 3
TINY_D = 32
TWIN_NAME = "pythia-160m"  # EleutherAI/pythia-160m: the tiny model's tokenizer, other weights
TRAINED_NAME = "pythia-14m"  # EleutherAI/pythia-14m: the tiny model trained briefly on the corpus (its MLPs matter)
OTHER_TOKENIZER_NAME = "pythia-410m"  # EleutherAI/pythia-410m: a different tokenizer
RMS_NAME = "Qwen/Qwen2-0.5B"  # a tiny random Qwen2 (RMSNorm, gated MLP) under a TransformerLens name
WORDS = (
    "sparse dictionary feature latent activation model layer token residual stream decoder encoder "
    "the a of and to in is that it for on with as was by this be are from at or an which"
).split()


def corpus(n_docs: int, seed: int = 0) -> list[str]:
    """Deterministic pseudo-English documents."""
    import random

    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 80))) + "." for _ in range(n_docs)]


def _train_tokenizer(vocab_size: int, corpus_seed: int):
    """A byte-level BPE trained on the pseudo-English corpus; <|endoftext|> is BOS, EOS and UNK."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus(200, seed=corpus_seed), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>"
    )


def save_tiny_model(directory: Path, tokenizer, *, seed: int, d_model: int = TINY_D) -> None:
    """A randomly initialised GPT-NeoX (weights from `seed`) and its tokenizer, as a HF directory."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
    import torch

    torch.manual_seed(seed)
    config = GPTNeoXConfig(
        vocab_size=len(tokenizer), hidden_size=d_model, num_hidden_layers=TINY_LAYERS, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=256, rotary_pct=0.25, bos_token_id=0, eos_token_id=0,
    )
    GPTNeoXForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def save_tiny_qwen2(directory: Path, tokenizer, *, seed: int) -> None:
    """A randomly initialised Qwen2 (RMSNorm with random gains, so that folding them matters)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=TINY_D, intermediate_size=64, num_hidden_layers=TINY_LAYERS,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
                         bos_token_id=0, eos_token_id=0)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def _hub_snapshot(root: Path, repo_id: str) -> Path:
    """An empty snapshot folder laid out as the Hugging Face cache does: models--ORG--NAME/..."""
    repo = root / "hub" / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / "0123456789abcdef"
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123456789abcdef")
    return snapshot


def pytest_configure(config):
    root = Path(tempfile.mkdtemp(prefix="sae-sweep-hf-"))
    config._sae_sweep_hf_root = root
    os.environ["HF_HOME"] = str(root)
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ["SAE_SWEEP_MODEL_CACHE"] = str(root / "sae-sweep-models")  # converted GGUF models, never ~/.cache
    tokenizer = _train_tokenizer(vocab_size=400, corpus_seed=0)
    save_tiny_model(_hub_snapshot(root, "EleutherAI/pythia-70m"), tokenizer, seed=0)
    save_tiny_model(_hub_snapshot(root, "EleutherAI/pythia-160m"), tokenizer, seed=1)
    save_tiny_model(_hub_snapshot(root, "EleutherAI/pythia-410m"), _train_tokenizer(vocab_size=300, corpus_seed=7), seed=2)
    save_tiny_qwen2(_hub_snapshot(root, RMS_NAME), tokenizer, seed=4)
    _hub_snapshot(root, "EleutherAI/pythia-14m")  # filled on first use by the trained_model fixture


def pytest_unconfigure(config):
    shutil.rmtree(getattr(config, "_sae_sweep_hf_root", ""), ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_model_dir(pytestconfig) -> Path:
    """The tiny model's snapshot directory (a plain local HF directory)."""
    return next((pytestconfig._sae_sweep_hf_root / "hub" / "models--EleutherAI--pythia-70m" / "snapshots").iterdir())


@pytest.fixture(scope="session")
def trained_model(pytestconfig, tiny_model_dir) -> str:
    """The tiny model's shape and tokenizer, trained for 300 steps on the pseudo-English corpus
    (~8 s), saved as EleutherAI/pythia-14m in the test HF cache: a model whose MLPs change its
    loss, for replacement-model and suite tests.  → its TransformerLens alias"""
    import torch
    from transformers import AutoTokenizer, GPTNeoXConfig, GPTNeoXForCausalLM

    snapshot = next((pytestconfig._sae_sweep_hf_root / "hub" / "models--EleutherAI--pythia-14m" / "snapshots").iterdir())
    if (snapshot / "config.json").exists():
        return TRAINED_NAME
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = tokenizer(" ".join(corpus(400, seed=11)), return_tensors="pt")["input_ids"][0]
    rows = ids[: len(ids) // 64 * 64].view(-1, 64)
    torch.manual_seed(0)
    config = GPTNeoXConfig(
        vocab_size=len(tokenizer), hidden_size=TINY_D, num_hidden_layers=TINY_LAYERS, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=256, rotary_pct=0.25, bos_token_id=0, eos_token_id=0,
    )
    model = GPTNeoXForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        batch = rows[torch.randint(0, len(rows), (16,), generator=g)]
        loss = model(batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.save_pretrained(snapshot)
    tokenizer.save_pretrained(snapshot)
    return TRAINED_NAME


@pytest.fixture(scope="session")
def wide_twin_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """A local HF directory: the tiny model's tokenizer, d_model 64 instead of 32."""
    from transformers import AutoTokenizer

    directory = tmp_path_factory.mktemp("wide-twin")
    save_tiny_model(directory, AutoTokenizer.from_pretrained(tiny_model_dir), seed=3, d_model=64)
    return directory


@pytest.fixture(scope="session")
def text_dir(tmp_path_factory) -> Path:
    """A folder of .txt documents."""
    folder = tmp_path_factory.mktemp("text")
    for i, doc in enumerate(corpus(60)):
        (folder / f"doc{i:03d}.txt").write_text(doc)
    return folder


@pytest.fixture(scope="session")
def text_jsonl(tmp_path_factory) -> Path:
    """A .jsonl file of {"text": ...} records."""
    import json

    path = tmp_path_factory.mktemp("jsonl") / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"text": doc, "id": i}) for i, doc in enumerate(corpus(60, seed=1))))
    return path


def free_port() -> int:
    """A TCP port on 127.0.0.1 free right now (for torchrun rendezvous and moto's server)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gen_args(out: Path, dataset: Path, **extra) -> list[str]:
    """CLI arguments for a small store of the tiny model."""
    args = {
        "--model": TINY_NAME, "--layers": "1", "--dataset": str(dataset), "--out": str(out),
        "--context_length": "16", "--n_tokens": "3000", "--chunk_mb": "0.01", "--chunks_per_block": "3",
        "--batch_size": "8",
    }
    args.update({k: str(v) for k, v in extra.items()})
    return [item for pair in args.items() for item in pair]


@pytest.fixture(scope="session")
def small_store(tmp_path_factory, text_dir) -> Path:
    """A complete store of layer 1 resid_post and layer 2 mlp_out... of the tiny model."""
    from click.testing import CliRunner

    import generate_activations

    out = tmp_path_factory.mktemp("stores") / "small"
    result = CliRunner().invoke(generate_activations.main, gen_args(out, text_dir) + ["--hooks", "blocks.2.hook_mlp_out"])
    assert result.exit_code == 0, result.output
    return out


def fail_at_call(monkeypatch, owner, name: str, n: int, error: BaseException):
    """Make the n-th call (1-based) of owner.name raise `error`, as if the process died there;
    calls before it run normally. Returns the original, to put back with monkeypatch.setattr."""
    original = getattr(owner, name)
    calls = {"n": 0}

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise error
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, failing)
    return original


TEST_STORE_INFO = {"model_name": "m", "context_length": 8, "prepend_bos": True, "dataset": "d", "exclude_bos": True}
TEST_LOADED_WITH = {"model_class_name": "HookedTransformer", "model_from_pretrained_kwargs": {}}  # how "m" would load


def export_for_test(ensemble, e: int, directory: Path, scale: float | list[float] = 1.0, calibration_rows=None) -> dict:
    """Export member e of `ensemble` through the real writer (training/export.py), with every
    source it reads or writes at normalisation factor `scale` (one per source in order, or one
    for all), as if from a store of model "m" whose sources are its hooks. `calibration_rows`
    (normalised): what TopK transcoders and BatchTopK thresholds are calibrated on."""
    from training.export import ExportContext, export_member

    member = ensemble.members[e]
    if member.spec.activation == "batchtopk" and calibration_rows is not None:
        ensemble.dictionary.calibrate_thresholds_(calibration_rows)  # as the trainer does before exporting
    names = list(dict.fromkeys([*member.input_names(), *member.target_names()]))
    scales = scale if isinstance(scale, (list, tuple)) else [scale] * len(names)
    ctx = ExportContext(info=TEST_STORE_INFO, sources={n: {"model": "m", "hook": f"blocks.0.hook_{n}", "d": 0,
                                                           "loaded_with": TEST_LOADED_WITH} for n in names},
                        scales=dict(zip(names, scales)), calibration_rows=calibration_rows)
    return export_member(directory, ensemble.dictionary, e, ctx)

