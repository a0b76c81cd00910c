"""Activations from anywhere into a store: nnsight, vLLM, a model of your own, synthetic data.

    from store.write import write_store

    def batches():                          # any iterable; each batch a dict of arrays (numpy or torch)
        for acts, ids in my_loader():
            yield {"blocks.6.hook_resid_post": acts, "tokens": ids}   # [n, d] rows, or [b, ctx, d] sequences

    store = write_store(batches(), "caches/mine", model="google/gemma-3-270m", dataset="my corpus")
    # then: python train_sweep.py --cache caches/mine

A batch maps each source name to its activations, either rows `[n, d]` (each row its own
sequence of one position) or whole sequences `[b, ctx, d]` (a sequence's rows keep their
positions and stay together: held-out evaluation rows are whole sequences). One key is reserved
and optional: `tokens`, the token ids (`[n]` or `[b, ctx]`). Every batch has the same sources,
widths and form; several sources (e.g. a transcoder's input and target, or two models') are
row-aligned, so they must have equal row counts.

The store is the one `generate_activations.py` writes: the same chunking, the same physical
pre-shuffle (blocks of whole sequences permuted by a generator seeded by (seed, block)), chunk
checksums and manifest, per-source normalisation statistics, and the same completion rule. Its
length is learnt as the batches come: blocks are cut from the rows in order whatever the batch
sizes, so the store depends only on the rows. Rerunning the same call after an interruption
resumes: the rows of the blocks already written are read past (their norms checked against the
blocks' records, so a different iterable is refused) and the result is byte-identical to an
uninterrupted run. Without a model or tokens, training reports L0, FVU and dead latents;
evaluation skips what needs the model (spliced CE/KL, the browser's contexts and logit effects)
and says so.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from itertools import chain
from typing import Any, Iterable, Iterator, Mapping

import numpy as np
import torch

from runtime.disk import writing
from runtime.location import Location, location
from runtime.lock import OutputLock
from store.errors import StoreError
from store.hooks import hook_kind
from store.zarr_store import (NO_TOKEN, STORAGE_DTYPES, STORAGE_TORCH_DTYPE, ActivationStore, SourceInfo, json_normal,
                              norm_sums, shuffled_block, value_fault)

RESERVED = ("tokens",)


class BatchError(ValueError):
    """A batch that cannot be stored: its shapes, its values, or the batches before it disagree."""


@dataclass(frozen=True)
class WriteConfig:
    """How the rows are laid out on disk; recorded as the store's identity (a rerun must match)."""

    chunk_mb: float = 8.0
    """Target size of one chunk over all sources, in MB (whole sequences per chunk)."""
    chunks_per_block: int = 16
    """Chunks shuffled together before writing (the on-disk mixing window)."""
    dtype: str = "float16"
    """Storage dtype of activations: float16, bfloat16 or float32."""
    seed: int = 0
    """Seed of the row shuffle."""
    model: str | None = None
    """The model the activations came from, if any (recorded, and written into exports)."""
    dataset: str = "write_store"
    """What the rows were computed on (recorded, and written into exports)."""

    def __post_init__(self):
        if self.dtype not in STORAGE_DTYPES:
            raise ValueError(f"dtype {self.dtype!r}: choose one of {', '.join(STORAGE_DTYPES)}")
        if self.chunk_mb <= 0 or self.chunks_per_block < 1:
            raise ValueError("chunk_mb and chunks_per_block must be positive")


@dataclass(frozen=True)
class _Form:
    """What the first batch fixed: each source's width, rows or sequences (and their length)."""

    widths: dict[str, int]
    ctx: int | None  # positions per sequence; None: rows
    tokens: bool


def write_store(batches: Iterable[Mapping[str, Any]], out: str | Location, *, loaded_with: dict | None = None,
                overwrite: bool = False, progress: bool = True, **options) -> ActivationStore:
    """Write the rows of `batches` as a complete, pre-shuffled store at `out`; return it opened.
    `options`: WriteConfig's fields. `loaded_with`: how a downstream tool loads `model` to compute
    these activations ({"model_class_name", "model_from_pretrained_kwargs"} as SAELens's
    load_model takes them), written into every export. A complete store written by the same call
    is returned as it is; an interrupted one is finished."""
    cfg = WriteConfig(**options)
    where = out if isinstance(out, Location) else location(str(out))
    with OutputLock(where, "write_store"):
        return _write_locked(iter(batches), where, cfg, loaded_with or {}, overwrite, progress)


def _write_locked(batches: Iterator[Mapping[str, Any]], where: Location, cfg: WriteConfig, loaded_with: dict,
                  overwrite: bool, progress: bool) -> ActivationStore:
    first = next(batches, None)
    if first is None:
        raise BatchError("write_store: the batches are empty (the iterable yielded nothing); nothing was written")
    form = _form(first)
    identity = {"writer": "write_store", **asdict(cfg), "sources": form.widths, "context_length": form.ctx}
    store = _existing(where, identity, overwrite)
    if store is not None and store.complete:
        return store
    if store is None:
        with writing(where.url, "creating the store"):
            store = _create(where, cfg, form, identity, loaded_with)
    try:
        _write_blocks(store, _checked(chain([first], batches), form, cfg.dtype), form, cfg, progress)
    except BatchError:
        if not store.block_records():
            store.remove()  # refused before its first block: nothing is left behind
        raise
    with writing(where.url, "completing the store (its manifest)"):
        store.finish()
    return ActivationStore.open(where)


def _form(batch: Mapping[str, Any]) -> _Form:
    sources = {name: _tensor(value, name, 0) for name, value in batch.items() if name not in RESERVED}
    if not sources:
        raise BatchError(f"batch 0 holds no source, only {', '.join(batch) or 'nothing'}: "
                         "give each source's activations under its name, e.g. {'blocks.2.hook_resid_post': acts}")
    ndims = {value.dim() for value in sources.values()}
    if ndims - {2, 3} or len(ndims) > 1:
        raise BatchError(f"batch 0: every source must be [n, d] rows or [b, ctx, d] sequences, got "
                         f"{', '.join(f'{n} {list(v.shape)}' for n, v in sources.items())}")
    ctx = next(iter(sources.values())).shape[1] if ndims == {3} else None
    return _Form({n: v.shape[-1] for n, v in sources.items()}, ctx, "tokens" in batch)


def _tensor(value: Any, name: str, index: int) -> torch.Tensor:
    try:
        return value if isinstance(value, torch.Tensor) else torch.from_numpy(np.asarray(value))
    except (TypeError, ValueError) as err:
        raise BatchError(f"batch {index}: {name} is not an array ({err})") from None


def _checked(batches: Iterator[Mapping[str, Any]], form: _Form,
             dtype: str) -> Iterator[tuple[np.ndarray, dict[str, torch.Tensor]]]:
    """Each batch as (tokens [S, C], {source: [S·C, d] float32}), checked against the first
    batch's form; a fault is one line naming the batch."""
    for index, batch in enumerate(batches):
        names = {n for n in batch if n not in RESERVED}
        if names != set(form.widths) or ("tokens" in batch) != form.tokens:
            raise BatchError(f"batch {index} holds {', '.join(sorted(batch))}; batch 0 held "
                             f"{', '.join(sorted([*form.widths, *(['tokens'] if form.tokens else [])]))}")
        acts = {name: _tensor(batch[name], name, index) for name in form.widths}
        lead = None
        for name, value in acts.items():
            expected = (form.widths[name],) if form.ctx is None else (form.ctx, form.widths[name])
            if value.dim() != len(expected) + 1 or tuple(value.shape[1:]) != expected:
                raise BatchError(f"batch {index}: {name} has shape {list(value.shape)}, batch 0 fixed "
                                 f"{['n', *expected]}: every batch keeps the sources' widths and form")
            if lead is not None and value.shape[0] != lead[1]:
                raise BatchError(f"batch {index}: {name} has {value.shape[0]} rows, {lead[0]} has {lead[1]}: "
                                 "sources are row-aligned (row i of each is the same token)")
            lead = lead or (name, value.shape[0])
            fault = value_fault(value, dtype)
            if fault is not None:
                raise BatchError(f"batch {index}: {name} has {fault}; nothing of it was stored"
                                 + ("" if fault.startswith("non-finite") else "; store with dtype='float32' or 'bfloat16'"))
        n = lead[1]
        shape = (n,) if form.ctx is None else (n, form.ctx)
        tokens = _ids(batch, shape, index) if form.tokens else torch.full(shape, NO_TOKEN, dtype=torch.int64)
        yield tokens.reshape(n, -1).numpy(), {k: v.reshape(-1, v.shape[-1]).float() for k, v in acts.items()}


def _ids(batch: Mapping[str, Any], shape: tuple[int, ...], index: int) -> torch.Tensor:
    ids = _tensor(batch["tokens"], "tokens", index)
    if tuple(ids.shape) != shape or ids.is_floating_point():
        raise BatchError(f"batch {index}: tokens has shape {list(ids.shape)} ({ids.dtype}); the sources need integer {list(shape)}")
    return ids.long()


def _existing(where: Location, identity: dict, overwrite: bool) -> ActivationStore | None:
    if overwrite or not where.holds_store():
        fs, root = where.filesystem()
        if not overwrite and fs.exists(root) and fs.ls(root):
            raise StoreError(f"{where.url} exists and is not an activation store: choose another out, or overwrite=True")
        return None
    store = ActivationStore.open(where, writable=True, allow_incomplete=True)
    if store.identity != json_normal(identity):
        diff = sorted(k for k in set(identity) | set(store.identity) if json_normal(identity).get(k) != store.identity.get(k))
        raise StoreError(f"{where.url} was written with another configuration (differs in: {', '.join(diff)}): "
                         "write elsewhere, or pass overwrite=True to replace it")
    return store


def _create(where: Location, cfg: WriteConfig, form: _Form, identity: dict, loaded_with: dict) -> ActivationStore:
    rows_per_seq = form.ctx or 1
    bytes_per_row = sum(form.widths.values()) * STORAGE_TORCH_DTYPE[cfg.dtype].itemsize
    seqs_per_chunk = max(1, round(cfg.chunk_mb * 2**20 / (rows_per_seq * bytes_per_row)))
    chunk_rows = seqs_per_chunk * rows_per_seq
    block_seqs = seqs_per_chunk * cfg.chunks_per_block
    sources = [SourceInfo(name=name, model=cfg.model or "unknown", hook=name, d=d, layer=hook_kind(name)[0],
                          kind=hook_kind(name)[1]) for name, d in form.widths.items()]
    model_info = {"label": None, "model_name": cfg.model, "model": None, "model_path": None, "loaded_with": loaded_with}
    info = {**model_info, "models": [model_info], "tokenizer": None, "bos_token_id": None, "eos_token_id": None,
            "prepend_bos": False, "exclude_bos": False, "dataset": cfg.dataset, "context_length": rows_per_seq,
            "hooks": list(form.widths), "has_tokens": form.tokens, "torch_version": torch.__version__}
    return ActivationStore.create(where, identity=identity, sources=sources, n_rows=block_seqs * rows_per_seq,
                                  n_sequences=block_seqs, context_length=rows_per_seq, chunk_rows=chunk_rows,
                                  block_rows=block_seqs * rows_per_seq, storage_dtype=cfg.dtype, info=info)


def _write_blocks(store: ActivationStore, sequences, form: _Form, cfg: WriteConfig, progress: bool) -> None:
    """Cut the stream of sequences into blocks in order; write those without a record, read past
    (and check) the others."""
    from tqdm.auto import tqdm

    records = store.block_records()
    seqs_per_block = store.seqs_per_block
    with tqdm(unit="row", unit_scale=True, desc="writing store", disable=not progress) as bar:
        for index, (tokens, acts) in enumerate(_blocks(sequences, seqs_per_block)):
            store.grow((index + 1) * seqs_per_block)
            sums = {name: tuple(norm_sums(values)) for name, values in acts.items()}
            if index in records:
                _check_same(records[index], sums, index, store.path)
            else:
                block = shuffled_block(seed=cfg.seed, index=index, seq_start=index * seqs_per_block, sequences_SC=tokens,
                                       first_pos=0, acts={n: v.to(STORAGE_TORCH_DTYPE[cfg.dtype]) for n, v in acts.items()},
                                       norm_sums=sums, dtype=cfg.dtype)
                with writing(store.path, f"writing block {index} of the store"):
                    store.write_block(index, block)
            bar.update(len(tokens) * (form.ctx or 1))
    if store.missing_blocks():  # an earlier, interrupted run had more rows
        raise StoreError(f"store {store.path}: these batches end at block {store.n_blocks - len(store.missing_blocks()) - 1}, "
                         "an earlier run of this store had more: resume with the same batches, or pass overwrite=True")


def _blocks(sequences, seqs_per_block: int):
    """Sequences regrouped into blocks of `seqs_per_block` (the last may be short), whatever the
    batch sizes were.  → (tokens [S, C], {source: [S·C, d]})"""
    pending: list = []
    count = 0
    for item in sequences:
        pending.append(item)
        count += len(item[0])
        while count >= seqs_per_block:
            block, pending, count = _take(pending, seqs_per_block)
            yield block
    if count:
        yield _take(pending, count)[0]


def _take(pending: list, n_seqs: int):
    tokens = np.concatenate([p[0] for p in pending])
    rows_per_seq = tokens.shape[1]
    acts = {name: torch.cat([p[1][name] for p in pending]) for name in pending[0][1]}
    head = (tokens[:n_seqs], {k: v[: n_seqs * rows_per_seq] for k, v in acts.items()})
    rest_seqs = len(tokens) - n_seqs
    rest = [(tokens[n_seqs:], {k: v[n_seqs * rows_per_seq:] for k, v in acts.items()})] if rest_seqs else []
    return head, rest, rest_seqs


def _check_same(record: dict, norm_sums: dict, index: int, path: str) -> None:
    """A block already written must hold the rows this call gives it (its norm sums agree)."""
    for name, sums in norm_sums.items():
        written = record["norm_sums"].get(name)
        if written is None or not all(math.isclose(a, b, rel_tol=1e-9) for a, b in zip(sums, written)):
            raise StoreError(f"store {path}: block {index} was written from other rows than this call gives it: "
                             "resume with the same batches, or pass overwrite=True to start again")
