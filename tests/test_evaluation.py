"""Evaluation: known answers for CE recovery and FVU, batch-size independence, the report."""
from __future__ import annotations

import json
import math
import re
import time

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import evaluate
import train_sweep
from cache.models import load_model
from formats.saelens import saelens_forward as sae_forward
from evaluation.metrics import MetricAccumulator
from evaluation.splice import recovered, single, spliced_losses
from tests.conftest import TINY_D, TINY_NAME
from tests.test_end_to_end import sweep_args

HOOK = "blocks.1.hook_resid_post"


def identity_weights(d: int) -> dict[str, torch.Tensor]:
    """A ReLU SAE with 2d latents that reconstructs exactly: f = (relu(x), relu(−x)), x̂ = f₁ − f₂."""
    eye = torch.eye(d)
    return {"W_enc": torch.cat([eye, -eye], 1), "b_enc": torch.zeros(2 * d),
            "W_dec": torch.cat([eye, -eye], 0), "b_dec": torch.zeros(d)}


def test_identity_recovers_all_the_loss_and_zero_recovers_none():
    model = load_model(TINY_NAME, None, device="cpu")
    tokens = torch.randint(0, model.cfg.d_vocab, (6, 12), generator=torch.Generator().manual_seed(0))
    cfg = {"architecture": "standard"}
    w = identity_weights(TINY_D)
    zero = {k: torch.zeros_like(v) for k, v in w.items()}
    losses = spliced_losses(model, tokens, {
        "zero": single(HOOK, lambda x, _: torch.zeros_like(x)), "identity": single(HOOK, lambda x, _: sae_forward(cfg, w, x)[1]),
        "zero_dict": single(HOOK, lambda x, _: sae_forward(cfg, zero, x)[1])}, batch_size=4)
    clean = losses["clean"]["ce"]
    assert losses["zero"]["ce"] != pytest.approx(clean)  # the hook matters, so the test can fail
    assert recovered(losses["identity"]["ce"], clean, losses["zero"]["ce"]) == pytest.approx(1.0, abs=1e-5)
    assert losses["identity"]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert recovered(losses["zero_dict"]["ce"], clean, losses["zero"]["ce"]) == pytest.approx(0.0, abs=1e-6)


def test_spliced_losses_do_not_depend_on_batch_size():
    model = load_model(TINY_NAME, None, device="cpu")
    tokens = torch.randint(0, model.cfg.d_vocab, (5, 10), generator=torch.Generator().manual_seed(1))
    half = {"half": single(HOOK, lambda x, _: 0.5 * x)}
    a = spliced_losses(model, tokens, half, batch_size=1)
    b = spliced_losses(model, tokens, half, batch_size=5)
    assert a["half"]["ce"] == pytest.approx(b["half"]["ce"], rel=1e-6)
    # KL subtracts nearly equal fp32 log-probs, whose last bits depend on the batch shape
    assert a["half"]["kl"] == pytest.approx(b["half"]["kl"], rel=1e-3)


def test_spliced_ce_and_kl_equal_a_hand_computation_in_the_right_direction():
    """CE is −log p(token t+1) from the logits at t (an off-by-one between logits and targets
    would not cancel here), and KL is KL(clean ‖ spliced), not the reverse."""
    model = load_model(TINY_NAME, None, device="cpu")
    tokens = torch.randint(0, model.cfg.d_vocab, (4, 9), generator=torch.Generator().manual_seed(3))
    noise = torch.randn(4 * 9, TINY_D, generator=torch.Generator().manual_seed(4))
    shift = single(HOOK, lambda x, _: x + 3 * noise[: len(x)])
    losses = spliced_losses(model, tokens, {"shift": shift}, batch_size=4)
    with torch.no_grad():
        clean_logits = model(tokens)
        spliced_logits = model.run_with_hooks(
            tokens, fwd_hooks=[(HOOK, lambda act, hook: act + 3 * noise.view(4, 9, -1))])
    def ce(logits):
        return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
    log_p, log_q = clean_logits[:, :-1].log_softmax(-1), spliced_logits[:, :-1].log_softmax(-1)
    kl_clean_spliced = (log_p.exp() * (log_p - log_q)).sum(-1).mean().item()
    assert losses["clean"]["ce"] == pytest.approx(ce(clean_logits).item(), rel=1e-5)
    assert losses["shift"]["ce"] == pytest.approx(ce(spliced_logits).item(), rel=1e-5)
    assert losses["shift"]["kl"] == pytest.approx(kl_clean_spliced, rel=1e-4)
    # the direction, on distributions where it matters: KL([.9, .1] ‖ [.5, .5]) = 0.368, the reverse 0.511,
    # through the chunked loss with a model whose unembedding is the identity (logits = residual)
    from types import SimpleNamespace

    from evaluation.splice import _chunked_losses

    identity = SimpleNamespace(cfg=SimpleNamespace(d_vocab=2, normalization_type=None, output_logits_soft_cap=None),
                               unembed=SimpleNamespace(W_U=torch.eye(2), b_U=torch.zeros(2)))
    clean, spliced = torch.tensor([0.9, 0.1]).log().view(1, 1, 2), torch.tensor([0.5, 0.5]).log().view(1, 1, 2)
    pad = torch.zeros(1, 1, 2)  # the last position predicts nothing
    _, (per_splice,) = _chunked_losses(identity, torch.cat([clean, pad], 1), [torch.cat([spliced, pad], 1)],
                                       torch.tensor([0]))
    assert per_splice[1].item() == pytest.approx(0.9 * math.log(1.8) + 0.1 * math.log(0.2), rel=1e-6)


def test_spliced_losses_leave_excluded_positions_untouched():
    """With first_pos 1 position 0 keeps its clean activation: in two-token sequences the only
    prediction comes from position 0, so zeroing every other position changes nothing there."""
    model = load_model(TINY_NAME, None, device="cpu")
    tokens = torch.randint(0, model.cfg.d_vocab, (3, 8), generator=torch.Generator().manual_seed(2))
    seen = []
    spliced_losses(model, tokens, {"spy": single(HOOK, lambda x, _: seen.append(len(x)) or x)}, first_pos=1)
    assert seen == [3 * 7]
    zero = {"zero": single(HOOK, lambda x, _: torch.zeros_like(x))}
    kept = spliced_losses(model, tokens[:, :2], zero, first_pos=1)
    assert kept["zero"]["ce"] == pytest.approx(kept["clean"]["ce"], rel=1e-6) and kept["zero"]["kl"] == pytest.approx(0, abs=1e-6)
    replaced = spliced_losses(model, tokens[:, :2], zero, first_pos=0)
    assert replaced["zero"]["kl"] > 1e-4  # position 0 matters, so the test above can fail


def test_excluded_tokens_keep_their_clean_activation():
    model = load_model(TINY_NAME, None, device="cpu")
    tokens = torch.randint(1, model.cfg.d_vocab, (3, 2), generator=torch.Generator().manual_seed(5))
    tokens[:, 0] = 0  # the token excluded below sits at the only predicting position
    zero = {"zero": single(HOOK, lambda x, _: torch.zeros_like(x))}
    kept = spliced_losses(model, tokens, zero, exclude_tokens=(0,))
    assert kept["zero"]["kl"] == pytest.approx(0, abs=1e-6)
    assert spliced_losses(model, tokens, zero)["zero"]["kl"] > 1e-4


def test_reconstruction_metrics_do_not_depend_on_batch_size():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 4, generator=g) + 3
    x_hat = x.unsqueeze(0) + 0.3 * torch.randn(2, 60, 4, generator=g)
    f = torch.relu(torch.randn(2, 60, 5, generator=g))
    results = []
    for size in (60, 7):
        acc = MetricAccumulator(2, 4, 5)
        for s in range(0, 60, size):
            acc.update(x[s : s + size], x_hat[:, s : s + size], f[:, s : s + size])
        results.append(acc.results())
    for one, other in zip(*results):
        assert one == pytest.approx(other, rel=1e-9)


def test_fvu_is_measured_against_the_mean_not_zero():
    x = torch.randn(100, 3, generator=torch.Generator().manual_seed(0)) + 10.0  # a large mean
    acc = MetricAccumulator(1, 3, 1)
    acc.update(x, x.mean(0).expand(1, 100, 3), torch.zeros(1, 100, 1))  # predicting the mean explains nothing
    result = acc.results()[0]
    assert result["fvu"] == pytest.approx(1.0) and result["explained_variance"] == pytest.approx(0.0, abs=1e-9)
    assert result["dead_fraction"] == 1.0 and result["l0"] == 0.0


@pytest.fixture(scope="module")
def planted_run(small_store, tmp_path_factory):
    """A trained sweep whose first two members are replaced by an exact and an empty dictionary."""
    out = tmp_path_factory.mktemp("eval") / "run"
    result = CliRunner().invoke(train_sweep.main, sweep_args(small_store, out, **{"--n_models": "3"}) + ["--no_eval"])
    assert result.exit_code == 0, result.output
    rows = json.loads((out / "sweep.json").read_text())["members"]
    scale = json.loads((out / "sweep.json").read_text())["store"]["norm_scale"]
    for row, weights in zip(rows, [identity_weights(TINY_D), {k: 0 * v for k, v in identity_weights(TINY_D).items()}]):
        save_file(weights, out / row["dir"] / "sae_weights.safetensors")
        cfg = json.loads((out / row["dir"] / "cfg.json").read_text())
        cfg["d_sae"] = 2 * TINY_D
        (out / row["dir"] / "cfg.json").write_text(json.dumps(cfg))
    assert scale > 0
    result = CliRunner().invoke(evaluate.main, ["--run_dir", str(out), "--n_sequences", "8", "--batch_size", "3"])
    assert result.exit_code == 0, result.output
    return out


def test_evaluate_run_gives_known_answers_for_exact_and_empty_dictionaries(planted_run):
    summary = json.loads((planted_run / "sweep.json").read_text())
    exact, empty, trained = summary["members"]
    assert exact["fvu"] == pytest.approx(0.0, abs=1e-6) and exact["ce_recovered"] == pytest.approx(1.0, abs=1e-4)
    assert exact["kl"] == pytest.approx(0.0, abs=1e-5) and exact["l0"] > 0
    assert empty["ce_recovered"] == pytest.approx(0.0, abs=1e-6) and empty["dead_fraction"] == 1.0
    assert empty["fvu"] > 0.99
    assert 0 < trained["fvu"] < 1 and summary["eval"]["n_sequences"] > 0
    assert {"ce_recovered_mean_ablation", "ce_spliced", "cosine", "l2_ratio", "dense_fraction_1pct"} <= set(trained)


def test_report_links_resolve_and_plots_are_not_empty(planted_run):
    report = (planted_run / "report.md").read_text()
    links = re.findall(r"\]\(([^)]+)\)", report)
    assert any(link.endswith(".png") for link in links) and any(link.startswith("members/") for link in links)
    for link in links:
        assert (planted_run / link).exists(), link
        if link.endswith(".png"):
            assert (planted_run / link).stat().st_size > 5000
    for name in ("l0_vs_fvu.png", "l0_vs_ce_recovered.png", "l1_vs_l0.png", "density.png"):
        assert (planted_run / name).exists()
    assert (planted_run / "members" / "00_l1_0.001" / "sparsity.safetensors").exists()


def test_evaluate_refuses_a_directory_without_a_sweep(tmp_path):
    result = CliRunner().invoke(evaluate.main, ["--run_dir", str(tmp_path)])
    assert result.exit_code == 1 and "no finished sweep" in result.output


def test_wandb_logging_is_optional_and_records_curves_offline(small_store, tmp_path, monkeypatch):
    """wandb's own offline writer records every member's curves and the final table (their keys
    are in the run file), and the tracker logs what it should, at the steps it should."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    logged = []
    import training.tracking as tracking

    original_log = tracking.WandbTracker.log
    monkeypatch.setattr(tracking.WandbTracker, "log", lambda self, m, step: logged.append((step, m)) or original_log(self, m, step))
    args = sweep_args(small_store, tmp_path / "run", **{"--n_models": "2", "--n_epochs": "1"})
    result = CliRunner().invoke(train_sweep.main, args + ["--wandb_project", "sae-sweep-test", "--eval_sequences", "0"])
    assert result.exit_code == 0, result.output
    runs = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    steps = json.loads((tmp_path / "run" / "sweep.json").read_text())["resolved"]["total_steps"]
    assert [step for step, _ in logged] == [s for s in range(10, steps + 1, 10)] + ([steps] if steps % 10 else [])
    names = [m["name"] for m in json.loads((tmp_path / "run" / "sweep.json").read_text())["members"]]
    assert set(logged[0][1]) == {f"{name}/{k}" for name in names for k in ("loss", "mse", "l0")}  # curves by member name
    keys = [key.encode() for key in (f"{names[0]}/l0", f"{names[1]}/mse", "members", "00_l1_0.001/fvu")]
    deadline = time.monotonic() + 60  # wandb's writer is a process of its own that may still be flushing
    while not all(key in runs[0].read_bytes() for key in keys) and time.monotonic() < deadline:
        time.sleep(0.5)
    content = runs[0].read_bytes()
    assert all(key in content for key in keys), [key for key in keys if key not in content]
