"""A sweep's configuration, stated once: small frozen dataclasses with a docstring under each field.
train_sweep.py generates its options, defaults and help from these fields (runtime/cli_options.py
`dataclass_options`), and sweep_config.json records them flat, as the CLI names them.

    SweepConfig
      data      DataConfig       the store, the batches, the held-out rows
      wiring    WiringConfig     what the members read and write
      grid      GridConfig       architectures, knob axes and fixed knobs: the members
      schedule  ScheduleConfig   overrides of each architecture's recipe (training/members.py)
      + where the run goes and how it runs (output_dir, device, checkpoints, torchrun layout)

`SweepConfig.from_flat(cache=…, output_dir=…, arch=("relu", "topk"), batch_size=…)` builds one from
flat names. No torch here: the CLIs validate a configuration before importing it.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Literal

from training.members import ARCHS, ArchName
from training.sweep import axis_scope, parse_axis

# Fields that do not change what is trained: they may differ when a run is resumed.
RUNTIME_FIELDS = ("output_dir", "device", "overwrite", "checkpoint_every", "prefetch", "storage_options", "cache_dir",
                  "data_parallel", "break_lock", "compile", "topk_decode", "group_members")
SHORTHAND_DEFAULTS = (-4.0, -2.0, 8)  # --l1_min, --l1_max, --n_models when the shorthand applies by default


@dataclass(frozen=True)
class DataConfig:
    cache: str = "caches/demo"
    """Activation store written by generate_activations.py (its default writes caches/demo)."""
    batch_size: int = 4096
    """Rows per step, shared by every member."""
    n_epochs: int = 1
    """Passes over the training rows (ignored when n_tokens is given)."""
    n_tokens: int | None = None
    """Train on this many rows instead of n_epochs (epochs repeat as needed)."""
    eval_tokens: int = 50_000
    """Rows of whole sequences held out for evaluation (at most a tenth of the store)."""
    exclude_tokens: tuple[str, ...] = ()
    """Never train on or evaluate rows of these tokens: ids, or bos / eos, e.g. --exclude_tokens eos."""
    shuffle_chunks: int = 8
    """Store chunks shuffled together in memory."""
    prefetch: int = 8
    """Batches read ahead in the background."""
    storage_options: dict = field(default_factory=dict, hash=False)
    """A store at a URL (s3://…): JSON options of its fsspec filesystem [default: credentials and endpoint from the
    environment, AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL, …]."""
    cache_dir: str | None = None
    """A store at a URL: keep a local copy of every chunk read in this directory."""

    def __post_init__(self):
        for name in ("batch_size", "n_epochs", "shuffle_chunks", "prefetch"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be positive, got {getattr(self, name)}")
        if self.n_tokens is not None and self.n_tokens <= 0:
            raise ValueError(f"--n_tokens must be positive, got {self.n_tokens}")
        if self.eval_tokens < 0:
            raise ValueError(f"--eval_tokens must be ≥ 0, got {self.eval_tokens}")


@dataclass(frozen=True)
class WiringConfig:
    source: str | None = None
    """Source in the store to train on [default: the store's only source]."""
    sources: tuple[str, ...] = ()
    """Several sources read side by side for crosscoders (e.g. base/blocks.6.hook_resid_post,chat/blocks.6.hook_resid_post),
    or a transcoder's input."""
    targets: tuple[str, ...] = ()
    """What the members reconstruct when not their inputs: a transcoder, --sources IN --targets OUT."""
    transcoder: bool = False
    """MLP transcoders at each of --layers (input: the MLP's input, target: its output)."""
    clt: bool = False
    """A cross-layer transcoder over --layers (consecutive; also: --arch clt)."""
    layers: tuple[str, ...] = ()
    """Layers of --kind / --transcoder / --clt: numbers, or all."""
    kind: str | None = None
    """An SAE at each of --layers on the store's source of this kind (e.g. attn_out), in one ensemble."""
    skip: bool = False
    """Transcoders: add a linear skip term x W_skip (skip transcoders)."""

    def __post_init__(self):
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


@dataclass(frozen=True)
class GridConfig:
    arch: tuple[ArchName, ...] = ("relu",)
    """Architectures, each trained as its own ensemble on the same batches (one pass over the store), e.g.
    --arch relu topk batchtopk jumprelu gated; clt = jumprelu_tanh with --clt."""
    sweep: tuple[str, ...] = ()
    """Knob axes; members are their grid, per architecture: --sweep k=16,32,64 'l1=logspace(-4,-2,8)' seed=0,1;
    an axis for one architecture only: topk:k=20,40,80."""
    l1_min: float | None = None
    """log10 of the smallest sparsity coefficient of the shorthand sweep [default: -4 when the shorthand applies]."""
    l1_max: float | None = None
    """log10 of the largest one [default: -2]."""
    n_models: int | None = None
    """Members of each architecture along its default sparsity axis: λ log-spaced between --l1_min and --l1_max
    (architectures with a coefficient), or k spaced geometrically over the default k range (the TopK family,
    matching_pursuit) [default: 8 λs; the k axis 20 … 640]. It applies to every architecture whose axis nothing else
    sets (--k, --l1_coeff, --sweep), and is refused where it applies to none."""
    l1_coeff: float | None = None
    """A fixed L1 coefficient (relu, relu_april, gated, panneal, crosscoder)."""
    l0_coeff: float | None = None
    """A fixed L0 coefficient (jumprelu) or tanh coefficient (jumprelu_tanh)."""
    k: int | None = None
    """Active latents per row (topk, abstopk, batchtopk, matryoshka), or the most pursuit steps (matching_pursuit)
    [default: the axis k = 20, 40, 80, 160, 320, 640 (matching_pursuit: 8, 16, 32, 64), up to d_sae, unless --sweep sets k]."""
    residual_threshold: float = 1e-2
    """matching_pursuit: a row's pursuit stops once its residual norm is below this (normalised units, rows of norm ≈ √d)."""
    bandwidth: float | None = None
    """JumpReLU straight-through bandwidth [default: 1e-3·√d, the reference's 1e-3 on unit-norm² activations]."""
    threshold_init: float | None = None
    """Initial JumpReLU threshold [default: 1e-3·√d]."""
    p_end: float = 0.2
    """panneal: final exponent of the Lp penalty, unless swept."""
    decoder_init_norm: float = 0.1
    """relu_april, crosscoder: initial norm of each source's decoder vector (e.g. 0.08 for 2 sources)."""
    ratio: float = 8.0
    """d_sae = ratio × d_in."""
    d_sae: int | None = None
    """Number of latents (overrides --ratio)."""
    b_dec_init: Literal["mean", "zeros"] = "mean"
    """Initial decoder bias: the mean of a sample of training rows, or zeros."""
    seed: int = 0
    """Seed of initialisation and data order."""

    def __post_init__(self):
        object.__setattr__(self, "arch", (self.arch,) if isinstance(self.arch, str) else tuple(self.arch))
        if not self.arch:
            raise ValueError("--arch needs at least one architecture")
        for arch in self.arch:
            if arch not in ARCHS:
                raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}")
        if len(set(self.arch)) < len(self.arch):
            raise ValueError(f"--arch names an architecture twice: {' '.join(self.arch)}")
        if None not in (self.l1_min, self.l1_max) and self.l1_min > self.l1_max:
            raise ValueError(f"--l1_min ({self.l1_min}) is larger than --l1_max ({self.l1_max})")
        if self.n_models is not None and self.n_models < 1:
            raise ValueError(f"--n_models must be at least 1, got {self.n_models}")
        if self.d_sae is not None and self.d_sae < 1:
            raise ValueError(f"--d_sae must be positive, got {self.d_sae}")
        if self.d_sae is None and self.ratio <= 0:
            raise ValueError(f"--ratio must be positive, got {self.ratio}")
        if self.k is not None and self.k < 1:
            raise ValueError(f"--k must be positive, got {self.k}")
        for name in ("bandwidth", "threshold_init"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"--{name} must be positive, got {getattr(self, name)}")
        for spec in self.sweep:
            scope, axis = axis_scope(spec)
            parse_axis(axis)
            if scope is not None and scope not in self.arch:
                raise ValueError(f"--sweep {spec}: {scope} is not among --arch {' '.join(self.arch)}")
        self._check_coefficients()

    def axes_for(self, arch: str) -> list[str]:
        """The --sweep axes that apply to `arch`: its own, and the unscoped ones it has the knob of
        (with one architecture, every unscoped axis, so a knob it lacks is refused)."""
        out = []
        for spec in self.sweep:
            scope, axis = axis_scope(spec)
            if scope == arch or (scope is None and (len(self.arch) == 1 or parse_axis(axis)[0] in ARCHS[arch].knobs)):
                out.append(axis)
        return out

    @property
    def shorthand_asked(self) -> bool:
        return any(v is not None for v in (self.l1_min, self.l1_max, self.n_models))

    def _n_models_applies(self, arch: str) -> bool:
        """Whether --n_models sets `arch`'s axis: its coefficient's or its k's, where nothing else does."""
        knob = ARCHS[arch].coefficient or ("k" if "k" in ARCHS[arch].knobs else None)
        if knob is None:
            return False
        fixed = self.k if knob == "k" else getattr(self, knob)
        return fixed is None and not any(parse_axis(axis)[0] == knob for axis in self.axes_for(arch))

    def _check_coefficients(self) -> None:
        """A fixed coefficient, and the shorthand, must belong to some architecture of the run, and
        the shorthand may not fight a fixed coefficient or a --sweep axis over the same one."""
        coefficients = {ARCHS[a].coefficient for a in self.arch}
        for name in ("l1_coeff", "l0_coeff"):
            if getattr(self, name) is not None and name not in coefficients:
                uses = ", ".join(f"{a}: --{ARCHS[a].coefficient}" if ARCHS[a].coefficient else f"{a}: no coefficient"
                                 for a in self.arch)
                raise ValueError(f"--{name} does not apply to {' '.join(self.arch)} ({uses})")
        unscoped = [parse_axis(axis_scope(s)[1])[0] for s in self.sweep if axis_scope(s)[0] is None]
        for axis in unscoped:
            if len(self.arch) > 1 and not any(axis in ARCHS[a].knobs for a in self.arch):
                raise ValueError(f"--sweep {axis}: none of {' '.join(self.arch)} uses it")
        if not self.shorthand_asked:
            return
        if coefficients == {None} and (self.l1_min is not None or self.l1_max is not None):
            raise ValueError(f"--l1_min/--l1_max bound a sparsity coefficient, and {' '.join(self.arch)} "
                             "has none: sweep k instead, e.g. --sweep k=16,32,64, or set how many k with --n_models")
        if self.n_models is not None and not any(self._n_models_applies(a) for a in self.arch):
            raise ValueError(f"--n_models sets the length of a default sparsity axis, and every axis of {' '.join(self.arch)} "
                             "is set otherwise (--k, --l1_coeff/--l0_coeff or --sweep): drop --n_models")
        for arch in self.arch:
            coefficient = ARCHS[arch].coefficient
            if coefficient is None or (self.l1_min is None and self.l1_max is None and not self._n_models_applies(arch)):
                continue
            swept = any(parse_axis(axis)[0] == coefficient for axis in self.axes_for(arch))
            if swept or getattr(self, coefficient) is not None:
                by = "--sweep" if swept else f"--{coefficient}"
                raise ValueError(f"--l1_min/--l1_max/--n_models and {by} both set {coefficient}: give one of them")


@dataclass(frozen=True)
class ScheduleConfig:
    lr: float | None = None
    """Adam learning rate [default: each architecture's recipe, see README]."""
    lr_warmup_steps: int | None = None
    """Linear learning-rate warm-up steps [default: the recipe's fraction of the run]."""
    lr_decay_start: float | None = None
    """Fraction of training after which the lr decays linearly to 0 (1: never) [default: the recipe's]."""
    sparsity_warmup_steps: int | None = None
    """Linear warm-up steps of the sparsity coefficient [default: the recipe's]."""
    grad_clip: float | None = None
    """Clip each member's gradient norm (0: off), on the loss summed over d as the references do [default: the
    recipe's]."""
    dead_window: int | None = None
    """Tokens without firing after which a latent counts as dead [default: the recipe's, at most a quarter of
    the run]."""
    k_anneal_steps: int = 0
    """TopK family: anneal k from d_in down to --k over this many steps."""
    p_anneal_start: float = 0.2
    """panneal: fraction of training after which p starts to fall."""
    p_anneal_updates: int = 10
    """panneal: p reaches p_end in this many steps."""
    resample_every: int = 0
    """L1 architectures: resample dead latents every N steps (0: never)."""
    resample_stop: float = 0.5
    """No resampling after this fraction of training."""
    resample_pool: int = 819_200
    """Store rows dead latents draw their new inputs from."""

    def __post_init__(self):
        for name in ("dead_window", "lr"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"--{name} must be positive, got {getattr(self, name)}")
        for name in ("lr_warmup_steps", "sparsity_warmup_steps", "k_anneal_steps"):
            if (getattr(self, name) or 0) < 0:
                raise ValueError(f"--{name} must be ≥ 0, got {getattr(self, name)}")
        if self.grad_clip is not None and self.grad_clip < 0:
            raise ValueError(f"--grad_clip must be ≥ 0 (0: off), got {self.grad_clip}")
        if self.lr_decay_start is not None and not 0 <= self.lr_decay_start <= 1:
            raise ValueError(f"--lr_decay_start is a fraction in [0, 1] (1: no decay), got {self.lr_decay_start}")
        if not 0 <= self.p_anneal_start < 1 or self.p_anneal_updates < 1:
            raise ValueError("--p_anneal_start is a fraction in [0, 1) and --p_anneal_updates at least 1")
        if self.resample_every < 0 or not 0 < self.resample_stop <= 1:
            raise ValueError("--resample_every must be ≥ 0 and --resample_stop a fraction in (0, 1]")
        if self.resample_pool < 1:
            raise ValueError(f"--resample_pool must be positive, got {self.resample_pool}")


@dataclass(frozen=True)
class SweepConfig:
    output_dir: str = "runs/demo"
    """Where checkpoints, members and the summary go."""
    data: DataConfig = field(default_factory=DataConfig)
    wiring: WiringConfig = field(default_factory=WiringConfig)
    grid: GridConfig = field(default_factory=GridConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    checkpoint_every: int = 500
    """Steps between checkpoints."""
    device: str = "cpu"
    """Training device (cpu, cuda, cuda:1, mps)."""
    overwrite: bool = False
    """Replace an output directory that holds another run (the old one is moved aside)."""
    data_parallel: int = 1
    """Under torchrun: ranks that split each batch of the same members [default: every rank trains its own
    members on whole batches]."""
    break_lock: bool = False
    """Take over the output's lock (OUTPUT_DIR.lock) even when another host holds it."""
    precision: Literal["fp32", "tf32", "bf16"] | None = None
    """Matmul precision: fp32; tf32 (CUDA tensor cores, float32 storage); bf16 (encoder and decoder products in
    bfloat16 under autocast; weights, gradients, Adam moments and losses float32) [default: tf32 on CUDA, fp32
    elsewhere: on a CPU bf16 gained 7% at most (bench/RESULTS.md), not worth its rounding]."""
    compile: bool = False
    """torch.compile each ensemble's forward (and so its backward); off by default: 1.05-1.19× on a CPU after a
    compilation of tens of seconds, not yet measured on a GPU (bench/RESULTS.md)."""
    topk_decode: Literal["auto", "sparse", "dense"] = "auto"
    """TopK members' decode: the k active decoder rows gathered (sparse) or a dense product [default: sparse on a CPU,
    on a GPU whichever a timed step finds faster]."""
    group_members: int | None = None
    """Members per forward/backward group (members never interact: it changes speed and memory only) [default: timed
    on the first batch: of 1, a middle number and as many as fit in memory, the cheapest per member]."""

    def __post_init__(self):
        from runtime.devices import check_device

        if self.checkpoint_every < 1:
            raise ValueError(f"--checkpoint_every must be positive, got {self.checkpoint_every}")
        check_device(self.device)
        if self.group_members is not None and self.group_members < 1:
            raise ValueError(f"--group_members must be positive, got {self.group_members}")
        if self.precision == "tf32" and not self.device.startswith("cuda"):
            raise ValueError(f"--precision tf32 is a CUDA matmul mode; on {self.device} use fp32 (or bf16)")
        archs = self.grid.arch
        if self.schedule.resample_every:
            others = [a for a in archs if not ARCHS[a].resamples]
            if others:
                raise ValueError(f"--resample_every is for the L1 architectures "
                                 f"({', '.join(a for a, s in ARCHS.items() if s.resamples)}); "
                                 f"{', '.join(others)} {'has its' if len(others) == 1 else 'have their'} own remedy")
        if self.schedule.k_anneal_steps and not any("k" in ARCHS[a].knobs for a in archs):
            raise ValueError(f"--k_anneal_steps is for the TopK family; {' '.join(archs)} has no k")

    @property
    def archs(self) -> tuple[str, ...]:
        return self.grid.arch

    def resolved_precision(self) -> str:
        return self.precision or ("tf32" if self.device.startswith("cuda") else "fp32")

    @classmethod
    def from_flat(cls, **values) -> "SweepConfig":
        """A configuration from flat field names (what the CLI and sweep_config.json use)."""
        parts, top = {}, {}
        for key, value in values.items():
            if key in _OWNER:
                parts.setdefault(_OWNER[key], {})[key] = value
            elif key in _TOP:
                top[key] = value
            else:
                raise TypeError(f"SweepConfig has no field {key!r}")
        return cls(**top, **{name: _PARTS[name](**kw) for name, kw in parts.items()})

    def flat(self) -> dict:
        """Every field by its flat name (as the CLI names it)."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out.update(asdict(value) if f.name in _PARTS else {f.name: value})
        return out

    def identity(self) -> dict:
        """What the run trains (compared on resume), flat; one architecture is recorded as its name,
        as runs recorded it before several could share a run."""
        identity = {k: v for k, v in self.flat().items() if k not in RUNTIME_FIELDS}
        if len(self.grid.arch) == 1:
            identity["arch"] = self.grid.arch[0]
        return identity


_PARTS = {"data": DataConfig, "wiring": WiringConfig, "grid": GridConfig, "schedule": ScheduleConfig}
_OWNER = {f.name: name for name, cls in _PARTS.items() for f in fields(cls)}
_TOP = {f.name for f in fields(SweepConfig) if f.name not in _PARTS}
