"""Transcoders (read one place, write another) and cross-layer transcoders: planted recovery, the
ensemble invariant, SAELens round trips of the four transcoder architectures, a CLT end to end
on a tiny model (replacement-model CE), and one clear line for each wiring mistake."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import generate_activations
import train_sweep
from formats.saelens import load_saelens, saelens_forward
from tests.conftest import export_for_test, gen_args
from tests.test_end_to_end import assert_one_line_error
from training.ensemble import Ensemble
from training.members import MemberConfig
from training.schedules import Schedule

D_IN, D_OUT, N, H = 32, 24, 12, 16  # planted features live in the first H input dims


def planted_mlp(seed: int = 0):
    """A synthetic MLP: its input holds sparse codes of N directions A (in the first H dims),
    its output a nonlinear sparse code of them, ReLU(c − 1.2) along directions B, plus (with
    `linear`) a dense part z in the other dims mapped linearly by M.  → (batch(n, linear), A, B, M)"""
    g = torch.Generator().manual_seed(seed)
    A = torch.zeros(N, D_IN)
    A[:, :H] = torch.nn.functional.normalize(torch.randn(N, H, generator=g), dim=-1)
    B = torch.nn.functional.normalize(torch.randn(N, D_OUT, generator=g), dim=-1)
    M = torch.zeros(D_IN, D_OUT)
    M[H:] = 0.2 * torch.randn(D_IN - H, D_OUT, generator=g)

    def batch(n: int, linear: bool = False) -> torch.Tensor:
        codes = torch.rand(n, N, generator=g) * 2 * (torch.rand(n, N, generator=g) < 0.15)
        z = torch.zeros(n, D_IN)
        if linear:
            z[:, H:] = 0.5 * torch.randn(n, D_IN - H, generator=g)
        x = codes @ A + z
        y = 3 * torch.relu(codes - 1.2) @ B + z @ M
        return torch.cat([x, y], dim=-1)  # a batch's columns: the input, then the target

    return batch, A, B, M


def transcoder(arch: str, **kw) -> MemberConfig:
    knobs = {"relu": dict(l1_coeff=1e-2), "topk": dict(k=2), "batchtopk": dict(k=2),
             "jumprelu": dict(l0_coeff=1e-3, threshold_init=0.1, bandwidth=0.05)}[arch]
    return MemberConfig(d_in=D_IN, d_out=D_OUT, d_sae=32, arch=arch, inputs=("x",), targets=("y",), lr=3e-3,
                        **{**knobs, **kw})


@pytest.mark.parametrize("arch", ["relu", "topk", "jumprelu"])
def test_a_transcoder_recovers_a_planted_sparse_mlp(arch):
    batch, A, B, _ = planted_mlp()
    ensemble = Ensemble([transcoder(arch)], dead_tokens=2000)
    for _ in range(2000):
        ensemble.step(batch(256))
    d = ensemble.dictionary
    W_dec = torch.nn.functional.normalize(d.W_dec[0].detach(), dim=-1)
    decoder_cos, best = (B @ W_dec.T).max(dim=-1)  # each planted output direction's best latent
    assert decoder_cos.mean() > 0.98 and decoder_cos.min() > 0.95, decoder_cos
    # its encoder reads the feature: the dual direction of A within the span the inputs occupy
    dual = torch.nn.functional.normalize(torch.linalg.pinv(A).T[:, :H], dim=-1)
    W_enc = torch.nn.functional.normalize(d.W_enc[0].detach().T[best, :H], dim=-1)
    assert (dual * W_enc).sum(-1).mean() > 0.75


def test_a_skip_transcoder_learns_the_linear_part_in_w_skip():
    batch, _, B, M = planted_mlp()
    ensemble = Ensemble([transcoder("topk", skip=True)], dead_tokens=2000)
    for _ in range(2000):
        ensemble.step(batch(256, linear=True))
    d = ensemble.dictionary
    W_skip = d.W_skip[0, H:].detach()  # the dense part's rows: only the skip can carry them
    assert (W_skip - M[H:]).norm() / M[H:].norm() < 0.05
    W_dec = torch.nn.functional.normalize(d.W_dec[0].detach(), dim=-1)
    assert (B @ W_dec.T).max(dim=-1).values.mean() > 0.9  # the nonlinear part stays in the dictionary


def _columns(n_layers: int, d: int = 8) -> dict[str, tuple[int, int]]:
    names = [f"in{layer}" for layer in range(n_layers)] + [f"out{layer}" for layer in range(n_layers)]
    return {name: (i * d, d) for i, name in enumerate(names)}


def _clt(arch: str, L: int = 3, **kw) -> MemberConfig:
    knobs = {"jumprelu_tanh": dict(l0_coeff=1e-2, threshold_init=0.05, bandwidth=0.05), "topk": dict(k=3),
             "batchtopk": dict(k=3), "relu": dict(l1_coeff=1e-3)}[arch]
    return MemberConfig(d_in=8, d_sae=16, arch=arch, n_sources=L, inputs=tuple(f"in{layer}" for layer in range(L)),
                        targets=tuple(f"out{layer}" for layer in range(L)), cross_layer=True, lr=3e-3, **{**knobs, **kw})


@pytest.mark.parametrize("kind", ["per-layer transcoders", "clt-jumprelu_tanh", "clt-topk", "clt-batchtopk"])
def test_a_transcoder_or_clt_member_equals_it_trained_alone(kind):
    """Members reading different layers (per-layer transcoders) or all of them (CLTs) in one
    ensemble train exactly as each would alone, schedules and clipping included."""
    g = torch.Generator().manual_seed(3)
    if kind == "per-layer transcoders":
        configs = [MemberConfig(d_in=8, d_sae=16, arch="topk", k=k, inputs=(f"in{layer}",), targets=(f"out{layer}",),
                                lr=3e-3, seed=layer, grad_clip=0.05 if layer == 0 else None)
                   for layer in range(3) for k in (2, 4)]
    else:
        arch = kind.split("-", 1)[1]
        configs = [_clt(arch, seed=e, grad_clip=0.05 if e == 0 else None, **({"k": k} if "topk" in arch else {}))
                   for e, k in enumerate((2, 4))]
    columns = _columns(3)
    together = Ensemble(configs, member_chunk=1, columns=columns, dead_tokens=64)
    alone = [Ensemble([c], columns=columns, dead_tokens=64) for c in configs]
    schedule = Schedule(total_steps=6, lr_warmup_steps=2, sparsity_warmup_steps=3)
    for step in range(6):
        x = torch.randn(32, 48, generator=g)
        for ensemble in (together, *alone):
            schedule.apply_(ensemble, step)
            ensemble.step(x)
    for e, solo in enumerate(alone):
        for name, tensor in solo.dictionary.state_dict().items():
            if name in ("input_index", "target_index"):
                continue
            torch.testing.assert_close(together.dictionary.state_dict()[name][e].float(), tensor[0].float(),
                                       rtol=1e-4, atol=1e-5, msg=f"{kind} member {e}: {name}")


def test_a_clt_decodes_each_layers_features_into_that_layer_and_later_ones_only():
    d = Ensemble([_clt("relu")], columns=_columns(3)).dictionary
    with torch.no_grad():
        d.b_dec.zero_()
    f = torch.zeros(3, 1, 16)  # [U = 1 member × 3 layers, B, F]
    f[1, 0, 5] = 1.0  # one feature of layer 1
    y = d.decode(f)[0, 0].view(3, 8)  # [targets, d]
    assert not y[0].any() and y[1].any() and y[2].any()
    slab = d.slab(1)[0, 5].view(2, 8)  # layer 1 writes layers 1 and 2
    torch.testing.assert_close(y[1:], slab)
    assert d.W_dec.shape == (1, 16, (3 + 2 + 1) * 8)  # L(L+1)/2 blocks, not L²


@pytest.mark.parametrize("arch, skip", [("relu", False), ("relu", True), ("jumprelu", False), ("jumprelu", True)],
                         ids=["transcoder", "skip_transcoder", "jumprelu_transcoder", "jumprelu_skip_transcoder"])
def test_transcoder_exports_load_in_saelens_with_identical_outputs(tmp_path, arch, skip):
    from sae_lens import SAE

    batch, *_ = planted_mlp()
    ensemble = Ensemble([transcoder(arch, skip=skip)], dead_tokens=2000)
    for _ in range(30):
        ensemble.step(batch(128, linear=skip))
    scales = [2.5, 0.4]  # the input's and the target's normalisation factors differ
    record = export_for_test(ensemble, 0, tmp_path / "tc", scales)
    cfg, weights = load_saelens(tmp_path / "tc")
    assert cfg["architecture"] == record["saelens_architecture"] == (("jumprelu_" if arch == "jumprelu" else "")
                                                                      + ("skip_" if skip else "") + "transcoder")
    assert cfg["d_in"] == D_IN and cfg["d_out"] == D_OUT and cfg["apply_b_dec_to_input"] is False
    assert cfg["metadata"]["hook_name"] == "blocks.0.hook_x" and cfg["metadata"]["hook_name_out"] == "blocks.0.hook_y"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sae = SAE.load_from_disk(tmp_path / "tc")
    rows = batch(64, linear=skip)
    x_raw = scales[0] * rows[:, :D_IN]
    _, ours = saelens_forward(cfg, weights, x_raw)
    with torch.no_grad():
        torch.testing.assert_close(sae(x_raw), ours, atol=1e-5, rtol=1e-5)
        # the folded export is the trained member in raw units: s_out · ŷ(x_raw / s_in)
        torch.testing.assert_close(ours, scales[1] * ensemble.dictionary.reconstruct(rows)[0], atol=1e-5, rtol=1e-4)


def test_a_topk_transcoder_exports_as_jumprelu_with_a_calibrated_threshold(tmp_path):
    batch, *_ = planted_mlp()
    ensemble = Ensemble([transcoder("topk", k=3)], dead_tokens=2000)
    for _ in range(200):
        ensemble.step(batch(256))
    calibration = batch(4096)
    record = export_for_test(ensemble, 0, tmp_path / "tc", calibration_rows=calibration)
    cfg, weights = load_saelens(tmp_path / "tc")
    assert cfg["architecture"] == "jumprelu_transcoder" and record["threshold_calibrated_from"] == "topk k=3"
    f, _ = saelens_forward(cfg, weights, batch(4096)[:, :D_IN])
    assert (f > 0).float().sum(-1).mean().item() == pytest.approx(3, rel=0.2)  # k per row on average, held out


# ---------------------------------------------------------------- end to end on a tiny model

@pytest.fixture(scope="module")
def mlp_store(tmp_path_factory, text_dir):
    """Every layer's MLP input (normalised, with its scale), MLP output and attention output."""
    out = tmp_path_factory.mktemp("mlp") / "store"
    args = gen_args(out, text_dir, **{"--layers": "all"}) + ["--hook", "mlp_in_normalized", "mlp_out", "attn_out"]
    result = CliRunner().invoke(generate_activations.main, args)
    assert result.exit_code == 0, result.output
    return out


def _sweep(store, out, *extra):
    args = ["--cache", str(store), "--output_dir", str(out), "--ratio", "2", "--batch_size", "64",
            "--eval_tokens", "400", *extra]
    return CliRunner().invoke(train_sweep.main, args)


def test_the_store_records_each_sources_layer_and_kind_with_the_norm_scale_beside_the_mlp_input(mlp_store):
    from store.zarr_store import ActivationStore

    store = ActivationStore.open(mlp_store)
    kinds = {(s.layer, s.kind): s for s in store.sources}
    for layer in range(3):
        assert {(layer, k) for k in ("mlp_in_normalized", "mlp_in_scale", "mlp_out", "attn_out")} <= set(kinds)
        assert kinds[layer, "mlp_in_scale"].d == 1 and kinds[layer, "mlp_in_normalized"].hook == f"blocks.{layer}.ln2.hook_normalized"


def test_per_layer_transcoders_train_in_one_ensemble_and_export_per_layer_and_as_a_set(mlp_store, tmp_path):
    out = tmp_path / "tc"
    result = _sweep(mlp_store, out, "--transcoder", "--layers", "all", "--arch", "jumprelu", "--sweep",
                    "l0=1e-3,1e-2", "--eval_sequences", "2")
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "sweep.json").read_text())
    names = [r["name"] for r in summary["members"]]
    assert names == ["00_L00_l0_0.001", "01_L00_l0_0.01", "02_L01_l0_0.001", "03_L01_l0_0.01", "04_L02_l0_0.001",
                     "05_L02_l0_0.01"]
    for r in summary["members"]:
        cfg = json.loads((out / r["dir"] / "cfg.json").read_text())
        layer = int(r["name"].split("_L")[1][:2])
        assert cfg["architecture"] == "jumprelu_transcoder"
        assert cfg["metadata"]["hook_name"] == f"blocks.{layer}.ln2.hook_normalized"
        assert cfg["metadata"]["hook_name_out"] == f"blocks.{layer}.hook_mlp_out"
        assert r["targets"] == [f"blocks.{layer}.hook_mlp_out"] and 0 <= r["fvu"] < 1 and np.isfinite(r["ce_spliced"])
    sets = summary["transcoder_sets"]
    assert [s["name"] for s in sets] == ["00_l0_0.001", "01_l0_0.01"] and all(s["loads_in_circuit_tracer"] for s in sets)
    assert sorted(p.name for p in (out / sets[0]["dir"]).iterdir()) == [
        "config.yaml", "layer_0.safetensors", "layer_1.safetensors", "layer_2.safetensors", "sae_sweep.json"]


@pytest.fixture(scope="module")
def trained_mlp_store(trained_model, tmp_path_factory):
    """MLP inputs and outputs of every layer of the briefly trained tiny model (whose MLPs matter)."""
    from tests.conftest import corpus

    text = tmp_path_factory.mktemp("trained-text")
    for i, doc in enumerate(corpus(400, seed=5)):
        (text / f"doc{i:03d}.txt").write_text(doc)
    out = tmp_path_factory.mktemp("trained") / "store"
    args = gen_args(out, text, **{"--model": trained_model, "--layers": "all", "--n_tokens": "16000"})
    result = CliRunner().invoke(generate_activations.main, args + ["--hook", "mlp_in_normalized", "mlp_out"])
    assert result.exit_code == 0, result.output
    return out


def test_an_sae_per_layer_on_one_kind_trains_in_one_ensemble(mlp_store, tmp_path):
    out = tmp_path / "attn"
    result = _sweep(mlp_store, out, "--kind", "attn_out", "--layers", "all", "--arch", "topk", "--k", "4",
                    "--eval_sequences", "0")
    assert result.exit_code == 0, result.output
    rows = json.loads((out / "sweep.json").read_text())["members"]
    assert [r["name"] for r in rows] == ["00_L00", "01_L01", "02_L02"]
    for layer, r in enumerate(rows):
        cfg = json.loads((out / r["dir"] / "cfg.json").read_text())
        assert cfg["architecture"] == "topk" and cfg["metadata"]["hook_name"] == f"blocks.{layer}.hook_attn_out"
        assert r["l0"] == pytest.approx(4, abs=0.5) and r["fvu"] < 1


def test_a_tiny_clt_replaces_every_mlp_better_than_ablating_them(trained_mlp_store, tmp_path):
    out = tmp_path / "clt"
    result = _sweep(trained_mlp_store, out, "--arch", "clt", "--layers", "all", "--l0_coeff", "1e-4", "--n_epochs", "3",
                    "--lr", "3e-3", "--eval_sequences", "32")
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "sweep.json").read_text())
    (row,) = summary["members"]
    replaced = summary["eval"]["replacement_model"]
    # every MLP output replaced at once by the CLT: finite, and far better than ablating them all
    assert np.isfinite(row["ce_spliced"]) and row["ce_spliced"] < replaced["zero_ablation_ce"]
    assert row["ce_recovered"] > 0.5 and "ce_recovered_one_layer_at_a_time" in row
    per_layer_l0 = row["per_layer_l0"]
    assert list(per_layer_l0) == [f"blocks.{layer}.ln2.hook_normalized" for layer in range(3)]
    assert all(0 < l0 < 64 for l0 in per_layer_l0.values()), per_layer_l0  # sparse, and alive at every layer
    assert all(0 <= m["fvu"] < 1 for m in row["per_source"].values())


# ---------------------------------------------------------------- wiring mistakes, one line each

def test_a_transcoder_on_a_store_without_mlp_inputs_is_refused(small_store, tmp_path):
    result = _sweep(small_store, tmp_path / "x", "--transcoder", "--layers", "1")
    assert_one_line_error(result, "no MLP input", "layer 1", "--hook mlp_in_normalized mlp_out")
    assert not (tmp_path / "x").exists()


def test_a_clt_over_non_consecutive_layers_is_refused(mlp_store, tmp_path):
    result = _sweep(mlp_store, tmp_path / "x", "--arch", "clt", "--layers", "0", "2")
    assert_one_line_error(result, "consecutive layers", "0, 2")


def test_targets_of_different_widths_are_refused(tmp_path):
    """A CLT writes one width at every layer: a store whose MLP outputs differ is refused."""
    from store.zarr_store import ActivationStore, RowBlock, SourceInfo

    n, per_seq = 400, 4
    sources = [SourceInfo(f"blocks.{layer}.{hook}", "m", f"blocks.{layer}.{hook}", d, layer, kind)
               for layer in range(2) for hook, kind, d in (("ln2.hook_normalized", "mlp_in_normalized", 8),
                                                             ("hook_mlp_out", "mlp_out", 8 if layer == 0 else 12))]
    store = ActivationStore.create(tmp_path / "s", identity={}, sources=sources, n_rows=n, n_sequences=n // per_seq,
                                   context_length=per_seq, chunk_rows=100, block_rows=n, storage_dtype="float32",
                                   info={"n_layers": 2, "models": [{"label": None}]})
    ids = np.arange(n, dtype=np.int32)
    acts = {s.name: np.random.default_rng(0).normal(size=(n, s.d)).astype(np.float32) for s in sources}
    store.write_block(0, RowBlock(ids, ids % per_seq, ids // per_seq, acts, {s.name: (1.0, 1.0, n) for s in sources},
                               np.zeros((n // per_seq, per_seq), dtype=np.int32)))
    store.finish()
    result = _sweep(tmp_path / "s", tmp_path / "x", "--arch", "clt", "--layers", "all", "--eval_tokens", "40")
    assert_one_line_error(result, "targets of a cross-layer transcoder must have one width", "12")


@pytest.mark.parametrize("member", [
    MemberConfig(d_in=8, d_sae=16),
    MemberConfig(d_in=8, d_sae=16, arch="crosscoder", n_sources=3),
    MemberConfig(d_in=8, d_out=6, d_sae=16, arch="jumprelu", inputs=("x",), targets=("y",), skip=True),
    MemberConfig(d_in=8, d_sae=16, arch="gated"),
    _clt("jumprelu_tanh", L=4),
], ids=["sae", "crosscoder", "jumprelu-skip-transcoder", "gated", "clt"])
def test_the_memory_estimate_counts_exactly_the_parameters_an_ensemble_allocates(member):
    from dataclasses import replace

    from training.memory import parameter_count

    members = [member, replace(member, d_sae=12, seed=1)]
    columns = _columns(4) if member.cross_layer else None
    dictionary = Ensemble(members, columns=columns).dictionary
    assert parameter_count(members) == sum(p.numel() for p in dictionary.parameters())


def test_a_sweep_that_will_not_fit_fails_at_once_with_the_numbers(mlp_store, tmp_path):
    result = _sweep(mlp_store, tmp_path / "huge", "--arch", "clt", "--layers", "all", "--d_sae", "40000000")
    assert_one_line_error(result, "this sweep needs about", "GiB", "free", "fewer latents")
    assert not (tmp_path / "huge").exists()



@pytest.mark.parametrize("arch, skip", [("topk", False), ("jumprelu", True)])
def test_loading_an_exports_tensors_is_the_inverse_of_the_fold(arch, skip):
    batch, *_ = planted_mlp()
    trained = Ensemble([transcoder(arch, skip=skip)], dead_tokens=2000)
    for _ in range(20):
        trained.step(batch(64, linear=skip))
    fresh = Ensemble([transcoder(arch, skip=skip, seed=5)], dead_tokens=2000)
    fresh.dictionary.load_member_tensors_(0, trained.dictionary.member_tensors(0, 2.5, 0.4), 2.5, 0.4)
    for name, p in trained.dictionary.named_parameters():
        torch.testing.assert_close(dict(fresh.dictionary.named_parameters())[name], p, rtol=1e-6, atol=1e-6, msg=name)
