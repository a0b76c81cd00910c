"""Write a trained member where the ecosystem loads it, with the normalisation folded in:

  * an SAE (one source, reconstructing it) → a SAELens directory (formats/saelens.py);
  * a crosscoder (several sources read side by side) → our crosscoder format (formats/crosscoder.py);
  * a single-layer transcoder → a SAELens transcoder directory (`transcoder`, `skip_transcoder`,
    `jumprelu_transcoder`, `jumprelu_skip_transcoder`), and, with one per layer, the layers of a
    sweep setting together as a circuit-tracer transcoder set (formats/circuit_tracer.py);
  * a cross-layer transcoder → circuit-tracer's CLT layout.
SAELens transcoders and circuit-tracer load only ReLU and JumpReLU: a TopK member exported there
becomes JumpReLU with one threshold per layer calibrated on store rows so that it keeps k
latents per row on average (`calibrate_threshold`); what that costs in FVU is measured by
evaluation and recorded. BatchTopK and Matryoshka export their own inference threshold.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from runtime.disk import writing
from formats import circuit_tracer
from formats.crosscoder import ARCHITECTURES as CROSSCODER_RULES
from formats.crosscoder import save_crosscoder
from formats.saelens import saelens_architecture, saelens_cfg, saelens_has, save_saelens, saelens_tensors
from training.dictionary import Dictionary
from training.members import LOSS_CONVENTION, MemberConfig
from training.plan import resolved_record
from training.rules import rule_of
from training.rundir import write_summary
from training.sweep import member_name

CALIBRATION_ROWS = 8192  # training rows the exported thresholds of the TopK family are calibrated on


@dataclass(frozen=True)
class ExportContext:
    """What the export needs to know about the store the members were trained on."""

    info: dict
    """The store's info (model, BOS, dataset, ...) and context_length."""
    sources: dict[str, dict]
    """Source name → {"model", "hook", "d", "layer", "loaded_with"} (`store_sources`)."""
    scales: dict[str, float]
    """Source name → normalisation factor folded into the weights."""
    exclude_tokens: tuple[int, ...] = ()
    """Token ids whose rows were not trained on."""
    calibration_rows: torch.Tensor | None = field(default=None, repr=False)
    """Normalised batch rows [N, C] for calibrating TopK thresholds (None: no TopK member needs them)."""
    precision: str = "fp32"
    """The matmul precision it trained at (recorded in each member's config)."""


def store_sources(store) -> dict[str, dict]:
    """What an export says of each source of `store`: its model, hook, width, layer, and how the
    model is loaded elsewhere to compute the stored values (ActivationStore.loaded_with)."""
    return {s.name: {"model": s.model, "hook": s.hook, "d": s.d, "layer": s.layer, "loaded_with": store.loaded_with(s.name)}
            for s in store.sources}


def export_member(directory: Path, d: Dictionary, e: int, ctx: ExportContext) -> dict:
    """Write member e of `d` into `directory`; return what sweep.json records of it."""
    member = d.members[e]
    record = {**member.record(), "loss_convention": LOSS_CONVENTION, "precision": ctx.precision}
    in_scales = [ctx.scales[name] for name in member.input_names()]
    out_scales = [ctx.scales[name] for name in member.target_names()]
    tensors = d.member_tensors(e, in_scales, out_scales)
    rule = d.inference_rule(e)
    if member.cross_layer:
        return {**record, **_save_clt(directory, d, e, tensors, rule, ctx, record), "format": "circuit_tracer_clt"}
    if member.n_sources > 1 and not member.is_transcoder:
        _save_crosscoder(directory, member, tensors, rule, ctx, record)
        return {**record, "format": "crosscoder"}
    activation, extra = rule.activation, {}
    if rule.k is not None and not saelens_has(activation, member.is_transcoder, member.skip):  # TopK transcoders
        tensors["threshold"] = calibrate_threshold(d, e, ctx.calibration_rows)
        activation, extra = "jumprelu", _calibrated_from(rule.activation, rule.k)
    architecture = saelens_architecture(activation, member.is_transcoder, member.skip)
    if "W_skip" in tensors:
        tensors["W_skip"] = tensors["W_skip"].T.contiguous()  # SAELens: [d_out, d_in]
    tensors = saelens_tensors(activation, tensors)
    metadata = _metadata(member, ctx, {**record, **extra})
    settings = {} if rule.residual_threshold is None else {"residual_threshold": rule.residual_threshold * in_scales[0]}
    cfg = saelens_cfg(architecture=architecture, d_in=member.d_in, d_sae=member.d_sae, metadata=metadata,
                      apply_b_dec_to_input=member.subtract_b_dec,
                      d_out=member.width_out if member.is_transcoder else None, k=rule.k, settings=settings)
    save_saelens(directory, tensors, cfg)
    return {**record, **extra, "format": "saelens", "saelens_architecture": architecture}


@torch.no_grad()
def calibrate_threshold(d: Dictionary, e: int, rows_NC: torch.Tensor | None) -> torch.Tensor:
    """One JumpReLU threshold per encoder group of member e, chosen so that on `rows` the latents
    above it are k per row on average (the k·N-th largest ReLU pre-activation), repeated over the
    group's latents.  → [G·F_e]"""
    if rows_NC is None or not len(rows_NC):
        raise ValueError("calibrating a TopK export needs store rows")
    f = d.members[e].d_sae
    per_group = d.calibrated_thresholds(rows_NC.to(d.W_enc.device), units=[e * d.G + g for g in range(d.G)])
    return per_group.repeat_interleave(f).clone()


def circuit_tracer_layer(d: Dictionary, e: int, ctx: ExportContext) -> dict[str, torch.Tensor]:
    """Member e (a single-layer transcoder) as one layer of a circuit-tracer transcoder set:
    W_enc [F, d], W_dec, b_enc, b_dec, its threshold (calibrated for TopK) and W_skip [d_out, d_in]."""
    member = d.members[e]
    tensors = d.member_tensors(e, [ctx.scales[n] for n in member.input_names()],
                               [ctx.scales[n] for n in member.target_names()])
    layer = {"W_enc": tensors["W_enc"].T, "W_dec": tensors["W_dec"], "b_enc": tensors["b_enc"], "b_dec": tensors["b_dec"]}
    threshold = _threshold(d, e, d.inference_rule(e), tensors, ctx)
    if threshold is not None:
        layer["activation_function.threshold"] = threshold
    if "W_skip" in tensors:
        layer["W_skip"] = tensors["W_skip"].T
    return layer


def save_transcoder_set(directory: Path, d: Dictionary, members: dict[int, int], ctx: ExportContext, record: dict,
                        first: MemberConfig | None = None, layers: list[int] | None = None, describe: bool = True) -> dict:
    """The members of one sweep setting, one per layer, as a circuit-tracer transcoder set.
    `members` ({layer: member index in d}): the layers this process writes, of the set's `layers`
    (default: these); `first`: the set's first member (default: of these); `describe`: also write
    the set's config (when processes share a set's layers, one of them does).
    → what sweep.json records of the set (a note when it does not cover every layer of the
    model: circuit-tracer needs all)."""
    first = first or d.members[members[min(members)]]
    layers = layers or sorted(members)
    source, target = ctx.sources[first.input_names()[0]], ctx.sources[first.target_names()[0]]
    tensors = {layer: circuit_tracer_layer(d, e, ctx) for layer, e in sorted(members.items())}
    extras = _calibrated_from(rule_of(first.spec).exports_as, first.k)
    circuit_tracer.save_transcoder_set(directory, tensors, input_hook=_block_relative(source["hook"]),
                                       output_hook=_block_relative(target["hook"]), model_name=source["model"],
                                       record={**record, **extras, "layers": layers, **source["loaded_with"]},
                                       describe=describe)
    complete = layers == list(range(ctx.info.get("n_layers", len(layers))))
    return {"layers": layers, "loads_in_circuit_tracer": complete, **extras}


def _save_clt(directory: Path, d: Dictionary, e: int, tensors: dict, rule, ctx: ExportContext, record: dict) -> dict:
    member = d.members[e]
    F, I, width = member.d_sae, d.I, d.d_out
    threshold = _threshold(d, e, rule, tensors, ctx)
    layers = {}
    for g, name in enumerate(member.input_names()):
        layer = ctx.sources[name]["layer"]
        part = slice(g * F, (g + 1) * F)
        slab = tensors["W_dec"][:, d.slab_starts[g]: d.slab_starts[g + 1]]
        layers[layer] = {"W_enc": tensors["W_enc"][g * I:(g + 1) * I].T, "b_enc": tensors["b_enc"][part],
                         "b_dec": tensors["b_dec"][g * width:(g + 1) * width], "W_dec": slab.reshape(F, -1, width)}
        if threshold is not None:
            layers[layer]["threshold"] = threshold[part]
    source, target = ctx.sources[member.input_names()[0]], ctx.sources[member.target_names()[0]]
    extra = _calibrated_from(rule.activation, rule.k)
    circuit_tracer.save_clt(directory, layers, input_hook=_block_relative(source["hook"]),
                            output_hook=_block_relative(target["hook"]), model_name=source["model"],
                            record={**record, **extra, "layers": sorted(layers), **source["loaded_with"]})
    complete = sorted(layers) == list(range(ctx.info.get("n_layers", len(layers))))
    return {"layers": sorted(layers), "loads_in_circuit_tracer": complete, **extra}


def _threshold(d: Dictionary, e: int, rule, tensors: dict, ctx: ExportContext) -> torch.Tensor | None:
    """The JumpReLU threshold an export carries: the member's own (JumpReLU, BatchTopK), one
    calibrated on store rows (a rule circuit-tracer cannot run: TopK), or None (ReLU).  → [G·F]"""
    if rule.activation not in circuit_tracer.INFERENCE_RULES:
        return calibrate_threshold(d, e, ctx.calibration_rows)
    return tensors.get("threshold")


def _calibrated_from(activation: str, k: int | None) -> dict:
    """What an export records when it replaced an inference rule that transcoder formats lack
    (TopK) by a calibrated JumpReLU threshold."""
    if activation in circuit_tracer.INFERENCE_RULES:
        return {}
    return {"threshold_calibrated_from": f"{activation} k={k}"}


def _block_relative(hook: str) -> str:
    """blocks.3.ln2.hook_normalized → ln2.hook_normalized (circuit-tracer names hooks within a block)."""
    parts = hook.split(".", 2)
    return parts[2] if len(parts) == 3 and parts[0] == "blocks" and parts[1].isdigit() else hook


def _metadata(member, ctx: ExportContext, record: dict) -> dict:
    """SAELens metadata: the input source's model and hook (and the target's hook for transcoders),
    and what the cache and the trainer excluded, as they were."""
    source = ctx.sources[member.input_names()[0]]
    info = ctx.info
    metadata = {
        "model_name": source["model"],
        **source["loaded_with"],  # model_class_name, model_from_pretrained_kwargs
        "hook_name": source["hook"],
        "context_size": info["context_length"],
        "prepend_bos": info["prepend_bos"],
        "dataset_path": info["dataset"],
        "seqpos_slice": [1 if info["exclude_bos"] else 0, None],
        # what was left out of training beyond the position slice: the excluded token ids, if any
        "exclude_special_tokens": list(ctx.exclude_tokens) if ctx.exclude_tokens else False,
        "sae_sweep": record,
    }
    if member.is_transcoder:
        metadata["hook_name_out"] = ctx.sources[member.target_names()[0]]["hook"]
    return metadata


def _save_crosscoder(directory: Path, member, flat: dict, rule, ctx: ExportContext, record: dict) -> None:
    """The member in formats.crosscoder's layout: W_enc [S, D, F], W_dec [F, S, D], b_dec [S, D]."""
    S, D = member.n_sources, member.d_in
    tensors = {**flat, "W_enc": flat["W_enc"].reshape(S, D, -1), "W_dec": flat["W_dec"].reshape(-1, S, D),
               "b_dec": flat["b_dec"].reshape(S, D)}
    if rule.activation not in CROSSCODER_RULES:
        raise ValueError(f"the crosscoder format has no {rule.activation} rule")
    info = ctx.info
    config = {
        "architecture": rule.activation,
        **({"k": rule.k} if rule.k is not None else {}),
        "apply_b_dec_to_input": member.subtract_b_dec,
        "n_sources": S, "d_in": D, "d_sae": member.d_sae,
        "sources": [_source_entry(name, ctx.sources[name]) for name in member.input_names()],
        "normalisation": {"folded": True, "scales": [ctx.scales[n] for n in member.input_names()]},
        "context_size": info["context_length"],
        "prepend_bos": info["prepend_bos"],
        "exclude_bos": info["exclude_bos"],
        "exclude_tokens": list(ctx.exclude_tokens),
        "dataset": info["dataset"],
        "sae_sweep": record,
    }
    save_crosscoder(directory, tensors, config)


def _source_entry(name: str, source: dict) -> dict:
    entry = {"name": name, "model": source["model"], **source["loaded_with"], "hook": source["hook"]}
    return {**entry, "label": name.split("/", 1)[0]} if "/" in name else entry


@torch.no_grad()
def export_run(cfg, held: list, parts: list, stream, store, tokens_seen: int, out: Path, layout, seconds: float) -> list[dict]:
    """This rank's members (`held`: training.trainer.Held, one per architecture it trains) in
    their formats; rank 0 writes the training summary (sweep.json) with every rank's rows.
    `seconds`: how long this invocation's training loop ran. BatchTopK and Matryoshka thresholds
    are calibrated on training rows first (Dictionary.calibrate_thresholds_)."""
    members = [m for h in held for m in h.ensemble.members]
    needs_rows = any(m.is_transcoder and rule_of(m.spec).exports_as not in circuit_tracer.INFERENCE_RULES for m in members)
    calibrates = any(rule_of(m.spec).calibrates_at_export for m in members)
    calibration = stream.sample(CALIBRATION_ROWS) if needs_rows or calibrates else None
    ctx = ExportContext(
        info={**store.info, "context_length": store.attrs["context_length"]},
        sources=store_sources(store),
        scales=dict(zip(stream.sources, stream.scales)),
        exclude_tokens=parts[0].resolved.exclude_token_ids,
        calibration_rows=calibration if needs_rows else None,
        precision=cfg.resolved_precision(),
    )
    rows, sets = [], []
    distributed = layout.processes.distributed
    for h in held if layout.writes else ():
        dictionary = h.ensemble.dictionary
        if dictionary.rule.calibrates_at_export:
            dictionary.calibrate_thresholds_(calibration)
        dead_train_E = dictionary.dead_latents(h.part.resolved.dead_window).sum(-1) / dictionary.width_mask.sum(-1)
        for e, name in enumerate(h.names):
            with writing(out / "members", f"exporting member {name}"):
                record = export_member(out / "members" / name, dictionary, e, ctx)
            rows.append({"name": name, "dir": f"members/{name}", **record, "source": stream.source,
                         "dead_fraction_train": dead_train_E[e].item(), "train_tokens": tokens_seen,
                         **({"rank": layout.processes.rank} if distributed else {})})
    if cfg.wiring.transcoder:
        for h in held:
            sets += _export_transcoder_sets(h, store, ctx, out, layout, several=len(parts) > 1)
    rows = [row for part in layout.processes.all_gather(rows, "gathering the exported members") for row in part]
    if layout.processes.rank == 0:
        first = store.source(stream.sources[0])
        summary = {
            "config": cfg.flat(),
            "resolved": resolved_record(parts),
            "store": {"path": store.path, "path_as_given": cfg.data.cache, "source": stream.source,
                      "hook": first.hook, "hooks": [store.source(s).hook for s in stream.sources],
                      "model": store.info.get("model_name"), "norm_scale": stream.scale, "sources": stream.sources,
                      "norm_scales": stream.scales, "train_rows": stream.n_train, "eval_rows": stream.n_eval,
                      "eval_sequence_start": stream.eval_sequence_start},
            "layout": {"world_size": layout.processes.world, "data_parallel": layout.data_parallel,
                       "member_groups": layout.groups},
            "train_seconds": seconds,
            "precision": cfg.resolved_precision(),
            "topk_decode": {h.part.arch: "sparse" if h.ensemble.dictionary.sparse_topk else "dense"
                            for h in held if h.ensemble.dictionary.rule.sparse_decode},
            "group_members": {h.part.arch: h.ensemble.group_sizes.get(cfg.data.batch_size) for h in held},
            "loss_convention": LOSS_CONVENTION,
            "archs": [p.arch for p in parts],
            "swept": parts[0].axes if len(parts) == 1 else {p.arch: p.axes for p in parts},
            "members": rows,
            **({"transcoder_sets": sets} if sets else {}),
        }
        with writing(out, "writing sweep.json"):
            write_summary(out, summary)
    return rows


def _export_transcoder_sets(h, store, ctx: ExportContext, out: Path, layout, several: bool) -> list[dict]:
    """Per sweep setting of one architecture, its per-layer transcoders together as a
    circuit-tracer transcoder set (transcoder_sets/<setting>/); members come layer-major, each
    layer with the whole grid. Each rank writes the layers it trained; rank 0 describes the set."""
    members, axes = h.part.members, h.part.axes
    mine = range(h.indices.start - h.first, h.indices.stop - h.first)  # within the architecture's members
    layers = sorted({store.source(m.inputs[0]).layer for m in members})
    per_layer = len(members) // len(layers)
    sets = []
    for j in range(per_layer):
        group = {layer: i * per_layer + j for i, layer in enumerate(layers)}
        owned = {layer: index - mine.start for layer, index in group.items() if index in mine} if layout.writes else {}
        name = member_name(j, members[j], axes, arch=h.part.arch if several else None)
        record = {k: v for k, v in members[j].record().items() if k not in ("inputs", "targets")}
        if owned or layout.processes.rank == 0:
            info = save_transcoder_set(out / "transcoder_sets" / name, h.ensemble.dictionary, owned, ctx, record,
                                       first=members[j], layers=layers, describe=layout.processes.rank == 0)
            sets.append({"name": name, "dir": f"transcoder_sets/{name}", **info})
    return sets
