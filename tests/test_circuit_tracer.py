"""Transcoder sets and cross-layer transcoders load in circuit-tracer 0.5 with its own loader
(`load_transcoder_from_hub(<absolute dir>)`), and its encode/decode give what the trained members
give. circuit-tracer pins transformers ≤ 4.57.3, which TransformerLens 3 cannot share, so it runs
in an environment of its own: created on first use at $SAE_SWEEP_CIRCUIT_TRACER_ENV (default
~/.cache/sae-sweep/circuit-tracer-0.5.0) and reused; skipped, saying so, only when the package
registry cannot be reached."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from formats import circuit_tracer
from training.ensemble import Ensemble
from training.export import ExportContext, export_member, save_transcoder_set
from training.members import MemberConfig
from tests.conftest import TEST_LOADED_WITH, TEST_STORE_INFO

PROBE = Path(__file__).parent / "interop" / "circuit_tracer_probe.py"
L, D, F = 3, 8, 16
NETWORK_FAILURES = ("Failed to establish a new connection", "Temporary failure in name resolution",
                    "Network is unreachable", "Connection refused", "Max retries exceeded", "ConnectTimeout")


@pytest.fixture(scope="session")
def circuit_tracer_python() -> Path:
    env = Path(os.environ.get("SAE_SWEEP_CIRCUIT_TRACER_ENV", Path.home() / ".cache" / "sae-sweep" / "circuit-tracer-0.5.0"))
    python = env / "bin" / "python"
    if not (env / ".ready").exists():
        steps = [[sys.executable, "-m", "venv", str(env)],
                 [str(python), "-m", "pip", "install", "-q", "torch==2.13.0"],
                 [str(python), "-m", "pip", "install", "-q", "circuit-tracer==0.5.0"]]
        for step in steps:
            done = subprocess.run(step, capture_output=True, text=True)
            if done.returncode != 0:
                said = done.stdout + done.stderr
                if any(failure in said for failure in NETWORK_FAILURES):
                    pytest.skip(f"circuit-tracer's environment cannot be installed: the package registry is unreachable ({said.strip().splitlines()[-1]})")
                pytest.fail(f"installing circuit-tracer's environment failed: {' '.join(step)}\n{said}")
        (env / ".ready").touch()
    return python


def _columns() -> dict[str, tuple[int, int]]:
    names = [f"in{layer}" for layer in range(L)] + [f"out{layer}" for layer in range(L)]
    return {name: (i * D, D) for i, name in enumerate(names)}


def _context(scales: dict[str, float], rows=None) -> ExportContext:
    sources = {}
    for layer in range(L):
        sources[f"in{layer}"] = {"model": "m", "hook": f"blocks.{layer}.ln2.hook_normalized", "d": D, "layer": layer,
                                 "loaded_with": TEST_LOADED_WITH}
        sources[f"out{layer}"] = {"model": "m", "hook": f"blocks.{layer}.hook_mlp_out", "d": D, "layer": layer,
                                  "loaded_with": TEST_LOADED_WITH}
    return ExportContext(info={**TEST_STORE_INFO, "n_layers": L}, sources=sources, scales=scales, calibration_rows=rows)


def _train(members: list[MemberConfig], steps: int = 40) -> tuple[Ensemble, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ensemble = Ensemble(members, columns=_columns(), dead_tokens=10_000)
    for _ in range(steps):
        ensemble.step(torch.randn(64, 2 * L * D, generator=g))
    return ensemble, torch.randn(32, 2 * L * D, generator=g)


def _probe(python: Path, directory: Path, x_LBd: torch.Tensor, tmp_path: Path) -> tuple[dict, torch.Tensor, torch.Tensor]:
    save_file({"x": x_LBd.contiguous()}, tmp_path / "inputs.safetensors")
    request = {"dir": str(directory.resolve()), "inputs": str(tmp_path / "inputs.safetensors"),
               "outputs": str(tmp_path / "outputs.safetensors")}
    (tmp_path / "request.json").write_text(json.dumps(request))
    done = subprocess.run([str(python), str(PROBE), str(tmp_path / "request.json")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    out = load_file(tmp_path / "outputs.safetensors")
    return json.loads(done.stdout.strip().splitlines()[-1]), out["f"], out["y"]


SCALES = {**{f"in{layer}": 1.0 + 0.5 * layer for layer in range(L)}, **{f"out{layer}": 0.1 * (layer + 1) for layer in range(L)}}


@pytest.mark.parametrize("arch, skip", [("relu", False), ("jumprelu", False), ("relu", True), ("topk", False)],
                         ids=["relu", "jumprelu", "relu-skip", "topk-as-calibrated-jumprelu"])
def test_a_transcoder_set_loads_in_circuit_tracer_with_identical_outputs(circuit_tracer_python, tmp_path, arch, skip):
    knobs = {"relu": dict(l1_coeff=1e-3), "jumprelu": dict(l0_coeff=1e-3, threshold_init=0.1, bandwidth=0.1),
             "topk": dict(k=4)}[arch]
    members = [MemberConfig(d_in=D, d_sae=F, arch=arch, inputs=(f"in{layer}",), targets=(f"out{layer}",), skip=skip,
                            lr=3e-3, seed=layer, **knobs) for layer in range(L)]
    ensemble, rows = _train(members)
    ctx = _context(SCALES, rows=rows)
    info = save_transcoder_set(tmp_path / "set", ensemble.dictionary, {layer: layer for layer in range(L)}, ctx, {})
    assert info["loads_in_circuit_tracer"]
    x_BC = rows * torch.tensor([SCALES[n] for n in _columns() for _ in range(D)])  # raw units
    x_LBd = x_BC[:, : L * D].view(-1, L, D).transpose(0, 1)
    loaded, f, y = _probe(circuit_tracer_python, tmp_path / "set", x_LBd, tmp_path)
    assert loaded == {"model_kind": "transcoder_set", "n_layers": L,
                      "activation": "function" if arch == "relu" else "JumpReLU",
                      "feature_input_hook": "ln2.hook_normalized", "feature_output_hook": "hook_mlp_out"}
    config, layers = circuit_tracer.load(tmp_path / "set")
    ours_f, ours_y = circuit_tracer.forward(config, layers, x_LBd.transpose(0, 1))
    torch.testing.assert_close(f.transpose(0, 1).flatten(1), ours_f, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y.transpose(0, 1).flatten(1), ours_y, atol=1e-5, rtol=1e-5)
    if arch != "topk":  # the exported member is the trained one, in raw units
        with torch.no_grad():
            trained = torch.cat([ensemble.dictionary.reconstruct(rows)[e] * SCALES[f"out{e}"] for e in range(L)], dim=-1)
        torch.testing.assert_close(ours_y, trained, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", ["relu", "jumprelu_tanh", "batchtopk"])
def test_a_cross_layer_transcoder_loads_in_circuit_tracer_with_identical_outputs(circuit_tracer_python, tmp_path, arch):
    knobs = {"relu": dict(l1_coeff=1e-3), "jumprelu_tanh": dict(l0_coeff=1e-3, threshold_init=0.1, bandwidth=0.1),
             "batchtopk": dict(k=4)}[arch]
    member = MemberConfig(d_in=D, d_sae=F, arch=arch, n_sources=L, inputs=tuple(f"in{layer}" for layer in range(L)),
                          targets=tuple(f"out{layer}" for layer in range(L)), cross_layer=True, lr=3e-3, **knobs)
    ensemble, rows = _train([member])
    record = export_member(tmp_path / "clt", ensemble.dictionary, 0, _context(SCALES))
    assert record["format"] == "circuit_tracer_clt" and record["loads_in_circuit_tracer"]
    x_BC = rows * torch.tensor([SCALES[n] for n in _columns() for _ in range(D)])
    x_LBd = x_BC[:, : L * D].view(-1, L, D).transpose(0, 1)
    loaded, f, y = _probe(circuit_tracer_python, tmp_path / "clt", x_LBd, tmp_path)
    assert loaded["model_kind"] == "cross_layer_transcoder" and loaded["n_layers"] == L
    assert loaded["activation"] == ("function" if arch == "relu" else "JumpReLU")
    config, layers = circuit_tracer.load(tmp_path / "clt")
    ours_f, ours_y = circuit_tracer.forward(config, layers, x_LBd.transpose(0, 1))
    torch.testing.assert_close(f.transpose(0, 1).flatten(1), ours_f, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y.transpose(0, 1).flatten(1), ours_y, atol=1e-5, rtol=1e-5)
    if arch != "batchtopk":  # whose export is its inference threshold, not the batch rule of training
        with torch.no_grad():
            trained = ensemble.dictionary.reconstruct(rows)[0].view(-1, L, D)
        scale_out = torch.tensor([SCALES[f"out{layer}"] for layer in range(L)]).view(1, L, 1)
        torch.testing.assert_close(ours_y.view(-1, L, D), trained * scale_out, atol=1e-5, rtol=1e-4)
