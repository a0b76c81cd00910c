"""Crosscoder directory format, forward pass and model-diff analysis: round trips, hand-computed
answers, load errors, and band counts on planted decoder rows."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from evaluation.model_diff import (
    DiffThresholds,
    decoder_cosine,
    diff_summary,
    relative_decoder_norm,
    source_norm_fractions,
    write_diff_analysis,
)
from formats.crosscoder import (
    CROSSCODER_FORMAT,
    CROSSCODER_FORMAT_VERSION,
    crosscoder_forward,
    is_crosscoder_dir,
    load_crosscoder,
    save_crosscoder,
)

HOOK = "blocks.1.hook_resid_post"


def make_config(arch: str = "relu", d_in: int = 4, d_sae: int = 6, labels=("base", "chat"), **extra) -> dict:
    sources = [{"name": f"{label}/{HOOK}", "model": f"model-{label}", "hook": HOOK, "label": label} for label in labels]
    config = {"architecture": arch, "apply_b_dec_to_input": False, "n_sources": len(labels), "d_in": d_in,
              "d_sae": d_sae, "sources": sources, **extra}
    if arch == "topk":
        config.setdefault("k", 2)
    return config


def random_weights(config: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    S, D, M = config["n_sources"], config["d_in"], config["d_sae"]
    w = {"W_enc": torch.randn(S, D, M, generator=g), "b_enc": torch.randn(M, generator=g),
         "W_dec": torch.randn(M, S, D, generator=g), "b_dec": torch.randn(S, D, generator=g)}
    if config["architecture"] == "jumprelu":
        w["threshold"] = torch.rand(M, generator=g)
    return w


def hand_weights() -> dict[str, torch.Tensor]:
    """S=2, D=2, M=3, worked through by hand in test_forward_known_answer."""
    return {
        "W_enc": torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]],     # source 0
                               [[0.0, 0.0, 1.0], [0.0, -1.0, 1.0]]]),  # source 1
        "b_enc": torch.tensor([0.0, 0.5, -1.0]),
        "W_dec": torch.tensor([[[1.0, 0.0], [0.0, 0.0]],    # latent 0: source 0 only
                               [[5.0, 5.0], [5.0, 5.0]],    # latent 1: never fires here
                               [[0.5, 0.0], [0.0, 1.0]]]),  # latent 2: both sources
        "b_dec": torch.tensor([[0.1, 0.0], [0.0, -0.2]]),
    }


X_HAND = torch.tensor([[[2.0, -1.0], [1.0, 3.0]]])  # one row: x_0 = (2, −1), x_1 = (1, 3)


@pytest.mark.parametrize("arch", ["relu", "jumprelu", "topk"])
def test_save_load_forward_round_trip(tmp_path, arch):
    config = make_config(arch, sae_sweep={"member": 3, "l1_coeff": 0.5}, normalisation={"scale": [1.5, 2.0]})
    w = random_weights(config)
    save_crosscoder(tmp_path / "cc", w, config)
    loaded_config, loaded = load_crosscoder(tmp_path / "cc")
    assert loaded_config == {"format": CROSSCODER_FORMAT, "format_version": CROSSCODER_FORMAT_VERSION, **config}
    assert set(loaded) == set(w) and all(torch.equal(loaded[k], w[k]) for k in w)
    x_BSD = torch.randn(16, 2, 4, generator=torch.Generator().manual_seed(1))
    f_ref, x_hat_ref = crosscoder_forward(config, w, x_BSD)
    f, x_hat = crosscoder_forward(loaded_config, loaded, x_BSD)
    assert torch.equal(f, f_ref) and torch.equal(x_hat, x_hat_ref)
    assert f.shape == (16, 6) and x_hat.shape == (16, 2, 4)
    assert (f > 0).any() and (f == 0).any()
    if arch == "topk":
        assert ((f != 0).sum(-1) <= 2).all()
    assert is_crosscoder_dir(tmp_path / "cc") and not is_crosscoder_dir(tmp_path)


def test_forward_known_answer():
    config = make_config("relu", d_in=2, d_sae=3)
    # pre = x_0 W_enc[0] + x_1 W_enc[1] + b_enc = (2, −1, 0) + (0, −3, 4) + (0, 0.5, −1) = (2, −3.5, 3)
    f, x_hat = crosscoder_forward(config, hand_weights(), X_HAND)
    torch.testing.assert_close(f, torch.tensor([[2.0, 0.0, 3.0]]))
    # x̂ = 2 W_dec[0] + 3 W_dec[2] + b_dec = [[2 + 1.5 + 0.1, 0], [0, 3 − 0.2]]
    torch.testing.assert_close(x_hat, torch.tensor([[[3.6, 0.0], [0.0, 2.8]]]))
    # jumprelu with θ = (2.5, 0, 2.5) keeps only latent 2 (pre 3 > 2.5); topk with k = 1 too.
    w_jump = {**hand_weights(), "threshold": torch.tensor([2.5, 0.0, 2.5])}
    for arch, w in (("jumprelu", w_jump), ("topk", hand_weights())):
        f, x_hat = crosscoder_forward(make_config(arch, d_in=2, d_sae=3, k=1), w, X_HAND)
        torch.testing.assert_close(f, torch.tensor([[0.0, 0.0, 3.0]]))
        torch.testing.assert_close(x_hat, torch.tensor([[[1.6, 0.0], [0.0, 2.8]]]))


def test_apply_b_dec_to_input():
    w = hand_weights()
    f_raw, _ = crosscoder_forward(make_config(d_in=2, d_sae=3, apply_b_dec_to_input=False), w, X_HAND)
    f_centred, x_hat = crosscoder_forward(make_config(d_in=2, d_sae=3, apply_b_dec_to_input=True), w, X_HAND)
    # x − b_dec: x_0 = (1.9, −1), x_1 = (1, 3.2) → pre = (1.9, −1 − 3.2 + 0.5, 1 + 3.2 − 1) = (1.9, −3.7, 3.2)
    torch.testing.assert_close(f_raw, torch.tensor([[2.0, 0.0, 3.0]]))
    torch.testing.assert_close(f_centred, torch.tensor([[1.9, 0.0, 3.2]]))
    torch.testing.assert_close(x_hat, torch.tensor([[[1.9 + 1.6 + 0.1, 0.0], [0.0, 3.2 - 0.2]]]))
    # b_dec is subtracted per source: a b_dec on source 1 alone must not move source 0's contribution
    w_shift = {**w, "b_dec": torch.tensor([[0.0, 0.0], [0.0, 1.0]])}
    f_shift, _ = crosscoder_forward(make_config(d_in=2, d_sae=3, apply_b_dec_to_input=True), w_shift, X_HAND)
    torch.testing.assert_close(f_shift, torch.tensor([[2.0, 0.0, 2.0]]))


def test_unknown_architecture_raises():
    with pytest.raises(ValueError, match="architecture 'gated'"):
        crosscoder_forward({**make_config(), "architecture": "gated"}, random_weights(make_config()),
                           torch.zeros(1, 2, 4))


def _saved(tmp_path, arch="relu"):
    config = make_config(arch)
    return save_crosscoder(tmp_path / "cc", random_weights(config), config), config


def _edit_config(directory, **changes):
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, **changes}))


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no crosscoder directory"):
        load_crosscoder(tmp_path / "absent")
    directory, _ = _saved(tmp_path)
    (directory / "model.safetensors").rename(tmp_path / "moved.safetensors")
    with pytest.raises(FileNotFoundError, match=r"lacks model\.safetensors"):
        load_crosscoder(directory)
    (tmp_path / "moved.safetensors").rename(directory / "model.safetensors")
    _edit_config(directory, format="saelens")
    with pytest.raises(ValueError, match="'saelens' is not a sae-sweep-crosscoder"):
        load_crosscoder(directory)
    assert not is_crosscoder_dir(directory)
    _edit_config(directory, format=CROSSCODER_FORMAT, format_version=CROSSCODER_FORMAT_VERSION + 1)
    with pytest.raises(ValueError, match="newer than this reader"):
        load_crosscoder(directory)
    _edit_config(directory, format_version=CROSSCODER_FORMAT_VERSION)
    load_crosscoder(directory)  # restored
    _edit_config(directory, d_sae=7)
    with pytest.raises(ValueError, match=r"W_enc should have shape \[2, 4, 7\].*got \[2, 4, 6\]"):
        load_crosscoder(directory)
    (directory / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"lacks config\.json"):
        load_crosscoder(directory)


def test_load_rejects_bad_tensors_and_save_validates(tmp_path):
    directory, config = _saved(tmp_path, "jumprelu")
    w = random_weights(config)
    save_file({**w, "b_dec": torch.zeros(4, 2)}, directory / "model.safetensors")
    with pytest.raises(ValueError, match=r"b_dec should have shape \[2, 4\]"):
        load_crosscoder(directory)
    save_file({k: v for k, v in w.items() if k != "threshold"}, directory / "model.safetensors")
    with pytest.raises(ValueError, match="threshold"):
        load_crosscoder(directory)
    with pytest.raises(ValueError, match=r"W_dec should have shape \[6, 2, 4\]"):
        save_crosscoder(tmp_path / "bad", {**w, "W_dec": torch.zeros(6, 4, 2)}, config)
    with pytest.raises(ValueError, match="integer 'k'"):
        save_crosscoder(tmp_path / "bad", random_weights(make_config()), {**make_config(), "architecture": "topk"})
    assert not (tmp_path / "bad").exists()


def test_relative_decoder_norm_known_answers():
    W_dec_MSD = torch.zeros(4, 2, 3)
    W_dec_MSD[0, 1] = torch.tensor([0.0, 3.0, 4.0])  # only in source 1
    W_dec_MSD[1, 0] = torch.tensor([1.0, 0.0, 0.0])  # only in source 0
    W_dec_MSD[2, 0], W_dec_MSD[2, 1] = torch.tensor([2.0, 0.0, 0.0]), torch.tensor([0.0, 0.0, -2.0])  # equal norms
    r_M = relative_decoder_norm(W_dec_MSD, 0, 1)  # latent 3 is all zero
    torch.testing.assert_close(r_M, torch.tensor([1.0, 0.0, 0.5, 0.0]))
    torch.testing.assert_close(relative_decoder_norm(W_dec_MSD, 1, 0), torch.tensor([0.0, 1.0, 0.5, 0.0]))
    torch.testing.assert_close(source_norm_fractions(W_dec_MSD), torch.tensor([[0, 1], [1, 0], [0.5, 0.5], [0, 0]]))
    torch.testing.assert_close(decoder_cosine(W_dec_MSD, 0, 1), torch.zeros(4))
    assert not r_M.isnan().any()


def planted_decoder(base: int = 0, chat: int = 1, S: int = 2, D: int = 5) -> torch.Tensor:
    """12 latents: 3 base-only, 2 chat-only, 4 shared (same direction), 1 in between, 2 shared ones to mark dead."""
    direction = torch.nn.functional.normalize(torch.arange(1.0, D + 1), dim=0)
    pairs = [(1, 0), (2, 0.1), (1, 0.05), (0, 1), (0.05, 3), (1, 1), (1, 2), (2, 1), (0.5, 0.5), (1, 0.25),
             (1, 1), (2, 2)]  # (‖base‖, ‖chat‖): r = 0, 0.048, 0.048, 1, 0.98, 0.5, 0.67, 0.33, 0.5, 0.2, dead, dead
    W_dec_MSD = torch.zeros(len(pairs), S, D)
    for i, (norm_base, norm_chat) in enumerate(pairs):
        W_dec_MSD[i, base] = norm_base * direction
        W_dec_MSD[i, chat] = norm_chat * direction.roll(1) if i == 9 else norm_chat * direction
    return W_dec_MSD


ALIVE = torch.tensor([True] * 10 + [False] * 2)


def test_diff_summary_counts_on_planted_rows():
    summary = diff_summary(planted_decoder(), 0, 1, ("base", "chat"), alive_M=ALIVE)
    assert {k: summary[k] for k in ("n_latents", "n_base_only", "n_chat_only", "n_shared", "n_other")} == {
        "n_latents": 10, "n_base_only": 3, "n_chat_only": 2, "n_shared": 4, "n_other": 1}
    assert summary["frac_shared"] == pytest.approx(0.4) and summary["frac_base_only"] == pytest.approx(0.3)
    assert summary["shared_decoder_cosine"]["mean"] == pytest.approx(1.0)
    assert decoder_cosine(planted_decoder(), 0, 1).max() <= 1.0  # parallel rows must land in the last bin
    assert summary["shared_decoder_cosine"]["median"] == pytest.approx(1.0)
    assert summary["shared_decoder_cosine"]["histogram"]["counts"][-1] == 4
    hist = summary["relative_norm_histogram"]
    assert len(hist["bin_edges"]) == 21 and sum(hist["counts"]) == 10 and hist["counts"][0] == 3
    assert summary["thresholds"] == {"a_only_max": 0.1, "b_only_min": 0.9, "shared_min": 0.3, "shared_max": 0.7}
    everyone = diff_summary(planted_decoder(), 0, 1, ("base", "chat"))
    assert everyone["n_latents"] == 12 and everyone["n_shared"] == 6
    json.dumps(summary)  # plain Python values only
    narrow = diff_summary(planted_decoder(), 0, 1, ("base", "chat"), DiffThresholds(shared_min=0.45, shared_max=0.55))
    assert narrow["n_shared"] == 4 and narrow["n_other"] == 3  # r = 0.67 and 0.33 leave the band


def test_diff_summary_without_shared_latents_and_zero_rows():
    W_dec_MSD = torch.zeros(3, 2, 2)
    W_dec_MSD[0, 0, 0] = 1.0  # base only; latents 1 and 2 all zero
    summary = diff_summary(W_dec_MSD, 0, 1, ("base", "chat"))
    assert summary["n_base_only"] == 1 and summary["n_other"] == 2 and summary["n_zero_norm"] == 2
    assert summary["shared_decoder_cosine"] == {"mean": None, "median": None, "histogram": None}
    with pytest.raises(ValueError, match="two distinct labels"):  # n_base_only would be written twice
        diff_summary(W_dec_MSD, 0, 1, ("base", "base"))


def test_thresholds_validated():
    with pytest.raises(ValueError, match="a_only_max < shared_min"):
        DiffThresholds(a_only_max=0.4)
    with pytest.raises(ValueError):
        DiffThresholds(b_only_min=1.5)


def test_write_diff_analysis_picks_base_and_chat_by_label(tmp_path):
    config = make_config(d_in=5, d_sae=12, labels=("chat", "base"))  # source 0 is chat, source 1 is base
    w = {**random_weights(config), "W_dec": planted_decoder(base=1, chat=0)}
    summary = write_diff_analysis(tmp_path / "out", config, w, alive_M=ALIVE)
    assert (tmp_path / "out" / "diff.png").stat().st_size > 1000
    on_disk = json.loads((tmp_path / "out" / "diff_summary.json").read_text())
    assert on_disk == summary
    assert (on_disk["n_base_only"], on_disk["n_chat_only"], on_disk["n_shared"], on_disk["n_other"]) == (3, 2, 4, 1)
    assert on_disk["pair"]["a"]["index"] == 1 and on_disk["pair"]["b"]["index"] == 0
    per_source = on_disk["source_norm_fractions"]["per_source"]
    assert [s["label"] for s in per_source] == ["chat", "base"]
    assert [s["n_dominant"] for s in per_source] == [2, 3]  # r ≥ 0.98 chat, r ≤ 0.048 base
    explicit = write_diff_analysis(tmp_path / "explicit", config, w, labels=("chat", "base"), alive_M=ALIVE)
    assert (explicit["n_chat_only"], explicit["n_base_only"]) == (2, 3)  # the same latents, whichever order
    assert explicit["relative_norm_mean"] == pytest.approx(1 - summary["relative_norm_mean"])


def test_write_diff_analysis_defaults_and_errors(tmp_path):
    config = make_config(d_in=5, d_sae=12, labels=("L4", "L5", "L6"))  # a layer stack: no base/chat
    W_dec_MSD = torch.zeros(12, 3, 5)
    W_dec_MSD[:, :2] = planted_decoder()
    summary = write_diff_analysis(tmp_path, config, {**random_weights(config), "W_dec": W_dec_MSD})
    assert summary["labels"] == ["L4", "L5"] and summary["n_L4_only"] == 3 and summary["n_L5_only"] == 2
    assert [s["n_dominant"] for s in summary["source_norm_fractions"]["per_source"]] == [3, 2, 0]
    with pytest.raises(ValueError, match="two different sources"):
        write_diff_analysis(tmp_path, config, {"W_dec": W_dec_MSD}, labels=("L4", "base"))
    one = make_config(labels=("base",))
    with pytest.raises(ValueError, match="needs at least two sources"):
        write_diff_analysis(tmp_path, one, random_weights(one))
    empty = write_diff_analysis(tmp_path / "empty", make_config(), {"W_dec": torch.zeros(6, 2, 4)})
    assert empty["n_shared"] == 0 and (tmp_path / "empty" / "diff.png").stat().st_size > 0


def test_relative_norms_are_measured_in_the_normalised_space_whatever_the_source_scales(tmp_path):
    """Latents whose decoder has equal norm in both sources (in the space the penalty acted on)
    are shared at r = ½ however differently the two sources are scaled in the export; a latent
    only in chat is r = 1. Comparing the exported (scale-folded) decoders would give
    1.6 / (1 + 1.6) = 0.615 for the first."""
    W_norm = torch.tensor([[[3.0, 4.0], [0.0, 5.0]],   # ‖base‖ = ‖chat‖ = 5
                           [[0.0, 0.0], [1.0, 0.0]]])  # chat only
    for scales in ([1.0, 1.0], [1.0, 1.6], [0.2, 7.0]):
        W_raw = W_norm * torch.tensor(scales).view(1, 2, 1)  # what an export holds
        config = make_config(d_in=2, d_sae=2, normalisation={"folded": True, "scales": scales})
        weights = {**random_weights(config), "W_dec": W_raw}
        summary = write_diff_analysis(tmp_path / str(scales[1]), config, weights)
        assert summary["relative_norm_mean"] == pytest.approx((0.5 + 1.0) / 2)
        assert summary["n_shared"] == 1 and summary["n_chat_only"] == 1 and "normalised" in summary["space"]

