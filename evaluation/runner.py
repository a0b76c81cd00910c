"""Evaluate a trained sweep directory: reconstruction metrics, spliced CE/KL, report.

    evaluate_run(EvalConfig(run_dir="runs/l1-sweep"))

Reads the members as exported (raw-space weights, through formats/), so what is measured is what
users load. Every member reads input sources and writes target sources (the same ones for an SAE
or crosscoder, other ones for a transcoder). Reconstruction metrics use the store's held-out
rows, in each target's normalised space (y / s, so MSE is comparable across hooks; FVU is
scale-free), overall and per target where a member writes several. CE/KL re-run the model on
held-out sequences (none of whose rows were trained on) with each member spliced in at each of
its targets: an SAE replaces its hook by its reconstruction; a crosscoder replaces one source's
hook at a time by its reconstruction from the clean activations of all sources; a transcoder
replaces its target hook by its output computed from its input hook in the same forward pass.
Crosscoders also get the model-diff analysis of their decoders (evaluation/model_diff.py).
Writes per-latent density (sparsity.safetensors), sweep.json/csv, plots and report.md, and
prints each phase's progress and time. Evaluating a run that was evaluated before prints every
figure that changed (member, metric, old → new) and keeps the previous report.md, sweep.json and
sweep.csv beside the new ones as report.previous.md, sweep.previous.json, sweep.previous.csv.

Dimension key: B rows, F latents of a member, N sequences, T context.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from runtime.disk import writing
from runtime.location import location
from store.zarr_store import ActivationStore, StoreError
from store.stream import ActivationStream, StreamConfig
from evaluation.config import EvalConfig
from evaluation.metrics import MetricAccumulator
from evaluation.model_diff import write_diff_analysis
from evaluation.plots import plot_sweep
from evaluation.report import changed_figures, write_report
from evaluation.splice import Splice, recovered, single, spliced_losses, spliced_losses_hf
from formats import load_any
from formats.saelens import save_density
from training.rundir import write_summary

Forward = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # raw inputs [B, I] → (f [B, F], ŷ [B, O])
_PER_TARGET_METRICS = ("mse", "fvu", "explained_variance", "cosine", "l2_ratio")


@dataclass(frozen=True)
class LoadedMember:
    """A member as evaluation uses it: what it reads and writes, and its forward on raw inputs."""

    name: str
    d_sae: int
    inputs: list[str]  # source names it reads, side by side
    targets: list[str]  # source names it writes, side by side
    forward: Forward
    config: dict = field(repr=False)
    weights: dict[str, torch.Tensor] = field(repr=False)

    @property
    def wiring(self) -> str:
        """sae | transcoder | clt | crosscoder: how its inputs and targets are wired."""
        if self.inputs != self.targets:
            return "clt" if len(self.inputs) > 1 else "transcoder"
        return "crosscoder" if len(self.inputs) > 1 else "sae"


class _Phases:
    """Prints when each phase of the evaluation starts and how long it took; a summary at the end."""

    def __init__(self):
        self.times: dict[str, float] = {}

    def run(self, name: str, fn, *args, **kwargs):
        print(f"evaluation: {name} …", flush=True)
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        self.times[name] = time.perf_counter() - start
        return result

    def summary(self) -> str:
        return "evaluation took " + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in self.times.items())


def evaluate_run(cfg: EvalConfig) -> list[dict]:
    """Measure every member of the sweep in cfg.run_dir; return the updated member rows. A full
    disk while writing the results is one line (runtime/disk.py): rerunning evaluates again."""
    with writing(cfg.run_dir, "writing the evaluation's results"):
        return _evaluate_run(cfg)


def _evaluate_run(cfg: EvalConfig) -> list[dict]:
    out = Path(cfg.run_dir)
    if not (out / "sweep.json").exists():
        raise FileNotFoundError(f"{out} holds no finished sweep (no sweep.json): run train_sweep.py first")
    previous = {name: (out / name).read_bytes() for name in KEPT if (out / name).is_file()}
    summary = json.loads(previous["sweep.json"])
    rows = summary["members"]
    store = open_run_store(summary, out, cfg.storage_options, cfg.cache_dir)
    members = [_load(out / r["dir"], r, summary, cfg.device) for r in rows]
    phases = _Phases()
    density, mean_raw = phases.run("reconstruction metrics on held-out rows", _reconstruction_metrics,
                                   cfg, store, summary, members, rows)
    for r, m in zip(rows, members):
        save_density(out / r["dir"], density[m.name])
        if m.wiring == "crosscoder":
            diff = write_diff_analysis(out / r["dir"], m.config, m.weights, alive_M=density[m.name] > 0)
            r["diff"] = {k: v for k, v in diff.items() if k.startswith(("n_", "frac_")) or k == "relative_norm_mean"}
            r["diff"]["space"] = diff["space"]
    if cfg.n_sequences > 0 and not store.model_recorded:
        print(f"spliced CE/KL: skipped: store {store.path} records no model to run again (written by write_store); "
              "its members have reconstruction metrics only")
    elif cfg.n_sequences > 0:
        summary["eval"] = phases.run("spliced CE/KL on held-out sequences", _downstream_metrics,
                                     cfg, store, summary, members, rows, mean_raw)
    write_summary(out, summary)
    log10 = {name: torch.log10(d.float().clamp_min(1e-10)) for name, d in density.items()}
    plots = phases.run("plots", plot_sweep, rows, out, log10)
    write_report(out, summary, plots)
    print(phases.summary())
    if "report.md" in previous:
        _keep_previous(out, previous, json.loads(previous["sweep.json"]), summary)
    return rows


KEPT = {"report.md": "report.previous.md", "sweep.json": "sweep.previous.json", "sweep.csv": "sweep.previous.csv"}


def _keep_previous(out: Path, previous: dict[str, bytes], before: dict, after: dict) -> None:
    """A run evaluated again: print the figures that changed; where any did, keep the previous
    report and summary beside the new ones (KEPT)."""
    changes = changed_figures(before, after)
    if not changes:
        print("evaluation: every figure equals the previous evaluation's (to 6 significant digits)")
        return
    for name, data in previous.items():
        (out / KEPT[name]).write_bytes(data)
    print(f"evaluation: {len(changes)} figures differ from the previous evaluation (kept as {KEPT['report.md']}, "
          f"{KEPT['sweep.json']}):")
    for member, metric, old, new in changes:
        print(f"  {member}  {metric}  {old} → {new}")


def open_run_store(summary: dict, run_dir: Path, storage_options: dict | None = None,
                   cache_dir: str | None = None) -> ActivationStore:
    """The run's store: its recorded location (absolute path or URL), else the path as given on
    the command line (relative to where training ran, tried from here and from the run
    directory); says which."""
    recorded = summary["store"]
    candidates = [recorded["path"]]
    given = recorded.get("path_as_given")
    if given and location(given).remote:
        candidates.append(given)
    elif given:
        candidates += [given, str(run_dir.parent / given), str(run_dir / given)]
    for path in dict.fromkeys(candidates):
        where = location(path, storage_options, cache_dir)
        if where.holds_store():
            if where.url != recorded["path"]:
                print(f"evaluation: store not at {recorded['path']}; using {where.url}")
            return ActivationStore.open(where)
    raise StoreError(f"the run's store is not at {recorded['path']}"
                     + (f" nor at {given} (relative to here or to {run_dir})" if given else "")
                     + ": move it back, or rerun training with --cache pointing at it")


def _load(directory: Path, row: dict, summary: dict, device: str) -> LoadedMember:
    """A member in its format (formats.load_any), with the sources it reads and writes."""
    loaded = load_any(directory, device)
    store_sources = summary["store"].get("sources") or [summary["store"]["source"]]
    inputs = list(loaded.sources or row.get("inputs") or store_sources)
    targets = list(loaded.sources or row.get("targets") or inputs)
    return LoadedMember(row["name"], loaded.d_sae, inputs, targets, loaded.forward, loaded.config, loaded.weights)


@torch.no_grad()
def _reconstruction_metrics(cfg: EvalConfig, store, summary, members: list[LoadedMember], rows
                            ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Held-out L0/MSE/FVU/... into `rows` (and per target for members writing several); return
    each member's firing density [F] (over its own width) and the held-out mean raw activation of
    each source [d] (the mean-ablation baseline), from the same one pass over the rows."""
    sources = list(dict.fromkeys(s for m in members for s in (*m.inputs, *m.targets)))
    exclude = tuple(summary.get("resolved", {}).get("exclude_token_ids", ()))
    stream_cfg = StreamConfig(batch_size=cfg.row_batch_size, eval_rows=summary["config"]["eval_tokens"], normalise=False,
                              exclude_tokens=exclude)
    stream = ActivationStream(store, sources, stream_cfg, cfg.device)
    scales = dict(zip(sources, (store.norm_scale(s) for s in sources)))

    def cols(names: list[str]) -> torch.Tensor:
        return torch.cat([torch.arange(stream.columns[n][0], sum(stream.columns[n])) for n in names]).to(cfg.device)

    def scale(names: list[str]) -> torch.Tensor:
        return torch.cat([torch.full((stream.columns[n][1],), scales[n]) for n in names]).to(cfg.device)

    plan = [(m, cols(m.inputs), cols(m.targets), scale(m.targets)) for m in members]
    overall = [MetricAccumulator(1, len(out_cols), m.d_sae, cfg.device) for m, _, out_cols, _ in plan]
    per_target = [[MetricAccumulator(1, stream.columns[t][1], m.d_sae, cfg.device) for t in m.targets]
                  if len(m.targets) > 1 else [] for m in members]
    sums = {s: torch.zeros(w, dtype=torch.float64, device=cfg.device) for s, w in zip(sources, stream.widths)}
    layer_l0 = {m.name: torch.zeros(len(m.inputs), dtype=torch.float64, device=cfg.device) for m in members if m.wiring == "clt"}
    n_rows = 0
    batches = tqdm(stream.eval_batches(), total=-(-stream.n_eval // cfg.row_batch_size), unit="batch",
                   desc="held-out rows", leave=False)
    for raw_BC in batches:
        n_rows += len(raw_BC)
        for s in sources:
            start, width = stream.columns[s]
            sums[s] += raw_BC[:, start:start + width].double().sum(0)
        for (m, in_cols, out_cols, s_out), acc, accs in zip(plan, overall, per_target):
            f_BF, y_hat_BO = m.forward(raw_BC[:, in_cols])
            if m.name in layer_l0:  # a CLT's L0 per layer: its features are [L, F] side by side
                layer_l0[m.name] += (f_BF.view(len(f_BF), len(m.inputs), -1) != 0).sum(dim=(0, 2)).double()
            y_BO, y_hat_BO = raw_BC[:, out_cols] / s_out, y_hat_BO / s_out
            acc.update(y_BO, y_hat_BO.unsqueeze(0), f_BF.unsqueeze(0))
            for t, block in enumerate(accs):
                part = slice(t * block.sum_x_D.numel(), (t + 1) * block.sum_x_D.numel())
                block.update(y_BO[:, part], y_hat_BO[:, part].unsqueeze(0), f_BF.unsqueeze(0))
    if n_rows == 0:
        raise StoreError(f"store {store.path} has no held-out rows to evaluate on")
    density = {}
    for r, m, acc, accs in zip(rows, members, overall, per_target):
        r.update(acc.results()[0])
        if accs:
            r["per_source"] = {t: {k: a.results()[0][k] for k in _PER_TARGET_METRICS} for t, a in zip(m.targets, accs)}
        if m.name in layer_l0:  # the L0 of each layer's features (read at that layer's input)
            r["per_layer_l0"] = dict(zip(m.inputs, (layer_l0[m.name] / n_rows).tolist()))
        density[m.name] = acc.density()[0]
    return density, {s: (v / n_rows).float() for s, v in sums.items()}


def _downstream_metrics(cfg: EvalConfig, store, summary, members: list[LoadedMember], rows,
                        mean_raw: dict[str, torch.Tensor]) -> dict:
    """Spliced CE/KL of every member at each of its targets into `rows` (per target where it
    writes several, their mean at the top level); return the clean and ablation baselines."""
    from cache.models import load_for_evaluation  # the models are needed only here

    start = summary["store"]["eval_sequence_start"]  # sequences from here on are held out whole
    stop = min(start + cfg.n_sequences, store.attrs["n_sequences"])
    sequences = torch.from_numpy(store.read_sequences(start, stop)).long()
    targets = list(dict.fromkeys(t for m in members for t in m.targets))
    entries = {t: store.model_entry(t) for t in targets}
    dtype = store.identity["model_dtype"]
    models = {}
    for entry in entries.values():
        if entry["label"] not in models:
            models[entry["label"]] = load_for_evaluation(entry, device=cfg.device, dtype=dtype)
    first_pos = 1 if store.info["exclude_bos"] else 0
    exclude = tuple(summary.get("resolved", {}).get("exclude_token_ids", ()))
    # a crosscoder reconstructs each source from all of them: record their clean activations first
    stacked = [m for m in members if m.wiring == "crosscoder"]
    clean = _clean_activations(models, store, sorted({s for m in stacked for s in m.inputs}), sequences,
                                cfg.batch_size) if stacked else {}
    clts = [(r, m) for r, m in zip(rows, members) if m.wiring == "clt"]
    # every splice of a model in one call: one clean pass per batch serves all targets and members
    by_model: dict[str, dict[tuple[str, str], Splice]] = {}
    for target in targets:
        hook = store.source(target).hook
        splices = by_model.setdefault(entries[target]["label"], {})
        splices[target, "zero"] = single(hook, lambda x, _: torch.zeros_like(x))
        splices[target, "mean"] = single(hook, lambda x, _, t=target: mean_raw[t].expand_as(x))
        for m in members:
            if target in m.targets:
                splices[target, m.name] = _splice(m, target, store, clean, first_pos)
    if clts:  # the replacement model: every MLP output replaced at once, against ablating all of them
        splices = by_model[entries[clts[0][1].targets[0]]["label"]]
        splices.update(_replacement_splices(clts, store, mean_raw))
    losses, clean_ce, used = {}, {}, len(sequences)
    for label, splices in by_model.items():
        model = models[label]
        run = (partial(spliced_losses_hf, model) if model.backend == "transformers" else
               partial(spliced_losses, model.model))
        result = run(sequences, splices, first_pos=first_pos, exclude_tokens=exclude, batch_size=cfg.batch_size,
                     desc=f"spliced CE/KL ({len(splices)} splices per sequence" + (f", {label})" if len(by_model) > 1 else ")"),
                     budget_s=60 * cfg.eval_budget / len(by_model) if cfg.eval_budget else None)
        clean = result.pop("clean")
        clean_ce[label], used = clean["ce"], min(used, clean["sequences"])
        losses.update(result)
    baselines, results = {}, {m.name: {} for m in members}
    for target in targets:
        baselines[target] = _baselines(clean_ce[entries[target]["label"]], losses, target)
        for m in members:
            if target in m.targets:
                results[m.name][target] = _against(losses[target, m.name], baselines[target])
    for r, m in zip(rows, members):
        per = results[m.name]
        r.update({k: sum(p[k] for p in per.values()) / len(per) for k in next(iter(per.values()))})
        if len(m.targets) > 1:
            for target, values in per.items():
                r["per_source"][target].update(values)
    replaced = {}
    if clts:
        replaced = {**_baselines(clean_ce[entries[clts[0][1].targets[0]]["label"]], losses, "replacement"),
                    "replaced": [store.source(t).hook for t in clts[0][1].targets]}
        for r, m in clts:
            r["ce_recovered_one_layer_at_a_time"] = r.get("ce_recovered")
            r.update(_against(losses["replacement", m.name], replaced))
    out = {"n_sequences": used, "n_sequences_asked": len(sequences), **({"replacement_model": replaced} if replaced else {})}
    if len(targets) == 1:
        return {**out, **baselines[targets[0]]}
    return {**out, "per_source": baselines}


def _baselines(clean: float, losses: dict, scope: str) -> dict:
    zero, mean = losses[scope, "zero"], losses[scope, "mean"]
    return {"clean_ce": clean, "zero_ablation_ce": zero["ce"], "mean_ablation_ce": mean["ce"],
            "zero_ablation_kl": zero["kl"], "mean_ablation_kl": mean["kl"]}


def _against(spliced: dict, baseline: dict) -> dict:
    """A splice's CE/KL and its recovery against both ablation baselines."""
    clean = baseline["clean_ce"]
    return {"ce_spliced": spliced["ce"], "kl": spliced["kl"],
            "ce_recovered": recovered(spliced["ce"], clean, baseline["zero_ablation_ce"]),
            "ce_recovered_mean_ablation": recovered(spliced["ce"], clean, baseline["mean_ablation_ce"])}


def _replacement_splices(clts: list, store, mean_raw: dict) -> dict[tuple[str, str], Splice]:
    """Every MLP output replaced at once: by each CLT (the replacement model), by zeros, by its mean."""
    targets = clts[0][1].targets
    hooks = [store.source(t).hook for t in targets]
    splices = {("replacement", "zero"): Splice(tuple((h, lambda x, rec, b: torch.zeros_like(x)) for h in hooks)),
               ("replacement", "mean"): Splice(tuple((h, lambda x, rec, b, t=t: mean_raw[t].expand_as(x))
                                                     for h, t in zip(hooks, targets)))}
    splices.update({("replacement", m.name): replacement_model(m, store) for _, m in clts})
    return splices


def _splice(member: LoadedMember, target: str, store, clean: dict[str, torch.Tensor], first_pos: int) -> Splice:
    """How `member` replaces `target`'s hook: its reconstruction of the hook's own rows (SAE), its
    reconstruction from the clean activations of all its sources (crosscoder), or its output from
    its input hook recorded earlier in the same pass (transcoder, CLT)."""
    if member.wiring == "sae":
        return single(store.source(target).hook, lambda x, _: member.forward(x)[1])
    if member.wiring == "crosscoder":
        width = store.source(target).d
        t = member.targets.index(target)
        acts = [clean[s] for s in member.inputs]  # each [N, T, d]

        def from_clean(x, seqs):
            x_BI = torch.cat([a[seqs, first_pos:].reshape(-1, a.shape[-1]) for a in acts], dim=-1).to(x.device)
            return member.forward(x_BI)[1][:, t * width:(t + 1) * width]

        return single(store.source(target).hook, from_clean)
    return Splice(((store.source(target).hook, _from_inputs(member, target, store)),),
                  record=tuple(store.source(s).hook for s in member.inputs))


def _from_inputs(member: LoadedMember, target: str, store):
    """A transcoder's (or CLT's) output at `target`, from its inputs recorded earlier in the same
    forward pass. A CLT's output at layer m reads the inputs of layers ≤ m only, which are the
    ones recorded by then; later layers' slots get zeros (they do not write to m)."""
    t = member.targets.index(target)
    in_hooks = [store.source(s).hook for s in member.inputs]
    width = store.source(target).d

    def replace(x, recorded, seqs):
        parts = [recorded[h] if h in recorded else torch.zeros(len(x), store.source(s).d, device=x.device)
                 for h, s in zip(in_hooks, member.inputs)]
        return member.forward(torch.cat(parts, dim=-1))[1][:, t * width:(t + 1) * width]

    return replace


def replacement_model(member: LoadedMember, store) -> Splice:
    """Every target of a CLT replaced at once, each from the inputs as they flow in that pass
    (earlier replaced outputs included): the replacement model of Anthropic's circuit tracing."""
    return Splice(tuple((store.source(t).hook, _from_inputs(member, t, store)) for t in member.targets),
                  record=tuple(store.source(s).hook for s in member.inputs))


def _clean_activations(models: dict, store, sources: list[str], sequences: torch.Tensor,
                       batch_size: int) -> dict[str, torch.Tensor]:
    """The clean activation of every source on `sequences`, from one forward pass per model and
    batch for all of that model's hooks (a layer stack is one model).  → source: [N, T, d]"""
    N, T = sequences.shape
    recorded = {}
    for label, model in models.items():
        mine = [s for s in sources if store.model_entry(s)["label"] == label]
        if not mine:
            continue
        hooks = [store.source(s).hook for s in mine]
        parts = [model.record(sequences[i: i + batch_size], hooks) for i in range(0, N, batch_size)]
        recorded.update({s: torch.cat([part[h] for part in parts]).view(N, T, -1) for s, h in zip(mine, hooks)})
    return recorded
