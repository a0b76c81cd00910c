"""Defaults that work out of the box: each architecture's recipe gives a sparsity frontier with
the README's commands (scaled to a small store), a fixed coefficient on the command line wins
over the shorthand, and a run too short for its schedule says so."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

import generate_activations
import train_sweep
from tests.conftest import corpus, gen_args
from tests.test_end_to_end import assert_one_line_error

SOURCE = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def recipe_store(tmp_path_factory):
    """A store large enough for a few hundred steps of 64 rows."""
    text = tmp_path_factory.mktemp("recipe-text")
    for i, doc in enumerate(corpus(400, seed=3)):
        (text / f"doc{i:03d}.txt").write_text(doc)
    out = tmp_path_factory.mktemp("recipes") / "store"
    result = CliRunner().invoke(generate_activations.main, gen_args(out, text, **{"--n_tokens": "12000"}))
    assert result.exit_code == 0, result.output
    return out


def _readme_sweep(store, out, *extra: str) -> list[dict]:
    """The README's sweep command with nothing but its size scaled down (no --lr, no schedule flags)."""
    args = ["--cache", str(store), "--output_dir", str(out), "--ratio", "4", "--batch_size", "64",
            "--n_epochs", "2", "--eval_tokens", "1000", "--eval_sequences", "0", *extra]
    result = CliRunner().invoke(train_sweep.main, args)
    assert result.exit_code == 0, result.output
    return json.loads((out / "sweep.json").read_text())["members"]


# The README sweeps λ over 1e-4 … 1e-2 for d 512; the reconstruction term is averaged over d and
# the penalty summed over latents, so at this store's d 32 the same sparsities sit ~16× higher.
@pytest.mark.parametrize("arch_args", [
    ["--arch", "relu", "--l1_min", "-3", "--l1_max", "-1", "--n_models", "3"],
    ["--arch", "jumprelu", "--l1_min", "-3", "--l1_max", "-1", "--n_models", "3"],
    ["--arch", "topk", "--sweep", "k=4,16"],
], ids=["relu", "jumprelu", "topk"])
def test_default_recipes_give_a_frontier_across_the_sweep(recipe_store, tmp_path, arch_args):
    rows = _readme_sweep(recipe_store, tmp_path / "run", *arch_args)
    l0 = [r["l0"] for r in rows]
    assert max(l0) >= 2 * min(l0), l0  # the knob has a visible effect with default settings
    ordered = l0 if arch_args[1] == "topk" else l0[::-1]  # L0 grows with k, falls with λ
    assert ordered == sorted(ordered), l0
    assert min(r["fvu"] for r in rows) < 0.5, [r["fvu"] for r in rows]  # the densest member reconstructs
    if arch_args[1] == "topk":  # the top-k family's lr: 8e-4/√(d_sae/2¹⁴), measured (bench/RESULTS.md "Quality")
        resolved = json.loads((tmp_path / "run" / "sweep_config.json").read_text())["resolved"]
        assert resolved["lr"] == pytest.approx(8e-4 / (4 * 32 / 2**14) ** 0.5)  # --ratio 4 at d 32


def test_a_fixed_coefficient_wins_and_the_shorthand_is_not_silently_applied(recipe_store, tmp_path):
    rows = _readme_sweep(recipe_store, tmp_path / "fixed", "--arch", "jumprelu", "--l0_coeff", "0.05")
    assert len(rows) == 1 and rows[0]["l0_coeff"] == 0.05
    cfg = json.loads((tmp_path / "fixed" / rows[0]["dir"] / "cfg.json").read_text())
    assert cfg["metadata"]["sae_sweep"]["l0_coeff"] == 0.05
    # the member records the knobs its architecture reads, not every other architecture's
    assert "k" not in cfg["metadata"]["sae_sweep"] and "p_end" not in cfg["metadata"]["sae_sweep"]
    both = CliRunner().invoke(train_sweep.main, ["--cache", str(recipe_store), "--output_dir", str(tmp_path / "both"),
                                                 "--arch", "jumprelu", "--l0_coeff", "0.05", "--l1_min", "-3"])
    assert_one_line_error(both, "--l0_coeff", "give one of them")
    assert not (tmp_path / "both").exists()
    wrong = CliRunner().invoke(train_sweep.main, ["--cache", str(recipe_store), "--output_dir", str(tmp_path / "w"),
                                                  "--arch", "relu", "--l0_coeff", "0.05"])
    assert_one_line_error(wrong, "--l0_coeff does not apply to relu", "--l1_coeff")


def test_a_short_run_says_so_with_the_fix_and_k_annealing_longer_than_the_run_is_refused(recipe_store, tmp_path):
    args = ["--cache", str(recipe_store), "--output_dir", str(tmp_path / "short"), "--batch_size", "1024",
            "--eval_sequences", "0", "--l1_min", "-3", "--n_models", "1"]
    result = CliRunner().invoke(train_sweep.main, args)
    assert result.exit_code == 0, result.output
    note = next(line for line in result.output.splitlines() if line.startswith("note:"))
    assert "short for its schedule" in note and "--n_epochs" in note and "--batch_size" in note
    resolved = json.loads((tmp_path / "short" / "sweep_config.json").read_text())["resolved"]
    assert resolved["lr"] == 1e-3 and resolved["grad_clip"] == 1.0  # the relu recipe, recorded
    annealed = CliRunner().invoke(train_sweep.main, ["--cache", str(recipe_store), "--output_dir", str(tmp_path / "k"),
                                                     "--arch", "topk", "--k_anneal_steps", "100000"])
    assert_one_line_error(annealed, "--k_anneal_steps 100000 is longer than the run")
