"""Stage 2 input: stream batches of the sources a sweep needs, side by side, from a store onto the
training device. A batch row is the concatenation of its sources' rows ([x_1 … x_S], each source
normalised by its own factor, widths may differ: a transcoder's input and target); rows are
aligned in the store, and `columns` says where each source sits.

Held out: every row of the last sequences cached, about `eval_rows` rows of whole sequences, so
evaluation can re-run the model on sequences no dictionary saw a token of. Blocks hold
contiguous ranges of sequences, so the held-out rows all lie in the store's tail (the last
block or few), where training reads filter them out by their sequence id. Rows whose token is in
`exclude_tokens` (e.g. EOS between documents) are filtered out of training and evaluation alike.
Per epoch:
  * the training chunks are visited in a random order (seeded by (seed, epoch));
  * `shuffle_chunks` chunks at a time are loaded, concatenated and permuted together;
  * consecutive batches of `batch_size` rows are cut from that stream, carrying leftovers across
    groups, so every training row is seen exactly once per epoch (the last batch may be short).
A background thread reads and shuffles ahead (`prefetch` batches queued; it is stopped and joined
when its consumer stops, so none outlives a CLI); the main thread moves
each batch to the device and casts it to float32 once, dividing by the normalisation factors.
The stream is deterministic given (seed, epoch), so `start_batch` resumes mid-epoch.
"""
from __future__ import annotations

import math
from contextlib import closing
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from runtime.background import prefetched
from store.zarr_store import ActivationStore, StoreError


@dataclass(frozen=True)
class StreamConfig:
    batch_size: int = 4096
    """Rows per training batch."""
    eval_rows: int = 50_000
    """Rows of whole sequences held out from training (at most a tenth of the store)."""
    shuffle_chunks: int = 8
    """Chunks loaded and shuffled together."""
    prefetch: int = 8
    """Batches read ahead by the background thread."""
    seed: int = 0
    """Seed of the chunk order and in-memory shuffles."""
    normalise: bool = True
    """Divide rows by the store's factor s = E‖x‖/√d (mean norm √d)."""
    exclude_tokens: tuple[int, ...] = ()
    """Token ids whose rows are never read (e.g. EOS between documents)."""

    def __post_init__(self):
        if self.batch_size < 1 or self.shuffle_chunks < 1 or self.prefetch < 1 or self.eval_rows < 0:
            raise ValueError("batch_size, shuffle_chunks and prefetch must be positive, eval_rows ≥ 0")


class ActivationStream:
    """Batches of one or several sources of a complete store, normalised, on `device`."""

    def __init__(self, store: ActivationStore, source: str | list[str], cfg: StreamConfig,
                 device: str | torch.device = "cpu"):
        infos = [store.source(name) for name in ([source] if isinstance(source, str) else source)]
        # every chunk file this stream will read is there, at its size, before any work starts
        store.check_files([*(f"acts/{info.name}" for info in infos), "sequence", "tokens", "sequences"])
        self.store = store
        self.sources = [info.name for info in infos]
        self.source = ",".join(self.sources)
        self.widths = [info.d for info in infos]
        self.columns: dict[str, tuple[int, int]] = {}
        for info, start in zip(infos, np.cumsum([0, *self.widths[:-1]]).tolist()):
            self.columns[info.name] = (start, info.d)
        self.width = sum(self.widths)
        self.d = infos[0].d  # width of the first source (of every source, where they are equal)
        self.cfg = cfg
        self.device = torch.device(device)
        self.scales = [store.norm_scale(name) if cfg.normalise else 1.0 for name in self.sources]
        self.scale = self.scales[0]  # the factor of a single source
        # what a row is divided by: one factor, or one per column of the concatenated sources
        self._divisor = (self.scale if len(self.scales) == 1 else torch.tensor(
            [s for s, w in zip(self.scales, self.widths) for _ in range(w)], device=self.device))
        rows_per_seq = store.n_rows // store.attrs["n_sequences"]
        n_eval_seqs = math.ceil(min(cfg.eval_rows, store.n_rows // 10) / rows_per_seq)
        self.eval_sequence_start = store.attrs["n_sequences"] - n_eval_seqs  # sequences ≥ this are held out
        # first row of the block holding that sequence: rows before it are all training rows
        seqs_per_block = store.block_rows // rows_per_seq
        self.tail_start = min(self.eval_sequence_start // seqs_per_block * store.block_rows, store.n_rows)
        self._tail_in_eval = store.read_column("sequence", self.tail_start) >= self.eval_sequence_start  # [N - tail_start]
        self._excluded = np.asarray(cfg.exclude_tokens, dtype=np.int32)
        self._chunk_train_rows = self._count_training_rows() if len(self._excluded) else None
        self.n_eval = sum(int(self._keep_mask(a, b, held_out=True).sum()) for a, b in self.chunk_ranges() if b > self.tail_start)
        self.n_train = sum(self.n_training_rows(a, b) for a, b in self.chunk_ranges())
        if self.n_train < 1:
            raise StoreError(f"store {store.path} has no training rows ({store.n_rows:,} rows, "
                             f"{self.n_eval:,} held out): cache more tokens or lower --eval_tokens")

    @property
    def batches_per_epoch(self) -> int:
        return math.ceil(self.n_train / self.cfg.batch_size)

    def chunk_ranges(self) -> list[tuple[int, int]]:
        """Row range [start, stop) of every stored chunk (those in the tail also hold held-out rows)."""
        size = self.store.chunk_rows
        return [(a, min(a + size, self.store.n_rows)) for a in range(0, self.store.n_rows, size)]

    def read_training_rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) without the held-out and excluded ones, in store order.  → [≤ stop-start, C]"""
        rows, keep = self._rows(start, stop, held_out=False)
        return rows if keep is None else rows[keep]

    def read_token_ids(self, start: int, stop: int, held_out: bool = False) -> torch.Tensor:
        """Token id and position of the training (or held-out) rows among [start, stop).  → [n, 2] int64"""
        keep = self._keep_mask(start, stop, held_out)
        ids = torch.from_numpy(np.stack([self.store.read_column("tokens", start, stop),
                                         self.store.read_column("positions", start, stop)], axis=1).astype(np.int64))
        return ids if keep is None else ids[keep]

    def n_training_rows(self, start: int, stop: int) -> int:
        """How many of rows [start, stop) (a chunk range) are training rows."""
        if self._chunk_train_rows is not None:
            return self._chunk_train_rows[start]
        if stop <= self.tail_start:
            return stop - start
        lo = max(start, self.tail_start) - self.tail_start
        return stop - start - int(self._tail_in_eval[lo : stop - self.tail_start].sum())

    def _keep_mask(self, start: int, stop: int, held_out: bool) -> torch.Tensor | None:
        """Which of rows [start, stop) to read: training or held-out rows, without excluded tokens
        (None: all of them).  → [stop-start] bool"""
        keep = None
        if stop > self.tail_start:
            in_eval = np.zeros(stop - start, dtype=bool)
            lo = max(start, self.tail_start)
            in_eval[lo - start:] = self._tail_in_eval[lo - self.tail_start: stop - self.tail_start]
            keep = in_eval if held_out else ~in_eval
        elif held_out:
            keep = np.zeros(stop - start, dtype=bool)
        if len(self._excluded):
            allowed = ~np.isin(self.store.read_column("tokens", start, stop), self._excluded)
            keep = allowed if keep is None else keep & allowed
        return None if keep is None else torch.from_numpy(keep)

    def _rows(self, start: int, stop: int, held_out: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        keep = self._keep_mask(start, stop, held_out)
        if keep is not None and not keep.any():
            return self.store.empty_rows(self.width), keep[:0]
        parts = [self.store.read_rows(name, start, stop) for name in self.sources]
        return (parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)), keep

    def _count_training_rows(self) -> dict[int, int]:
        """Training rows of each chunk (by its first row) when tokens are excluded: one pass over
        the tokens column (4 bytes a row)."""
        counts = {}
        for a, b in self.chunk_ranges():
            keep = self._keep_mask(a, b, held_out=False)
            counts[a] = b - a if keep is None else int(keep.sum())
        return counts

    def epoch_groups(self, epoch: int) -> list[list[tuple[int, int]]]:
        """This epoch's chunk ranges in visiting order, grouped `shuffle_chunks` at a time."""
        ranges = self.chunk_ranges()
        order = torch.randperm(len(ranges), generator=_generator(self.cfg.seed, epoch))
        visited = [ranges[i] for i in order.tolist()]
        k = self.cfg.shuffle_chunks
        return [visited[i : i + k] for i in range(0, len(visited), k)]

    def train_batches(self, epoch: int, start_batch: int = 0) -> Iterator[torch.Tensor]:
        """The epoch's batches from `start_batch` on.  → [B, C] float32 on device"""
        with closing(prefetched(self._pinned(self._cpu_batches(epoch, start_batch)), self.cfg.prefetch)) as batches:
            for (batch,) in batches:
                yield self._to_device(batch)

    def train_batches_with_ids(self, epoch: int, start_batch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """As `train_batches`, with each row's token id and position.  → ([B, C] float32, [B, 2] int64) on device"""
        batches = self._pinned(self._cpu_batches(epoch, start_batch, with_ids=True))
        with closing(prefetched(batches, self.cfg.prefetch)) as queued:
            for batch, ids in queued:
                yield self._to_device(batch), ids.to(self.device, non_blocking=True)

    def _pinned(self, batches: Iterator[tuple[torch.Tensor, ...]]) -> Iterator[tuple[torch.Tensor, ...]]:
        """For a CUDA device, the batches in page-locked memory, pinned in the prefetch thread, so
        the copies to the GPU are asynchronous and the training thread never waits for them."""
        if self.device.type != "cuda":
            return batches
        return (tuple(t.pin_memory() for t in batch) for batch in batches)

    def eval_batches(self) -> Iterator[torch.Tensor]:
        """The held-out rows in store order, in batches of batch_size (the last may be short):
        ceil(n_eval / batch_size) of them.  → [B, C] float32 on device"""
        for rows, _ in self._held_out(with_ids=False):
            yield self._to_device(rows)

    def eval_batches_with_ids(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """As `eval_batches`, with each row's token id and position.  → ([B, C] float32, [B, 2] int64) on device"""
        for rows, ids in self._held_out(with_ids=True):
            yield self._to_device(rows), ids.to(self.device)

    def _held_out(self, with_ids: bool) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """Held-out rows (and ids) read a batch's worth of store rows at a time from the tail, cut
        into whole batches with leftovers carried over."""
        size = self.cfg.batch_size
        pending: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        n_pending = 0
        for start in range(self.tail_start, self.store.n_rows, size):
            stop = min(start + size, self.store.n_rows)
            rows, keep = self._rows(start, stop, held_out=True)
            rows = rows if keep is None else rows[keep]
            if not len(rows):
                continue
            pending.append((rows, self.read_token_ids(start, stop, held_out=True) if with_ids else None))
            n_pending += len(rows)
            while n_pending >= size:
                rows, ids = _merge(pending)
                yield rows[:size], None if ids is None else ids[:size]
                pending, n_pending = [(rows[size:], None if ids is None else ids[size:])], n_pending - size
        if n_pending:
            yield _merge(pending)

    def blocks(self, held_out: bool) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The held-out (or the training) rows a store block at a time, in store order, with each
        row's token id, position and sequence (a block holds whole sequences, so each block's
        rows complete its sequences; memory: one block).  → ([n, C] float32 on device, [n, 3] int64)"""
        size = self.store.block_rows
        for start in range(self.tail_start if held_out else 0, self.store.n_rows, size):
            stop = min(start + size, self.store.n_rows)
            rows, keep = self._rows(start, stop, held_out=held_out)
            rows = rows if keep is None else rows[keep]
            if not len(rows):
                continue
            sequence = torch.from_numpy(self.store.read_column("sequence", start, stop).astype(np.int64))
            ids = torch.cat([self.read_token_ids(start, stop, held_out), (sequence if keep is None else sequence[keep])
                             .unsqueeze(1)], dim=1)
            yield self._to_device(rows), ids

    def sample_mean(self, n_rows: int = 32_768) -> torch.Tensor:
        """Mean of the first `n_rows` training rows, normalised (rows are pre-shuffled on disk, so
        these are a random sample of the first block).  → [C] float32 on device"""
        return self.sample(n_rows).mean(0)

    def sample(self, n_rows: int) -> torch.Tensor:
        """The first `n_rows` training rows, normalised (a random sample: rows are pre-shuffled).  → [≤ n_rows, C]"""
        parts, n = [], 0
        for a, b in self.chunk_ranges():
            if n >= n_rows:
                break
            rows = self.read_training_rows(a, b)
            parts.append(rows[: n_rows - n])
            n += len(parts[-1])
        return self._to_device(torch.cat(parts))

    def pool(self, n_rows: int, step: int) -> torch.Tensor:
        """Up to `n_rows` training rows from chunks in a random order seeded by (seed, step),
        normalised: the inputs dead latents are resampled from.  → [≤ n_rows, C] on device"""
        ranges = self.chunk_ranges()
        order = torch.randperm(len(ranges), generator=_generator(self.cfg.seed, 7, step)).tolist()
        parts, n = [], 0
        for i in order:
            if n >= n_rows:
                break
            rows = self.read_training_rows(*ranges[i])[: n_rows - n]
            parts.append(rows)
            n += len(rows)
        return self._to_device(torch.cat(parts))

    def _to_device(self, batch: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda" and not batch.is_pinned():
            batch = batch.pin_memory()
        x = batch.to(self.device, non_blocking=True).float()
        return x.div_(self._divisor) if isinstance(self._divisor, torch.Tensor) or self._divisor != 1.0 else x

    def _cpu_batches(self, epoch: int, start_batch: int, with_ids: bool = False) -> Iterator[tuple[torch.Tensor, ...]]:
        """Batches in the storage dtype (and their rows' token ids and positions), cut from the
        shuffled groups with leftovers carried over."""
        size = self.cfg.batch_size
        skip = start_batch * size  # rows of this epoch already consumed
        pending: list[tuple[torch.Tensor, ...]] = []
        n_pending = 0
        for g, group in enumerate(self.epoch_groups(epoch)):
            group_rows = sum(self.n_training_rows(a, b) for a, b in group)
            if skip >= group_rows:  # resume: this whole group was consumed before
                skip -= group_rows
                continue
            parts = [torch.cat([self.read_training_rows(a, b) for a, b in group])]
            if with_ids:
                parts.append(torch.cat([self.read_token_ids(a, b) for a, b in group]))
            order = torch.randperm(len(parts[0]), generator=_generator(self.cfg.seed, epoch, g + 1))
            pending.append(tuple(part[order][skip:] for part in parts))
            n_pending += len(parts[0]) - skip
            skip = 0
            while n_pending >= size:
                merged = tuple(torch.cat(p) for p in zip(*pending)) if len(pending) > 1 else pending[0]
                yield tuple(m[:size] for m in merged)
                pending, n_pending = [tuple(m[size:] for m in merged)], n_pending - size
        if n_pending:
            yield tuple(torch.cat(p) for p in zip(*pending))


def _merge(parts: list[tuple[torch.Tensor, torch.Tensor | None]]) -> tuple[torch.Tensor, torch.Tensor | None]:
    rows = torch.cat([r for r, _ in parts]) if len(parts) > 1 else parts[0][0]
    if parts[0][1] is None:
        return rows, None
    return rows, torch.cat([i for _, i in parts]) if len(parts) > 1 else parts[0][1]


def _generator(*seeds: int) -> torch.Generator:
    """A generator seeded by a tuple (seed, epoch[, group]), stable across runs and platforms."""
    value = 0
    for s in seeds:
        value = (value * 1_000_003 + int(s)) % (2**63 - 1)
    return torch.Generator().manual_seed(value)
