"""A feature browser for every latent of every member of a sweep, built from the store: no model
forward (the activations are in the store, row-aligned with their tokens and sequences), one
streaming pass over the rows for all members at once, memory bounded by one store block plus a
fixed amount per latent (evaluation/browser/collect.py).

    build_browser(BrowserConfig(run_dir="runs/demo"))        # writes runs/demo/browser/
    python evaluate.py --run_dir runs/demo --browser          # the same; --serve to open it over http

The pass reads the store's held-out rows (`rows=None`; no member trained on them), or the first
`rows` rows of its training split, a block at a time, arranged as whole sequences, and encodes
them with each member as exported (formats.load_any). Logit effects (each latent's decoder
direction through the final norm and the unembedding, W_dec[i] · W_U,
evaluation/browser/logit_effects.py) read the unembedding alone from disk (cache/unembed.py),
never the whole model; a store whose unembedding cannot be read gets pages without them, and
says why (a GGUF model without its kept converted copy is loaded once instead, which keeps it). The site
(evaluation/browser/site.py) is static and works from file://; `neuronpedia` writes Neuronpedia's
bulk-import layout instead (evaluation/browser/neuronpedia.py).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from tqdm.auto import tqdm

from runtime.disk import writing
from store.stream import ActivationStream, StreamConfig
from store.zarr_store import NO_TOKEN
from evaluation.browser.collect import LatentRecorder
from evaluation.browser.logit_effects import LogitEffects, member_logit_effects


@dataclass(frozen=True)
class BrowserConfig:
    run_dir: str
    """A sweep directory written by train_sweep.py."""
    rows: int | None = None
    """Rows to build from: None, the store's held-out rows; N, the first N rows of its training split."""
    top_k: int = 20
    """Top contexts kept per latent."""
    samples: int = 32
    """Activating tokens sampled per latent, from which the quantile bands' examples come."""
    shard_latents: int = 256
    """Latents per data file (loaded by the page when one of them is opened)."""
    sequences_per_batch: int = 8
    """Whole sequences encoded at a time."""
    format: Literal["site", "neuronpedia"] = "site"
    """The static site (browser/), or Neuronpedia's bulk-import layout (neuronpedia/)."""
    hf_repo_id: str | None = None
    """The Hub repository the members are pushed to (USER/NAME): Neuronpedia's source records name it."""
    device: str = "cpu"

    def __post_init__(self):
        if self.rows is not None and self.rows < 1:
            raise ValueError(f"--browser_rows must be positive, got {self.rows}")
        if min(self.top_k, self.samples, self.shard_latents, self.sequences_per_batch) < 1:
            raise ValueError("top_k, samples, shard_latents and sequences_per_batch must be positive")


@dataclass
class MemberData:
    """What the pages show of one member."""

    row: dict  # its sweep.json row
    recorder: LatentRecorder
    logits: LogitEffects | None  # each latent's 10 most promoted and suppressed tokens
    extra: dict  # per member: hooks (transcoders), per-source decoder norms and r (crosscoders)


def build_browser(cfg: BrowserConfig) -> Path:
    """Write the browser of cfg.run_dir's members; return its directory."""
    from evaluation.runner import _load, open_run_store

    out = Path(cfg.run_dir)
    summary = json.loads((out / "sweep.json").read_text())
    store = open_run_store(summary, out)
    rows = summary["members"]
    members = [_load(out / r["dir"], r, summary, cfg.device) for r in rows]
    started = time.perf_counter()
    recorders, n_rows = collect(cfg, store, summary, members)
    seconds = time.perf_counter() - started
    W_U_DV, centre_input, tokenizer, note = _unembedding(store, cfg.device)
    loaded = time.perf_counter()
    if not store.tokens_recorded:
        note = "; ".join(filter(None, [note, "no token texts in contexts: the store records no token ids (write_store "
                                             "without tokens), so a context shows only where a latent fires"]))
    logits = {m.name: member_logit_effects(m, store, W_U_DV, centre_input) if W_U_DV is not None else None for m in members}
    del W_U_DV
    effects = time.perf_counter()
    data = [MemberData(r, recorders[m.name], logits[m.name], _extra(m, store)) for r, m in zip(rows, members)]
    decode = _decoder(tokenizer)
    target = out / ("neuronpedia" if cfg.format == "neuronpedia" else "browser")
    with writing(target, "writing the browser"):
        if cfg.format == "neuronpedia":
            from evaluation.browser.neuronpedia import write_neuronpedia

            write_neuronpedia(target, data, store, decode, cfg.shard_latents, set_name=out.resolve().name,
                              hf_repo_id=cfg.hf_repo_id)
        else:
            from evaluation.browser.site import write_site

            write_site(target, data, summary, store, decode, cfg.shard_latents,
                       {"rows": n_rows, "split": "held-out" if cfg.rows is None else "training", "seconds": seconds,
                        "logits_note": note})
    print(f"browser: {len(members)} members from {n_rows:,} rows in {seconds:.1f} s; unembedding read in "
          f"{loaded - started - seconds:.1f} s, logit effects {effects - loaded:.1f} s, pages {time.perf_counter() - effects:.1f} s"
          + (f"; {note}" if note else ""))
    return target


@torch.no_grad()
def collect(cfg: BrowserConfig, store, summary: dict, members: list) -> tuple[dict[str, LatentRecorder], int]:
    """One pass over the rows for every member: their recorders, and the rows seen."""
    sources = list(dict.fromkeys(s for m in members for s in m.inputs))
    exclude = tuple(summary.get("resolved", {}).get("exclude_token_ids", ()))
    stream = ActivationStream(store, sources, StreamConfig(batch_size=4096, eval_rows=summary["config"]["eval_tokens"],
                                                           normalise=False, exclude_tokens=exclude), cfg.device)
    cols = {m.name: torch.cat([torch.arange(stream.columns[n][0], sum(stream.columns[n])) for n in m.inputs]) for m in members}
    recorders = {m.name: LatentRecorder(m.d_sae, cfg.top_k, cfg.samples, seed=i) for i, m in enumerate(members)}
    first_pos = 1 if store.info["exclude_bos"] else 0
    P = store.attrs["context_length"] - first_pos
    limit = cfg.rows if cfg.rows is not None else stream.n_eval
    seen = 0
    with tqdm(total=limit, unit="row", desc="browser", leave=False) as bar:
        for rows_NC, ids_N3 in stream.blocks(held_out=cfg.rows is None):
            for grid_SPC, tokens_SP, seq_S in _sequences(rows_NC, ids_N3, store, first_pos, P, cfg.sequences_per_batch):
                for m in members:
                    x = grid_SPC[:, :, cols[m.name]].reshape(-1, len(cols[m.name]))
                    f = m.forward(x)[0].view(len(seq_S), P, -1)
                    recorders[m.name].update(f, tokens_SP, seq_S)
                seen += len(seq_S) * P
                bar.update(len(seq_S) * P)
                if seen >= limit:
                    return recorders, seen
    return recorders, seen


def _sequences(rows_NC: torch.Tensor, ids_N3: torch.Tensor, store, first_pos: int, P: int, per_batch: int):
    """A block's rows as whole sequences, `per_batch` at a time: rows [S, P, C] (zeros where a row
    was left out), the stored positions' token ids [S, P] and the sequence numbers [S]."""
    seqs, where = torch.unique(ids_N3[:, 2], return_inverse=True)
    tokens = torch.from_numpy(store.read_sequences(int(seqs[0]), int(seqs[-1]) + 1)).long()[seqs - seqs[0], first_pos:]
    for a in range(0, len(seqs), per_batch):
        chosen = (where >= a) & (where < a + per_batch)
        grid = rows_NC.new_zeros(min(per_batch, len(seqs) - a), P, rows_NC.shape[1])
        grid[where[chosen] - a, ids_N3[chosen, 1] - first_pos] = rows_NC[chosen]
        yield grid, tokens[a: a + per_batch], seqs[a: a + per_batch]


def _unembedding(store, device: str) -> tuple[torch.Tensor | None, bool, object, str | None]:
    """(W_U [D, V] on `device` or None, whether a direction is centred first, the tokenizer or
    None, a note where there are no logit effects) for the store's first model."""
    from cache.models import load_model
    from cache.unembed import UnembeddingError, load_unembedding

    if not store.model_recorded:
        return None, False, None, "no logit effects: the store records no model (written by write_store)"
    entry = store.info["models"][0]
    dtype = store.identity.get("model_dtype", "float32")
    try:
        unembedding = load_unembedding(entry, dtype)
        print(f"browser: logit effects from {unembedding.read_from}")
        return unembedding.W_U.to(device), unembedding.centre_input, unembedding.tokenizer, None
    except UnembeddingError as err:
        if entry.get("backend") == "transformers":
            from transformers import AutoTokenizer

            return None, False, AutoTokenizer.from_pretrained(entry["model_path"] or entry["model"]), f"no logit effects: {err}"
        if not str(entry.get("model_path")).endswith(".gguf"):
            return None, False, None, f"no logit effects: {err}"
        print(f"browser: {err}; loading the whole model once for it (its converted copy is kept for the next time)")
    try:
        model = load_model(entry["model"], entry["model_path"], device=device, dtype=dtype)
    except Exception as err:  # a model that is not here: pages without logit effects, said so
        return None, False, None, f"no logit effects: the store's model {entry.get('model_name')} cannot be loaded ({str(err).splitlines()[0]})"
    return model.W_U.detach().float(), model.cfg.normalization_type in ("LN", "LNPre"), model.tokenizer, None


def _extra(member, store) -> dict:
    """Crosscoders: each source's decoder norm per latent and the relative norm r; transcoders: their hooks."""
    if member.wiring == "crosscoder":
        norms = member.weights["W_dec"].float().norm(dim=-1)  # [F, S]
        out = {"sources": member.inputs, "norms": norms}
        if norms.shape[1] == 2:
            out["r"] = norms[:, 1] / norms.sum(-1).clamp_min(1e-12)
        return out
    if member.wiring in ("transcoder", "clt"):
        return {"input_hooks": [store.source(s).hook for s in member.inputs],
                "output_hooks": [store.source(s).hook for s in member.targets]}
    return {}


def _decoder(tokenizer):
    """token id → its text (cached); `#id` without a tokenizer; `·` for a row whose token was not
    recorded (NO_TOKEN)."""
    cache: dict[int, str] = {NO_TOKEN: "·"}

    def decode(token: int) -> str:
        if token not in cache:
            cache[token] = f"#{token}" if tokenizer is None else tokenizer.decode([token])
        return cache[token]

    return decode
