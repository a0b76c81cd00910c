"""A random-weight model laid out as a Hugging Face cache entry, for benchmarks without hub access.

    hf_home = build_hf_cache(Path(tmp), PYTHIA_70M_SHAPE)
    use_offline_hf_home(hf_home)          # before transformers / transformer_lens are imported
    load_model("pythia-70m", None, device="cpu")

writes `$HF_HOME/hub/models--EleutherAI--pythia-70m/snapshots/<rev>/` (config, safetensors
weights, tokenizer) and `refs/main`, so TransformerLens finds "pythia-70m" offline through the
ordinary cache lookup. The weights are random (seeded) and the tokenizer is a byte-level BPE
trained in seconds on the standard library's docstrings, so speed and memory match the real
shape; the activations' statistics and the token counts per document do not. Not a
substitute for the real checkpoint anywhere but in a benchmark.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import torch

from cache.text import STDLIB_DOCSTRINGS, iter_documents

HF_REPO_ID = "EleutherAI/pythia-70m"
TL_NAME = "pythia-70m"
_REVISION = "0" * 40  # any commit-hash-shaped string; refs/main points at it
_SPECIAL = "<|endoftext|>"


@dataclass(frozen=True)
class ModelShape:
    """GPT-NeoX hyper-parameters of the stand-in model."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    vocab_size: int
    tokenizer_vocab: int  # BPE vocabulary actually trained (≤ vocab_size)


PYTHIA_70M_SHAPE = ModelShape(512, 6, 8, 2048, 50304, tokenizer_vocab=8192)
TINY_SHAPE = ModelShape(64, 3, 4, 256, 2048, tokenizer_vocab=2048)


def build_hf_cache(hf_home: Path, shape: ModelShape, seed: int = 0, tokenizer_docs: int = 2000) -> Path:
    """Write the stand-in `EleutherAI/pythia-70m` into the HF cache under `hf_home`; return `hf_home`."""
    repo = hf_home / "hub" / ("models--" + HF_REPO_ID.replace("/", "--"))
    snapshot = repo / "snapshots" / _REVISION
    snapshot.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(shape.tokenizer_vocab, tokenizer_docs)
    tokenizer.save_pretrained(str(snapshot))
    random_gpt_neox(shape, tokenizer.bos_token_id, seed).save_pretrained(str(snapshot))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(_REVISION)
    return hf_home


def use_offline_hf_home(hf_home: Path) -> None:
    """Point this process's Hugging Face cache at `hf_home`, offline.

    huggingface_hub reads these when first imported: call before anything imports it.
    """
    os.environ["HF_HOME"] = str(hf_home)
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"


def train_tokenizer(vocab_size: int, n_docs: int):
    """Byte-level BPE on the first `n_docs` stdlib docstrings, "<|endoftext|>" as BOS/EOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[_SPECIAL],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(islice(iter_documents(STDLIB_DOCSTRINGS), n_docs), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=_SPECIAL, eos_token=_SPECIAL, unk_token=_SPECIAL)


def random_gpt_neox(shape: ModelShape, special_id: int, seed: int):
    """A GPT-NeoX causal LM of `shape` with seeded random weights (pythia's other settings)."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    config = GPTNeoXConfig(
        hidden_size=shape.hidden_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        intermediate_size=shape.intermediate_size,
        vocab_size=shape.vocab_size,
        max_position_embeddings=2048,
        rotary_pct=0.25,
        use_parallel_residual=True,
        bos_token_id=special_id,
        eos_token_id=special_id,
    )
    torch.manual_seed(seed)
    return GPTNeoXForCausalLM(config).eval()
