"""Stage 1: run a model over text and write a pre-shuffled activation store.

    cfg = GenerateConfig(out="caches/p70m-l2", model="pythia-70m", layers=(2,))
    generate(cfg)

Work is done a *block* at a time: `chunks_per_block` chunks' worth of whole sequences are run
(all hooks from one forward pass, stopped after the deepest layer needed), their rows permuted
with a generator seeded by (seed, block index), and written as whole chunks. The mixing window
on disk is therefore one block (`chunks_per_block × chunk` rows, ~128 MB by default); the
training stream shuffles again across chunks. Memory is bounded by one block, whatever
`n_tokens` is. Resume restarts at the first unwritten block and yields a store identical to an
uninterrupted run.

Paired models (model diffing, crosscoders): with `paired_model`/`paired_model_path` a second
model that shares the first one's tokenizer runs on the *same* token ids (tokenised once, with
the first model's tokenizer, BOS and EOS included), batch by batch inside the same block loop, so
row i of `base/<hook>` and `chat/<hook>` (names from `labels`) is the same token, and shuffling
and resume are shared. Both models stay loaded for the whole run (twice the model memory: fine
for small models). Their widths may differ in the store; `require_equal_widths` refuses such a
pair up front for a crosscoder that needs them equal (the trainer checks again).

Several processes (`torchrun --nproc_per_node N generate_activations.py …`, runtime/distributed.py)
share the work by blocks: rank r runs its own copy of the model on blocks r, r+N, …, reading
past the others' sequences in the (cheap, deterministic) text stream. Blocks are independent
(store/zarr_store.py), so the store is byte-identical to a single-process run, and a rerun after a
crash of any rank writes exactly the blocks that have no record. Rank 0 creates the store and,
once every rank is done, completes it.

Not done here: packing of variable-length documents without crossing document boundaries, more
than two models.
"""
from __future__ import annotations

import math
from contextlib import closing, nullcontext
from dataclasses import dataclass, replace
from itertools import chain, groupby, islice
from pathlib import Path
from typing import Any, Iterator, get_args

import numpy as np
import torch
from tqdm.auto import tqdm

from cache.config import GenerateConfig, StorageDtype
from cache.model_config import check_layers
from cache.models import ModelError, check_same_tokenizer, load_for_caching
from cache.text import TextCount, TextSourceError, iter_documents, token_sequences
from runtime.background import prefetched
from runtime.disk import check_free, writing
from runtime.distributed import Processes
from runtime.location import Location
from runtime.lock import OutputLock

from store.zarr_store import (STORAGE_DTYPES, STORAGE_TORCH_DTYPE, ActivationStore, RowBlock, SourceInfo, StoreError, json_normal,
                              norm_sums, shuffled_block, value_fault)

assert get_args(StorageDtype) == STORAGE_DTYPES, "StorageDtype must list STORAGE_DTYPES"


class GenerationError(ValueError):
    """Activations that cannot be stored as asked (non-finite, or overflowing the storage dtype)."""


@dataclass(frozen=True)
class RunModel:
    """One model of the run and the sources it writes."""

    label: str | None  # prefix of its source names; None in an unpaired run (plain hook names)
    name: str  # display name and exports' model_name: the TransformerLens name, the checkpoint's file/folder
    # name, or, through transformers, what AutoModelForCausalLM loads it by (a hub name or an absolute path)
    tl_name: str | None  # the name it was loaded by (--model: TransformerLens's, or a hub name), if any
    path: str | None
    model: Any  # cache.models.TLModel | cache.hf_models.HFModel
    sources: tuple[SourceInfo, ...]

    @property
    def hooks(self) -> list[str]:
        return [src.hook for src in self.sources]


@dataclass(frozen=True)
class StoreLayout:
    """How rows fall into sequences, chunks and blocks."""

    rows_per_seq: int
    seqs_per_chunk: int
    n_chunks: int
    chunks_per_block: int
    first_pos: int  # position of the first stored row of a sequence (1 when BOS rows are excluded)

    @property
    def chunk_rows(self) -> int:
        return self.rows_per_seq * self.seqs_per_chunk

    @property
    def seqs_per_block(self) -> int:
        return self.seqs_per_chunk * self.chunks_per_block

    @property
    def n_seqs(self) -> int:
        return self.seqs_per_chunk * self.n_chunks

    def block_sequences(self, block: int) -> int:
        """Sequences in `block` (the last block may be partial)."""
        return max(0, min(self.seqs_per_block, self.n_seqs - block * self.seqs_per_block))


def plan_layout(cfg: GenerateConfig, bytes_per_row: int, first_pos: int) -> StoreLayout:
    rows_per_seq = cfg.context_length - first_pos
    seqs_per_chunk = max(1, round(cfg.chunk_mb * 2**20 / (rows_per_seq * bytes_per_row)))
    chunk_rows = rows_per_seq * seqs_per_chunk
    n_chunks = cfg.n_chunks or math.ceil(cfg.n_tokens / chunk_rows)
    return StoreLayout(rows_per_seq, seqs_per_chunk, n_chunks, cfg.chunks_per_block, first_pos)


def generate(cfg: GenerateConfig, processes: Processes = Processes()) -> ActivationStore:
    """Write (or finish, or confirm) the store described by `cfg`; return it opened. Whatever can
    be checked without the model is checked first; a store this call created is removed again if
    it is refused before its first block is written, so the suggested retry just works. Under
    torchrun every rank calls this with the same `cfg`; the ranks share the blocks."""
    cfg = replace(cfg, device=processes.device_for(cfg.device))
    lock = OutputLock(cfg.where, "generate_activations.py", cfg.break_lock) if processes.rank == 0 else nullcontext()
    with lock:  # one writer per store; under torchrun, rank 0 holds it for the job
        return _generate_locked(cfg, processes)


def _generate_locked(cfg: GenerateConfig, processes: Processes) -> ActivationStore:
    existing = _existing_store(cfg)
    if existing is not None and existing.complete:
        print(f"{cfg.out} is complete ({existing.n_rows:,} rows); nothing to do")
        return existing
    _preflight(cfg)
    created = existing is None
    try:
        return _generate(cfg, existing, processes)
    except (ValueError, OSError) as err:
        if created and processes.rank == 0:
            _remove_if_empty(cfg.where)
        kept = _rows_written(cfg.where)
        if isinstance(err, GenerationError) and kept:
            raise GenerationError(f"{err}; add --overwrite, as {cfg.out} already holds {kept:,} rows stored as {cfg.dtype}") from None
        raise


def _preflight(cfg: GenerateConfig) -> None:
    """Checks that need no model: layer numbers against the checkpoint's config, and a dataset that
    yields a document."""
    check_layers(cfg)
    if next(iter_documents(cfg.dataset, cfg.text_column, cfg.split), None) is None:
        raise TextSourceError(f"dataset {cfg.dataset!r} holds no documents (no non-empty {cfg.text_column!r} text)")


def _rows_written(where: Location) -> int:
    try:
        return ActivationStore.open(where, allow_incomplete=True).rows_written
    except StoreError:
        return 0


def _remove_if_empty(where: Location) -> None:
    """Remove a store that was refused before any block was written."""
    try:
        store = ActivationStore.open(where, allow_incomplete=True)
    except StoreError:
        return
    if store.rows_written == 0:
        store.remove()


def _generate(cfg: GenerateConfig, existing: ActivationStore | None, processes: Processes) -> ActivationStore:
    resumed = existing is not None
    members = _load_members(cfg)
    model = members[0].model  # its tokenizer makes the token ids every model is fed
    prepend_bos = model.default_prepend_bos if cfg.prepend_bos is None else cfg.prepend_bos
    bos_id = model.tokenizer.bos_token_id if prepend_bos else None
    if prepend_bos and bos_id is None:
        raise ModelError("the tokenizer has no BOS token: pass --no_prepend_bos")
    first_pos = int(prepend_bos and cfg.exclude_bos)
    sources = [src for member in members for src in member.sources]
    bytes_per_row = sum(s.d for s in sources) * STORAGE_TORCH_DTYPE[cfg.dtype].itemsize
    layout = plan_layout(cfg, bytes_per_row, first_pos)

    count = TextCount()
    sequences = token_sequences(
        iter_documents(cfg.dataset, cfg.text_column, cfg.split),
        lambda texts: model.tokenizer(texts, add_special_tokens=False)["input_ids"],
        context_length=cfg.context_length,
        bos_id=bos_id,
        eos_id=model.tokenizer.eos_token_id,
        count=count,
    )
    first = next(sequences, None)  # read the source before creating anything on disk
    if first is None:
        raise TextSourceError(
            f"dataset {cfg.dataset!r} gave {count.documents:,} documents of {count.tokens:,} tokens in all, "
            f"short of one sequence of --context_length {cfg.context_length}: use a shorter --context_length or more text")
    if processes.rank == 0:
        written = existing.rows_written if existing is not None else 0
        check_free(cfg.out, (layout.n_chunks * layout.chunk_rows - written) * (bytes_per_row + 12), "the store's remaining rows")
    if processes.rank == 0 and existing is None:
        with writing(cfg.out, "creating the store"):
            existing = _create(cfg, layout, sources, members, prepend_bos, bos_id)
    processes.barrier("creating the store")
    store = existing if processes.rank == 0 else ActivationStore.open(cfg.where, writable=True, allow_incomplete=True)
    if resumed and processes.rank == 0:
        done = store.n_blocks - len(store.missing_blocks())
        print(f"resuming {cfg.out}: {done} of {store.n_blocks} blocks were written before; writing the others")
    _write_blocks(cfg, members, layout, store, chain([first], sequences), processes)
    processes.barrier("writing blocks")
    if processes.rank == 0:
        if store.rows_written < store.n_rows:
            print(f"warning: dataset ran out after {store.rows_written:,} of {store.n_rows:,} rows")
        with writing(cfg.out, "completing the store (its manifest)"):
            store.finish()
    processes.barrier("completing the store")
    return ActivationStore.open(cfg.where) if processes.rank else store


def _create(cfg: GenerateConfig, layout: StoreLayout, sources: list, members: list, prepend_bos: bool, bos_id) -> ActivationStore:
    return ActivationStore.create(
        cfg.where,
        identity=cfg.identity(),
        sources=sources,
        n_rows=layout.n_chunks * layout.chunk_rows,
        n_sequences=layout.n_seqs,
        context_length=cfg.context_length,
        chunk_rows=layout.chunk_rows,
        block_rows=layout.seqs_per_block * layout.rows_per_seq,
        storage_dtype=cfg.dtype,
        info=_store_info(cfg, members, prepend_bos, bos_id),
    )


def _existing_store(cfg: GenerateConfig) -> ActivationStore | None:
    """The store at cfg.out if it was written with the same identity; refuse conflicts."""
    where = cfg.where
    if cfg.overwrite:
        return None  # ActivationStore.create replaces it
    if not where.holds_store():
        fs, root = where.filesystem()
        if fs.exists(root) and fs.ls(root):
            raise StoreError(f"{cfg.out} exists and is not an activation store: choose another --out or pass --overwrite")
        return None
    store = ActivationStore.open(where, writable=True, allow_incomplete=True)
    mine = json_normal(cfg.identity())
    if store.identity != mine:
        diff = sorted(k for k in set(mine) | set(store.identity) if mine.get(k) != store.identity.get(k))
        raise StoreError(
            f"{cfg.out} was written with another configuration (differs in: {', '.join(diff)}): "
            "use another --out, or --overwrite to replace it"
        )
    return store


def _load_members(cfg: GenerateConfig) -> list[RunModel]:
    """The model, or the pair of models, with hooks resolved and validated against each. A pair
    must share its tokenizer; with `require_equal_widths` also its activation widths."""
    specs = [(cfg.model, cfg.model_path)] + ([(cfg.paired_model, cfg.paired_model_path)] if cfg.paired else [])
    labels = cfg.labels if cfg.paired else (None,)
    members = []
    for label, (name, path) in zip(labels, specs):
        model = load_for_caching(cfg.backend, name, path, device=cfg.device, dtype=cfg.model_dtype)
        hooks = model.resolve_hooks(cfg.layers, cfg.hook, cfg.hooks)
        sources = tuple(
            SourceInfo(name=f"{label}/{h}" if label else h, model=model.name, hook=h, d=d, layer=model.hook_kind(h)[0],
                       kind=model.hook_kind(h)[1])
            for h, d in _hook_widths(model, hooks).items()
        )
        members.append(RunModel(label, model.name, name, path, model, sources))
    if cfg.paired:
        first, second = members
        check_same_tokenizer(first.model.tokenizer, second.model.tokenizer, (first.name, second.name))
        if cfg.require_equal_widths:
            _check_equal_widths(first, second)
    return members


def _check_equal_widths(first: RunModel, second: RunModel) -> None:
    unequal = [f"{a.hook} ({a.d} vs {b.d})" for a, b in zip(first.sources, second.sources) if a.d != b.d]
    if unequal:
        raise ModelError(
            f"--require_equal_widths: {first.name} and {second.name} differ in width at {', '.join(unequal)}: "
            "pair models of the same d_model, or drop --require_equal_widths to store them anyway"
        )


def _hook_widths(model, hooks: list[str]) -> dict[str, int]:
    """Width of each hook's activation per token (heads flattened), from a two-token forward."""
    acts = model.record(torch.zeros((1, 2), dtype=torch.long), hooks)
    return {h: a.shape[-1] for h, a in acts.items()}


def _write_blocks(cfg, members: list[RunModel], layout: StoreLayout, store: ActivationStore, sequences: Iterator,
                  processes: Processes) -> None:
    """Write this rank's blocks that have no record yet; those past the end of the text get an
    empty record."""
    mine = [b for b in store.missing_blocks() if b % processes.world == processes.rank]
    if processes.distributed:
        print(f"{processes.name}: blocks {_describe(mine)} of {store.n_blocks}")
    # Text is read and tokenised in a background thread, a few forward batches ahead.
    planned_rows = sum(layout.block_sequences(b) for b in mine) * layout.rows_per_seq
    desc = f"caching ({processes.name})" if processes.distributed else "caching"
    with tqdm(total=planned_rows, unit="tok", unit_scale=True, desc=desc, disable=processes.rank > 0) as bar, \
            closing(prefetched(_block_batches(sequences, layout, cfg.batch_size, set(mine)), depth=4)) as batches:
        for block, group in groupby(batches, key=lambda item: item[0]):
            forwarded = _counted((batch for _, batch in group), lambda b: bar.update(len(b) * layout.rows_per_seq))
            rows = _block_rows(cfg, members, layout, forwarded, block)
            with writing(cfg.out, f"writing block {block} of the store"):
                store.write_block(block, rows)
            mine.remove(block)
    for block in mine:  # the text ran out before them
        with writing(cfg.out, f"recording block {block} of the store"):
            store.write_block(block, None)


def _counted(batches: Iterator[torch.Tensor], after) -> Iterator[torch.Tensor]:
    """The batches, calling `after(batch)` once each has been consumed (forwarded)."""
    for batch in batches:
        yield batch
        after(batch)


def _describe(blocks: list[int]) -> str:
    """[0, 2, 4, 6] → "0, 2, 4, 6"; long lists shortened."""
    if not blocks:
        return "none (all written)"
    shown = ", ".join(map(str, blocks[:6]))
    return shown + (f", … ({len(blocks)} blocks)" if len(blocks) > 6 else "")


def _block_batches(sequences: Iterator[np.ndarray], layout: StoreLayout, batch_size: int,
                   blocks: set[int]) -> Iterator[tuple[int, torch.Tensor]]:
    """(block, batch of its token sequences) for `blocks`, in order; the other blocks' sequences
    are read past. Batches never cross a block boundary (so the blocks, and the store, do not
    depend on the batch size).  → (int, [b, ctx])"""
    for block in range(math.ceil(layout.n_seqs / layout.seqs_per_block)):
        if not blocks:
            return
        size = layout.block_sequences(block)
        if block not in blocks:
            if len(list(islice(sequences, size))) < size:
                return
            continue
        blocks.discard(block)
        for start in range(0, size, batch_size):
            batch = list(islice(sequences, min(batch_size, size - start)))
            if not batch:
                return
            yield block, torch.from_numpy(np.stack(batch))


def _block_rows(cfg, members: list[RunModel], layout: StoreLayout, batches: Iterator[torch.Tensor], block_index: int) -> RowBlock:
    """Forward one block's batches as they arrive (every model on the same batch), drop excluded
    positions, check, cast; then permute the block's rows."""
    sources = [src for member in members for src in member.sources]
    sequences: list[torch.Tensor] = []
    stored: dict[str, list[torch.Tensor]] = {src.name: [] for src in sources}
    sums = {src.name: np.zeros(3) for src in sources}  # Σ‖x‖, Σ‖x‖², rows
    keep = slice(layout.first_pos, None)
    for batch in batches:  # [b, ctx]
        sequences.append(batch)
        for member in members:
            acts = member.model.record(batch, member.hooks)
            for src in member.sources:
                values = acts[src.hook].reshape(*batch.shape, -1)[:, keep].reshape(-1, src.d)  # [b·kept, d] fp32
                _check_values(values, src.name, cfg.dtype)
                sums[src.name] += norm_sums(values)
                stored[src.name].append(values.to(STORAGE_TORCH_DTYPE[cfg.dtype]).cpu())  # cast early: half the copying
    return shuffled_block(seed=cfg.seed, index=block_index, seq_start=block_index * layout.seqs_per_block,
                          sequences_SC=torch.cat(sequences).numpy(), first_pos=layout.first_pos,
                          acts={src.name: torch.cat(stored[src.name]) for src in sources},
                          norm_sums={src.name: tuple(sums[src.name]) for src in sources}, dtype=cfg.dtype)


def _check_values(values: torch.Tensor, source: str, dtype: str) -> None:
    fault = value_fault(values, dtype)
    if fault is None:
        return
    if fault.startswith("non-finite"):
        raise GenerationError(f"{source}: the model produced non-finite activations (NaN/inf); "
                              "check the checkpoint, or run the model in --model_dtype float32")
    raise GenerationError(f"{source}: activations {fault}; store them with --dtype bfloat16 or float32 "
                          "(or --exclude_bos if the outliers are at BOS)")


def _store_info(cfg: GenerateConfig, members: list[RunModel], prepend_bos: bool, bos_id) -> dict:
    """Model, tokenizer and text facts for readers. The top-level model fields describe the first
    model (the one whose tokenizer made the ids); `models` lists every model of the run."""
    tokenizer = members[0].model.tokenizer
    return {
        **_model_info(members[0], cfg.model_dtype, prepend_bos),
        "models": [{"label": m.label, **_model_info(m, cfg.model_dtype, prepend_bos)} for m in members],
        "tokenizer": getattr(tokenizer, "name_or_path", None),
        "bos_token_id": bos_id,
        "eos_token_id": tokenizer.eos_token_id,
        "prepend_bos": prepend_bos,
        "exclude_bos": bool(prepend_bos and cfg.exclude_bos),
        "dataset": cfg.dataset,
        "context_length": cfg.context_length,
        "hooks": members[0].hooks,
        "torch_version": torch.__version__,
    }


def _model_info(member: RunModel, dtype: str, prepend_bos: bool) -> dict:
    model = member.model
    return {
        "loaded_with": model.loading_record(dtype, prepend_bos),  # what reproduces its activations elsewhere
        "backend": model.backend,
        "model_name": member.name,
        "model": member.tl_name,  # with model_path: what load_model needs to load it again
        "model_path": member.path,
        "n_layers": model.n_layers,
        "d_model": model.d_model,
        "d_vocab": model.d_vocab,
        "n_parameters": model.n_parameters,  # what evaluation's memory estimate needs
    }
