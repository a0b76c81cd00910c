"""Stage 2 input: stream batches of one source, or of several side by side, from a store onto
the training device. Several sources (a crosscoder's layers × models) come as one row of their
concatenation [x_1 … x_S], each normalised by its own factor; rows are aligned in the store.

Held out: every row of the last sequences cached, about `eval_rows` rows of whole sequences, so
evaluation can re-run the model on sequences no dictionary saw a token of. Blocks hold
contiguous ranges of sequences, so the held-out rows all lie in the store's tail (the last
block or few), where training reads filter them out by their sequence id. Per epoch:
  * the training chunks are visited in a random order (seeded by (seed, epoch));
  * `shuffle_chunks` chunks at a time are loaded, concatenated and permuted together;
  * consecutive batches of `batch_size` rows are cut from that stream, carrying leftovers across
    groups, so every training row is seen exactly once per epoch (the last batch may be short).
A background thread reads and shuffles ahead (`prefetch` batches queued); the main thread moves
each batch to the device and casts it to float32 once, dividing by the store's normalisation
factor. The stream is deterministic given (seed, epoch), so `start_batch` resumes mid-epoch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import torch

from cache.background import prefetched
from cache.store import ActivationStore, StoreError


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

    def __post_init__(self):
        if self.batch_size < 1 or self.shuffle_chunks < 1 or self.prefetch < 1 or self.eval_rows < 0:
            raise ValueError("batch_size, shuffle_chunks and prefetch must be positive, eval_rows ≥ 0")


class ActivationStream:
    """Batches of one or several sources of a complete store, normalised, on `device`."""

    def __init__(self, store: ActivationStore, source: str | list[str], cfg: StreamConfig,
                 device: str | torch.device = "cpu"):
        infos = [store.source(name) for name in ([source] if isinstance(source, str) else source)]
        widths = {info.name: info.d for info in infos}
        if len(set(widths.values())) > 1:
            raise StoreError(f"sources read together must have one width; got {widths} "
                             "(a crosscoder needs equal d_model: cache pairs with --require_equal_widths)")
        self.store = store
        self.sources = [info.name for info in infos]
        self.source = self.sources[0] if len(infos) == 1 else ",".join(self.sources)
        self.d = infos[0].d  # width of each source
        self.cfg = cfg
        self.device = torch.device(device)
        self.scales = [store.norm_scale(name) if cfg.normalise else 1.0 for name in self.sources]
        self.scale = self.scales[0]  # the factor of a single source
        # what a row is divided by: one factor, or one per column of the concatenated sources
        self._divisor = (self.scale if len(self.scales) == 1
                         else torch.tensor(self.scales, device=self.device).repeat_interleave(self.d))
        rows_per_seq = store.n_rows // store.attrs["n_sequences"]
        n_eval_seqs = math.ceil(min(cfg.eval_rows, store.n_rows // 10) / rows_per_seq)
        self.eval_sequence_start = store.attrs["n_sequences"] - n_eval_seqs  # sequences ≥ this are held out
        # first row of the block holding that sequence: rows before it are all training rows
        seqs_per_block = store.block_rows // rows_per_seq
        self.tail_start = min(self.eval_sequence_start // seqs_per_block * store.block_rows, store.n_rows)
        self._tail_in_eval = store.read_column("sequence", self.tail_start) >= self.eval_sequence_start  # [N - tail_start]
        self.n_eval = int(self._tail_in_eval.sum())
        self.n_train = store.n_rows - self.n_eval
        if self.n_train < 1:
            raise StoreError(f"store {store.path} has too few rows ({store.n_rows}) to train on")

    @property
    def batches_per_epoch(self) -> int:
        return math.ceil(self.n_train / self.cfg.batch_size)

    def chunk_ranges(self) -> list[tuple[int, int]]:
        """Row range [start, stop) of every stored chunk (those in the tail also hold held-out rows)."""
        size = self.store.chunk_rows
        return [(a, min(a + size, self.store.n_rows)) for a in range(0, self.store.n_rows, size)]

    def read_training_rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) without the held-out ones, in store order.  → [≤ stop-start, S·D]"""
        return self._read_filtered(start, stop, held_out=False)

    def n_training_rows(self, start: int, stop: int) -> int:
        """How many of rows [start, stop) are training rows (no read needed)."""
        if stop <= self.tail_start:
            return stop - start
        lo = max(start, self.tail_start) - self.tail_start
        return stop - start - int(self._tail_in_eval[lo : stop - self.tail_start].sum())

    def _read_filtered(self, start: int, stop: int, held_out: bool) -> torch.Tensor:
        parts = [self.store.read_rows(name, start, stop) for name in self.sources]
        rows = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
        if stop <= self.tail_start:
            return rows if not held_out else rows[:0]
        in_eval = torch.zeros(stop - start, dtype=torch.bool)
        lo = max(start, self.tail_start)
        in_eval[lo - start :] = torch.from_numpy(self._tail_in_eval[lo - self.tail_start : stop - self.tail_start])
        return rows[in_eval if held_out else ~in_eval]

    def epoch_groups(self, epoch: int) -> list[list[tuple[int, int]]]:
        """This epoch's chunk ranges in visiting order, grouped `shuffle_chunks` at a time."""
        ranges = self.chunk_ranges()
        order = torch.randperm(len(ranges), generator=_generator(self.cfg.seed, epoch))
        visited = [ranges[i] for i in order.tolist()]
        k = self.cfg.shuffle_chunks
        return [visited[i : i + k] for i in range(0, len(visited), k)]

    def train_batches(self, epoch: int, start_batch: int = 0) -> Iterator[torch.Tensor]:
        """The epoch's batches from `start_batch` on.  → [B, D] float32 on device"""
        for batch in prefetched(self._cpu_batches(epoch, start_batch), self.cfg.prefetch):
            yield self._to_device(batch)

    def eval_batches(self) -> Iterator[torch.Tensor]:
        """The held-out rows in store order, in batches of at most batch_size.  → [B, D] float32 on device"""
        size = self.cfg.batch_size
        for start in range(self.tail_start, self.store.n_rows, size):
            rows = self._read_filtered(start, min(start + size, self.store.n_rows), held_out=True)
            if len(rows):
                yield self._to_device(rows)

    def sample_mean(self, n_rows: int = 32_768) -> torch.Tensor:
        """Mean of the first `n_rows` training rows, normalised (rows are pre-shuffled on disk, so
        these are a random sample of the first block).  → [D] float32 on device"""
        rows = self.read_training_rows(0, min(n_rows, self.store.n_rows))
        return self._to_device(rows).mean(0)

    def _to_device(self, batch: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":
            batch = batch.pin_memory()
        x = batch.to(self.device, non_blocking=True).float()
        return x.div_(self._divisor) if isinstance(self._divisor, torch.Tensor) or self._divisor != 1.0 else x

    def _cpu_batches(self, epoch: int, start_batch: int) -> Iterator[torch.Tensor]:
        """Batches in the storage dtype, cut from the shuffled groups with leftovers carried over."""
        size = self.cfg.batch_size
        skip = start_batch * size  # rows of this epoch already consumed
        pending: list[torch.Tensor] = []
        n_pending = 0
        for g, group in enumerate(self.epoch_groups(epoch)):
            group_rows = sum(self.n_training_rows(a, b) for a, b in group)
            if skip >= group_rows:  # resume: this whole group was consumed before
                skip -= group_rows
                continue
            rows = torch.cat([self.read_training_rows(a, b) for a, b in group])
            rows = rows[torch.randperm(len(rows), generator=_generator(self.cfg.seed, epoch, g + 1))]
            rows, skip = rows[skip:], 0
            pending.append(rows)
            n_pending += len(rows)
            while n_pending >= size:
                merged = torch.cat(pending) if len(pending) > 1 else pending[0]
                yield merged[:size]
                pending, n_pending = [merged[size:]], n_pending - size
        if n_pending:
            yield torch.cat(pending)


def _generator(*seeds: int) -> torch.Generator:
    """A generator seeded by a tuple (seed, epoch[, group]), stable across runs and platforms."""
    value = 0
    for s in seeds:
        value = (value * 1_000_003 + int(s)) % (2**63 - 1)
    return torch.Generator().manual_seed(value)
