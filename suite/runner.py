"""Train a sparsely connected suite as resumable stages, each skipped when its output is complete:

    train        an attention-output SAE per layer (one ensemble) and an MLP transcoder per layer
                 (another), TopK, through train_sweep          → RUN/train/attn, RUN/train/mlp
    connections  the C connections of every transcoder latent  → RUN/connections/
    finetune     per setting (c, C, lr), the whole suite on Σ MSE + AuxK/32 + c · Σ pruned MSE
                                                               → RUN/finetune/<setting>/
    evaluate     held-out MSE/FVU (vanilla and pruned), explained fractions, CE/KL of the spliced
                 suite, pruned FVU against C                   → RUN/suite.json, report.md, PNG
Settings of a sweep (`--sweep c=0.5,1 connections=50,100 lr=…`) fine-tune one after another from
the same trained suite and connection index (each latent's connections are sorted, so C' ≤ C is a
prefix). The store must hold, for every layer, attn_out, mlp_in_normalized (with its norm's
scale) and mlp_out: generate_activations.py --layers all --hook attn_out mlp_in_normalized mlp_out.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, replace
from pathlib import Path

import torch

from runtime.disk import writing
from runtime.lock import OutputLock
from store.hooks import parse_layers
from store.zarr_store import ActivationStore, StoreError
from store.stream import ActivationStream, StreamConfig
from formats.saelens import load_saelens
from suite import connections, evaluate, report
from suite.config import FinetuneSettings, SuiteConfig
from suite.finetune import finetune
from suite.model import Suite, SuiteLayout
from training import rundir
from training.export import ExportContext, export_member, save_transcoder_set, store_sources
from training.config import SweepConfig
from training.trainer import train_sweep


CONFIG, SUMMARY = "suite_config.json", "suite.json"


def run_suite(cfg: SuiteConfig) -> dict:
    """All stages; returns the evaluation summary (suite.json). A full disk is one line naming
    the output directory (runtime/disk.py); rerunning resumes at the stage it stopped in."""
    with OutputLock(cfg.output_dir, "train_suite.py", cfg.break_lock), writing(cfg.output_dir, "running the suite's stages"):
        return _run_suite(cfg)


def _run_suite(cfg: SuiteConfig) -> dict:
    store = ActivationStore.open(cfg.cache)
    layout = suite_layout(store, cfg.layers)
    out = Path(cfg.output_dir)
    model = _load_model(store, cfg.device)
    layout = replace(layout, centred=model.cfg.normalization_type in ("LN", "LNPre"), parallel=bool(model.cfg.parallel_attn_mlp))
    if rundir.claim(out, cfg.identity(), cfg.overwrite, {}, CONFIG, SUMMARY):
        print(f"{out} already holds this finished suite; see {out / 'report.md'}")
        return json.loads((out / "suite.json").read_text())
    trained = [_train(cfg, out / "train" / part, part) for part in ("attn", "mlp")]
    stream = _stream(cfg, store, layout)
    suite = build_suite(cfg, store, layout, stream, trained)
    settings = cfg.settings()
    C_max = max(s.n_connections for s in settings)
    n_batches = min(math.ceil(cfg.connection_tokens / cfg.batch_size), stream.batches_per_epoch)
    connections.find_connections(suite, lambda start: stream.train_batches_with_ids(0, start), n_batches,
                                 out / "connections", C_max)
    embed = embedder(model)
    results = []
    for setting in settings:
        directory = out / "finetune" / setting.name
        tuned = build_suite(cfg, store, layout, stream, trained)
        indices = [connections.load_index(out / "connections", m, setting.n_connections, cfg.device)[0]
                   for m in range(layout.n_layers)]
        finetune(tuned, setting, lambda start: _batches_from(stream, start), lambda ids: embed(ids[:, 0], ids[:, 1]),
                 indices, directory)
        _export(store, stream, tuned, out / "connections", setting, directory / "export")
        untuned = build_suite(cfg, store, layout, stream, trained)
        results.append(_evaluate(cfg, store, stream, tuned, model, embed, indices, setting, directory, untuned))
    summary = {"config": asdict(cfg), "layout": asdict(layout), "settings": results}
    (out / "suite.json").write_text(json.dumps(summary, indent=2))
    report.write(out, summary)
    return summary


def suite_layout(store: ActivationStore, layers: tuple = ("all",)) -> SuiteLayout:
    """The store's sources per layer of the suite, or one line saying what is missing and how to cache it."""
    block = parse_layers(tuple(layers), store.info.get("n_layers"))
    if block != list(range(len(block))):
        raise ValueError(f"--layers {' '.join(map(str, layers))}: a suite covers consecutive layers from layer 0 "
                         "(its pruned pass starts from the token embedding), e.g. --layers 0 1 2 3")
    sources = {(s.layer, s.kind): s.name for s in store.sources if "/" not in s.name}
    columns = {"attn_out": [], "mlp_in_normalized": [], "mlp_in_scale": [], "mlp_out": []}
    for layer in block:
        for kind, found in columns.items():
            if (layer, kind) not in sources:
                raise StoreError(f"store {store.path} has no {kind} at layer {layer}, which a suite needs at each of its layers: "
                                 f"cache with generate_activations.py --layers {' '.join(map(str, layers))} "
                                 "--hook attn_out mlp_in_normalized mlp_out "
                                 "(a model whose attention output cannot be hooked cannot carry a suite)")
            found.append(sources[layer, kind])
    return SuiteLayout(tuple(columns["attn_out"]), tuple(columns["mlp_in_normalized"]), tuple(columns["mlp_in_scale"]),
                       tuple(columns["mlp_out"]), centred=True, parallel=False)


def _train(cfg: SuiteConfig, out: Path, part: str) -> list[dict]:
    """One train_sweep run (all layers' modules of one part in one ensemble), or its finished rows."""
    wiring = {"kind": "attn_out"} if part == "attn" else {"transcoder": True}
    sweep = SweepConfig.from_flat(cache=cfg.cache, output_dir=str(out), arch="topk", k=cfg.k, ratio=cfg.ratio,
                                  d_sae=cfg.d_sae, layers=cfg.layers, batch_size=cfg.batch_size, n_epochs=cfg.train_epochs,
                                  eval_tokens=cfg.eval_tokens, device=cfg.device, seed=cfg.seed, **wiring)
    return train_sweep(sweep)


def _stream(cfg: SuiteConfig, store: ActivationStore, layout: SuiteLayout) -> ActivationStream:
    sources = [s for layer in range(layout.n_layers)
               for s in (layout.attn[layer], layout.mlp_in[layer], layout.scale[layer], layout.mlp_out[layer])]
    return ActivationStream(store, sources, StreamConfig(cfg.batch_size, cfg.eval_tokens, seed=cfg.seed), cfg.device)


def build_suite(cfg: SuiteConfig, store: ActivationStore, layout: SuiteLayout, stream: ActivationStream,
                trained: list[list[dict]]) -> Suite:
    """The suite from the trained modules' exports (their normalisation taken back out)."""
    d = store.source(layout.attn[0]).d
    scales = dict(zip(stream.sources, stream.scales))
    rows_attn, rows_mlp = trained
    d_sae, lr = rows_attn[0]["d_sae"], rows_attn[0]["lr"]
    suite = Suite(layout, d, d_sae, cfg.k, stream.columns, scales, lr, cfg.seed).to(cfg.device)
    base = Path(cfg.output_dir) / "train"
    for layer in range(layout.n_layers):
        _, attn = load_saelens(base / "attn" / rows_attn[layer]["dir"], cfg.device)
        suite.attn.load_member_tensors_(layer, attn, scales[layout.attn[layer]])
        _, mlp = load_saelens(base / "mlp" / rows_mlp[layer]["dir"], cfg.device)
        # (a TopK transcoder is exported as JumpReLU with a calibrated threshold; the TopK member ignores it)
        suite.mlp.load_member_tensors_(layer, mlp, scales[layout.mlp_in[layer]], scales[layout.mlp_out[layer]])
    return suite


def _batches_from(stream: ActivationStream, start: int):
    """Training batches with ids from global step `start` on, epoch after epoch."""
    epoch, offset = divmod(start, stream.batches_per_epoch)
    while True:
        yield from stream.train_batches_with_ids(epoch, offset)
        epoch, offset = epoch + 1, 0


def embedder(model):
    """(token ids [B], positions [B]) → the residual stream's embedding of each row [B, d]."""
    standard = model.cfg.positional_embedding_type == "standard"

    @torch.no_grad()
    def embed(tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        e = model.embed(tokens.view(-1, 1).to(model.cfg.device)).view(len(tokens), -1).float()
        return e + model.pos_embed.W_pos[positions].float() if standard else e

    return embed


def _load_model(store: ActivationStore, device: str):
    from cache.models import load_model

    entry = store.info["models"][0]
    return load_model(entry["model"], entry["model_path"], device=device, dtype=store.identity["model_dtype"])


def _export(store: ActivationStore, stream: ActivationStream, suite: Suite, index_dir: Path, setting: FinetuneSettings,
            out: Path) -> None:
    """The fine-tuned suite where the ecosystem loads it: each attention SAE and transcoder as a
    SAELens directory, the transcoders together as a circuit-tracer transcoder set, and the
    connection index (the first C of each latent) beside them."""
    if (out / "connections").exists():
        return
    ctx = ExportContext(info={**store.info, "context_length": store.attrs["context_length"]},
                        sources=store_sources(store),
                        scales=dict(zip(stream.sources, stream.scales)), calibration_rows=stream.sample(8192))
    L = suite.layout.n_layers
    for layer in range(L):
        export_member(out / f"attn_L{layer:02d}", suite.attn, layer, ctx)
        export_member(out / f"mlp_L{layer:02d}", suite.mlp, layer, ctx)
    save_transcoder_set(out / "transcoder_set", suite.mlp, {layer: layer for layer in range(L)}, ctx, {"suite": setting.name})
    (out / "connections").mkdir(parents=True, exist_ok=True)
    for m in range(L):
        indices, scores = connections.load_index(index_dir, m, setting.n_connections)
        connections.save_index(out / "connections", m, indices, scores, suite)


def _evaluate(cfg: SuiteConfig, store, stream, suite: Suite, model, embed, indices, setting, directory: Path,
              untuned: Suite) -> dict:
    if (directory / "result.json").exists():
        return json.loads((directory / "result.json").read_text())
    counts = sorted({min(2 ** i, setting.n_connections) for i in range(int(math.log2(setting.n_connections)) + 1)}
                    | {setting.n_connections})
    batches = ((x, ids) for x, ids in stream.eval_batches_with_ids())
    metrics = evaluate.held_out_metrics(suite, batches, lambda ids: embed(ids[:, 0], ids[:, 1]), indices, counts)
    result = {"setting": asdict(setting), "name": setting.name, "dir": str(directory.relative_to(cfg.output_dir)), **metrics}
    if cfg.eval_sequences:
        start = stream.eval_sequence_start
        sequences = torch.from_numpy(store.read_sequences(start, min(start + cfg.eval_sequences,
                                                                      store.attrs["n_sequences"]))).long()
        hooks = {"attn": [store.source(s).hook for s in suite.layout.attn],
                 "mlp_in": [store.source(s).hook for s in suite.layout.mlp_in],
                 "scale": [store.source(s).hook for s in suite.layout.scale],
                 "mlp_out": [store.source(s).hook for s in suite.layout.mlp_out]}
        first_pos = 1 if store.info["exclude_bos"] else 0
        result["ce"] = evaluate.spliced(suite, model, sequences, embed, indices, first_pos, cfg.eval_batch_size, hooks,
                                         untuned)
    (directory / "result.json").write_text(json.dumps(result, indent=2))
    return result

