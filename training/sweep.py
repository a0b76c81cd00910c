"""A sweep is a list of member configs: a base member and a grid over knob axes.

    --sweep k=16,32,64             values
    --sweep l1=logspace(-4,-2,8)   8 log-spaced values from 1e-4 to 1e-2
    --sweep lr=linspace(1e-4,1e-3,4) --sweep seed=0,1,2    several axes: their grid
    --sweep d_sae=4096,8192,16384  widths, trained as masks inside the widest member

`--l1_min/--l1_max/--n_models` is the shorthand for a log-spaced axis over the architecture's
sparsity coefficient (l1 for relu/relu_april, l0_coeff for jumprelu) when no --sweep names it.
"""
from __future__ import annotations

import dataclasses
import itertools
import re

import numpy as np

from training.members import MemberConfig

# Axis names a user may write → MemberConfig field.
AXES = {"l1": "l1_coeff", "l1_coeff": "l1_coeff", "l0": "l0_coeff", "l0_coeff": "l0_coeff", "k": "k",
        "lr": "lr", "seed": "seed", "bandwidth": "bandwidth", "aux_coeff": "aux_coeff", "d_sae": "d_sae",
        "width": "d_sae", "p_end": "p_end", "threshold_init": "threshold_init",
        "decoder_init_norm": "decoder_init_norm", "grad_clip": "grad_clip", "preact_coeff": "preact_coeff",
        "residual_threshold": "residual_threshold"}
_INT_FIELDS = {"k", "seed", "d_sae"}
_SHORT = {"l1_coeff": "l1", "l0_coeff": "l0"}  # how an axis appears in member names


def axis_scope(spec: str) -> tuple[str | None, str]:
    """'topk:k=20,40' → ("topk", "k=20,40"): an axis for one architecture of the run; 'k=20,40' → (None, …)."""
    head, sep, rest = spec.partition(":")
    if sep and "=" not in head:
        return head.strip(), rest
    return None, spec


def parse_values(values: str) -> list[float]:
    """'16,32' → [16.0, 32.0]; also logspace(a,b,n) or linspace(a,b,n). ValueError if the text
    holds no numbers or something else."""
    match = re.fullmatch(r"\s*(logspace|linspace)\(([^,]+),([^,]+),([^,]+)\)\s*", values)
    try:
        if match:
            spacing, a, b, n = match.groups()
            numbers = [float(v) for v in (np.logspace if spacing == "logspace" else np.linspace)(float(a), float(b), int(n))]
        else:
            numbers = [float(v) for v in values.split(",") if v.strip()]
    except ValueError:
        raise ValueError("values must be numbers, logspace(a,b,n) or linspace(a,b,n)") from None
    if not numbers:
        raise ValueError("no values given")
    return numbers


def parse_axis(spec: str) -> tuple[str, list[float]]:
    """'k=16,32' → ("k", [16, 32]); values as for parse_values."""
    name, sep, values = spec.partition("=")
    name = name.strip()
    if not sep or name not in AXES:
        raise ValueError(f"--sweep {spec!r}: write NAME=VALUES with NAME one of {', '.join(sorted(set(AXES)))}")
    try:
        numbers = parse_values(values)
    except ValueError as err:
        raise ValueError(f"--sweep {spec!r}: {err}") from None
    field = AXES[name]
    return field, [int(v) for v in numbers] if field in _INT_FIELDS else numbers


def build_members(base: MemberConfig, axes: dict[str, list[float]]) -> list[MemberConfig]:
    """One member per point of the grid over `axes` (field → values), in row-major order."""
    unused = [a for a in axes if a not in base.spec.knobs]
    if unused:
        raise ValueError(f"{base.arch} does not use {', '.join(unused)}; its knobs are {', '.join(base.spec.knobs)}")
    names = list(axes)
    return [dataclasses.replace(base, **dict(zip(names, point))) for point in itertools.product(*axes.values())]


def shorthand_axis(arch_knobs: tuple[str, ...], l1_min: float, l1_max: float, n_models: int) -> dict[str, list[float]]:
    """The --l1_min/--l1_max/--n_models axis over the architecture's sparsity coefficient: the
    l1_coeff or l0_coeff among its knobs (none for the TopK family)."""
    field = next((f for f in ("l1_coeff", "l0_coeff") if f in arch_knobs), None)
    if field is None:
        return {}
    values = np.logspace(l1_min, l1_max, n_models) if n_models > 1 else [10**l1_min]
    return {field: [float(v) for v in values]}


def k_axis(default: tuple[int, ...], n_models: int | None, d_sae: int) -> list[int]:
    """An architecture's default k axis up to d_sae; with --n_models, that many values spaced
    geometrically over the same range (6 over 20 … 640 is the default axis itself)."""
    top = min(default[-1], d_sae)
    if n_models is None:
        return [k for k in default if k <= d_sae] or [d_sae]
    if n_models == 1 or top <= default[0]:
        return [min(default[0], d_sae)]
    return sorted({int(round(k)) for k in np.geomspace(default[0], top, n_models)})


def member_name(e: int, member: MemberConfig, axes: list[str], label: str = "", arch: str | None = None) -> str:
    """Directory name of member e from its wiring's label and the knobs the sweep varies, e.g.
    03_l1_0.00072, 01_k_32_seed_1, 05_L02_k_16; with `arch` (a run of several architectures) it
    leads, e.g. topk_01_k_40, so a listing sorts by architecture."""
    parts = [f"{_SHORT.get(a, a)}_{getattr(member, a):.3g}" for a in axes]
    parts = ([label] if label else []) + parts
    head = [arch] if arch else []
    return "_".join([*head, f"{e:02d}", *parts]) if parts or arch else f"{e:02d}_{member.arch}"
