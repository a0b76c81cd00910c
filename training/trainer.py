"""Stage 2: train a sweep of dictionaries on sources of an activation store.

    cfg = SweepConfig(cache="caches/p70m-l2", output_dir="runs/l1-sweep", l1_min=-4, l1_max=-2)
    train_sweep(cfg)

One loop, all members at once: every batch is read once and stepped by the whole ensemble.
Everything that can be checked is checked before anything is written: the store, the sources,
the architecture's knobs and every member's configuration. Defaults come from the
architecture's recipe (training/schedules.py) and are resolved into sweep_config.json.
Checkpoints (ensemble, optimiser, stream position, dead-latent counters) are written every
`checkpoint_every` steps, and on Ctrl-C at the next step boundary (a second Ctrl-C stops at once;
the last checkpoint stands); rerunning the same command resumes from the last one. Under
torchrun each rank trains its share of the members (or a slice of each batch), and each member
group checkpoints its own (training/parallel.py). After
training every member is exported with the normalisation folded in (training/export.py), and
sweep.json records the run; `evaluation.runner.evaluate_run` measures the members.
"""
from __future__ import annotations

import json
import math
import os
import signal
import sys
import threading
import time
from contextlib import ExitStack, closing
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Callable, Iterator

import torch
from tqdm.auto import tqdm

from cache.devices import check_device
from cache.disk import check_free, writing
from cache.distributed import Processes
from cache.location import location
from cache.lock import LockError, OutputLock
from cache.store import ActivationStore, StoreError, json_normal
from cache.stream import ActivationStream, StreamConfig
from evaluation.report import write_summary
from training import rundir
from training.members import ARCHS, LOSS_CONVENTION, MemberConfig
from training import memory
from training.ensemble import Ensemble, group_size
from training.export import ExportContext, export_member, save_transcoder_set
from training.parallel import GradientSync, Layout
from training.schedules import RECIPES, Schedule, short_run_note
from training.sweep import build_members, member_name, parse_axis, shorthand_axis
from training.wiring import Wiring, plan_wirings

# Fields that do not change what is trained: they may differ when a run is resumed.
_RUNTIME_FIELDS = ("output_dir", "device", "overwrite", "checkpoint_every", "prefetch", "storage_options", "cache_dir",
                   "data_parallel", "break_lock")
SHORTHAND_DEFAULTS = (-4.0, -2.0, 8)  # --l1_min, --l1_max, --n_models when the shorthand applies by default
CALIBRATION_ROWS = 8192  # training rows the exported thresholds of the TopK family are calibrated on
REFERENCE_THRESHOLD = 1e-3  # JumpReLU θ₀ and ε on activations of unit mean squared norm (Rajamanoharan et al. 2024)
RunDirError = rundir.RunDirError


@dataclass(frozen=True)
class SweepConfig:
    cache: str
    """Path of a complete activation store."""
    output_dir: str
    """Directory for checkpoints, exported members, sweep.json/csv and plots."""
    source: str | None = None
    """Source in the store to train on; default: the store's only source."""
    sources: tuple[str, ...] = ()
    """Several sources to train crosscoders on, read side by side (instead of `source`); a transcoder's input."""
    targets: tuple[str, ...] = ()
    """What members reconstruct, when not their inputs: a transcoder's target (with one --sources)."""
    transcoder: bool = False
    """MLP transcoders at each of `layers`: input the layer's MLP input, target its MLP output."""
    clt: bool = False
    """One cross-layer transcoder over `layers` per sweep setting (consecutive layers)."""
    layers: tuple[str, ...] = ()
    """Layers of --kind/--transcoder/--clt: numbers, or all."""
    kind: str | None = None
    """An SAE at each of `layers` on the store's source of this kind (e.g. attn_out), all in one ensemble."""
    skip: bool = False
    """Transcoders: add a linear skip term x W_skip (skip transcoders)."""
    arch: str = "relu"
    """Architecture of every member: one of training.dictionary.ARCHS."""
    sweep: tuple[str, ...] = ()
    """Knob axes, e.g. ("k=16,32", "seed=0,1"); members are their grid (see training.sweep)."""
    l1_min: float | None = None
    """log10 of the smallest sparsity coefficient of the shorthand sweep (default -4)."""
    l1_max: float | None = None
    """log10 of the largest sparsity coefficient of the shorthand sweep (default -2)."""
    n_models: int | None = None
    """Members of the shorthand sweep (default 8). The shorthand applies when one of its three
    flags is given, or when nothing else sets the sparsity coefficient."""
    l1_coeff: float | None = None
    """A fixed L1 coefficient (relu, relu_april, gated, panneal, crosscoder) instead of a sweep."""
    l0_coeff: float | None = None
    """A fixed L0 / tanh coefficient (jumprelu, jumprelu_tanh) instead of a sweep."""
    k: int = 32
    """Active latents per row (topk, batchtopk, matryoshka), unless swept."""
    bandwidth: float | None = None
    """JumpReLU straight-through bandwidth ε; default 1e-3 in the reference's units (activations of
    unit mean squared norm), i.e. 1e-3·√d on ours (mean norm √d)."""
    threshold_init: float | None = None
    """Initial JumpReLU threshold θ; default 1e-3·√d, as the bandwidth."""
    grad_clip: float | None = None
    """Clip each member's gradient norm to this (per member, never across the ensemble); 0: off.
    Default: the recipe's."""
    k_anneal_steps: int = 0
    """TopK family: k decreases linearly from d_in (at most d_sae) to its value over this many steps."""
    p_end: float = 0.2
    """panneal: final exponent of the Lp penalty, unless swept."""
    decoder_init_norm: float = 0.1
    """relu_april, crosscoder: initial norm of each source's decoder vector, unless swept."""
    p_anneal_start: float = 0.2
    """panneal: fraction of training after which p starts to move from 1 towards p_end."""
    p_anneal_updates: int = 10
    """panneal: p reaches p_end in this many equal steps, evenly spaced from p_anneal_start on."""
    resample_every: int = 0
    """L1 architectures: resample latents dead for `dead_window` tokens every this many steps (0: never)."""
    resample_stop: float = 0.5
    """No resampling after this fraction of training (resampled latents need time to train)."""
    resample_pool: int = 819_200
    """Rows read from the store for each resampling, from which dead latents draw their inputs."""
    ratio: float = 8.0
    """d_sae = ratio × d_in, unless d_sae is given."""
    d_sae: int | None = None
    """Number of latents of every member."""
    batch_size: int = 4096
    """Rows per step, shared by all members."""
    lr: float | None = None
    """Adam learning rate; default: the recipe's (training/schedules.py)."""
    lr_warmup_steps: int | None = None
    """Linear learning-rate warm-up from 0 over this many steps; default: the recipe's fraction of the run."""
    lr_decay_start: float | None = None
    """Fraction of training after which the learning rate decays linearly to 0 (1: no decay);
    default: the recipe's."""
    sparsity_warmup_steps: int | None = None
    """Linear warm-up of the sparsity coefficient from 0 over this many steps; default: the recipe's."""
    b_dec_init: str = "mean"
    """Initial b_dec: "mean" (of a sample of training rows) or "zeros"."""
    n_epochs: int = 1
    """Passes over the training rows (ignored when n_tokens is given)."""
    n_tokens: int | None = None
    """Train on this many rows (epochs repeat as needed)."""
    eval_tokens: int = 50_000
    """Rows held out at the end of the store for evaluation (at most a tenth of it)."""
    exclude_tokens: tuple[str, ...] = ()
    """Tokens whose rows are never trained on or evaluated: ids, or bos / eos (from the store's tokenizer)."""
    shuffle_chunks: int = 8
    """Store chunks shuffled together in memory."""
    prefetch: int = 8
    """Batches read ahead in the background."""
    dead_window: int | None = None
    """A latent is dead once it has not fired for this many tokens (AuxK, resampling, reports);
    default: the recipe's, at most a quarter of the run."""
    checkpoint_every: int = 500
    """Steps between checkpoints."""
    device: str = "cpu"
    """Training device."""
    seed: int = 0
    """Seed of the members' initialisation and of the data order."""
    overwrite: bool = False
    """Replace an output directory that holds another run (the old one is moved aside)."""
    storage_options: dict = field(default_factory=dict, hash=False)
    """For a store at a URL: options of its fsspec filesystem (credentials come from the environment)."""
    cache_dir: str | None = None
    """For a store at a URL: keep a local copy of every chunk read here (read-through cache)."""
    data_parallel: int = 1
    """Under torchrun: ranks that split each batch of the same members (see training/parallel.py)."""
    break_lock: bool = False
    """Take over the output directory's lock even when another host holds it (cache/lock.py)."""

    def __post_init__(self):
        if None not in (self.l1_min, self.l1_max) and self.l1_min > self.l1_max:
            raise ValueError(f"--l1_min ({self.l1_min}) is larger than --l1_max ({self.l1_max})")
        if self.n_models is not None and self.n_models < 1:
            raise ValueError(f"--n_models must be at least 1, got {self.n_models}")
        if self.d_sae is not None and self.d_sae < 1:
            raise ValueError(f"--d_sae must be positive, got {self.d_sae}")
        if self.d_sae is None and self.ratio <= 0:
            raise ValueError(f"--ratio must be positive, got {self.ratio}")
        for name in ("batch_size", "n_epochs", "checkpoint_every", "resample_pool"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be positive, got {getattr(self, name)}")
        for name in ("n_tokens", "dead_window", "lr", "bandwidth", "threshold_init"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"--{name} must be positive, got {getattr(self, name)}")
        for name in ("lr_warmup_steps", "sparsity_warmup_steps", "k_anneal_steps"):
            if (getattr(self, name) or 0) < 0:
                raise ValueError(f"--{name} must be ≥ 0, got {getattr(self, name)}")
        if self.grad_clip is not None and self.grad_clip < 0:
            raise ValueError(f"--grad_clip must be ≥ 0 (0: off), got {self.grad_clip}")
        if not 0 <= self.p_anneal_start < 1 or self.p_anneal_updates < 1:
            raise ValueError("--p_anneal_start is a fraction in [0, 1) and --p_anneal_updates at least 1")
        if self.resample_every < 0 or not 0 < self.resample_stop <= 1:
            raise ValueError("--resample_every must be ≥ 0 and --resample_stop a fraction in (0, 1]")
        if self.source is not None and self.sources:
            raise ValueError("give --source (one) or --sources (several), not both")
        if self.transcoder and self.clt:
            raise ValueError("give --transcoder (one per layer) or --clt (one across layers), not both")
        if self.skip and not (self.transcoder or self.targets):
            raise ValueError("--skip is for transcoders (--transcoder, or --sources … --targets …)")
        if self.skip and self.clt:
            raise ValueError("--skip is for single-layer transcoders; circuit-tracer reads no skip term of a CLT")
        if len(set(self.sources)) < len(self.sources):
            raise ValueError(f"--sources names a source twice: {', '.join(self.sources)}")
        if self.arch not in ARCHS:
            raise ValueError(f"unknown architecture {self.arch!r}; choose one of {', '.join(ARCHS)}")
        if self.resample_every and not ARCHS[self.arch].resamples:
            raise ValueError(f"--resample_every is for the L1 architectures "
                             f"({', '.join(a for a, s in ARCHS.items() if s.resamples)}); {self.arch} has its own remedy")
        if self.lr_decay_start is not None and not 0 <= self.lr_decay_start <= 1:
            raise ValueError(f"--lr_decay_start is a fraction in [0, 1] (1: no decay), got {self.lr_decay_start}")
        check_device(self.device)
        if self.b_dec_init not in ("mean", "zeros"):
            raise ValueError(f"--b_dec_init must be 'mean' or 'zeros', got {self.b_dec_init!r}")
        self._check_coefficients()

    def _check_coefficients(self) -> None:
        """A fixed coefficient must belong to the architecture, and the shorthand may not fight
        a fixed coefficient or a --sweep axis over the same one."""
        spec = ARCHS[self.arch]
        for name in ("l1_coeff", "l0_coeff"):
            if getattr(self, name) is not None and spec.coefficient != name:
                other = f"; it uses --{spec.coefficient}" if spec.coefficient else "; it has no sparsity coefficient"
                raise ValueError(f"--{name} does not apply to {self.arch}{other}")
        if not self.shorthand_asked:
            return
        if spec.coefficient is None:
            raise ValueError(f"--l1_min/--l1_max/--n_models sweep a sparsity coefficient, and {self.arch} has none: "
                             "sweep k instead, e.g. --sweep k=16,32,64")
        swept = any(parse_axis(axis)[0] == spec.coefficient for axis in self.sweep)
        if swept or getattr(self, spec.coefficient) is not None:
            by = "--sweep" if swept else f"--{spec.coefficient}"
            raise ValueError(f"--l1_min/--l1_max/--n_models and {by} both set {spec.coefficient}: give one of them")

    @property
    def shorthand_asked(self) -> bool:
        return any(v is not None for v in (self.l1_min, self.l1_max, self.n_models))

    @property
    def recipe(self):
        return RECIPES[self.arch]

    def identity(self) -> dict:
        return json_normal({k: v for k, v in asdict(self).items() if k not in _RUNTIME_FIELDS})


@dataclass(frozen=True)
class Resolved:
    """What the recipe and the store made of a SweepConfig's defaults (recorded in sweep_config.json)."""

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

    def schedule(self, cfg: SweepConfig) -> Schedule:
        return Schedule(self.total_steps, self.lr_warmup_steps, self.lr_decay_start, self.sparsity_warmup_steps,
                        cfg.k_anneal_steps, cfg.p_anneal_start, cfg.p_anneal_updates)


def resolve(cfg: SweepConfig, stream: ActivationStream, exclude_ids: tuple[int, ...], d_in: int, unit_in: int) -> Resolved:
    """The run's concrete schedule: the config's values where given, else the recipe's. `d_in`:
    the width of each input source; `unit_in`: what one encoder reads (S·d_in for a crosscoder)."""
    recipe = cfg.recipe
    T = math.ceil(cfg.n_tokens / cfg.batch_size) if cfg.n_tokens is not None else cfg.n_epochs * stream.batches_per_epoch
    d_sae = cfg.d_sae or int(round(cfg.ratio * d_in))
    if d_sae < 1:
        raise ValueError(f"--ratio {cfg.ratio} gives no latents for d_in={d_in}")
    run_tokens = T * cfg.batch_size
    activation_unit = math.sqrt(unit_in)  # the reference's units → ours (mean norm √d)
    return Resolved(
        total_steps=T,
        lr=cfg.lr if cfg.lr is not None else recipe.learning_rate(d_sae),
        lr_warmup_steps=cfg.lr_warmup_steps if cfg.lr_warmup_steps is not None else round(recipe.lr_warmup * T),
        lr_decay_start=cfg.lr_decay_start if cfg.lr_decay_start is not None else recipe.lr_decay_start,
        sparsity_warmup_steps=(cfg.sparsity_warmup_steps if cfg.sparsity_warmup_steps is not None
                               else round(recipe.sparsity_warmup * T)),
        grad_clip=(cfg.grad_clip or None) if cfg.grad_clip is not None else recipe.grad_clip,
        dead_window=cfg.dead_window if cfg.dead_window is not None else max(1, min(recipe.dead_tokens, run_tokens // 4)),
        exclude_token_ids=exclude_ids,
        d_sae=d_sae,
        bandwidth=cfg.bandwidth if cfg.bandwidth is not None else REFERENCE_THRESHOLD * activation_unit,
        threshold_init=cfg.threshold_init if cfg.threshold_init is not None else REFERENCE_THRESHOLD * activation_unit,
    )


def sweep_members(cfg: SweepConfig, d_in: int, n_sources: int = 1, resolved: Resolved | None = None,
                  wirings: list[Wiring] | None = None, d_out: int | None = None) -> tuple[list[MemberConfig], list[str]]:
    """The sweep's members (its grid of knobs for every wiring) and the names of the knobs it varies."""
    spec = ARCHS[cfg.arch]
    wirings = wirings or [Wiring(tuple(f"input{i}" for i in range(n_sources)))]
    n_in = len(wirings[0].inputs)
    d_sae = resolved.d_sae if resolved else (cfg.d_sae or int(round(cfg.ratio * d_in)))
    if d_sae < 1:
        raise ValueError(f"--ratio {cfg.ratio} gives no latents for d_in={d_in}")
    lr = resolved.lr if resolved else (cfg.lr if cfg.lr is not None else cfg.recipe.learning_rate(d_sae))
    grad_clip = resolved.grad_clip if resolved else cfg.grad_clip
    unit = math.sqrt(d_in * (1 if wirings[0].cross_layer else n_in))
    bandwidth = resolved.bandwidth if resolved else (cfg.bandwidth or REFERENCE_THRESHOLD * unit)
    threshold_init = resolved.threshold_init if resolved else (cfg.threshold_init or REFERENCE_THRESHOLD * unit)
    fixed = {spec.coefficient: getattr(cfg, spec.coefficient)} if spec.coefficient and getattr(cfg, spec.coefficient) is not None else {}
    axes = dict(parse_axis(spec_) for spec_ in cfg.sweep)
    if spec.coefficient and spec.coefficient not in axes and (cfg.shorthand_asked or not fixed):
        lo, hi, n = (v if v is not None else d for v, d in zip((cfg.l1_min, cfg.l1_max, cfg.n_models), SHORTHAND_DEFAULTS))
        if lo > hi:
            raise ValueError(f"--l1_min ({lo}) is larger than --l1_max ({hi})")
        axes = {**shorthand_axis(spec.knobs, lo, hi, n), **axes}
    members = []
    for wiring in wirings:
        base = MemberConfig(d_in=d_in, d_sae=d_sae, arch=cfg.arch, n_sources=len(wiring.inputs), inputs=wiring.inputs,
                            targets=wiring.targets, d_out=d_out if wiring.targets else None,
                            cross_layer=wiring.cross_layer, skip=cfg.skip, k=min(cfg.k, d_sae),
                            bandwidth=bandwidth, threshold_init=threshold_init, p_end=cfg.p_end,
                            decoder_init_norm=cfg.decoder_init_norm, lr=lr, grad_clip=grad_clip, seed=cfg.seed, **fixed)
        members += build_members(base, axes)
    if cfg.lr is None and "lr" not in axes and cfg.recipe.scale_lr_with_width:
        members = [replace(m, lr=cfg.recipe.learning_rate(m.d_sae)) for m in members]
    return members, list(axes)


def exclude_token_ids(store: ActivationStore, names: tuple[str, ...]) -> tuple[int, ...]:
    """Token ids from ids or the words bos / eos."""
    ids = []
    for name in names:
        if name.lower() in ("bos", "eos"):
            value = store.info.get(f"{name.lower()}_token_id")
            if value is None:
                raise ValueError(f"--exclude_tokens {name}: the store records no {name.upper()} token id; give the id")
            ids.append(int(value))
        elif name.strip().lstrip("-").isdigit():
            ids.append(int(name))
        else:
            raise ValueError(f"--exclude_tokens {name!r}: give token ids or bos / eos")
    return tuple(sorted(set(ids)))


def open_training_stream(cfg: SweepConfig) -> tuple[ActivationStore, list[Wiring], ActivationStream, tuple[int, ...]]:
    """The store, the members' wirings, the stream of batches the sweep trains on and the token
    ids it leaves out (benches feed other trainers the same batches through this)."""
    store = ActivationStore.open(location(cfg.cache, cfg.storage_options, cfg.cache_dir))
    wirings = plan_wirings(store, source=cfg.source, sources=cfg.sources, targets=cfg.targets, transcoder=cfg.transcoder,
                           clt=cfg.clt, layers=cfg.layers, arch=cfg.arch, kind=cfg.kind)
    sources = list(dict.fromkeys(s for w in wirings for s in w.sources))
    exclude_ids = exclude_token_ids(store, cfg.exclude_tokens)
    stream = ActivationStream(store, sources, StreamConfig(cfg.batch_size, cfg.eval_tokens, cfg.shuffle_chunks,
                                                           cfg.prefetch, cfg.seed, exclude_tokens=exclude_ids), cfg.device)
    return store, wirings, stream, exclude_ids


def training_batches(stream: ActivationStream, start_step: int, total_steps: int) -> Iterator[torch.Tensor]:
    """The batches of steps start_step … total_steps − 1, epoch after epoch.  → [B, C] on the device"""
    step, per_epoch = start_step, stream.batches_per_epoch
    while step < total_steps:
        epoch, start = divmod(step, per_epoch)
        with closing(stream.train_batches(epoch, start)) as batches:  # stops its prefetch thread, however we leave
            for x_BC in batches:
                yield x_BC
                step += 1
                if step >= total_steps:
                    return


def train_sweep(cfg: SweepConfig, tracker=None, layout: Layout | None = None,
                evaluation_bytes: Callable[[dict, int, int], int | None] | None = None) -> list[dict]:
    """Train and export every member; return one row per member. `tracker`, if given, gets the
    training curves (see training.tracking.WandbTracker). `layout`: under torchrun, which
    members and rows this rank steps (training/parallel.py); every rank returns every row.
    `evaluation_bytes(store info, the members' parameters, context length)`: what the evaluation
    that follows will need (evaluation.runner.memory_needed), checked with training's needs
    before anything is written."""
    layout = layout or Layout(Processes(), cfg.data_parallel)
    cfg = replace(cfg, device=layout.processes.device_for(cfg.device))
    lead = layout.processes.rank == 0
    store, wirings, stream, exclude_ids = open_training_stream(cfg)
    _check_widths(store, wirings)
    _check_stream(cfg, stream)
    first = wirings[0]
    d_in = store.source(first.inputs[0]).d
    d_out = store.source(first.targets[0]).d if first.targets else None
    resolved = resolve(cfg, stream, exclude_ids, d_in, d_in * (1 if first.cross_layer else len(first.inputs)))
    if cfg.k_anneal_steps > resolved.total_steps:
        raise ValueError(f"--k_anneal_steps {cfg.k_anneal_steps} is longer than the run ({resolved.total_steps} steps): "
                         f"members would be exported at a k they never trained at; use at most {resolved.total_steps}")
    members, axes = sweep_members(cfg, d_in, len(first.inputs), resolved, wirings, d_out)
    mine = layout.members(len(members))
    own = [members[i] for i in mine]
    rows_per_step = len(layout.rows(cfg.batch_size))
    need = memory.estimate(own, rows_per_step, group_size(own, rows_per_step, torch.device(cfg.device)),
                           stream.width, cfg.prefetch)
    if evaluation_bytes is not None and lead:  # rank 0 evaluates
        need = replace(need, evaluation_bytes=evaluation_bytes(store.info, memory.parameter_count(members),
                                                               store.attrs["context_length"]))
    memory.check_fits(need, torch.device(cfg.device), len(own))
    ensemble = Ensemble(own, cfg.device, dead_tokens=resolved.dead_window, columns=stream.columns)
    if layout.data_parallel > 1:
        ensemble.sync_gradients(GradientSync(layout))
    # everything is validated: only now may the output directory be touched
    out = Path(cfg.output_dir)
    identity = {**cfg.identity(), "resolved": json_normal(asdict(resolved))}
    lock = OutputLock(out, "train_sweep.py", cfg.break_lock) if lead else None  # rank 0 holds it for the job
    with ExitStack() as held:
        if lock is not None:
            held.callback(lock.release)
        if _claim(layout, out, identity, cfg.overwrite, lock):
            if lead:
                print(f"{out} already holds this finished sweep; see {out / 'sweep.csv'}")
            return json.loads((out / rundir.SUMMARY_FILE).read_text())["members"]
        if lead:
            _print_plan(cfg, resolved, members, stream)
        if layout.processes.distributed:
            labels = {(w.inputs, w.targets): w.label for w in wirings}
            names = [member_name(i, members[i], axes, labels[members[i].inputs, members[i].targets]) for i in mine]
            print(layout.describe(names, len(members)), flush=True)
        print(f"{layout.processes.name + ' ' if layout.processes.distributed else ''}memory: "
              f"{need.describe(torch.device(cfg.device))}")
        if cfg.b_dec_init == "mean":
            ensemble.dictionary.init_b_dec_(stream.sample_mean())
        state = _TrainState(0, 0)
        resume = layout.agreed_resume_path(out)
        if resume is not None:
            state = _load_checkpoint(resume, ensemble, cfg.device)
            if lead:
                print(f"resuming {out} at step {state.step}")
        if layout.writes:  # a checkpoint (two while one replaces the other) and the exported weights
            check_free(out, 2 * checkpoint_bytes(ensemble) + 4 * memory.parameter_count(ensemble.members),
                       "training and exporting")
        started = time.perf_counter()
        _train(cfg, ensemble, stream, state, resolved, out, layout, tracker)
        seconds = time.perf_counter() - started
        rows = _export(cfg, ensemble, members, mine, axes, stream, store, state, resolved, out, wirings, layout, seconds)
        layout.processes.barrier("waiting for every rank's export")
        layout.remove_checkpoints(out)  # the exported members are the result now
        return rows


def _claim(layout: Layout, out: Path, identity: dict, overwrite: bool, lock: OutputLock | None) -> bool:
    """Rank 0 takes the output's lock, claims the directory (training/rundir.py) and tells the
    others the verdict."""
    verdict = None
    if layout.processes.rank == 0:
        try:
            lock.acquire()
            verdict = ("claimed", rundir.claim(out, identity, overwrite, _default_identity()))
        except (RunDirError, LockError) as err:
            verdict = ("refused", str(err))
    kind, value = layout.processes.all_gather(verdict, "claiming the output directory")[0]
    if kind == "refused":
        raise RunDirError(value)
    return value


def _check_widths(store: ActivationStore, wirings: list[Wiring]) -> None:
    """Inputs read side by side (a crosscoder) or layer by layer (a CLT) share a width, as do
    targets; transcoders' inputs and targets may differ."""
    for wiring in wirings:
        for role, names in (("inputs", wiring.inputs), ("targets", wiring.targets)):
            widths = {n: store.source(n).d for n in names}
            if len(set(widths.values())) > 1:
                kind = "a crosscoder" if not wiring.targets else "a cross-layer transcoder"
                raise StoreError(f"the {role} of {kind} must have one width; got {widths} "
                                 "(cache pairs with --require_equal_widths)")


def _check_stream(cfg: SweepConfig, stream: ActivationStream) -> None:
    if cfg.k_anneal_steps and "k" not in ARCHS[cfg.arch].knobs:
        raise ValueError(f"--k_anneal_steps is for the TopK family; {cfg.arch} has no k")
    if cfg.batch_size > stream.n_train:
        raise ValueError(f"--batch_size {cfg.batch_size:,} is larger than the store's {stream.n_train:,} training rows: "
                         f"use --batch_size {max(1, stream.n_train // 8):,} or cache more tokens")


def _print_plan(cfg: SweepConfig, resolved: Resolved, members: list[MemberConfig], stream: ActivationStream) -> None:
    """One line with what the recipe resolved to, and one when the run is too short for it."""
    lrs = sorted({m.lr for m in members})
    lr = f"{lrs[0]:.2g}" if len(lrs) == 1 else f"{lrs[0]:.2g}…{lrs[-1]:.2g}"
    print(f"{len(members)} × {cfg.arch} on {stream.source}: {resolved.total_steps} steps of {cfg.batch_size} rows, "
          f"lr {lr} (warm-up {resolved.lr_warmup_steps} steps, decay from {resolved.lr_decay_start}), "
          f"sparsity warm-up {resolved.sparsity_warmup_steps} steps, clip {resolved.grad_clip}, "
          f"dead after {resolved.dead_window:,} tokens", flush=True)
    note = short_run_note(cfg.arch, resolved.schedule(cfg), cfg.batch_size, stream.n_train)
    if note:
        print(note)


def _default_identity() -> dict:
    """The identity fields' defaults (those without one are always written by a run)."""
    return json_normal({f.name: f.default for f in fields(SweepConfig)
                        if f.default is not MISSING and f.name not in _RUNTIME_FIELDS})


@dataclass
class _TrainState:
    step: int
    tokens_seen: int


class _StepBoundaryInterrupts:
    """Ctrl-C during training takes effect at the next step boundary: the first SIGINT sets a
    flag the loop checks after each whole step (then it checkpoints and stops); a second one
    raises at once, leaving the last checkpoint as it was. Only the main thread can handle
    signals; elsewhere Ctrl-C behaves as usual."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.requested = False
        self._previous = None

    def __enter__(self):
        if self.enabled and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\ninterrupt: stopping after this step (Ctrl-C again to stop at once)", file=sys.stderr)

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False


def _train(cfg: SweepConfig, ensemble: Ensemble, stream: ActivationStream, state: _TrainState, resolved: Resolved,
           out: Path, layout: Layout, tracker=None):
    total, schedule = resolved.total_steps, resolved.schedule(cfg)
    distributed = layout.processes.distributed
    bar = tqdm(total=total, initial=state.step, unit="step", desc=f"training {len(ensemble)} dictionaries",
               disable=distributed and layout.processes.rank > 0)
    # under torchrun a Ctrl-C reaches every rank at its own step: torchrun ends them, and the
    # last checkpoint every rank completed stands
    with _StepBoundaryInterrupts(enabled=not distributed) as interrupts, bar, \
            closing(training_batches(stream, state.step, total)) as batches:
        for x_BC in batches:
            schedule.apply_(ensemble, state.step)
            if layout.data_parallel > 1:
                rows = layout.rows(len(x_BC))
                result = ensemble.step(x_BC[rows.start:rows.stop], batch_rows=len(x_BC))
            else:
                result = ensemble.step(x_BC)
            state.step += 1
            if _resample_due(cfg, state.step, total):
                ensemble.resample_dead_(stream.pool(cfg.resample_pool, state.step), resolved.dead_window, state.step)
            state.tokens_seen += len(x_BC)
            bar.update()
            if state.step % 10 == 0 or state.step == total:
                bar.set_postfix_str(_progress(result))
                if tracker is not None:
                    tracker.log(_curves(result), state.step)
            if state.step % cfg.checkpoint_every == 0 or interrupts.requested:
                _checkpoint(layout, out, ensemble, state)
            if interrupts.requested:
                raise KeyboardInterrupt
    _checkpoint(layout, out, ensemble, state)


def _checkpoint(layout: Layout, out: Path, ensemble: Ensemble, state: _TrainState) -> None:
    """Every member group writes this step; once all have, their older checkpoints go."""
    if layout.writes:
        _save_checkpoint(layout.checkpoint_path(out, state.step), ensemble, state)
    layout.processes.barrier(f"checkpointing step {state.step}")
    layout.prune_checkpoints(out, state.step)


def _resample_due(cfg: SweepConfig, step: int, total: int) -> bool:
    return bool(cfg.resample_every) and step % cfg.resample_every == 0 and step <= cfg.resample_stop * total


def _progress(result) -> str:
    l0 = result.l0.detach()
    return f"mse {result.mse.mean().item():.4f} L0 {l0.min().item():.1f}..{l0.max().item():.1f}"


def _curves(result) -> dict[str, float]:
    values = {"loss": result.total, "mse": result.mse, "l0": result.l0}
    return {f"member_{e:02d}/{k}": v[e].item() for e in range(len(result.total)) for k, v in values.items()}


def _save_checkpoint(path: Path, ensemble: Ensemble, state: _TrainState) -> None:
    """Written to a temporary file and renamed: a crash or a full disk mid-write leaves the
    previous checkpoint as it was, and no temporary file."""
    tmp = path.with_suffix(".tmp")
    try:
        with writing(path.parent, f"writing the checkpoint of step {state.step}"), open(tmp, "wb") as f:
            # through a Python file, so a failed write keeps its OSError (errno) as the error's context
            torch.save({"ensemble": ensemble.state_dict(), "state": asdict(state)}, f)
        os.replace(tmp, path)  # atomic
    finally:
        tmp.unlink(missing_ok=True)


def checkpoint_bytes(ensemble: Ensemble) -> int:
    """Size of one checkpoint: the dictionary's parameters and buffers and Adam's two moments."""
    d = ensemble.dictionary
    tensors = [*d.parameters(), *d.buffers(), *ensemble.optimizer.exp_avg, *ensemble.optimizer.exp_avg_sq]
    return sum(t.numel() * t.element_size() for t in tensors)


def _load_checkpoint(path: Path, ensemble: Ensemble, device) -> _TrainState:
    saved = torch.load(path, map_location=device, weights_only=False)
    ensemble.load_state_dict(saved["ensemble"])
    return _TrainState(**saved["state"])


@torch.no_grad()
def _export(cfg: SweepConfig, ensemble: Ensemble, members: list[MemberConfig], mine: range, axes: list[str],
            stream: ActivationStream, store: ActivationStore, state: _TrainState, resolved: Resolved, out: Path,
            wirings: list[Wiring], layout: Layout, seconds: float) -> list[dict]:
    """This rank's members in their formats (training/export.py); rank 0 writes the training
    summary with every rank's rows. `seconds`: how long this invocation's training loop ran."""
    dictionary = ensemble.dictionary
    dead_train_E = dictionary.dead_latents(resolved.dead_window).sum(-1) / dictionary.width_mask.sum(-1)
    needs_rows = any(m.is_transcoder and m.spec.activation == "topk" for m in members)
    if dictionary.spec.activation == "batchtopk":
        dictionary.calibrate_thresholds_(stream.sample(CALIBRATION_ROWS))
    ctx = ExportContext(
        info={**store.info, "context_length": store.attrs["context_length"]},
        sources={s.name: {"model": s.model, "hook": s.hook, "d": s.d, "layer": s.layer} for s in store.sources},
        scales=dict(zip(stream.sources, stream.scales)),
        exclude_tokens=resolved.exclude_token_ids,
        calibration_rows=stream.sample(CALIBRATION_ROWS) if needs_rows else None,
    )
    rows = []
    labels = {(w.inputs, w.targets): w.label for w in wirings}
    distributed = layout.processes.distributed
    for e, index in enumerate(mine) if layout.writes else ():
        member = members[index]
        name = member_name(index, member, axes, labels[member.inputs, member.targets])
        with writing(out / "members", f"exporting member {name}"):
            record = export_member(out / "members" / name, dictionary, e, ctx)
        rows.append({"name": name, "dir": f"members/{name}", **record, "source": stream.source,
                     "dead_fraction_train": dead_train_E[e].item(), "train_tokens": state.tokens_seen,
                     **({"rank": layout.processes.rank} if distributed else {})})
    sets = _export_transcoder_sets(dictionary, members, mine, axes, store, ctx, out, layout) if cfg.transcoder else []
    rows = [row for part in layout.processes.all_gather(rows, "gathering the exported members") for row in part]
    if layout.processes.rank == 0:
        first = store.source(stream.sources[0])
        summary = {
            "config": asdict(cfg),
            "resolved": asdict(resolved),
            "store": {"path": store.path, "path_as_given": cfg.cache, "source": stream.source,
                      "hook": first.hook, "norm_scale": stream.scale, "sources": stream.sources,
                      "norm_scales": stream.scales, "train_rows": stream.n_train, "eval_rows": stream.n_eval,
                      "eval_sequence_start": stream.eval_sequence_start},
            "layout": {"world_size": layout.processes.world, "data_parallel": layout.data_parallel,
                       "member_groups": layout.groups},
            "train_seconds": seconds,
            "loss_convention": LOSS_CONVENTION,
            "swept": axes,
            "members": rows,
            **({"transcoder_sets": sets} if sets else {}),
        }
        with writing(out, "writing sweep.json"):
            write_summary(out, summary)
    return rows


def _export_transcoder_sets(dictionary, members: list[MemberConfig], mine: range, axes: list[str],
                            store: ActivationStore, ctx: ExportContext, out: Path, layout: Layout) -> list[dict]:
    """Per sweep setting, its per-layer transcoders together as a circuit-tracer transcoder set
    (transcoder_sets/<setting>/); members come layer-major, each layer with the whole grid. Each
    rank writes the layers it trained; rank 0 describes the set."""
    layers = sorted({store.source(m.inputs[0]).layer for m in members})
    per_layer = len(members) // len(layers)
    sets = []
    for j in range(per_layer):
        group = {layer: i * per_layer + j for i, layer in enumerate(layers)}
        owned = {layer: index - mine.start for layer, index in group.items() if index in mine} if layout.writes else {}
        name = member_name(j, members[j], axes)
        record = {k: v for k, v in members[j].record().items() if k not in ("inputs", "targets")}
        if owned or layout.processes.rank == 0:
            info = save_transcoder_set(out / "transcoder_sets" / name, dictionary, owned, ctx, record, first=members[j],
                                       layers=layers, describe=layout.processes.rank == 0)
            sets.append({"name": name, "dir": f"transcoder_sets/{name}", **info})
    return sets
