"""Crosscoders: members reading several sources side by side (base + chat at one layer, or a
stack of layers), their export with per-source normalisation folded in, and the model-diff
analysis: planted shared / base-only / chat-only directions land at relative norms ½, 0 and 1."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

import generate_activations
import train_sweep
from evaluation.model_diff import relative_decoder_norm
from formats.crosscoder import crosscoder_forward, load_crosscoder
from tests.conftest import gen_args
from tests.test_paired import assert_one_line_error, paired_args
from training.dictionary import PENALTIES, Dictionary
from training.members import MemberConfig
from training.ensemble import Ensemble

S, D, N_EACH = 2, 16, 8  # sources, width of each, planted features of each kind


def planted_pairs(seed: int = 0) -> tuple[torch.Tensor, list[str]]:
    """Unit directions in the concatenated space [base | chat]: shared ones have half their norm in
    each model, exclusive ones all of it in one.  → [3·N_EACH, S·D], kinds"""
    g = torch.Generator().manual_seed(seed)
    unit = lambda n: torch.nn.functional.normalize(torch.randn(n, D, generator=g), dim=-1)  # noqa: E731
    zero = torch.zeros(N_EACH, D)
    shared = torch.cat([unit(N_EACH), unit(N_EACH)], dim=1) / 2**0.5
    base_only = torch.cat([unit(N_EACH), zero], dim=1)
    chat_only = torch.cat([zero, unit(N_EACH)], dim=1)
    return torch.cat([shared, base_only, chat_only]), ["shared"] * N_EACH + ["base"] * N_EACH + ["chat"] * N_EACH


def sparse_rows(g: torch.Generator, directions: torch.Tensor, batch: int, p: float = 0.08) -> torch.Tensor:
    n = directions.shape[0]
    codes = torch.rand(batch, n, generator=g) * 2 * (torch.rand(batch, n, generator=g) < p)
    return codes @ directions


def test_planted_shared_and_exclusive_latents_land_at_relative_norms_half_zero_and_one():
    directions, kinds = planted_pairs()
    g = torch.Generator().manual_seed(1)
    # at λ 1e-2 and above, some shared directions split into partly exclusive latents (r 0.15–0.85)
    ensemble = Ensemble([MemberConfig(d_in=D, d_sae=64, arch="crosscoder", n_sources=S, l1_coeff=3e-3, lr=3e-3,
                                      decoder_init_norm=0.08)])
    for _ in range(1500):
        ensemble.step(sparse_rows(g, directions, 256))
    W_dec_FSD = ensemble.dictionary.W_dec[0].detach().view(-1, S, D)
    cosine = torch.nn.functional.normalize(directions, dim=-1) @ torch.nn.functional.normalize(W_dec_FSD.flatten(1), dim=-1).T
    best_cos, best = cosine.max(dim=-1)  # each planted direction's best latent
    assert (best_cos > 0.95).all(), best_cos
    r = relative_decoder_norm(W_dec_FSD, 0, 1)[best]
    by_kind = {kind: r[[i for i, k in enumerate(kinds) if k == kind]] for kind in ("shared", "base", "chat")}
    assert ((by_kind["shared"] > 0.35) & (by_kind["shared"] < 0.65)).float().mean() >= 0.85, by_kind["shared"]
    assert (by_kind["base"] < 0.1).float().mean() >= 0.85, by_kind["base"]
    assert (by_kind["chat"] > 0.9).float().mean() >= 0.85, by_kind["chat"]


def test_crosscoder_penalty_sums_each_latents_per_source_decoder_norms():
    d = Dictionary([MemberConfig(d_in=2, d_sae=2, arch="crosscoder", n_sources=2, l1_coeff=1.0)])
    with torch.no_grad():
        d.W_dec.copy_(torch.tensor([[[3.0, 4.0, 0.0, 1.0], [0.0, 0.0, 1.0, 0.0]]]))  # norms 5+1, 0+1
    f = torch.tensor([[[1.0, 2.0], [0.0, 3.0]]])  # [E, B, F]
    assert PENALTIES["l1_decoder_norm"](d, f, f).item() == pytest.approx(((1 * 6 + 2 * 1) + (3 * 1)) / 2)


def test_crosscoder_decoder_starts_at_the_given_norm_per_source_and_encoder_is_its_transpose():
    d = Dictionary([MemberConfig(d_in=D, d_sae=32, arch="crosscoder", n_sources=3, decoder_init_norm=0.05)])
    norms = d.W_dec[0].detach().view(32, 3, D).norm(dim=-1)
    torch.testing.assert_close(norms, torch.full_like(norms, 0.05))
    torch.testing.assert_close(d.W_enc[0], d.W_dec[0].T)


@pytest.mark.parametrize("arch", ["crosscoder", "batchtopk"])
def test_a_crosscoder_member_equals_it_trained_alone(arch):
    directions, _ = planted_pairs()
    g = torch.Generator().manual_seed(2)
    knob = "l1_coeff" if arch == "crosscoder" else "k"
    configs = [MemberConfig(d_in=D, d_sae=32, arch=arch, n_sources=S, lr=3e-3, seed=e, **{knob: v},
                            grad_clip=0.05 if e == 0 else None) for e, v in enumerate([1e-3, 3e-2] if knob == "l1_coeff" else [2, 6])]
    together = Ensemble(configs, member_chunk=1)
    alone = [Ensemble([c]) for c in configs]
    for _ in range(6):
        x = sparse_rows(g, directions, 32)
        together.step(x)
        for solo in alone:
            solo.step(x)
    for e, solo in enumerate(alone):
        for name, p in solo.dictionary.named_parameters():
            torch.testing.assert_close(dict(together.dictionary.named_parameters())[name][e], p[0], msg=f"{e} {name}")


@pytest.mark.parametrize("arch", ["crosscoder", "batchtopk", "jumprelu"])
def test_folded_export_gives_raw_space_reconstructions_with_one_scale_per_source(arch, tmp_path):
    from tests.conftest import export_for_test

    directions, _ = planted_pairs()
    g = torch.Generator().manual_seed(3)
    ensemble = Ensemble([MemberConfig(d_in=D, d_sae=32, arch=arch, n_sources=S, k=4, lr=3e-3, l1_coeff=1e-2,
                                      threshold_init=0.05)])
    for _ in range(5):
        ensemble.step(sparse_rows(g, directions, 64))
    scales = torch.tensor([2.0, 0.25])
    export_for_test(ensemble, 0, tmp_path / "cc", scales.tolist())
    config, weights = load_crosscoder(tmp_path / "cc")
    x_BSD = sparse_rows(g, directions, 64).view(-1, S, D)
    _, x_hat_raw = crosscoder_forward(config, weights, x_BSD * scales.view(1, S, 1))
    # folding: the raw-space member is s · (the normalised-space member) on x / s, per source
    _, x_hat_normalised = crosscoder_forward(config, {**weights, **_unfolded(weights, scales)}, x_BSD)
    torch.testing.assert_close(x_hat_raw, x_hat_normalised * scales.view(1, S, 1), rtol=1e-4, atol=1e-5)
    if arch != "batchtopk":  # whose export is its inference rule, not the batch rule of training
        with torch.no_grad():
            trained = ensemble.dictionary.reconstruct(x_BSD.flatten(1))[0].view(-1, S, D)
        torch.testing.assert_close(x_hat_normalised, trained, rtol=1e-4, atol=1e-5)


def _unfolded(tensors: dict, scales: torch.Tensor) -> dict:
    """The exported weights with the normalisation taken back out (normalised-space weights)."""
    s_S1 = scales.view(-1, 1)
    return {"W_enc": tensors["W_enc"] * s_S1.unsqueeze(-1), "W_dec": tensors["W_dec"] / s_S1, "b_dec": tensors["b_dec"] / s_S1}


# ---------------------------------------------------------------- end to end on real stores

@pytest.fixture(scope="module")
def paired_store_path(tmp_path_factory, text_dir):
    out = tmp_path_factory.mktemp("cc") / "paired"
    result = CliRunner().invoke(generate_activations.main, paired_args(out, text_dir))
    assert result.exit_code == 0, result.output
    return out


def _sweep(cache, out, *extra) -> list[str]:
    return ["--cache", str(cache), "--output_dir", str(out), "--ratio", "2", "--batch_size", "64", "--lr", "1e-2",
            "--eval_tokens", "300", *extra]


def test_base_chat_crosscoder_trains_exports_and_gets_the_model_diff_analysis(paired_store_path, tmp_path):
    out = tmp_path / "diff"
    sources = "base/blocks.1.hook_resid_post,chat/blocks.1.hook_resid_post"
    result = CliRunner().invoke(train_sweep.main, _sweep(paired_store_path, out, "--sources", sources, "--arch",
                                                         "crosscoder", "--l1_min", "-3", "--l1_max", "-2", "--n_models",
                                                         "2", "--eval_sequences", "3"))
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "sweep.json").read_text())
    assert summary["store"]["sources"] == sources.split(",") and len(summary["store"]["norm_scales"]) == 2
    for row in summary["members"]:
        config, weights = load_crosscoder(out / row["dir"])
        assert [s["label"] for s in config["sources"]] == ["base", "chat"]
        assert config["sources"][1]["model"] == "pythia-160m" and weights["W_dec"].shape == (64, 2, 32)
        assert set(row["per_source"]) == set(sources.split(","))
        for metrics in row["per_source"].values():
            assert 0 <= metrics["fvu"] < 0.3 and "ce_recovered" in metrics and "kl" in metrics
        assert row["ce_recovered"] == pytest.approx(sum(m["ce_recovered"] for m in row["per_source"].values()) / 2)
        diff = json.loads((out / row["dir"] / "diff_summary.json").read_text())
        assert diff["n_latents"] == sum(diff[f"n_{k}"] for k in ("base_only", "chat_only", "shared", "other"))
        assert (out / row["dir"] / "diff.png").stat().st_size > 0 and row["diff"]["n_shared"] == diff["n_shared"]
    clean = summary["eval"]["per_source"]
    assert clean[sources.split(",")[0]]["clean_ce"] != pytest.approx(clean[sources.split(",")[1]]["clean_ce"])


def test_an_acausal_crosscoder_over_a_stack_of_hooks_of_one_model(small_store, tmp_path):
    out = tmp_path / "stack"
    sources = ["blocks.1.hook_resid_post", "blocks.2.hook_mlp_out"]
    result = CliRunner().invoke(train_sweep.main, _sweep(small_store, out, "--sources", *sources, "--arch", "batchtopk",
                                                         "--sweep", "k=2,4", "--eval_sequences", "2"))
    assert result.exit_code == 0, result.output
    rows = json.loads((out / "sweep.json").read_text())["members"]
    config, weights = load_crosscoder(out / rows[0]["dir"])
    assert config["architecture"] == "jumprelu" and "threshold" in weights
    assert [s["hook"] for s in config["sources"]] == sources
    assert all(set(r["per_source"]) == set(sources) for r in rows)


def test_sources_of_different_widths_are_refused(tmp_path, text_dir, wide_twin_dir):
    store = tmp_path / "wide"
    args = gen_args(store, text_dir, **{"--paired_model_path": str(wide_twin_dir), "--n_chunks": "2"})
    result = CliRunner().invoke(generate_activations.main, args)
    assert result.exit_code == 0, result.output
    bad = CliRunner().invoke(train_sweep.main, _sweep(store, tmp_path / "x", "--arch", "crosscoder", "--sources",
                                                      "base/blocks.1.hook_resid_post,chat/blocks.1.hook_resid_post"))
    assert_one_line_error(bad, "one width", "--require_equal_widths")
