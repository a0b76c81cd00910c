"""Stage 2: train a sweep of dictionaries on sources of an activation store.

    cfg = SweepConfig.from_flat(cache="caches/p70m-l2", output_dir="runs/l1-sweep", arch=("relu", "topk"))
    train_sweep(cfg)

One loop, every member at once: each batch is read once and stepped by one ensemble per
architecture (its own parameter shapes and recipe, training/plan.py). Everything that can be
checked is checked before anything is written: the store, the sources, the architectures' knobs,
every member's configuration and the memory all of them need. Checkpoints (ensembles,
optimisers, stream position, dead-latent counters) are written every `checkpoint_every` steps,
and on Ctrl-C at the next step boundary (a second Ctrl-C stops at once; the last checkpoint
stands); rerunning the same command resumes from the last one. Under torchrun each rank trains
its share of the members, whatever their architectures (or a slice of each batch), and each
member group checkpoints its own (training/parallel.py). After training every member is exported
with the normalisation folded in (training/export.py), and sweep.json records the run;
`evaluation.runner.evaluate_run` measures the members.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from contextlib import ExitStack, closing
from dataclasses import MISSING, dataclass, fields, replace
from pathlib import Path
from typing import Callable, Iterator

import torch
from tqdm.auto import tqdm

from runtime.disk import check_free, writing
from runtime.distributed import Processes
from runtime.location import location
from runtime.lock import LockError, OutputLock
from store.zarr_store import ActivationStore, StoreError, json_normal
from store.stream import ActivationStream, StreamConfig
from training import memory, rundir
from training.config import RUNTIME_FIELDS, SweepConfig
from training.ensemble import Ensemble, group_size, matmul_precision
from training.export import export_run
from training.parallel import GradientSync, Layout
from training.plan import Part, plan_parts, resolved_record
from training.rules import rule_of
from training.wiring import Wiring, plan_wirings

RunDirError = rundir.RunDirError


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


def open_training_stream(cfg: SweepConfig) -> tuple[ActivationStore, dict[str, list[Wiring]], ActivationStream,
                                                    tuple[int, ...]]:
    """The store, each architecture's wirings, the one stream of batches every architecture
    trains on (every source any member reads or writes, side by side) and the token ids it leaves
    out (benches feed other trainers the same batches through this)."""
    data, w = cfg.data, cfg.wiring
    store = ActivationStore.open(location(data.cache, data.storage_options, data.cache_dir))
    wirings = {arch: plan_wirings(store, source=w.source, sources=w.sources, targets=w.targets, transcoder=w.transcoder,
                                  clt=w.clt, layers=w.layers, arch=arch, kind=w.kind) for arch in cfg.archs}
    sources = list(dict.fromkeys(s for arch_wirings in wirings.values() for wiring in arch_wirings for s in wiring.sources))
    exclude_ids = exclude_token_ids(store, data.exclude_tokens)
    stream = ActivationStream(store, sources, StreamConfig(data.batch_size, data.eval_tokens, data.shuffle_chunks,
                                                           data.prefetch, cfg.grid.seed, exclude_tokens=exclude_ids),
                              cfg.device)
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


@dataclass
class Held:
    """This rank's share of one architecture: an ensemble of some of its members."""

    part: Part
    ensemble: Ensemble
    indices: range  # their places among the run's members
    first: int  # the run index of the part's first member

    @property
    def names(self) -> list[str]:
        offset = self.indices.start - self.first
        return self.part.names[offset: offset + len(self.indices)]


def train_sweep(cfg: SweepConfig, tracker=None, layout: Layout | None = None,
                evaluation_bytes: Callable[[ActivationStore, int], int | None] | None = None) -> list[dict]:
    """Train and export every member; return one row per member. `tracker`, if given, gets the
    training curves (see training.tracking.WandbTracker). `layout`: under torchrun, which
    members and rows this rank steps (training/parallel.py); every rank returns every row.
    `evaluation_bytes(store, the members' parameters)`: what the evaluation
    that follows will need (evaluation.memory.memory_needed), checked with training's needs
    before anything is written."""
    layout = layout or Layout(Processes(), cfg.data_parallel)
    cfg = replace(cfg, device=layout.processes.device_for(cfg.device))
    lead = layout.processes.rank == 0
    store, wirings, stream, exclude_ids = open_training_stream(cfg)
    for arch_wirings in wirings.values():
        _check_widths(store, arch_wirings)
    _check_stream(cfg, stream)
    first = next(iter(wirings.values()))[0]
    d_in = store.source(first.inputs[0]).d
    d_out = store.source(first.targets[0]).d if first.targets else None
    parts = plan_parts(cfg, stream.batches_per_epoch, wirings, exclude_ids, d_in, d_out)
    members = [m for p in parts for m in p.members]
    mine = layout.members(len(members))
    rows_per_step = len(layout.rows(cfg.data.batch_size))
    need = _estimate(parts, mine, rows_per_step, torch.device(cfg.device), stream, cfg.data.prefetch,
                     cfg.group_members)
    if evaluation_bytes is not None and lead:  # rank 0 evaluates
        parameters = sum(memory.parameter_count(p.members) for p in parts)
        need = replace(need, evaluation_bytes=evaluation_bytes(store, parameters))
    memory.check_fits(need, torch.device(cfg.device), len(mine))
    held = _build(cfg, parts, mine, stream.columns)
    if layout.data_parallel > 1:
        sync = GradientSync(layout)
        for h in held:
            h.ensemble.sync_gradients(sync)
    # everything is validated: only now may the output directory be touched
    out = Path(cfg.output_dir)
    identity = {**json_normal(cfg.identity()), "resolved": json_normal(resolved_record(parts))}
    lock = OutputLock(out, "train_sweep.py", cfg.break_lock) if lead else None  # rank 0 holds it for the job
    with ExitStack() as stack:
        if lock is not None:
            stack.callback(lock.release)
        if _claim(layout, out, identity, cfg.overwrite, lock):
            if lead:
                print(f"{out} already holds this finished sweep; see {out / 'sweep.csv'}")
            return json.loads((out / rundir.SUMMARY_FILE).read_text())["members"]
        if lead:
            _print_plan(cfg, parts, stream)
        if layout.processes.distributed:
            print(layout.describe([n for h in held for n in h.names], len(members)), flush=True)
        print(f"{layout.processes.name + ' ' if layout.processes.distributed else ''}memory: "
              f"{need.describe(torch.device(cfg.device))}")
        if cfg.grid.b_dec_init == "mean":
            mean_C = stream.sample_mean()
            for h in held:
                h.ensemble.dictionary.init_b_dec_(mean_C)
        state = _TrainState(0, 0)
        resume = layout.agreed_resume_path(out)
        if resume is not None:
            state = _load_checkpoint(resume, held, cfg.device)
            if lead:
                print(f"resuming {out} at step {state.step}")
        if layout.writes:  # a checkpoint (two while one replaces the other) and the exported weights
            exported = 4 * sum(memory.parameter_count(h.ensemble.members) for h in held)
            check_free(out, 2 * checkpoint_bytes(held) + exported, "training and exporting")
        started = time.perf_counter()
        with matmul_precision(cfg.device, cfg.resolved_precision()):
            _train(cfg, held, stream, state, out, layout, tracker)
        seconds = time.perf_counter() - started
        rows = export_run(cfg, held, parts, stream, store, state.tokens_seen, out, layout, seconds)
        layout.processes.barrier("waiting for every rank's export")
        layout.remove_checkpoints(out)  # the exported members are the result now
        return rows


def _build(cfg: SweepConfig, parts: list[Part], mine: range, columns: dict) -> list[Held]:
    """One ensemble per architecture that has members in this rank's share `mine` of the run."""
    held, first = [], 0
    for part in parts:
        share = range(max(first, mine.start), min(first + len(part.members), mine.stop))
        if len(share):
            members = [part.members[i - first] for i in share]
            decode = _topk_decode(cfg, members, columns) if rule_of(members[0].spec).sparse_decode else "sparse"
            ensemble = Ensemble(members, cfg.device, cfg.group_members, dead_tokens=part.resolved.dead_window,
                                columns=columns, precision=cfg.resolved_precision(), compile=cfg.compile, topk_decode=decode)
            held.append(Held(part, ensemble, share, first))
        first += len(part.members)
    return held


def _topk_decode(cfg: SweepConfig, members: list, columns: dict) -> str:
    """The TopK decode this device runs faster: sparse on a CPU (bench/RESULTS.md), timed on a GPU."""
    if cfg.topk_decode != "auto":
        return cfg.topk_decode
    if not cfg.device.startswith("cuda"):
        return "sparse"
    from training.ensemble import time_topk_decodes

    times = time_topk_decodes(members, cfg.device, cfg.data.batch_size, columns)
    choice = min(times, key=times.get)
    print(f"TopK decode on {cfg.device}: {choice} ({', '.join(f'{k} {v * 1e3:.1f} ms' for k, v in times.items())} a step)")
    return choice


def _estimate(parts: list[Part], mine: range, rows: int, device: torch.device, stream: ActivationStream,
              prefetch: int, group_members: int | None) -> memory.Estimate:
    """The memory of this rank's ensembles: their weights and states together, the largest one
    group's step (the ensembles step one after another; the largest group memory allows, or
    `group_members`), one stream's batches."""
    shares, first = [], 0
    for part in parts:
        own = [part.members[i - first] for i in range(max(first, mine.start), min(first + len(part.members), mine.stop))]
        if own:
            shares.append(own)
        first += len(part.members)
    resident = 16 * sum(memory.parameter_count(own) for own in shares)  # every ensemble's state, on the device at once
    estimates = [memory.estimate(own, rows, _group_for_estimate(own, rows, device, group_members, resident), stream.width,
                                 prefetch) for own in shares]
    return memory.combine(estimates)


def _group_for_estimate(own: list, rows: int, device: torch.device, group_members: int | None, resident: int) -> int:
    """The largest group memory allows; 1 where not even one member's step fits, so that
    memory.check_fits refuses the sweep with the whole estimate and the ways out."""
    try:
        return group_size(own, rows, device, group_members, resident_bytes=resident)
    except ValueError:
        return 1


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
    outcome, value = layout.processes.all_gather(verdict, "claiming the output directory")[0]
    if outcome == "refused":
        raise RunDirError(value)
    return value


def _check_widths(store: ActivationStore, wirings: list[Wiring]) -> None:
    """Inputs read side by side (a crosscoder) or layer by layer (a CLT) share a width, as do
    targets; transcoders' inputs and targets may differ."""
    for wiring in wirings:
        for role, names in (("inputs", wiring.inputs), ("targets", wiring.targets)):
            widths = {n: store.source(n).d for n in names}
            if len(set(widths.values())) > 1:
                what = "a crosscoder" if not wiring.targets else "a cross-layer transcoder"
                raise StoreError(f"the {role} of {what} must have one width; got {widths} "
                                 "(cache pairs with --require_equal_widths)")


def _check_stream(cfg: SweepConfig, stream: ActivationStream) -> None:
    if cfg.data.batch_size > stream.n_train:
        raise ValueError(f"--batch_size {cfg.data.batch_size:,} is larger than the store's {stream.n_train:,} training "
                         f"rows: use --batch_size {max(1, stream.n_train // 8):,} or cache more tokens")


def _print_plan(cfg: SweepConfig, parts: list[Part], stream: ActivationStream) -> None:
    """One line per architecture with what its recipe resolved to, and one when the run is too
    short for it."""
    for part in parts:
        r = part.resolved
        lrs = sorted({m.lr for m in part.members})
        lr = f"{lrs[0]:.2g}" if len(lrs) == 1 else f"{lrs[0]:.2g}…{lrs[-1]:.2g}"
        print(f"{len(part.members)} × {part.arch}{_axes_text(part)} on {stream.source}: {r.total_steps} steps of {cfg.data.batch_size} rows, "
              f"lr {lr} (warm-up {r.lr_warmup_steps} steps, decay from {r.lr_decay_start}), "
              f"sparsity warm-up {r.sparsity_warmup_steps} steps, clip {r.grad_clip}, "
              f"dead after {r.dead_window:,} tokens", flush=True)
        note = part.note(cfg.data.batch_size, stream.n_train)
        if note:
            print(note)


def _axes_text(part: Part) -> str:
    """What its members vary, e.g. " (l1_coeff 1e-04 … 1e-02, k 20 40 80)"; "" for one member."""
    texts = []
    for axis in part.axes:
        values = sorted({getattr(m, axis) for m in part.members})
        shown = [f"{v:.3g}" for v in values]
        texts.append(f"{axis} {' '.join(shown) if len(shown) <= 6 else f'{shown[0]} … {shown[-1]}'}")
    return f" ({', '.join(texts)})" if texts else ""


def _default_identity() -> dict:
    """The identity fields' defaults (those without one are always written by a run)."""
    defaults = {}
    for f in fields(SweepConfig):
        value = f.default_factory() if f.default_factory is not MISSING else f.default
        if hasattr(value, "__dataclass_fields__"):
            defaults.update({g.name: getattr(value, g.name) for g in fields(value)})
        elif value is not MISSING:
            defaults[f.name] = value
    defaults["arch"] = defaults["arch"][0]  # one architecture is recorded by its name
    return json_normal({k: v for k, v in defaults.items() if k not in RUNTIME_FIELDS})


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


def _train(cfg: SweepConfig, held: list[Held], stream: ActivationStream, state: _TrainState, out: Path,
           layout: Layout, tracker=None):
    total = held[0].part.resolved.total_steps if held else 0
    distributed = layout.processes.distributed
    n_members = sum(len(h.ensemble) for h in held)
    bar = tqdm(total=total, initial=state.step, unit="step", desc=f"training {n_members} dictionaries",
               disable=distributed and layout.processes.rank > 0)
    # under torchrun a Ctrl-C reaches every rank at its own step: torchrun ends them, and the
    # last checkpoint every rank completed stands
    with _StepBoundaryInterrupts(enabled=not distributed) as interrupts, bar, \
            closing(training_batches(stream, state.step, total)) as batches:
        for x_BC in batches:
            results = []
            for h in held:  # every architecture steps on the same batch, read once
                h.part.schedule.apply_(h.ensemble, state.step)
                if layout.data_parallel > 1:
                    rows = layout.rows(len(x_BC))
                    results.append(h.ensemble.step(x_BC[rows.start:rows.stop], batch_rows=len(x_BC)))
                else:
                    results.append(h.ensemble.step(x_BC))
            state.step += 1
            if _resample_due(cfg, state.step, total):
                pool = stream.pool(cfg.schedule.resample_pool, state.step)
                for h in held:
                    h.ensemble.resample_dead_(pool, h.part.resolved.dead_window, state.step)
            state.tokens_seen += len(x_BC)
            bar.update()
            if state.step % 10 == 0 or state.step == total:
                bar.set_postfix_str(_progress(results))
                if tracker is not None:
                    tracker.log(_curves(held, results), state.step)
            if state.step % cfg.checkpoint_every == 0 or interrupts.requested:
                _checkpoint(layout, out, held, state)
            if interrupts.requested:
                raise KeyboardInterrupt
    _checkpoint(layout, out, held, state)


def _checkpoint(layout: Layout, out: Path, held: list[Held], state: _TrainState) -> None:
    """Every member group writes this step; once all have, their older checkpoints go."""
    if layout.writes:
        _save_checkpoint(layout.checkpoint_path(out, state.step), held, state)
    layout.processes.barrier(f"checkpointing step {state.step}")
    layout.prune_checkpoints(out, state.step)


def _resample_due(cfg: SweepConfig, step: int, total: int) -> bool:
    every = cfg.schedule.resample_every
    return bool(every) and step % every == 0 and step <= cfg.schedule.resample_stop * total


def _progress(results: list) -> str:
    mse = torch.cat([r.mse for r in results]).mean().item()
    l0 = torch.cat([r.l0 for r in results]).detach()
    return f"mse {mse:.4f} L0 {l0.min().item():.1f}..{l0.max().item():.1f}"


def _curves(held: list[Held], results: list) -> dict[str, float]:
    values = {}
    for h, result in zip(held, results):
        for e, name in enumerate(h.names):
            values.update({f"{name}/{k}": getattr(result, key)[e].item()
                           for k, key in (("loss", "total"), ("mse", "mse"), ("l0", "l0"))})
    return values


def _save_checkpoint(path: Path, held: list[Held], state: _TrainState) -> None:
    """Written to a temporary file and renamed: a crash or a full disk mid-write leaves the
    previous checkpoint as it was, and no temporary file."""
    tmp = path.with_suffix(".tmp")
    try:
        with writing(path.parent, f"writing the checkpoint of step {state.step}"), open(tmp, "wb") as f:
            # through a Python file, so a failed write keeps its OSError (errno) as the error's context
            torch.save({"ensembles": {h.part.arch: h.ensemble.state_dict() for h in held}, "state": vars(state)}, f)
        os.replace(tmp, path)  # atomic
    finally:
        tmp.unlink(missing_ok=True)


def checkpoint_bytes(held: list[Held]) -> int:
    """Size of one checkpoint: the dictionaries' parameters and buffers and Adam's two moments."""
    total = 0
    for h in held:
        d, optimizer = h.ensemble.dictionary, h.ensemble.optimizer
        tensors = [*d.parameters(), *d.buffers(), *optimizer.exp_avg, *optimizer.exp_avg_sq]
        total += sum(t.numel() * t.element_size() for t in tensors)
    return total


def _load_checkpoint(path: Path, held: list[Held], device) -> _TrainState:
    saved = torch.load(path, map_location=device, weights_only=False)
    # checkpoints of one architecture written before a run could hold several: {"ensemble": …}
    states = saved["ensembles"] if "ensembles" in saved else {held[0].part.arch: saved["ensemble"]}
    if set(states) != {h.part.arch for h in held}:
        raise ValueError(f"checkpoint {path} holds {', '.join(states)}, not this run's {', '.join(h.part.arch for h in held)}")
    for h in held:
        h.ensemble.load_state_dict(states[h.part.arch])
    return _TrainState(**saved["state"])
