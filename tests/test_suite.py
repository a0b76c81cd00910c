"""The sparsely connected suite: connection scores against a brute-force computation, the pruned
pass with every connection equal to the pre-activation on the residual the suite rebuilds (and
that, to the transcoder's own pre-activation on that input), fine-tuning lowering the pruned MSE,
kills during connection finding and fine-tuning resuming to the same result, the whole command
end to end on a briefly trained tiny model, and a store without attention outputs refused."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

import generate_activations
import train_suite
from suite import connections
from suite.config import FinetuneSettings
from suite.finetune import finetune, losses
from suite.model import ConnectionWeights, Suite, SuiteLayout, active_latents
from tests.conftest import corpus, fail_at_call, gen_args
from tests.test_end_to_end import assert_one_line_error

L, D, F, K = 3, 8, 16, 3


def toy_suite(parallel: bool, centred: bool = True, seed: int = 0) -> tuple[Suite, dict]:
    """A suite over L layers of width D with random weights, reading a batch whose columns hold
    each layer's attention output, MLP input, norm scale (one column) and MLP output."""
    names = [(f"a{m}", f"i{m}", f"s{m}", f"o{m}") for m in range(L)]
    columns, start = {}, 0
    for group in names:
        for name in group:
            width = 1 if name.startswith("s") else D
            columns[name], start = (start, width), start + width
    layout = SuiteLayout(tuple(n[0] for n in names), tuple(n[1] for n in names), tuple(n[2] for n in names),
                         tuple(n[3] for n in names), centred=centred, parallel=parallel)
    scales = {name: 0.5 + 0.25 * (i % 5) for i, name in enumerate(columns)}
    torch.manual_seed(seed)
    suite = Suite(layout, D, F, K, columns, scales, lr=1e-3, seed=seed)
    with torch.no_grad():
        for d in (suite.attn, suite.mlp):
            d.b_enc.normal_(std=0.3)
            d.b_dec.normal_(std=0.3)
    return suite, columns


def toy_batch(columns: dict, n: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    width = sum(w for _, w in columns.values())
    x = torch.randn(n, width, generator=g)
    for name, (start, _) in columns.items():
        if name.startswith("s"):
            x[:, start] = 0.5 + torch.rand(n, generator=g)  # a norm scale: positive, varying by row
    return x


@pytest.mark.parametrize("parallel", [True, False])
def test_connection_scores_equal_the_brute_force_mean_direct_contribution(tmp_path, parallel):
    suite, columns = toy_suite(parallel)
    batches = [toy_batch(columns, 64, seed) for seed in range(3)]
    means = connections.accumulate_means(suite, lambda start: ((x, None) for x in batches[start:]), 3, tmp_path)
    with torch.no_grad():
        for m in range(L):
            upstream = suite.layout.upstream(m)
            if not upstream:
                continue
            # per token: the contribution f_j(t) · (W_dec,j · Ẽ_i) / σ_m(t) of every upstream latent j to every latent i
            total = torch.zeros(len(upstream) * F, F, dtype=torch.float64)
            for x in batches:
                codes = suite.dense_codes(*suite.vanilla(x))
                f_BU = torch.cat([codes[u] for u in upstream], dim=1)
                W_UD = torch.cat([suite.decoder(u)[0] for u in upstream])
                E_DF = suite.mlp.W_enc[m] / suite.in_scale[m]
                E_DF = E_DF - E_DF.mean(0)  # LayerNorm centres what reaches the MLP
                per_token = f_BU[:, :, None] * (W_UD @ E_DF)[None] / suite.sigma(x, m)[:, None, None]
                total += per_token.double().sum(0)
            brute = (total / sum(len(x) for x in batches)).float()
            indices, scores = connections.select(suite, m, means, len(upstream) * F)  # every connection
            ours = torch.zeros_like(brute).scatter_(0, indices.T, scores.T)
            torch.testing.assert_close(ours, brute, rtol=1e-4, atol=1e-6)
            assert (scores.abs().diff(dim=1) <= 1e-7).all()  # sorted by |score|: the first C' are the top C'


@pytest.mark.parametrize("parallel, centred", [(True, True), (False, True), (False, False)])
def test_with_every_connection_the_pruned_pass_is_the_pre_activation_on_the_rebuilt_residual(parallel, centred):
    suite, columns = toy_suite(parallel, centred)
    x = toy_batch(columns, 32)
    embed = torch.randn(32, D)
    with torch.no_grad():
        attn_out, mlp_out = suite.vanilla(x)
        codes = suite.dense_codes(attn_out, mlp_out)
        for m in range(L):
            n_up = len(suite.layout.upstream(m)) * F
            index = torch.arange(n_up).expand(F, n_up)  # every upstream latent connected
            active, _ = active_latents(mlp_out, m)
            sigma = suite.sigma(x, m)
            pruned = suite.pruned_pre(m, codes, sigma, embed, index, active)
            rebuilt = suite.reconstructed_pre(m, codes, embed, sigma).gather(1, active)
            torch.testing.assert_close(pruned, rebuilt, rtol=1e-4, atol=1e-5)
            # …which is the transcoder's own pre-activation when its input is that residual, normed with σ frozen
            residual = embed + sum(codes[u] @ suite.decoder(u)[0] + suite.decoder(u)[1] for u in suite.layout.upstream(m))
            normed = (residual - residual.mean(-1, keepdim=True) if centred else residual) / sigma[:, None]
            own = (normed / suite.in_scale[m]) @ suite.mlp.W_enc[m] + suite.mlp.b_enc[m]
            torch.testing.assert_close(rebuilt, own.gather(1, active), rtol=1e-4, atol=1e-5)


def test_the_embedding_and_biases_alone_are_the_pruned_pass_with_no_connections():
    suite, columns = toy_suite(parallel=True)
    x, embed = toy_batch(columns, 16), torch.randn(16, D)
    with torch.no_grad():
        attn_out, mlp_out = suite.vanilla(x)
        codes = suite.dense_codes(attn_out, mlp_out)
        active, _ = active_latents(mlp_out, 0)  # layer 0 beside a parallel attention: nothing upstream
        pre = suite.pruned_pre(0, codes, suite.sigma(x, 0), embed, torch.zeros(F, 0, dtype=torch.long), active)
        E = suite.encoder(0)
        torch.testing.assert_close(pre, (embed @ E / suite.sigma(x, 0)[:, None] + suite.mlp.b_enc[0]).gather(1, active))


def test_fine_tuning_lowers_the_pruned_mse_on_held_out_rows(tmp_path):
    suite, columns = toy_suite(parallel=False)
    train = [toy_batch(columns, 64, seed) for seed in range(40)]
    held_out = toy_batch(columns, 256, 99)
    embed = lambda ids: torch.zeros(len(ids), D)  # noqa: E731  (no embedding in this toy data)
    means = connections.accumulate_means(suite, lambda start: ((x, None) for x in train[start:]), 10, tmp_path / "c")
    indices = [connections.select(suite, m, means, 4)[0] for m in range(L)]
    ids = torch.zeros(256, 2, dtype=torch.long)

    def pruned_mse() -> float:
        with torch.no_grad():
            return losses(suite, held_out, embed(ids), indices, c=1.0)[2].item()

    before = pruned_mse()
    batches = lambda start: ((x, torch.zeros(64, 2, dtype=torch.long)) for x in train[start:])  # noqa: E731
    finetune(suite, FinetuneSettings(c=1.0, n_connections=4, lr=3e-3, steps=40), batches, embed, indices, tmp_path / "f")
    assert pruned_mse() < 0.8 * before, (before, pruned_mse())


def test_killed_connection_finding_and_fine_tuning_resume_to_the_uninterrupted_result(tmp_path, monkeypatch):
    suite, columns = toy_suite(parallel=False)
    train = [toy_batch(columns, 32, seed) for seed in range(30)]
    batches = lambda start: ((x, torch.zeros(32, 2, dtype=torch.long)) for x in train[start:])  # noqa: E731
    embed = lambda ids: torch.zeros(len(ids), D)  # noqa: E731
    whole = connections.accumulate_means(suite, batches, 30, tmp_path / "whole", checkpoint_every=4)
    original = fail_at_call(monkeypatch, Suite, "dense_codes", 11, RuntimeError("killed"))  # after 10 batches
    with pytest.raises(RuntimeError, match="killed"):
        connections.accumulate_means(suite, batches, 30, tmp_path / "cut", checkpoint_every=4)
    monkeypatch.setattr(Suite, "dense_codes", original)
    assert (tmp_path / "cut" / connections.PARTIAL).exists()
    resumed = connections.accumulate_means(suite, batches, 30, tmp_path / "cut", checkpoint_every=4)
    for key in whole:
        assert torch.equal(whole[key], resumed[key]), key
    indices = [connections.select(suite, m, whole, 4)[0] for m in range(L)]
    settings = FinetuneSettings(c=1.0, n_connections=4, lr=3e-3, steps=25)
    a = finetune(toy_suite(parallel=False)[0], settings, batches, embed, indices, tmp_path / "ft-whole", checkpoint_every=5)
    original = fail_at_call(monkeypatch, Suite, "vanilla", 13, RuntimeError("killed"))
    with pytest.raises(RuntimeError, match="killed"):
        finetune(toy_suite(parallel=False)[0], settings, batches, embed, indices, tmp_path / "ft-cut", checkpoint_every=5)
    monkeypatch.setattr(Suite, "vanilla", original)
    b = finetune(toy_suite(parallel=False)[0], settings, batches, embed, indices, tmp_path / "ft-cut", checkpoint_every=5)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name


# ---------------------------------------------------------------- the command, end to end

@pytest.fixture(scope="module")
def suite_store(trained_model, tmp_path_factory):
    text = tmp_path_factory.mktemp("suite-text")
    for i, doc in enumerate(corpus(300, seed=5)):
        (text / f"doc{i:03d}.txt").write_text(doc)
    out = tmp_path_factory.mktemp("suite") / "store"
    args = gen_args(out, text, **{"--model": trained_model, "--layers": "all", "--n_tokens": "10000"})
    result = CliRunner().invoke(generate_activations.main, args + ["--hook", "attn_out", "mlp_in_normalized", "mlp_out"])
    assert result.exit_code == 0, result.output
    return out


def test_the_suite_command_runs_its_stages_and_reports_and_a_rerun_skips_them(suite_store, tmp_path):
    out = tmp_path / "suite"
    args = ["--cache", str(suite_store), "--output_dir", str(out), "--k", "4", "--ratio", "2", "--connections", "8",
            "--batch_size", "64", "--connection_tokens", "2000", "--finetune_tokens", "2000", "--eval_tokens", "600",
            "--eval_sequences", "8", "--lr", "1e-3", "--sweep", "c=0,1"]
    result = CliRunner().invoke(train_suite.main, args)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "suite.json").read_text())
    assert [s["name"] for s in summary["settings"]] == ["c_0_C_8_lr_0.001", "c_1_C_8_lr_0.001"]
    without, with_pruned = summary["settings"]
    for s in summary["settings"]:
        ce = s["ce"]
        assert ce["ce_zero_ablation"] > ce["ce_clean"] and ce["ce_pruned_suite"] < ce["ce_zero_ablation"]
        assert {f"mlp{m}" for m in range(3)} <= set(s["modules"]) and s["connection_counts"] == [1, 2, 4, 8]
    # the pruned term in the loss makes the pruned pass better than fine-tuning without it
    pruned = lambda s: sum(s["modules"][f"mlp{m}"]["pruned_C8"]["fvu"] for m in range(1, 3))  # noqa: E731
    assert pruned(with_pruned) < pruned(without)
    export = out / with_pruned["dir"] / "export"
    assert (export / "transcoder_set" / "config.yaml").exists() and (export / "connections" / "L02.safetensors").exists()
    assert (export / "attn_L00" / "cfg.json").exists() and "ce_pruned_suite" in (out / "report.md").read_text()
    again = CliRunner().invoke(train_suite.main, args)
    assert again.exit_code == 0 and "already holds this finished suite" in again.output


def test_a_store_without_attention_outputs_cannot_carry_a_suite(small_store, tmp_path):
    result = CliRunner().invoke(train_suite.main, ["--cache", str(small_store), "--output_dir", str(tmp_path / "s")])
    assert_one_line_error(result, "has no attn_out at layer 0", "--hook attn_out mlp_in_normalized mlp_out")


def test_virtual_weights_of_the_connected_pairs_equal_the_dense_product_with_exact_gradients(monkeypatch):
    """V[i, c] = E[:, i] · W[idx[i, c]] computed chunk by chunk (chunks of a few latents here) equals
    the [F, U] product's entries, and its backward passes gradcheck in float64."""
    monkeypatch.setattr(ConnectionWeights, "CHUNK_VALUES", 60)
    g = torch.Generator().manual_seed(0)
    E = torch.randn(8, 30, dtype=torch.float64, generator=g, requires_grad=True)
    W = torch.randn(70, 8, dtype=torch.float64, generator=g, requires_grad=True)
    idx = torch.randint(0, 70, (30, 5), generator=g)
    assert torch.allclose(ConnectionWeights.apply(E, W, idx), (E.T @ W.T).gather(1, idx))
    assert torch.autograd.gradcheck(lambda e, w: ConnectionWeights.apply(e, w, idx), (E, W))



def test_a_suite_over_a_block_must_start_at_layer_0(suite_store, tmp_path):
    result = CliRunner().invoke(train_suite.main, ["--cache", str(suite_store), "--output_dir", str(tmp_path / "s"),
                                                   "--layers", "1", "2"])
    assert_one_line_error(result, "consecutive layers from layer 0", "--layers 0 1 2 3")


def test_the_real_model_bench_runs_at_toy_size_over_a_block(trained_model, tmp_path):
    """bench/suite_real.py --small: layers 0-1 of the 3-layer model, every CE of its table."""
    from bench import suite_real

    text = tmp_path / "text"
    text.mkdir()
    for i, doc in enumerate(corpus(300, seed=5)):
        (text / f"doc{i:03d}.txt").write_text(doc)
    out = tmp_path / "bench"
    result = CliRunner().invoke(suite_real.main, ["--small", "--model", trained_model, "--dataset", str(text),
                                                  "--out", str(out)])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "suite" / "suite.json").read_text())
    assert len(summary["layout"]["attn"]) == 2 and "blocks.1.hook_attn_out" in summary["layout"]["attn"][1]
    ce = summary["settings"][0]["ce"]
    for key in ("clean", "zero_ablation_block", "vanilla_suite", "vanilla_suite_untuned", "pruned_suite",
                "pruned_suite_untuned"):
        assert ce[f"ce_{key}"] > 0
    assert ce["ce_zero_ablation_block"] > ce["ce_clean"]
    assert "connections kept" in result.output
