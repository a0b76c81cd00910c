"""Each CLI's options are its configuration dataclass's fields (runtime/cli_options.py
`dataclass_options`): a default and a help text are written once, under the field, and cannot
drift from what the CLI does."""
from __future__ import annotations

import dataclasses

import pytest

import evaluate
import generate_activations
import train_suite
import train_sweep
from cache.config import GenerateConfig
from cache.models import DEMO_LAYER, DEMO_MODEL_NAME
from evaluation.config import EvalConfig
from runtime.cli_options import flat_fields
from suite.config import SuiteConfig
from training.config import SweepConfig

# Each CLI, its configuration, and the options it adds that are not configuration.
CLIS = [
    (train_sweep.main, SweepConfig,
     {"run_eval", "eval_sequences", "eval_budget", "eval_batch_size", "browser", "wandb_project", "hf_repo_id", "dist_timeout"}),
    (generate_activations.main, GenerateConfig, {"dist_timeout", "verify"}),
    (evaluate.main, EvalConfig, {"compare", "out", "force", "browser", "reevaluate", "browser_rows", "browser_format", "serve",
                                 "push"}),
    (train_suite.main, SuiteConfig, set()),
]


@pytest.mark.parametrize("main, config, own", CLIS, ids=[config.__name__ for _, config, _ in CLIS])
def test_the_cli_options_are_the_configuration_fields(main, config, own):
    """Every field has its option, with the field's default when the option is not given (None
    for a dict, whose JSON was not given, and for a field without a default that the CLI may run
    without; required where it may not) and its docstring as help; the CLI adds only its own."""
    params = {p.name: p for p in main.params}
    fields = flat_fields(config)
    assert set(params) - {f.name for f, _, _ in fields} == own
    given = [word for p in main.params if p.required for word in (p.opts[0], "given")]
    parsed = main.make_context(main.name, given).params
    for f, _, _ in fields:
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        expected = ("given" if params[f.name].required else
                    None if default is dataclasses.MISSING or isinstance(default, dict) else default)
        assert parsed[f.name] == expected, f.name
        assert params[f.name].help, f"{f.name} has no help (a docstring under the field)"


def test_flags_on_by_default_or_decided_later_keep_their_off_switches():
    params = {p.name: p for p in generate_activations.main.params}
    assert params["exclude_bos"].opts + params["exclude_bos"].secondary_opts == ["--exclude_bos", "--include_bos"]
    assert params["prepend_bos"].opts + params["prepend_bos"].secondary_opts == ["--prepend_bos", "--no_prepend_bos"]
    parsed = generate_activations.main.make_context("g", ["--include_bos", "--no_prepend_bos"]).params
    assert (parsed["exclude_bos"], parsed["prepend_bos"]) == (False, False)


def test_the_model_help_names_the_demo_that_runs_without_a_model():
    model = next(p for p in generate_activations.main.params if p.name == "model")
    assert f"demo model {DEMO_MODEL_NAME} (GGUF), layer {DEMO_LAYER}]" in model.help


@pytest.mark.parametrize("main, concept, names, required", [
    (train_sweep.main, "eval_sequences", ("--eval_sequences", "--n_sequences"), []),
    (evaluate.main, "n_sequences", ("--eval_sequences", "--n_sequences"), ["--run_dir", "r"]),
    (train_sweep.main, "output_dir", ("--output_dir", "--out"), []),
    (evaluate.main, "out", ("--output_dir", "--out"), ["--run_dir", "r"]),
    (generate_activations.main, "out", ("--output_dir", "--out"), []),
    (train_suite.main, "output_dir", ("--output_dir", "--out"), ["--cache", "c"]),
])
def test_one_concept_has_the_same_names_in_every_cli(main, concept, names, required):
    """Where the output goes and how many held-out sequences are spliced: both spellings work in
    every CLI that has the concept (one is the old name, kept as an alias)."""
    for name in names:
        value = "7" if "sequences" in name else "somewhere"
        parsed = main.make_context(main.name, [*required, name, value]).params
        assert str(parsed[concept]) == value, name
