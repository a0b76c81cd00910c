"""Stage 2: train a sweep of dictionaries on one source of an activation store, or crosscoders
on several sources read side by side (`sources`: layers × models, rows aligned in the store).

    cfg = SweepConfig(cache="caches/p70m-l2", output_dir="runs/l1-sweep", l1_min=-4, l1_max=-2)
    train_sweep(cfg)

One loop, all members at once: every batch is read once and stepped by the whole ensemble.
Checkpoints (ensemble, optimiser, stream position, dead-latent counters) are written every
`checkpoint_every` steps, on Ctrl-C and at the end; rerunning the same command resumes from the
last one. After training every member is exported for SAELens with the normalisation folded
in, and sweep.json records the run; `evaluation.runner.evaluate_run` measures the members.
Dead latents of the L1 architectures can be resampled every `resample_every` steps
(Ensemble.resample_dead_); members of different widths train as masks inside the widest.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path

import torch
from tqdm.auto import tqdm

from cache.devices import check_device
from cache.store import ActivationStore, StoreError, json_normal
from cache.stream import ActivationStream, StreamConfig
from evaluation.crosscoder import save_crosscoder
from evaluation.export import saelens_cfg, save_saelens
from evaluation.report import write_summary
from training.dictionary import ARCHS, LOSS_CONVENTION, MemberConfig
from training.ensemble import Ensemble
from training.sweep import build_members, member_name, parse_axis, shorthand_axis

# Fields that do not change what is trained: they may differ when a run is resumed.
_RUNTIME_FIELDS = ("output_dir", "device", "overwrite", "checkpoint_every", "prefetch")
CHECKPOINT = "checkpoint.pt"


class RunDirError(ValueError):
    """An output directory that holds another run."""


@dataclass(frozen=True)
class SweepConfig:
    cache: str
    """Path of a complete activation store."""
    output_dir: str
    """Directory for checkpoints, exported members, sweep.json/csv and plots."""
    source: str | None = None
    """Source in the store to train on; default: the store's only source."""
    sources: tuple[str, ...] = ()
    """Several sources to train crosscoders on, read side by side (instead of `source`)."""
    arch: str = "relu"
    """Architecture of every member: one of training.dictionary.ARCHS."""
    sweep: tuple[str, ...] = ()
    """Knob axes, e.g. ("k=16,32", "seed=0,1"); members are their grid (see training.sweep)."""
    l1_min: float = -4.0
    """log10 of the smallest L1 coefficient."""
    l1_max: float = -2.0
    """log10 of the largest L1 coefficient."""
    n_models: int = 8
    """Members of the shorthand sweep: the sparsity coefficient log-spaced over [10^l1_min, 10^l1_max]."""
    k: int = 32
    """Active latents per row (topk, batchtopk), unless swept."""
    l0_coeff: float = 1e-3
    """L0 coefficient (jumprelu), unless swept or set by the shorthand."""
    bandwidth: float = 1e-3
    """JumpReLU straight-through bandwidth ε."""
    grad_clip: float | None = None
    """Clip each member's gradient norm to this (per member, never across the ensemble)."""
    k_anneal_steps: int = 0
    """TopK family: k decreases linearly from d_in (at most d_sae) to its value over this many steps."""
    threshold_start_step: int = 1000
    """BatchTopK: step from which the inference threshold is averaged (at most half the run)."""
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
    ratio: float = 8.0
    """d_sae = ratio × d_in, unless d_sae is given."""
    d_sae: int | None = None
    """Number of latents of every member."""
    batch_size: int = 4096
    """Rows per step, shared by all members."""
    lr: float = 1e-4
    """Adam learning rate."""
    lr_warmup_steps: int = 0
    """Linear learning-rate warm-up from 0 over this many steps."""
    lr_decay_start: float | None = None
    """Fraction of training after which the learning rate decays linearly to 0 (e.g. 0.8)."""
    sparsity_warmup_steps: int = 0
    """Linear warm-up of the sparsity coefficient from 0 over this many steps."""
    b_dec_init: str = "mean"
    """Initial b_dec: "mean" (of a sample of training rows) or "zeros"."""
    n_epochs: int = 1
    """Passes over the training rows (ignored when n_tokens is given)."""
    n_tokens: int | None = None
    """Train on this many rows (epochs repeat as needed)."""
    eval_tokens: int = 50_000
    """Rows held out at the end of the store for evaluation (at most a tenth of it)."""
    shuffle_chunks: int = 8
    """Store chunks shuffled together in memory."""
    prefetch: int = 8
    """Batches read ahead in the background."""
    dead_window: int = 1_000_000
    """A latent is dead in training once it has not fired for this many tokens (also AuxK's rule)."""
    checkpoint_every: int = 500
    """Steps between checkpoints."""
    device: str = "cpu"
    """Training device."""
    seed: int = 0
    """Seed of the members' initialisation and of the data order."""
    overwrite: bool = False
    """Replace an output directory that holds another run."""

    def __post_init__(self):
        if self.l1_min > self.l1_max:
            raise ValueError(f"--l1_min ({self.l1_min}) is larger than --l1_max ({self.l1_max})")
        if self.n_models < 1:
            raise ValueError(f"--n_models must be at least 1, got {self.n_models}")
        if self.d_sae is not None and self.d_sae < 1:
            raise ValueError(f"--d_sae must be positive, got {self.d_sae}")
        if self.d_sae is None and self.ratio <= 0:
            raise ValueError(f"--ratio must be positive, got {self.ratio}")
        for name in ("batch_size", "n_epochs", "checkpoint_every", "dead_window"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be positive, got {getattr(self, name)}")
        if self.n_tokens is not None and self.n_tokens < 1:
            raise ValueError(f"--n_tokens must be positive, got {self.n_tokens}")
        if self.lr <= 0:
            raise ValueError(f"--lr must be positive, got {self.lr}")
        if self.lr_warmup_steps < 0 or self.sparsity_warmup_steps < 0 or self.k_anneal_steps < 0:
            raise ValueError("warm-up steps must be ≥ 0")
        if not 0 <= self.p_anneal_start < 1 or self.p_anneal_updates < 1:
            raise ValueError("--p_anneal_start is a fraction in [0, 1) and --p_anneal_updates at least 1")
        if self.resample_every < 0 or not 0 < self.resample_stop <= 1:
            raise ValueError("--resample_every must be ≥ 0 and --resample_stop a fraction in (0, 1]")
        if self.source is not None and self.sources:
            raise ValueError("give --source (one) or --sources (several), not both")
        if len(set(self.sources)) < len(self.sources):
            raise ValueError(f"--sources names a source twice: {', '.join(self.sources)}")
        if self.arch not in ARCHS:
            raise ValueError(f"unknown architecture {self.arch!r}; choose one of {', '.join(ARCHS)}")
        if self.resample_every and not ARCHS[self.arch].resamples:
            raise ValueError(f"--resample_every is for the L1 architectures "
                             f"({', '.join(a for a, s in ARCHS.items() if s.resamples)}); {self.arch} has its own remedy")
        if self.lr_decay_start is not None and not 0 <= self.lr_decay_start < 1:
            raise ValueError(f"--lr_decay_start is a fraction in [0, 1), got {self.lr_decay_start}")
        check_device(self.device)
        if self.b_dec_init not in ("mean", "zeros"):
            raise ValueError(f"--b_dec_init must be 'mean' or 'zeros', got {self.b_dec_init!r}")

    def identity(self) -> dict:
        return json_normal({k: v for k, v in asdict(self).items() if k not in _RUNTIME_FIELDS})


def sweep_members(cfg: SweepConfig, d_in: int, n_sources: int = 1) -> tuple[list[MemberConfig], list[str]]:
    """The sweep's members and the names of the knobs it varies."""
    d_sae = cfg.d_sae or int(round(cfg.ratio * d_in))
    if d_sae < 1:
        raise ValueError(f"--ratio {cfg.ratio} gives no latents for d_in={d_in}")
    base = MemberConfig(d_in=d_in, d_sae=d_sae, arch=cfg.arch, n_sources=n_sources, k=min(cfg.k, d_sae),
                        l0_coeff=cfg.l0_coeff, bandwidth=cfg.bandwidth, p_end=cfg.p_end, decoder_init_norm=cfg.decoder_init_norm, lr=cfg.lr,
                        grad_clip=cfg.grad_clip, seed=cfg.seed)
    axes = dict(parse_axis(spec) for spec in cfg.sweep)
    shorthand = shorthand_axis(base.spec.knobs, cfg.l1_min, cfg.l1_max, cfg.n_models)
    axes = {**{k: v for k, v in shorthand.items() if k not in axes}, **axes}
    return build_members(base, axes), list(axes)


def resolve_source(store: ActivationStore, source: str | None) -> str:
    names = [s.name for s in store.sources]
    if source is None:
        if len(names) > 1:
            raise StoreError(f"store {store.path} holds several sources; choose one with --source: {', '.join(names)}")
        return names[0]
    return store.source(source).name


def resolve_sources(store: ActivationStore, cfg: SweepConfig) -> list[str]:
    """The sources a sweep reads: `cfg.sources`, or the one of `cfg.source`."""
    if cfg.sources:
        return [store.source(name).name for name in cfg.sources]
    return [resolve_source(store, cfg.source)]


def train_sweep(cfg: SweepConfig, tracker=None) -> list[dict]:
    """Train and export every member; return one row per member. `tracker`, if given, gets the
    training curves (see training.tracking.WandbTracker)."""
    store = ActivationStore.open(cfg.cache)
    sources = resolve_sources(store, cfg)
    out = Path(cfg.output_dir)
    if _claim_output_dir(out, cfg):
        print(f"{out} already holds this finished sweep; see {out / 'sweep.csv'}")
        return json.loads((out / "sweep.json").read_text())["members"]
    stream = ActivationStream(
        store, sources, StreamConfig(cfg.batch_size, cfg.eval_tokens, cfg.shuffle_chunks, cfg.prefetch, cfg.seed), cfg.device
    )
    members, axes = sweep_members(cfg, stream.d, len(sources))
    total_steps = _total_steps(cfg, stream)
    ensemble = Ensemble(members, cfg.device, dead_tokens=cfg.dead_window,
                        threshold_start_step=min(cfg.threshold_start_step, total_steps // 2))
    if cfg.b_dec_init == "mean":
        ensemble.dictionary.init_b_dec_(stream.sample_mean())
    state = _TrainState(0, 0)
    if (out / CHECKPOINT).exists():
        state = _load_checkpoint(out / CHECKPOINT, ensemble, cfg.device)
        print(f"resuming {out} at step {state.step}")
    _train(cfg, ensemble, stream, state, total_steps, out, tracker)
    rows = _export(cfg, ensemble, axes, stream, store, state, out)
    (out / CHECKPOINT).unlink(missing_ok=True)  # the exported members are the result now
    return rows


def _claim_output_dir(out: Path, cfg: SweepConfig) -> bool:
    """Make `out` this run's directory; True if it already holds this run, finished."""
    config_file = out / "sweep_config.json"
    if out.exists() and any(out.iterdir()) and not cfg.overwrite:
        if not config_file.exists():
            raise RunDirError(f"{out} is not empty and holds no sweep: choose another --output_dir or pass --overwrite")
        # a field added to SweepConfig since that run was written counts as its default there
        theirs = {**_default_identity(), **json.loads(config_file.read_text())}
        if theirs != cfg.identity():
            diff = sorted(k for k in set(theirs) | set(cfg.identity()) if theirs.get(k) != cfg.identity().get(k))
            raise RunDirError(
                f"{out} holds another run (differs in: {', '.join(diff)}): "
                "choose another --output_dir or pass --overwrite"
            )
        return (out / "sweep.json").exists()
    if cfg.overwrite and out.exists():
        for name in (CHECKPOINT, "sweep.json", "sweep.csv"):
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    config_file.write_text(json.dumps(cfg.identity(), indent=2))
    return False


def _default_identity() -> dict:
    """The identity fields' defaults (those without one are always written by a run)."""
    return json_normal({f.name: f.default for f in fields(SweepConfig)
                        if f.default is not MISSING and f.name not in _RUNTIME_FIELDS})


def _total_steps(cfg: SweepConfig, stream: ActivationStream) -> int:
    if cfg.n_tokens is not None:
        return math.ceil(cfg.n_tokens / cfg.batch_size)
    return cfg.n_epochs * stream.batches_per_epoch


@dataclass
class _TrainState:
    step: int
    tokens_seen: int


def _schedule_(cfg: SweepConfig, ensemble: Ensemble, step: int, total: int) -> None:
    """Learning-rate warm-up/decay, sparsity warm-up and k annealing for this step (a function
    of the step alone, so a resumed run follows the same schedule)."""
    lr_scale = min(1.0, (step + 1) / cfg.lr_warmup_steps) if cfg.lr_warmup_steps else 1.0
    if cfg.lr_decay_start is not None:
        decay_from = cfg.lr_decay_start * total
        if step >= decay_from:
            lr_scale *= max(0.0, (total - step) / max(total - decay_from, 1))
    ensemble.optimizer.lr_scale = lr_scale
    sparsity = min(1.0, (step + 1) / cfg.sparsity_warmup_steps) if cfg.sparsity_warmup_steps else 1.0
    dictionary = ensemble.dictionary
    dictionary.sparsity_scale.fill_(sparsity)
    if cfg.k_anneal_steps:
        start_E = torch.full_like(dictionary.k, min(dictionary.W_enc.shape[1], dictionary.W_enc.shape[2]))
        start_E = torch.maximum(start_E, dictionary.k)
        progress = min(1.0, step / cfg.k_anneal_steps)
        dictionary.k_active.copy_(torch.round(start_E + (dictionary.k - start_E) * progress).long())
    if dictionary.spec.penalty == "lp":
        updates = p_updates_done(step, total, cfg.p_anneal_start, cfg.p_anneal_updates)
        dictionary.p_active.copy_(1 + (dictionary.p_end - 1) * updates / cfg.p_anneal_updates)


def p_updates_done(step: int, total: int, start: float, n_updates: int) -> int:
    """How many of the p-annealing steps have happened by `step`: they fall at
    start·total + j·(1 − start)·total / n_updates for j = 0 … n_updates − 1."""
    first = start * total
    if step < first:
        return 0
    return min(n_updates, int((step - first) // ((total - first) / n_updates)) + 1)


def _resample_due(cfg: SweepConfig, step: int, total: int) -> bool:
    return bool(cfg.resample_every) and step % cfg.resample_every == 0 and step <= cfg.resample_stop * total


def _train(cfg: SweepConfig, ensemble: Ensemble, stream: ActivationStream, state: _TrainState, total: int, out: Path,
           tracker=None):
    per_epoch = stream.batches_per_epoch
    bar = tqdm(total=total, initial=state.step, unit="step", desc=f"training {len(ensemble)} dictionaries")
    try:
        while state.step < total:
            epoch, start = divmod(state.step, per_epoch)
            for x_BD in stream.train_batches(epoch, start):
                _schedule_(cfg, ensemble, state.step, total)
                result = ensemble.step(x_BD)
                state.step += 1
                if _resample_due(cfg, state.step, total):
                    ensemble.resample_dead_(x_BD, cfg.dead_window, state.step)
                state.tokens_seen += len(x_BD)
                bar.update()
                if state.step % 10 == 0 or state.step == total:
                    bar.set_postfix_str(_progress(result))
                    if tracker is not None:
                        tracker.log(_curves(result), state.step)
                if state.step % cfg.checkpoint_every == 0:
                    _save_checkpoint(out / CHECKPOINT, ensemble, state)
                if state.step >= total:
                    break
    except KeyboardInterrupt:
        _save_checkpoint(out / CHECKPOINT, ensemble, state)
        raise
    finally:
        bar.close()
    _save_checkpoint(out / CHECKPOINT, ensemble, state)


def _progress(result) -> str:
    l0 = result.l0.detach()
    return f"mse {result.mse.mean().item():.4f} L0 {l0.min().item():.1f}..{l0.max().item():.1f}"


def _curves(result) -> dict[str, float]:
    values = {"loss": result.total, "mse": result.mse, "l0": result.l0}
    return {f"member_{e:02d}/{k}": v[e].item() for e in range(len(result.total)) for k, v in values.items()}


def _save_checkpoint(path: Path, ensemble: Ensemble, state: _TrainState) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"ensemble": ensemble.state_dict(), "state": asdict(state)}, tmp)
    os.replace(tmp, path)  # atomic: a crash mid-write leaves the previous checkpoint


def _load_checkpoint(path: Path, ensemble: Ensemble, device) -> _TrainState:
    saved = torch.load(path, map_location=device, weights_only=False)
    ensemble.load_state_dict(saved["ensemble"])
    return _TrainState(**saved["state"])


@torch.no_grad()
def _export(cfg, ensemble: Ensemble, axes: list[str], stream: ActivationStream, store, state: _TrainState,
            out: Path) -> list[dict]:
    """Every member with the normalisation folded in (a SAELens directory, or the crosscoder
    format for several sources) + the training summary."""
    dictionary = ensemble.dictionary
    dead_train_E = dictionary.dead_latents(cfg.dead_window).sum(-1) / dictionary.width_mask.sum(-1)
    rows = []
    for e, member in enumerate(ensemble.members):
        name = member_name(e, member, axes)
        member_info = {**member.to_dict(), "loss_convention": LOSS_CONVENTION, "source": stream.source}
        save = _save_crosscoder if len(stream.sources) > 1 else _save_sae
        save(out / "members" / name, dictionary, e, stream, store, member_info)
        rows.append({"name": name, "dir": f"members/{name}", **member_info,
                     "dead_fraction_train": dead_train_E[e].item(), "train_tokens": state.tokens_seen})
    first = store.source(stream.sources[0])
    summary = {
        "config": asdict(cfg),
        "store": {"path": str(store.path), "source": stream.source, "hook": first.hook, "norm_scale": stream.scale,
                  "sources": stream.sources, "norm_scales": stream.scales,
                  "train_rows": stream.n_train, "eval_rows": stream.n_eval,
                  "eval_sequence_start": stream.eval_sequence_start},
        "loss_convention": LOSS_CONVENTION,
        "swept": axes,
        "members": rows,
    }
    write_summary(out, summary)
    return rows


def _save_sae(directory: Path, dictionary, e: int, stream: ActivationStream, store, member_info: dict) -> None:
    source = store.source(stream.source)
    # the source's own model: in a paired store the second source belongs to the second model
    store_info = {**store.info, "model_name": source.model, "context_length": store.attrs["context_length"]}
    member = dictionary.members[e]
    cfg_json = saelens_cfg(arch_fields=dictionary.saelens_architecture(e), d_in=member.d_in, d_sae=member.d_sae,
                           store_info=store_info, hook_name=source.hook, member=member_info)
    save_saelens(directory, dictionary.member_tensors(e, stream.scale), cfg_json)


_CROSSCODER_RULE = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu"}  # inference rule by export kind


def _save_crosscoder(directory: Path, dictionary, e: int, stream: ActivationStream, store, member_info: dict) -> None:
    """The member in evaluation.crosscoder's format: W_enc [S, D, F], W_dec [F, S, D], b_dec [S, D]."""
    S, D, member = len(stream.sources), stream.d, dictionary.members[e]
    flat = dictionary.member_tensors(e, torch.tensor(stream.scales))
    tensors = {**flat, "W_enc": flat["W_enc"].reshape(S, D, -1), "W_dec": flat["W_dec"].reshape(-1, S, D),
               "b_dec": flat["b_dec"].reshape(S, D)}
    fields = dictionary.saelens_architecture(e)
    config = {
        "architecture": _CROSSCODER_RULE[fields["architecture"]],
        **({"k": fields["k"]} if "k" in fields else {}),
        "apply_b_dec_to_input": fields["apply_b_dec_to_input"],
        "n_sources": S, "d_in": D, "d_sae": member.d_sae,
        "sources": [_source_entry(store, name) for name in stream.sources],
        "normalisation": {"folded": True, "scales": stream.scales},
        "context_size": store.attrs["context_length"],
        "prepend_bos": store.info["prepend_bos"],
        "exclude_bos": store.info["exclude_bos"],
        "dataset": store.info["dataset"],
        "sae_sweep": member_info,
    }
    save_crosscoder(directory, tensors, config)


def _source_entry(store, name: str) -> dict:
    info = store.source(name)
    entry = {"name": name, "model": info.model, "hook": info.hook}
    return {**entry, "label": name.split("/", 1)[0]} if "/" in name else entry
