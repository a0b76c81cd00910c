"""What a sweep trains, from its configuration and the store: the run's length, and per
architecture its resolved recipe and its members (the grid of knobs for every wiring), named.

    parts = plan_parts(cfg, stream, wirings, exclude_ids, d_in, d_out)
    for part in parts: part.arch, part.resolved, part.members, part.names

Every default is computed once, here: a value the configuration gives wins, else the
architecture's recipe (training/members.py `ARCHS`), else what the store implies (JumpReLU
thresholds in its activations' units, the dead window at most a quarter of the run).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from training.config import SHORTHAND_DEFAULTS, SweepConfig
from training.members import ARCHS, MemberConfig
from training.schedules import Schedule, short_run_note
from training.sweep import build_members, k_axis, member_name, parse_axis, shorthand_axis
from training.wiring import Wiring

REFERENCE_THRESHOLD = 1e-3  # JumpReLU θ₀ and ε on activations of unit mean squared norm (Rajamanoharan et al. 2024)


@dataclass(frozen=True)
class Resolved:
    """What the recipe and the store made of one architecture's defaults (in sweep_config.json)."""

    total_steps: int
    lr: float  # at the base width; TopK-family members of other widths scale it by 1/√(d_sae/2¹⁴)
    lr_warmup_steps: int
    lr_decay_start: float | None
    sparsity_warmup_steps: int
    grad_clip: float | None
    dead_window: int
    exclude_token_ids: tuple[int, ...]
    d_sae: int
    bandwidth: float
    threshold_init: float


@dataclass(frozen=True)
class Part:
    """One architecture of the run: its resolved recipe, its members (one ensemble) and their names."""

    arch: str
    resolved: Resolved
    schedule: Schedule
    members: list[MemberConfig]
    axes: list[str]  # the knobs its grid varies
    names: list[str] = field(default_factory=list)

    def note(self, batch_size: int, train_rows: int) -> str | None:
        return short_run_note(self.arch, self.schedule, batch_size, train_rows)


def total_steps(cfg: SweepConfig, batches_per_epoch: int) -> int:
    data = cfg.data
    return math.ceil(data.n_tokens / data.batch_size) if data.n_tokens is not None else data.n_epochs * batches_per_epoch


def resolve(cfg: SweepConfig, arch: str, steps: int, exclude_ids: tuple[int, ...], d_in: int, unit_in: int) -> Resolved:
    """One architecture's concrete schedule: the config's values where given, else its recipe's.
    `d_in`: the width of each input source; `unit_in`: what one encoder reads (S·d_in for a crosscoder)."""
    recipe, s, grid = ARCHS[arch].recipe, cfg.schedule, cfg.grid
    d_sae = grid.d_sae or int(round(grid.ratio * d_in))
    if d_sae < 1:
        raise ValueError(f"--ratio {grid.ratio} gives no latents for d_in={d_in}")
    run_tokens = steps * cfg.data.batch_size
    activation_unit = math.sqrt(unit_in)  # the reference's units → ours (mean norm √d)
    return Resolved(
        total_steps=steps,
        lr=s.lr if s.lr is not None else recipe.learning_rate(d_sae),
        lr_warmup_steps=s.lr_warmup_steps if s.lr_warmup_steps is not None else round(recipe.lr_warmup * steps),
        lr_decay_start=s.lr_decay_start if s.lr_decay_start is not None else recipe.lr_decay_start,
        sparsity_warmup_steps=(s.sparsity_warmup_steps if s.sparsity_warmup_steps is not None
                               else round(recipe.sparsity_warmup * steps)),
        grad_clip=(s.grad_clip or None) if s.grad_clip is not None else recipe.grad_clip,
        dead_window=s.dead_window if s.dead_window is not None else max(1, min(recipe.dead_tokens, run_tokens // 4)),
        exclude_token_ids=exclude_ids,
        d_sae=d_sae,
        bandwidth=grid.bandwidth if grid.bandwidth is not None else REFERENCE_THRESHOLD * activation_unit,
        threshold_init=grid.threshold_init if grid.threshold_init is not None else REFERENCE_THRESHOLD * activation_unit,
    )


def grid_axes(cfg: SweepConfig, arch: str, d_sae: int) -> dict[str, list[float]]:
    """The knob axes of one architecture: its --sweep axes, the λ shorthand over its sparsity
    coefficient when asked or when nothing else sets it, and for the TopK family the default k
    axis when neither --k nor an axis sets k."""
    spec, grid = ARCHS[arch], cfg.grid
    axes = dict(parse_axis(axis) for axis in grid.axes_for(arch))
    coefficient = spec.coefficient
    if coefficient and coefficient not in axes and getattr(grid, coefficient) is None:
        lo, hi, n = (v if v is not None else d for v, d in zip((grid.l1_min, grid.l1_max, grid.n_models), SHORTHAND_DEFAULTS))
        axes = {**shorthand_axis(spec.knobs, lo, hi, n), **axes}
    if "k" in spec.knobs and "k" not in axes and grid.k is None:
        axes = {"k": k_axis(spec.k_axis, grid.n_models, d_sae), **axes}
    return axes


def plan_parts(cfg: SweepConfig, batches_per_epoch: int, wirings: dict[str, list[Wiring]], exclude_ids: tuple[int, ...],
               d_in: int, d_out: int | None) -> list[Part]:
    """Every architecture's part of the run, members named (see `name_members`)."""
    steps = total_steps(cfg, batches_per_epoch)
    parts = []
    for arch in cfg.archs:
        arch_wirings = wirings[arch]
        first = arch_wirings[0]
        resolved = resolve(cfg, arch, steps, exclude_ids, d_in, d_in * (1 if first.cross_layer else len(first.inputs)))
        members, axes = _members(cfg, arch, resolved, arch_wirings, d_in, d_out)
        if cfg.schedule.k_anneal_steps > steps and "k" in ARCHS[arch].knobs:
            raise ValueError(f"--k_anneal_steps {cfg.schedule.k_anneal_steps} is longer than the run ({steps} steps): "
                             f"members would be exported at a k they never trained at; use at most {steps}")
        schedule = Schedule(steps, resolved.lr_warmup_steps, resolved.lr_decay_start, resolved.sparsity_warmup_steps,
                            cfg.schedule.k_anneal_steps if "k" in ARCHS[arch].knobs else 0,
                            cfg.schedule.p_anneal_start, cfg.schedule.p_anneal_updates)
        parts.append(Part(arch, resolved, schedule, members, axes))
    return name_members(parts, wirings)


def _members(cfg: SweepConfig, arch: str, resolved: Resolved, wirings: list[Wiring], d_in: int,
             d_out: int | None) -> tuple[list[MemberConfig], list[str]]:
    """One architecture's members (its grid of knobs for every wiring) and the knobs its grid varies."""
    spec, grid = ARCHS[arch], cfg.grid
    axes = grid_axes(cfg, arch, resolved.d_sae)
    fixed = {spec.coefficient: getattr(grid, spec.coefficient)} if spec.coefficient and getattr(grid, spec.coefficient) is not None else {}
    members = []
    for wiring in wirings:
        base = MemberConfig(d_in=d_in, d_sae=resolved.d_sae, arch=arch, n_sources=len(wiring.inputs), inputs=wiring.inputs,
                            targets=wiring.targets, d_out=d_out if wiring.targets else None, cross_layer=wiring.cross_layer,
                            skip=cfg.wiring.skip, k=min(grid.k or spec.k_axis[1], resolved.d_sae),
                            residual_threshold=grid.residual_threshold,
                            bandwidth=resolved.bandwidth, threshold_init=resolved.threshold_init, p_end=grid.p_end,
                            decoder_init_norm=grid.decoder_init_norm, lr=resolved.lr, grad_clip=resolved.grad_clip,
                            seed=grid.seed, **fixed)
        members += build_members(base, axes)
    if cfg.schedule.lr is None and "lr" not in axes and spec.recipe.scale_lr_with_width:
        members = [replace(m, lr=spec.recipe.learning_rate(m.d_sae)) for m in members]
    return members, list(axes)


def name_members(parts: list[Part], wirings: dict[str, list[Wiring]]) -> list[Part]:
    """Member directory names: `03_l1_0.00072` (the run's index and the knobs its grid varies,
    prefixed by the wiring's label, e.g. L02); with several architectures, the architecture and
    its own index first (`topk_01_k_40`), so a listing sorts by architecture, then by the grid."""
    named, index = [], 0
    for part in parts:
        labels = {(w.inputs, w.targets): w.label for w in wirings[part.arch]}
        names = []
        for j, m in enumerate(part.members):
            label = labels[m.inputs, m.targets]
            names.append(member_name(j, m, part.axes, label, arch=part.arch) if len(parts) > 1
                         else member_name(index + j, m, part.axes, label))
        index += len(part.members)
        named.append(replace(part, names=names))
    return named


def resolved_record(parts: list[Part]) -> dict:
    """sweep_config.json's `resolved`: one architecture's as it always was; several side by side."""
    from dataclasses import asdict

    if len(parts) == 1:
        return asdict(parts[0].resolved)
    first = parts[0].resolved
    return {"total_steps": first.total_steps, "exclude_token_ids": first.exclude_token_ids, "d_sae": first.d_sae,
            "per_arch": {p.arch: asdict(p.resolved) for p in parts}}
