"""Evaluate a trained sweep directory: reconstruction metrics, spliced CE/KL, report.

    evaluate_run(EvalConfig(run_dir="runs/l1-sweep"))

Reads the members as exported (raw-space weights, SAELens semantics), so what is measured is
what users load. Reconstruction metrics use the store's held-out rows, in normalised space
(x / s, so MSE is comparable across hooks; FVU is scale-free). CE/KL re-run the model on
held-out sequences (none of whose rows were trained on) with each member spliced into its hook.
Writes per-latent density (sparsity.safetensors), sweep.json/csv, plots and report.md.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from cache.devices import check_device
from cache.store import ActivationStore
from cache.stream import ActivationStream, StreamConfig
from evaluation.export import load_member, sae_forward
from evaluation.metrics import MetricAccumulator
from evaluation.plots import plot_sweep
from evaluation.report import write_report, write_summary
from evaluation.splice import recovered, spliced_losses


@dataclass(frozen=True)
class EvalConfig:
    run_dir: str
    """A directory written by train_sweep.py."""
    n_sequences: int = 64
    """Held-out sequences for the spliced CE/KL (0: skip; it loads the model)."""
    batch_size: int = 8
    """Sequences per forward pass of the model."""
    row_batch_size: int = 2048
    """Held-out rows per batch for reconstruction metrics."""
    device: str = "cpu"
    """Device for the model and the dictionaries."""

    def __post_init__(self):
        if self.n_sequences < 0 or self.batch_size < 1 or self.row_batch_size < 1:
            raise ValueError("n_sequences must be ≥ 0, batch sizes positive")
        check_device(self.device)


def evaluate_run(cfg: EvalConfig) -> list[dict]:
    """Measure every member of the sweep in cfg.run_dir; return the updated member rows."""
    out = Path(cfg.run_dir)
    if not (out / "sweep.json").exists():
        raise FileNotFoundError(f"{out} holds no finished sweep (no sweep.json): run train_sweep.py first")
    summary = json.loads((out / "sweep.json").read_text())
    rows = summary["members"]
    store = ActivationStore.open(summary["store"]["path"])
    members = [load_member(out / r["dir"], cfg.device) for r in rows]
    density, mean_D = _reconstruction_metrics(cfg, store, summary, members, rows)
    for r, log10_density in zip(rows, density.values()):
        save_file({"sparsity": log10_density.cpu().contiguous()}, out / r["dir"] / "sparsity.safetensors")
    if cfg.n_sequences > 0:
        summary["eval"] = _downstream_metrics(cfg, store, summary, members, rows, mean_D)
    write_summary(out, summary)
    write_report(out, summary, plot_sweep(rows, out, density))
    return rows


@torch.no_grad()
def _reconstruction_metrics(cfg: EvalConfig, store, summary, members, rows) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Held-out L0/MSE/FVU/... into `rows`; return each member's log10 density and the held-out
    mean raw activation [D] (the mean-ablation baseline), from the same one pass over the rows."""
    scale = summary["store"]["norm_scale"]
    stream_cfg = StreamConfig(batch_size=cfg.row_batch_size, eval_rows=summary["config"]["eval_tokens"], normalise=False)
    stream = ActivationStream(store, summary["store"]["source"], stream_cfg, cfg.device)
    d_sae = max(m[0]["d_sae"] for m in members)
    acc = MetricAccumulator(len(members), stream.d, d_sae, cfg.device)
    for x_raw in stream.eval_batches():
        outputs = [sae_forward(c, w, x_raw) for c, w in members]
        f_EBF = torch.stack([_pad(f, d_sae) for f, _ in outputs])
        x_hat_EBD = torch.stack([x_hat for _, x_hat in outputs]) / scale
        acc.update(x_raw / scale, x_hat_EBD, f_EBF)
    for r, metrics in zip(rows, acc.results()):
        r.update(metrics)
    log10 = torch.log10(acc.density().float().clamp_min(1e-10))
    mean_D = (acc.sum_x_D / acc.n_tokens * scale).float()
    return {r["name"]: log10[e, : m[0]["d_sae"]] for e, (r, m) in enumerate(zip(rows, members))}, mean_D


def _pad(f_BF: torch.Tensor, width: int) -> torch.Tensor:
    return torch.nn.functional.pad(f_BF, (0, width - f_BF.shape[1])) if f_BF.shape[1] < width else f_BF


def _downstream_metrics(cfg: EvalConfig, store, summary, members, rows, mean_D: torch.Tensor) -> dict:
    """Spliced CE/KL of every member into `rows`; return the clean and ablation baselines."""
    from cache.models import load_model  # the model is needed only here

    entry = _model_entry(store, summary["store"]["source"])
    model = load_model(entry["model"], entry["model_path"], device=cfg.device, dtype=store.identity["model_dtype"])
    start = summary["store"]["eval_sequence_start"]  # sequences from here on are held out whole
    stop = min(start + cfg.n_sequences, store.attrs["n_sequences"])
    sequences = torch.from_numpy(store.read_sequences(start, stop)).long()
    replacements = {"zero": torch.zeros_like, "mean": lambda x: mean_D.expand_as(x)}
    for r, (c, w) in zip(rows, members):
        replacements[r["name"]] = lambda x, c=c, w=w: sae_forward(c, w, x)[1]
    first_pos = 1 if store.info["exclude_bos"] else 0
    losses = spliced_losses(model, sequences, summary["store"]["hook"], replacements,
                            first_pos=first_pos, batch_size=cfg.batch_size)
    clean, zero, mean = losses["clean"]["ce"], losses["zero"]["ce"], losses["mean"]["ce"]
    for r in rows:
        spliced = losses[r["name"]]
        r.update({"ce_spliced": spliced["ce"], "kl": spliced["kl"], "ce_recovered": recovered(spliced["ce"], clean, zero),
                  "ce_recovered_mean_ablation": recovered(spliced["ce"], clean, mean)})
    return {"n_sequences": len(sequences), "clean_ce": clean, "zero_ablation_ce": zero, "mean_ablation_ce": mean,
            "zero_ablation_kl": losses["zero"]["kl"], "mean_ablation_kl": losses["mean"]["kl"]}


def _model_entry(store, source: str) -> dict:
    """How to load the model that wrote `source` (the second model for chat/... in a pair)."""
    label = source.split("/", 1)[0] if "/" in source else None
    for entry in store.info["models"]:
        if entry["label"] == label:
            return entry
    raise ValueError(f"store {store.path} does not record the model of {source}")
