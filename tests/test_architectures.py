"""Every architecture: recovery of planted features, ensemble == solo, SAELens round trip, and
the estimators that need their own known answers (JumpReLU's STE, BatchTopK's threshold)."""
from __future__ import annotations

import warnings

import pytest
import torch
from click.testing import CliRunner

import train_sweep
from formats.saelens import load_saelens, saelens_forward
from training.dictionary import Dictionary
from training.members import ARCHS, MemberConfig
from training.ensemble import Ensemble
from training.sweep import build_members, parse_axis
from tests.conftest import export_for_test, fail_at_call
from training.schedules import Schedule
from training.config import SweepConfig

D, N_FEATURES, F = 16, 24, 48
# Settings under which each architecture reaches the planted L0 (2.4 on average) in 800 steps.
PLANTED = {
    "relu": dict(l1_coeff=3e-2, lr=3e-3),
    "relu_april": dict(l1_coeff=3e-2, lr=3e-3),
    "topk": dict(k=3, lr=3e-3),
    "abstopk": dict(k=3, lr=3e-3),
    "matching_pursuit": dict(k=3, lr=3e-3),
    "batchtopk": dict(k=3, lr=3e-3),
    "jumprelu": dict(l0_coeff=3e-3, lr=3e-3, bandwidth=0.05, threshold_init=0.1),
    "jumprelu_tanh": dict(l0_coeff=3e-3, lr=3e-3, bandwidth=0.05, threshold_init=0.1),
    # a first prefix as wide as the planted set (24): smaller prefixes must merge features by design
    "matryoshka": dict(k=3, lr=3e-3, group_fractions=(1 / 2,)),
    "gated": dict(l1_coeff=3e-2, lr=3e-3),
    "panneal": dict(l1_coeff=3e-2, lr=3e-3, p_end=0.5),
    "crosscoder": dict(l1_coeff=3e-2, lr=3e-3),  # one source: relu_april's objective
}


def planted_data(generator: torch.Generator, directions: torch.Tensor, batch: int, p: float = 0.1) -> torch.Tensor:
    """Sparse non-negative combinations of known unit directions (each active with probability p)."""
    n = directions.shape[0]
    codes = torch.rand(batch, n, generator=generator) * 2 * (torch.rand(batch, n, generator=generator) < p)
    return codes @ directions


def directions(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(N_FEATURES, D, generator=g), dim=-1)


def test_every_architecture_is_covered_by_the_planted_settings():
    assert set(PLANTED) == set(ARCHS)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_each_architecture_recovers_planted_directions_at_a_sensible_l0(arch):
    g = torch.Generator().manual_seed(1)
    dirs = directions()
    ensemble = Ensemble([MemberConfig(d_in=D, d_sae=F, arch=arch, **PLANTED[arch])],
                        dead_tokens=2000)
    schedule = Schedule(total_steps=800)  # p-annealing from step 160 on; no-op elsewhere
    for step in range(800):
        schedule.apply_(ensemble, step)
        out = ensemble.step(planted_data(g, dirs, 256))
    W = torch.nn.functional.normalize(ensemble.dictionary.W_dec[0].detach(), dim=-1)
    best_cosine = (dirs @ W.T).max(dim=-1).values  # for each planted direction, its best latent
    assert (best_cosine > 0.9).float().mean() >= 0.9, best_cosine
    assert 1.0 <= out.l0.item() <= 8.0  # planted L0 is 2.4


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_member_of_any_architecture_equals_it_trained_alone(arch):
    g = torch.Generator().manual_seed(2)
    knob = ARCHS[arch].coefficient or "k"  # its sparsity knob
    values = {"l1_coeff": [1e-3, 1e-2, 3e-2], "k": [2, 4, 8], "l0_coeff": [1e-3, 1e-2, 3e-2]}[knob]
    configs = [MemberConfig(d_in=D, d_sae=F, arch=arch, lr=3e-3, seed=e, threshold_init=0.1, bandwidth=0.05,
                            grad_clip=0.05 if e == 0 else None, **{knob: v}) for e, v in enumerate(values)]
    together = Ensemble(configs, member_chunk=2, dead_tokens=64)
    alone = [Ensemble([c], dead_tokens=64) for c in configs]
    # the schedules run too: warm-ups, k annealing (TopK family) and p steps (panneal)
    schedule = Schedule(total_steps=8, lr_warmup_steps=2, sparsity_warmup_steps=3, k_anneal_steps=4,
                        p_anneal_start=0.25, p_anneal_updates=3)
    for step in range(8):
        x = planted_data(g, directions(), 32)
        for ensemble in (together, *alone):
            schedule.apply_(ensemble, step)
            ensemble.step(x)
    if arch == "panneal":
        assert (together.dictionary.coeff_rescale != 1).all()  # the λ rescale happened
    for e, solo in enumerate(alone):
        for name, tensor in together.dictionary.state_dict().items():
            if name in ("k", "l1_coeff", "l0_coeff", "bandwidth", "aux_coeff", "sparsity_scale"):
                continue
            torch.testing.assert_close(tensor[e].float(), solo.dictionary.state_dict()[name][0].float(),
                                       rtol=1e-4, atol=1e-5, msg=f"{arch} member {e}: {name}")


def test_gradient_clipping_is_per_member():
    x = planted_data(torch.Generator().manual_seed(3), directions(), 32) * 50  # large gradients
    clipped = Ensemble([MemberConfig(d_in=D, d_sae=F, l1_coeff=1e-2, grad_clip=1e-3),
                        MemberConfig(d_in=D, d_sae=F, l1_coeff=1e-2)])
    before = clipped.dictionary.b_enc.detach().clone()
    clipped.step(x)
    # the clip bounds the gradient of the loss summed over d (the references' convention): D × ours
    norms = [D * sum(p.grad[e].pow(2).sum() for p in clipped.dictionary.parameters()).sqrt() for e in range(2)]
    assert clipped.dictionary.summed_loss_scale == D
    assert norms[0] <= 1e-3 * 1.001 and norms[1] > 1e-2
    assert not torch.equal(before, clipped.dictionary.b_enc)


def _smoothed_loss(d: Dictionary, x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """The JumpReLU loss with H(z − θ) replaced by its kernel-smoothed version clamp((z−θ)/ε + ½, 0, 1),
    whose exact θ-gradient the straight-through estimator approximates."""
    pre = d.pre_activation(x)
    H = ((pre - theta) / d.bandwidth.view(-1, 1, 1) + 0.5).clamp(0, 1)
    x_hat = d.decode(pre * H)
    return ((x_hat - x).pow(2).mean(dim=(1, 2)) + d.l0_coeff * H.sum(-1).mean(-1)).sum()


def test_jumprelu_threshold_gradient_is_nonzero_and_matches_finite_differences_of_the_smoothed_loss():
    torch.manual_seed(0)
    d = Dictionary([MemberConfig(d_in=8, d_sae=16, arch="jumprelu", l0_coeff=0.5, bandwidth=0.02, threshold_init=0.5,
                                 preact_coeff=0.0)]).double()  # the smoothed loss has no pre-activation term
    with torch.no_grad():
        d.b_enc.fill_(0.5)  # pre-activations around θ, so many fall inside the kernel window
    x = torch.randn(4096, 8, dtype=torch.float64)
    (grad,) = torch.autograd.grad(d.loss(x).total.sum(), [d.jump_threshold])
    assert grad.abs().sum() > 0
    direction = torch.randn_like(grad)
    h = 1e-4
    theta = d.jump_threshold.detach()
    with torch.no_grad():
        fd = (_smoothed_loss(d, x, (theta + h * direction).unsqueeze(1))
              - _smoothed_loss(d, x, (theta - h * direction).unsqueeze(1))) / (2 * h)
    # the STE uses θ where the smoothed loss has z, and the hard step where it has the ramp; both
    # differ only inside the window |z − θ| < ε/2 = 0.01 around θ = 0.5 (θ ≠ 1, so a lost θ factor shows)
    assert (grad * direction).sum().item() == pytest.approx(fd.item(), rel=0.1)


@pytest.mark.parametrize("arch, default", [("jumprelu", 3e-7), ("jumprelu_tanh", 3e-6)])
def test_pre_activation_loss_known_answer_and_its_default_per_architecture(arch, default):
    """The loss of a member minus the same member's without the term is λ_p · mean_b Σ_i
    ReLU(θ_i − pre_bi) · ‖W_dec,i‖; an unset λ_p is the architecture's recipe value."""
    assert MemberConfig(d_in=8, d_sae=16, arch=arch).preact_coeff == default
    assert MemberConfig(d_in=8, d_sae=16, arch=arch, preact_coeff=0.25).preact_coeff == 0.25
    torch.manual_seed(2)
    d = Dictionary([MemberConfig(d_in=8, d_sae=16, arch=arch, l0_coeff=0.1, threshold_init=0.3, preact_coeff=c)
                    for c in (0.25, 0.0)]).double()
    with torch.no_grad():  # two equal members but for λ_p, with decoder norms far from 1 and unequal
        for p in d.parameters():
            p[0].copy_(p[1])
        d.W_dec.mul_(torch.linspace(0.5, 2, 16, dtype=torch.float64).view(1, -1, 1))
        x = torch.randn(64, 8, dtype=torch.float64)
        total = d.loss(x).total
        gap = torch.relu(d.jump_threshold[0] - d.pre_activation(x)[0]) * d.W_dec[0].norm(dim=-1)  # [B, F]
    assert gap.sum() > 0  # pre-activations below θ exist, so the term can be wrong
    assert (total[0] - total[1]).item() == pytest.approx(0.25 * gap.sum(-1).mean().item(), rel=1e-9)


def test_jumprelu_l0_gradient_equals_the_smoothed_l0_gradient_exactly():
    torch.manual_seed(1)
    d = Dictionary([MemberConfig(d_in=8, d_sae=16, arch="jumprelu", l0_coeff=1.0, bandwidth=0.2, threshold_init=0.5)]).double()
    x = torch.randn(256, 8, dtype=torch.float64)
    theta = d.jump_threshold
    from training.dictionary import PENALTIES

    pre = d.pre_activation(x)
    (grad,) = torch.autograd.grad(PENALTIES["l0"](d, d.activate(pre), pre).sum(), [theta])
    pre = d.pre_activation(x).detach()
    in_window = ((pre - theta.detach().unsqueeze(1)).abs() < 0.1).double()
    torch.testing.assert_close(grad, -(1 / 0.2) * in_window.sum(1) / 256)


@pytest.mark.parametrize("arch", ["batchtopk", "matryoshka"])
def test_batchtopk_inference_threshold_gives_the_training_l0_on_held_out_data(arch, tmp_path):
    g = torch.Generator().manual_seed(4)
    dirs = directions()
    ensemble = Ensemble([MemberConfig(d_in=D, d_sae=F, arch=arch, k=3, lr=3e-3)])
    for _ in range(300):
        ensemble.step(planted_data(g, dirs, 256))
    calibration, held_out = planted_data(g, dirs, 4096), planted_data(g, dirs, 4096)
    with torch.no_grad():
        train_rule_l0 = (ensemble.dictionary.encode(held_out) > 0).float().sum(-1).mean().item()
    export_for_test(ensemble, 0, tmp_path / "b", calibration_rows=calibration)
    f, _ = saelens_forward(*load_saelens(tmp_path / "b"), held_out)
    exported_l0 = (f > 0).float().sum(-1).mean().item()
    assert train_rule_l0 == pytest.approx(3.0, rel=1e-6)
    assert exported_l0 == pytest.approx(3.0, rel=0.1)


def test_calibrated_threshold_keeps_exactly_k_per_row_on_its_rows_and_streams_in_row_batches():
    """The (k·N)-th largest ReLU pre-activation, found with a running top-k over row batches,
    equals a sort of all of them; fewer than k·N values lie above it, and k·N at or above it."""
    g = torch.Generator().manual_seed(8)
    d = Dictionary([MemberConfig(d_in=D, d_sae=F, arch="batchtopk", k=k) for k in (2, 5)])
    with torch.no_grad():
        d.b_enc.normal_(generator=g)
    rows = planted_data(g, directions(), 300)
    streamed = d.calibrated_thresholds(rows, row_batch=64)
    pre_UNF = torch.relu(d.pre_activation(rows))
    for u, k in enumerate((2, 5)):
        by_sort = pre_UNF[u].flatten().sort(descending=True).values[k * 300 - 1]
        assert streamed[u] == by_sort
        assert int((pre_UNF[u] > streamed[u]).sum()) < k * 300 <= int((pre_UNF[u] >= streamed[u]).sum())


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_every_architecture_loads_in_saelens_with_identical_outputs(arch, tmp_path):
    from sae_lens import SAE

    g = torch.Generator().manual_seed(5)
    ensemble = Ensemble([MemberConfig(d_in=D, d_sae=F, arch=arch, **PLANTED[arch])])
    for _ in range(20):
        ensemble.step(planted_data(g, directions(), 64))
    scale = 2.5
    export_for_test(ensemble, 0, tmp_path / arch, scale)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sae = SAE.load_from_disk(tmp_path / arch)
    x_raw = scale * planted_data(g, directions(), 128)
    _, ours = saelens_forward(*load_saelens(tmp_path / arch), x_raw)
    with torch.no_grad():
        torch.testing.assert_close(sae(x_raw), ours, atol=1e-5, rtol=1e-5)
        if arch not in ("batchtopk", "matryoshka"):  # their export is the inference rule, not the batch rule
            torch.testing.assert_close(ours, scale * ensemble.dictionary.reconstruct(x_raw / scale)[0], atol=1e-5, rtol=1e-5)


def test_sweep_axes_parse_and_form_a_grid():
    assert parse_axis("k=16,32") == ("k", [16, 32])
    field, values = parse_axis("l1=logspace(-4,-2,3)")
    assert field == "l1_coeff" and values == pytest.approx([1e-4, 1e-3, 1e-2])
    assert parse_axis("lr=linspace(1e-4,3e-4,3)")[1] == pytest.approx([1e-4, 2e-4, 3e-4])
    base = MemberConfig(d_in=4, d_sae=8, arch="topk", k=2)
    grid = build_members(base, {"k": [1, 2], "seed": [0, 1, 2]})
    assert [(m.k, m.seed) for m in grid] == [(1, 0), (1, 1), (1, 2), (2, 0), (2, 1), (2, 2)]
    with pytest.raises(ValueError, match="topk does not use l1_coeff"):
        build_members(base, {"l1_coeff": [1e-3]})
    with pytest.raises(ValueError, match="NAME=VALUES"):
        parse_axis("depth=3")


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_each_architecture_gets_its_own_default_sparsity_axis(arch):
    """The λ shorthand sweeps each architecture's own coefficient; the TopK family, which has
    none, gets its k axis (20 … 640; matching pursuit's steps 8 … 64) up to its width (and refuses
    the shorthand with the fix)."""
    from training.plan import grid_axes

    field = next((f for f in ("l1_coeff", "l0_coeff") if f in ARCHS[arch].knobs), None)
    if field is None:
        with pytest.raises(ValueError, match="sweep k instead"):
            SweepConfig.from_flat(arch=arch, l1_min=-3, l1_max=-1, n_models=3)
        k_axis = ARCHS[arch].k_axis
        assert grid_axes(SweepConfig.from_flat(arch=arch), arch, 40) == {"k": [k for k in k_axis if k <= 40]}
        assert grid_axes(SweepConfig.from_flat(arch=arch), arch, 5000) == {"k": list(k_axis)}
        assert grid_axes(SweepConfig.from_flat(arch=arch, k=32), arch, 100) == {}
    else:
        axes = grid_axes(SweepConfig.from_flat(arch=arch, l1_min=-3, l1_max=-1, n_models=3), arch, 100)
        assert list(axes) == [field] and axes[field] == pytest.approx([1e-3, 1e-2, 1e-1])


def test_n_models_sets_every_architectures_default_axis_length_or_is_refused_where_it_sets_none():
    from training.plan import grid_axes

    cfg = SweepConfig.from_flat(arch=("relu", "topk", "matching_pursuit"), n_models=3)
    assert [round(v, 6) for v in grid_axes(cfg, "relu", 5000)["l1_coeff"]] == [1e-4, 1e-3, 1e-2]
    assert grid_axes(cfg, "topk", 5000) == {"k": [20, 113, 640]}  # geometric over the default 20 … 640
    assert grid_axes(cfg, "matching_pursuit", 5000) == {"k": [8, 23, 64]}
    assert grid_axes(SweepConfig.from_flat(arch="topk", n_models=6), "topk", 5000) == {"k": [20, 40, 80, 160, 320, 640]}
    assert grid_axes(SweepConfig.from_flat(arch="topk", n_models=4), "topk", 100) == {"k": [20, 34, 58, 100]}
    mixed = SweepConfig.from_flat(arch=("relu", "topk"), n_models=2, k=32)  # topk's k is fixed: relu's axis only
    assert grid_axes(mixed, "topk", 5000) == {} and len(grid_axes(mixed, "relu", 5000)["l1_coeff"]) == 2
    with pytest.raises(ValueError, match="drop --n_models"):
        SweepConfig.from_flat(arch="topk", n_models=3, k=32)
    with pytest.raises(ValueError, match="drop --n_models"):
        SweepConfig.from_flat(arch=("relu", "topk"), n_models=3, l1_coeff=1e-3, sweep=("k=8,16",))


def test_axes_scoped_to_one_architecture_and_shared_ones():
    from training.plan import grid_axes

    cfg = SweepConfig.from_flat(arch=("relu", "topk", "jumprelu"), sweep=("topk:k=8,16", "seed=0,1"), l1_min=-3, l1_max=-2,
                                n_models=2)
    assert grid_axes(cfg, "topk", 64) == {"k": [8, 16], "seed": [0, 1]}
    assert grid_axes(cfg, "relu", 64) == {"l1_coeff": pytest.approx([1e-3, 1e-2]), "seed": [0, 1]}
    assert list(grid_axes(cfg, "jumprelu", 64)) == ["l0_coeff", "seed"]
    with pytest.raises(ValueError, match="gated is not among"):
        SweepConfig.from_flat(arch=("relu", "topk"), sweep=("gated:l1=1e-3",))
    with pytest.raises(ValueError, match="none of relu topk uses it"):
        SweepConfig.from_flat(arch=("relu", "topk"), sweep=("p_end=0.1",))


def test_schedules_warm_up_and_decay():
    schedule = Schedule(total_steps=100, lr_warmup_steps=10, lr_decay_start=0.5, sparsity_warmup_steps=4)
    ensemble = Ensemble([MemberConfig(d_in=4, d_sae=8, l1_coeff=1e-3)])
    seen = []
    for step in (0, 4, 9, 50, 75, 99):
        schedule.apply_(ensemble, step)
        seen.append((ensemble.optimizer.lr_scale, ensemble.dictionary.sparsity_scale.item()))
    expected = [(0.1, 0.25), (0.5, 1.0), (1.0, 1.0), (1.0, 1.0), (0.5, 1.0), (0.02, 1.0)]
    assert [v for pair in seen for v in pair] == pytest.approx([v for pair in expected for v in pair])


def test_cli_sweeps_k_for_topk_and_names_members_by_knob(small_store, tmp_path):
    import json

    out = tmp_path / "topk"
    args = ["--cache", str(small_store), "--source", "blocks.1.hook_resid_post", "--output_dir", str(out),
            "--arch", "topk", "--sweep", "k=2,8", "seed=0,1", "--ratio", "2", "--batch_size", "64", "--lr", "1e-2",
            "--eval_tokens", "400", "--eval_sequences", "2"]
    result = CliRunner().invoke(train_sweep.main, args)
    assert result.exit_code == 0, result.output
    rows = json.loads((out / "sweep.json").read_text())["members"]
    assert [r["name"] for r in rows] == ["00_k_2_seed_0", "01_k_2_seed_1", "02_k_8_seed_0", "03_k_8_seed_1"]
    assert [round(r["l0"]) for r in rows] == [2, 2, 8, 8]
    cfg = json.loads((out / rows[2]["dir"] / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["k"] == 8
    bad = CliRunner().invoke(train_sweep.main, args[:-2] + ["--sweep", "l1=1e-3", "--output_dir", str(tmp_path / "x")])
    assert bad.exit_code == 1 and "topk does not use l1_coeff" in bad.output


def test_cli_trains_abstopk_and_matching_pursuit_in_one_run_and_saelens_loads_every_member(small_store, tmp_path):
    """The two rules SAELens added run through the whole CLI path (several architectures in one
    pass, held-out evaluation from the exported files) and load in SAELens as what they are."""
    import json

    from sae_lens import SAE

    out = tmp_path / "new"
    args = ["--cache", str(small_store), "--source", "blocks.1.hook_resid_post", "--output_dir", str(out),
            "--arch", "abstopk", "matching_pursuit", "--sweep", "k=2,6", "--ratio", "2", "--batch_size", "64",
            "--lr", "1e-2", "--eval_tokens", "400", "--eval_sequences", "2"]
    result = CliRunner().invoke(train_sweep.main, args)
    assert result.exit_code == 0, result.output
    rows = json.loads((out / "sweep.json").read_text())["members"]
    assert [(r["arch"], r["k"]) for r in rows] == [("abstopk", 2), ("abstopk", 6), ("matching_pursuit", 2), ("matching_pursuit", 6)]
    for r in rows:
        assert r["l0"] <= r["k"] + 1e-6 and (r["arch"] == "matching_pursuit" or r["l0"] == pytest.approx(r["k"]))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sae = SAE.load_from_disk(out / r["dir"])
        assert sae.cfg.architecture() == r["arch"] and getattr(sae.cfg, "k", None) in (None, r["k"])


KILL_CASES = {
    "batchtopk": ["--arch", "batchtopk", "--sweep", "k=2,4"],
    "panneal-widths-resampling": ["--arch", "panneal", "--sweep", "l1=1e-3,3e-2", "d_sae=8,16", "--p_anneal_start", "0.3",
                                  "--p_anneal_updates", "3", "--resample_every", "4", "--resample_stop", "0.9",
                                  "--resample_pool", "300"],
    "topk-k-annealing": ["--arch", "topk", "--sweep", "k=2,4", "--k_anneal_steps", "20"],
    "jumprelu": ["--arch", "jumprelu", "--sweep", "l0=1e-3,1e-2", "--threshold_init", "0.1", "--bandwidth", "0.05"],
    "gated": ["--arch", "gated", "--sweep", "l1=1e-3,1e-2"],
    "matryoshka": ["--arch", "matryoshka", "--sweep", "k=2,4"],
    "relu_april": ["--arch", "relu_april", "--sweep", "l1=1e-3,1e-2"],
    "crosscoder-two-sources": ["--arch", "crosscoder", "--sources", "blocks.1.hook_resid_post,blocks.2.hook_mlp_out",
                               "--sweep", "l1=1e-3,1e-2"],
}


def _kill_args(store, out, arch_args) -> list[str]:
    source = [] if "--sources" in arch_args else ["--source", "blocks.1.hook_resid_post"]
    return ["--cache", str(store), *source, "--output_dir", str(out), *arch_args, "--ratio", "2", "--batch_size", "64",
            "--lr", "1e-2", "--n_epochs", "2", "--eval_tokens", "400", "--checkpoint_every", "5",
            "--dead_window", "128", "--no_eval"]


def _assert_same_members(a_dir, b_dir) -> None:
    """Bit-identical exported weights, and the same training record, member for member."""
    import json

    from safetensors.torch import load_file

    rows_a = json.loads((a_dir / "sweep.json").read_text())["members"]
    rows_b = json.loads((b_dir / "sweep.json").read_text())["members"]
    for ra, rb in zip(rows_a, rows_b, strict=True):
        assert (ra["train_tokens"], ra["dead_fraction_train"]) == (rb["train_tokens"], rb["dead_fraction_train"])
        weights = "sae_weights.safetensors" if (a_dir / ra["dir"] / "sae_weights.safetensors").exists() else "model.safetensors"
        a, b = load_file(a_dir / ra["dir"] / weights), load_file(b_dir / rb["dir"] / weights)
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=f"{ra['name']} {key}")


@pytest.mark.parametrize("arch_args", list(KILL_CASES.values()), ids=list(KILL_CASES))
def test_a_killed_sweep_resumes_to_the_same_weights(small_store, tmp_path, monkeypatch, arch_args):
    """A crash with no chance to save (as kill -9): the periodic checkpoint carries parameters,
    Adam moments, dead-latent counters, the threshold average, the Lp rescale and its queue, so
    the resumed run matches (resampling, k annealing and p steps included)."""
    import training.trainer as trainer

    assert CliRunner().invoke(train_sweep.main, _kill_args(small_store, tmp_path / "whole", arch_args)).exit_code == 0
    # not KeyboardInterrupt: no checkpoint is written on the way out
    original = fail_at_call(monkeypatch, trainer.Ensemble, "step", 13, RuntimeError("killed"))
    assert CliRunner().invoke(train_sweep.main, _kill_args(small_store, tmp_path / "killed", arch_args)).exit_code != 0
    monkeypatch.setattr(trainer.Ensemble, "step", original)
    resumed = CliRunner().invoke(train_sweep.main, _kill_args(small_store, tmp_path / "killed", arch_args))
    assert resumed.exit_code == 0 and "resuming" in resumed.output and "step 10" in resumed.output
    _assert_same_members(tmp_path / "whole", tmp_path / "killed")


SIGINT_POINTS = {  # where inside a step the signal lands: (owner, method it arrives at the start of)
    "forward": ("training.dictionary", "Dictionary", "loss"),
    "optimiser": ("training.ensemble", "BatchedAdam", "step"),
    "statistics": ("training.dictionary", "Dictionary", "observe_"),
}


@pytest.mark.parametrize("point", list(SIGINT_POINTS))
def test_sigint_inside_a_step_then_resume_equals_the_uninterrupted_run(small_store, tmp_path, monkeypatch, point):
    """A real SIGINT arrives inside a random step — as its forward starts, as the optimiser starts
    (gradients computed, weights not yet moved) or as the step's statistics are about to be
    applied (weights moved): training stops at the next step boundary with a checkpoint, and the
    resumed run is bit-identical to one never interrupted. A checkpoint taken where the signal
    landed would hold weights and statistics (BatchTopK's threshold average, dead-latent
    counters) of different steps."""
    import importlib
    import os
    import random
    import signal

    arch_args = ["--arch", "batchtopk", "--sweep", "k=2,4,8", "--ratio", "8"]
    args = lambda out: _kill_args(small_store, out, arch_args)  # noqa: E731
    assert CliRunner().invoke(train_sweep.main, args(tmp_path / "whole")).exit_code == 0
    module, owner_name, method = SIGINT_POINTS[point]
    owner = getattr(importlib.import_module(module), owner_name)
    at_call = random.Random(point).randint(3, 30)
    original, calls = getattr(owner, method), {"n": 0}

    def arrive(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == at_call:
            os.kill(os.getpid(), signal.SIGINT)  # handled at the next bytecode: here, inside the step
        return original(self, *args, **kwargs)

    monkeypatch.setattr(owner, method, arrive)
    interrupted = CliRunner().invoke(train_sweep.main, args(tmp_path / "cut"))
    assert interrupted.exit_code == 130, interrupted.output
    monkeypatch.setattr(owner, method, original)
    resumed = CliRunner().invoke(train_sweep.main, args(tmp_path / "cut"))
    assert resumed.exit_code == 0 and "resuming" in resumed.output, resumed.output
    _assert_same_members(tmp_path / "whole", tmp_path / "cut")


def _dense_topk_reference(d: Dictionary, x: torch.Tensor) -> torch.Tensor:
    """The TopK loss written densely (all of f materialised, AuxK over a masked dense matrix)."""
    from training.kernels import keep_top

    pre = d.pre_activation(x)
    f = keep_top(torch.relu(pre), d.k)
    x_hat = torch.bmm(f, d.W_dec) + d.b_dec.unsqueeze(1)
    mse = (x_hat - x).pow(2).mean(dim=(1, 2))
    dead = (d.tokens_since_fired >= d.aux_dead_tokens).unsqueeze(1)
    residual = (x - x_hat).detach()
    aux_f = keep_top(torch.relu(pre).masked_fill(~dead, 0.0), torch.full_like(d.k, d.aux_k))
    err = (torch.bmm(aux_f, d.W_dec) - residual).pow(2).sum(dim=(1, 2))
    var = (residual - residual.mean(1, keepdim=True)).pow(2).sum(dim=(1, 2))
    aux = torch.where(dead.flatten(1).any(-1), err / var, torch.zeros_like(err))
    return (mse + d.aux_coeff * aux).sum()


def test_sparse_topk_path_equals_the_dense_computation_in_loss_and_gradients():
    torch.manual_seed(0)
    d = Dictionary([MemberConfig(d_in=D, d_sae=F, arch="topk", k=k, aux_k=5) for k in (3, 7)]).double()
    with torch.no_grad():
        d.b_dec.normal_()
        d.b_enc.normal_(std=0.1)
        d.tokens_since_fired[0, ::3] = 10**9  # some dead latents in member 0, none in member 1
    d.eval()  # no counter updates, so both computations see the same dead set
    x = torch.randn(40, D, dtype=torch.float64)
    params = list(d.parameters())
    sparse_loss = d.loss(x).total.sum()
    dense_loss = _dense_topk_reference(d, x)
    torch.testing.assert_close(sparse_loss, dense_loss)
    for g_sparse, g_dense, p in zip(torch.autograd.grad(sparse_loss, params), torch.autograd.grad(dense_loss, params),
                                    dict(d.named_parameters())):
        torch.testing.assert_close(g_sparse, g_dense, msg=p)


def test_matryoshka_loss_is_the_mean_reconstruction_loss_of_its_nested_prefixes():
    from training.dictionary import nested_prefix_ends

    assert nested_prefix_ends(1024, (1 / 32, 1 / 16)) == [32, 96, 1024]
    torch.manual_seed(0)
    d = Dictionary([MemberConfig(d_in=D, d_sae=F, arch="matryoshka", k=4, group_fractions=(1 / 8, 1 / 4))])
    d.eval()
    x = torch.randn(16, D)
    out = d.loss(x)
    f = out.codes.dense[0]
    ends = [6, 18, 48]
    expected = torch.stack([((f[:, :m] @ d.W_dec[0, :m] + d.b_dec[0]) - x).pow(2).mean() for m in ends]).mean()
    torch.testing.assert_close(out.total[0], expected)  # no AuxK yet: nothing is dead
    torch.testing.assert_close(out.mse[0], ((f @ d.W_dec[0] + d.b_dec[0]) - x).pow(2).mean())


def test_k_anneals_from_d_in_down_to_k():
    schedule = Schedule(total_steps=30, k_anneal_steps=10)
    ensemble = Ensemble([MemberConfig(d_in=D, d_sae=F, arch="topk", k=k) for k in (2, 4)])
    seen = []
    for step in (0, 5, 10, 20):
        schedule.apply_(ensemble, step)
        seen.append(ensemble.dictionary.k_active.tolist())
    assert seen == [[16, 16], [9, 10], [2, 4], [2, 4]]
    x = planted_data(torch.Generator().manual_seed(0), directions(), 8)
    schedule.apply_(ensemble, 0)
    assert all(l0 > 4 for l0 in ensemble.step(x).l0.tolist())  # the annealed k, not the final one, is in force


# ---------------------------------------------------------------- gated and p-annealing

def test_gated_loss_and_gradients_equal_the_written_out_formula():
    torch.manual_seed(0)
    d = Dictionary([MemberConfig(d_in=D, d_sae=F, arch="gated", l1_coeff=0.3)]).double()
    with torch.no_grad():
        d.b_dec.normal_()
        d.b_enc.normal_(std=0.1)
        d.r_mag.normal_(std=0.3)
        d.b_mag.normal_(std=0.1)
    d.eval()
    x = torch.randn(32, D, dtype=torch.float64)
    W, W_dec, b_dec = d.W_enc[0], d.W_dec[0], d.b_dec[0]
    centred = x - b_dec
    gate = centred @ W + d.b_enc[0]
    f = (gate > 0) * torch.relu(centred @ (W * d.r_mag[0].exp()) + d.b_mag[0])
    x_hat = f @ W_dec + b_dec
    aux = torch.relu(gate) @ W_dec.detach() + b_dec.detach()
    expected = ((x_hat - x).pow(2).mean() + 0.3 * torch.relu(gate).sum(-1).mean() + (aux - x).pow(2).mean())
    ours = d.loss(x).total.sum()
    torch.testing.assert_close(ours, expected)
    params = list(d.parameters())
    for g_ours, g_ref, name in zip(torch.autograd.grad(ours, params), torch.autograd.grad(expected, params),
                                   dict(d.named_parameters())):
        torch.testing.assert_close(g_ours, g_ref, msg=name)


def test_lp_penalty_known_answer_and_finite_gradient_at_zero():
    from training.dictionary import lp_penalty

    f = torch.tensor([[[0.0, 0.25, 4.0]]], requires_grad=True)
    value = lp_penalty(f, torch.tensor([0.5]))
    assert value.item() == pytest.approx(0.5 + 2.0)
    (grad,) = torch.autograd.grad(value.sum(), [f])
    assert torch.isfinite(grad).all() and grad[0, 0, 0] == 0
    assert grad[0, 0, 1].item() == pytest.approx(0.5 * 0.25**-0.5)


def test_p_steps_from_one_to_p_end_and_lambda_keeps_the_penalty_size():
    from training.dictionary import lp_penalty
    from training.schedules import p_updates_done

    assert [p_updates_done(s, 100, 0.2, 4) for s in (0, 19, 20, 39, 40, 99)] == [0, 0, 1, 1, 2, 4]
    schedule = Schedule(total_steps=100, p_anneal_start=0.2, p_anneal_updates=4)
    ensemble = Ensemble([MemberConfig(d_in=D, d_sae=F, arch="panneal", p_end=p, lr=1e-9) for p in (0.2, 0.6)])
    x = planted_data(torch.Generator().manual_seed(6), directions(), 64)
    for step in range(20):  # p = 1: the queue fills with L1 values of (practically) fixed weights
        schedule.apply_(ensemble, step)
        l1_E = ensemble.step(x).sparsity
    schedule.apply_(ensemble, 20)
    d = ensemble.dictionary
    torch.testing.assert_close(d.p_active, torch.tensor([0.8, 0.9]))
    out = ensemble.step(x)  # p moved: λ is rescaled so that r · Lp(new p) equals the recent L1
    torch.testing.assert_close(d.coeff_rescale * out.sparsity, l1_E, rtol=1e-4, atol=0)
    assert (d.coeff_rescale != 1).all()
    schedule.apply_(ensemble, 99)
    torch.testing.assert_close(d.p_active, torch.tensor([0.2, 0.6]))
    f = d.encode(x).detach()
    torch.testing.assert_close(out.sparsity, lp_penalty(f, torch.tensor([0.8, 0.9])), rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- width sweeps

@pytest.mark.parametrize("arch", ["relu", "topk", "batchtopk", "jumprelu", "gated"])
def test_a_narrow_member_masked_inside_a_wide_ensemble_equals_it_trained_alone(arch):
    g = torch.Generator().manual_seed(7)
    knobs = {k: v for k, v in PLANTED[arch].items()}
    widths = [F, 20, 32]
    together = Ensemble([MemberConfig(d_in=D, d_sae=w, arch=arch, seed=e, **knobs) for e, w in enumerate(widths)],
                        dead_tokens=64)
    alone = [Ensemble([m], dead_tokens=64) for m in together.members]
    for _ in range(8):
        x = planted_data(g, directions(), 32)
        together.step(x)
        for solo in alone:
            solo.step(x)
    d = together.dictionary
    assert not (d.W_dec[1, 20:].any() or d.W_enc[1, :, 20:].any())  # masked latents never move from 0
    assert (d.tokens_since_fired[1, 20:] > 0).all()  # ...and never fire
    for e, solo in enumerate(alone):
        ours, theirs = d.member_tensors(e, 2.0), solo.dictionary.member_tensors(0, 2.0)
        assert ours["W_dec"].shape == (widths[e], D)
        for name in theirs:
            torch.testing.assert_close(ours[name], theirs[name], rtol=1e-4, atol=1e-5, msg=f"{arch} member {e} {name}")


def test_width_sweep_cli_exports_each_width_with_statistics_over_its_own_latents(small_store, tmp_path):
    import json

    from safetensors.torch import load_file

    out = tmp_path / "widths"
    args = ["--cache", str(small_store), "--source", "blocks.1.hook_resid_post", "--output_dir", str(out),
            "--arch", "topk", "--k", "2", "--sweep", "d_sae=8,24", "--batch_size", "64", "--lr", "1e-2",
            "--eval_tokens", "400", "--eval_sequences", "0"]
    result = CliRunner().invoke(train_sweep.main, args)
    assert result.exit_code == 0, result.output
    rows = json.loads((out / "sweep.json").read_text())["members"]
    assert [r["name"] for r in rows] == ["00_d_sae_8", "01_d_sae_24"]
    for r, width in zip(rows, (8, 24)):
        cfg = json.loads((out / r["dir"] / "cfg.json").read_text())
        assert cfg["d_sae"] == width and r["l0"] == pytest.approx(2, abs=0.5)
        # every per-latent statistic over the member's own latents, not the widest member's
        log10_density = load_file(out / r["dir"] / "sparsity.safetensors")["sparsity"]
        assert log10_density.shape == (width,)
        assert r["dead_fraction"] == pytest.approx((log10_density <= -10).float().mean().item())
        assert r["dense_fraction_10pct"] == pytest.approx((log10_density > -1).float().mean().item())
    assert rows[0]["dead_fraction"] < (24 - 8) / 24  # what averaging over the padded width gave at least
    bad = CliRunner().invoke(train_sweep.main, [*args[:-4], "--arch", "matryoshka", "--output_dir", str(tmp_path / "m")])
    assert bad.exit_code == 1 and "matryoshka members must share d_sae" in bad.output


# ---------------------------------------------------------------- resampling

def _with_dead_latents(arch: str = "relu", seeds: tuple[int, ...] = (0, 1, 2)) -> Ensemble:
    ensemble = Ensemble([MemberConfig(d_in=D, d_sae=F, arch=arch, l1_coeff=1e-2, lr=1e-2, seed=s) for s in seeds])
    x = planted_data(torch.Generator().manual_seed(8), directions(), 64)
    for _ in range(3):
        ensemble.step(x)  # non-zero Adam moments everywhere
    ensemble.dictionary.tokens_since_fired.zero_()
    ensemble.dictionary.tokens_since_fired[:, ::4] = 10**6  # every fourth latent is dead
    return ensemble


@pytest.mark.parametrize("arch", ["relu", "relu_april", "gated"])
def test_resampling_sets_dead_latents_from_high_loss_inputs_and_resets_their_adam_state(arch):
    ensemble = _with_dead_latents(arch)
    d = ensemble.dictionary
    dead = torch.zeros(F, dtype=torch.bool)
    dead[::4] = True
    before = {n: p.detach().clone() for n, p in d.named_parameters()}
    alive_enc_norm = d.W_enc[0][:, ~dead].norm(dim=0).mean()
    alive_dec_norm = d.W_dec[0, ~dead].norm(dim=-1).mean()
    # a pool of 32 rows, one with a loss ~10⁶ times the others': drawn with probability ∝ loss²,
    # it is always picked, and the 12 dead latents draw 12 different rows (no replacement)
    x = planted_data(torch.Generator().manual_seed(9), directions(), 32)
    x[5] = 1000 * directions()[0]
    n = ensemble.resample_dead_(x, window=1000, step=7)
    assert n.tolist() == [12, 12, 12]
    targets = x - d.b_dec[0] if d.subtract_b_dec else x
    pool_dirs = targets / targets.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # [32, D]
    norm = 1.0 if d.spec.unit_norm_decoder else alive_dec_norm
    rows = d.W_dec[0, dead] / norm
    match = (rows @ pool_dirs.T).argmax(-1)  # the pool row each dead latent took
    torch.testing.assert_close(rows, pool_dirs[match], rtol=1e-4, atol=1e-5)
    assert len(set(match.tolist())) == 12 and 5 in match.tolist()
    torch.testing.assert_close(d.W_enc[0][:, dead].norm(dim=0), (0.2 * alive_enc_norm).expand(12), rtol=1e-4, atol=1e-6)
    assert not d.b_enc[:, dead].any() and not d.tokens_since_fired[:, dead].any()
    for name, p, axis in d.latent_params():
        torch.testing.assert_close(p.index_select(axis, (~dead).nonzero().squeeze(1)),
                                   before[name].index_select(axis, (~dead).nonzero().squeeze(1)), msg=name)
        i = [id(q) for q in ensemble.optimizer.params].index(id(p))
        for moments in (ensemble.optimizer.exp_avg[i], ensemble.optimizer.exp_avg_sq[i]):
            assert not moments.index_select(axis, dead.nonzero().squeeze(1)).any(), name
            assert moments.index_select(axis, (~dead).nonzero().squeeze(1)).any(), name


def test_resampling_a_member_is_the_same_in_an_ensemble_and_alone():
    together = _with_dead_latents(seeds=(0, 1, 2))
    x = planted_data(torch.Generator().manual_seed(10), directions(), 64)
    together.resample_dead_(x, window=1000, step=5)
    for e in range(3):
        alone = _with_dead_latents(seeds=(e,))
        alone.resample_dead_(x, window=1000, step=5)
        for name, tensor in alone.dictionary.named_parameters():
            torch.testing.assert_close(dict(together.dictionary.named_parameters())[name][e], tensor[0], msg=name)


def test_resampling_is_refused_where_the_architecture_has_its_own_remedy():
    with pytest.raises(ValueError, match="L1 architectures"):
        SweepConfig.from_flat(arch="topk", resample_every=100)
    with pytest.raises(ValueError, match="L1 architectures"):
        Ensemble([MemberConfig(d_in=D, d_sae=F, arch="jumprelu")]).resample_dead_(torch.zeros(4, D), 1, 1)


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)])
def test_exported_files_are_as_readable_as_the_umask_makes_any_file(tmp_path, umask, mode):
    """safetensors creates its files 0600; exports follow the umask as cfg.json does, so a group
    on a shared cluster can read the weights."""
    import os

    from formats.saelens import save_density

    ensemble = Ensemble([MemberConfig(d_in=D, d_sae=F, arch="relu")])
    previous = os.umask(umask)
    try:
        export_for_test(ensemble, 0, tmp_path / "m")
        save_density(tmp_path / "m", torch.rand(F))
    finally:
        os.umask(previous)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "m").iterdir()}
    assert modes == {"cfg.json": mode, "sae_weights.safetensors": mode, "sparsity.safetensors": mode}
