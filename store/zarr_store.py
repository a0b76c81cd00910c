"""The activation store: the on-disk contract between stage 1 (cache) and stage 2 (sweep).

The only module that knows zarr; chunk files are read and listed through fsspec, so the same
code serves local directories and object stores. Layout of `store.zarr/`:

    attrs                         format, version, identity config, sources, sizes, progress,
                                  `complete`, per-source normalisation sums, model/tokenizer info
    tokens      int32 [N]         token id of each row
    positions   int32 [N]         position of the row's token in its sequence
    sequence    int32 [N]         index of the row's sequence in `sequences`
    sequences   int32 [S, ctx]    every token sequence that was run (lets evaluation re-run the model)
    acts/<source>  f16|f32|u16 [N, d]   one array per source; bf16 is stored as its raw uint16 bits
                                  (uncompressed: a chunk file is its rows' raw little-endian bytes)
    manifest.json                 byte size and crc32c of every chunk file (format 2; store/integrity.py)

All row arrays share one row order. Rows are written a block (many whole chunks; sequences'
chunks aligned with the rows') at a time, already shuffled. A block is done when its record
`manifest.blocks/<block>.json` is written, after its data: its chunks' sizes and checksums, its
row and sequence counts and its norm sums. Blocks are independent, so several processes can write
disjoint blocks of one store (torchrun) and a rerun redoes exactly the blocks without a record.
`complete` is set only after every block has a record and the merged manifest is written, so a
reader never mistakes a half-written store for a finished one. Reads of activation chunks check
the chunk's size, checksum and values (no NaN/inf) and name the file when one is wrong. A store
lives in a local directory or at any fsspec URL (runtime/location.py).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

from runtime.location import Location, location
from store import integrity
from store.errors import StoreError
from store.hooks import hook_kind

FORMAT_NAME = "sae-sweep-activations"
FORMAT_VERSION = 2  # 2: manifest.json with every chunk's size and checksum
ROW_ARRAYS = ("tokens", "positions", "sequence")

STORAGE_DTYPES = ("float16", "bfloat16", "float32")
_NUMPY_DTYPE = {"float16": np.float16, "bfloat16": np.uint16, "float32": np.float32}
STORAGE_TORCH_DTYPE = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# Largest finite magnitude of each storage dtype: a value above it would be stored as inf.
STORAGE_MAX = {"float16": 65504.0, "bfloat16": 3.3895e38, "float32": 3.4028e38}
NO_TOKEN = -1  # the token id of a row whose token is not known (store/write.py without tokens)
# How stores written before each model's loading was recorded (info["models"][i]["loaded_with"])
# loaded their models: TransformerLens's from_pretrained with its default weight processing.
LEGACY_LOADING = {"model_class_name": "HookedTransformer",
                  "model_from_pretrained_kwargs": {"fold_ln": True, "center_writing_weights": True, "center_unembed": True,
                                                   "fold_value_biases": True, "refactor_factored_attn_matrices": False}}


@dataclass(frozen=True)
class SourceInfo:
    """One activation source: a hook of one model."""

    name: str  # array name under acts/, e.g. "blocks.2.hook_resid_post" or "base/blocks.6.hook_resid_post"
    model: str  # the model's name as loaded
    hook: str  # full TransformerLens hook name
    d: int  # activation width
    layer: int | None = None  # the block it belongs to (None: not inside a block)
    kind: str | None = None  # its kind (store.hooks.HOOK_KINDS), e.g. mlp_in_normalized; None if other


def to_storage(acts: torch.Tensor, dtype: str) -> np.ndarray:
    """Cast activations to the storage dtype as a numpy array (bf16 as raw uint16 bits)."""
    cast = acts.detach().to(device="cpu", dtype=STORAGE_TORCH_DTYPE[dtype])
    if dtype == "bfloat16":
        return cast.view(torch.int16).numpy().view(np.uint16)
    return cast.numpy()


def from_storage(values: np.ndarray, dtype: str) -> torch.Tensor:
    """Inverse of `to_storage`: a torch tensor in the storage dtype (no copy where possible)."""
    if dtype == "bfloat16":
        return torch.from_numpy(values.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(values)


@dataclass(frozen=True)
class RowBlock:
    """One block of rows in their shuffled on-disk order, ready to append."""

    tokens: np.ndarray  # [R] int32
    positions: np.ndarray  # [R] int32
    sequence: np.ndarray  # [R] int32, index into `sequences` of the whole store
    acts: dict[str, np.ndarray]  # source -> [R, d] in the storage dtype
    norm_sums: dict[str, tuple[float, float, int]]  # source -> (Σ‖x‖, Σ‖x‖², rows) before the storage cast
    sequences: np.ndarray  # [S_block, ctx] int32, the token sequences this block ran


def shuffled_block(*, seed: int, index: int, seq_start: int, sequences_SC: np.ndarray, first_pos: int,
                   acts: dict[str, torch.Tensor], norm_sums: dict[str, tuple[float, float, int]], dtype: str) -> RowBlock:
    """Block `index`'s rows in their on-disk order: permuted by a generator seeded by (seed, index),
    whatever wrote them. `sequences_SC`: the block's token sequences, starting at sequence
    `seq_start` of the store; `acts`: each source's rows sequence-major, positions `first_pos`… of
    each sequence ([S·(C − first_pos), d], storage torch dtype)."""
    n_seqs, ctx = sequences_SC.shape
    rows_per_seq = ctx - first_pos
    perm = np.random.default_rng([seed, index]).permutation(n_seqs * rows_per_seq)
    positions = np.broadcast_to(np.arange(first_pos, ctx, dtype=np.int32), (n_seqs, rows_per_seq))
    seq_ids = np.broadcast_to(np.arange(seq_start, seq_start + n_seqs, dtype=np.int32)[:, None], (n_seqs, rows_per_seq))
    return RowBlock(
        tokens=sequences_SC[:, first_pos:].reshape(-1)[perm].astype(np.int32),
        positions=positions.reshape(-1)[perm],
        sequence=seq_ids.reshape(-1)[perm],
        acts={name: to_storage(values[torch.from_numpy(perm)], dtype) for name, values in acts.items()},
        norm_sums=norm_sums,
        sequences=sequences_SC.astype(np.int32),
    )


def norm_sums(values: torch.Tensor) -> np.ndarray:
    """(Σ‖x‖, Σ‖x‖², rows) of rows [n, d], in float64: what a block records of each source, summed
    into the store's normalisation statistic (measured before the storage cast)."""
    norms = torch.linalg.vector_norm(values, dim=1, dtype=torch.float64)
    return np.array([norms.sum().item(), norms.square().sum().item(), len(norms)])


def value_fault(values: torch.Tensor, dtype: str) -> str | None:
    """What makes `values` unstorable in `dtype` (non-finite, or beyond its range), or None."""
    peak = values.abs().amax().item()  # NaN and inf propagate through the max: one pass checks both
    if not math.isfinite(peak):
        return "non-finite values (NaN/inf)"
    if peak > STORAGE_MAX[dtype]:
        return f"values reach {peak:.3g}, beyond the {dtype} maximum {STORAGE_MAX[dtype]:.3g}"
    return None


class ActivationStore:
    """Open zarr activation store. Create with `create`, open with `open`."""

    def __init__(self, where: Location, group: zarr.Group):
        self.location = where
        self.path = where.url  # for messages and records: an absolute path, or the URL
        self.group = group
        self._fs, self._root = where.filesystem()
        self._read_fs, self._read_root = where.filesystem(cached=True)  # chunk reads, through the local cache if any
        self._manifest: dict[str, tuple[int, int]] | None = None
        self._verified: set[str] = set()  # int-array chunks already checked in this process
        self._last_chunk: dict[str, tuple[int, torch.Tensor]] = {}  # source → (chunk, rows): eval reads within a chunk

    # ---------------------------------------------------------------- creation / opening
    @classmethod
    def create(
        cls,
        path: str | Path | Location,
        *,
        identity: dict[str, Any],
        sources: list[SourceInfo],
        n_rows: int,
        n_sequences: int,
        context_length: int,
        chunk_rows: int,
        block_rows: int,
        storage_dtype: str,
        info: dict[str, Any],
    ) -> "ActivationStore":
        """Create an empty store (any existing one at `path` is replaced). Every sequence has
        `n_rows // n_sequences` rows; the sequences array is chunked by the sequences of one row
        chunk, so a block's sequences fill whole chunks as its rows do."""
        where = path if isinstance(path, Location) else location(path)
        group = where.open_group("w")
        row_chunks = (chunk_rows,)
        for name in ROW_ARRAYS:
            group.create_array(name, shape=(n_rows,), chunks=row_chunks, dtype=np.int32)
        seqs_per_chunk = max(1, chunk_rows // max(1, n_rows // max(1, n_sequences)))
        group.create_array("sequences", shape=(n_sequences, context_length), chunks=(seqs_per_chunk, context_length),
                           dtype=np.int32)
        for src in sources:
            group.create_array(
                f"acts/{src.name}",
                shape=(n_rows, src.d),
                chunks=(chunk_rows, src.d),
                dtype=_NUMPY_DTYPE[storage_dtype],
                compressors=None,  # activations barely compress; raw chunks read fastest
            )
        group.attrs.update(
            {
                "format": FORMAT_NAME,
                "format_version": FORMAT_VERSION,
                "identity": json_normal(identity),
                "sources": [src.__dict__ for src in sources],
                "storage_dtype": storage_dtype,
                "n_rows": n_rows,
                "n_sequences": n_sequences,
                "context_length": context_length,
                "chunk_rows": chunk_rows,
                "block_rows": block_rows,
                "rows_written": 0,  # rows and sequences summed from the block records at completion
                "sequences_written": 0,
                "complete": False,
                "norm_sums": {src.name: {"sum_norm": 0.0, "sum_sq_norm": 0.0, "count": 0} for src in sources},
                "info": json_normal(info),
            }
        )
        return cls(where, group)

    @classmethod
    def open(cls, path: str | Path | Location, *, writable: bool = False, allow_incomplete: bool = False) -> "ActivationStore":
        """Open an existing store; refuse an incomplete one unless `allow_incomplete`."""
        where = path if isinstance(path, Location) else location(path)
        if not where.holds_store():
            raise StoreError(f"no activation store at {where.url}: create one with generate_activations.py --out {where.url}")
        path = where.url
        group = where.open_group("r+" if writable else "r")
        if group.attrs.get("format") != FORMAT_NAME:
            raise StoreError(f"{path} is a zarr store but not a {FORMAT_NAME} store")
        if group.attrs["format_version"] > FORMAT_VERSION:
            raise StoreError(f"{path} has format version {group.attrs['format_version']}; upgrade sae-sweep to read it")
        store = cls(where, group)
        if not allow_incomplete and not store.complete:
            raise StoreError(
                f"store {path} is incomplete ({store.rows_written:,} of {store.n_rows:,} rows): "
                "rerun the same generate_activations.py command to finish it"
            )
        missing = [name for name in store.array_names() if name not in group]
        if missing and store.complete:
            raise StoreError(f"store {path} is marked complete but lacks the array {missing[0]}: "
                             f"it is damaged; {integrity.REGENERATE}")
        return store

    # ---------------------------------------------------------------- metadata
    @property
    def attrs(self) -> dict[str, Any]:
        return dict(self.group.attrs)

    @property
    def identity(self) -> dict[str, Any]:
        return self.group.attrs["identity"]

    @property
    def sources(self) -> list[SourceInfo]:
        out = []  # stores written before layer/kind were recorded: derived from the hook name
        for s in self.group.attrs["sources"]:
            layer, kind = hook_kind(s["hook"])
            out.append(SourceInfo(**{"layer": layer, "kind": kind, **s}))
        return out

    def source(self, name: str) -> SourceInfo:
        for src in self.sources:
            if src.name == name:
                return src
        names = ", ".join(s.name for s in self.sources)
        raise StoreError(f"source {name!r} is not in store {self.path}; it holds: {names}")

    @property
    def storage_dtype(self) -> str:
        return self.group.attrs["storage_dtype"]

    @property
    def n_rows(self) -> int:
        return self.group.attrs["n_rows"]

    @property
    def chunk_rows(self) -> int:
        return self.group.attrs["chunk_rows"]

    @property
    def block_rows(self) -> int:
        return self.group.attrs["block_rows"]

    @property
    def n_chunks(self) -> int:
        return math.ceil(self.n_rows / self.chunk_rows)

    @property
    def rows_written(self) -> int:
        """Rows in blocks that are done (a complete store: all of them)."""
        if self.complete:
            return self.n_rows
        return self.group.attrs["rows_written"] + sum(r["rows"] for r in self.block_records().values())

    @property
    def sequences_written(self) -> int:
        if self.complete:
            return self.group.attrs["n_sequences"]
        return self.group.attrs["sequences_written"] + sum(r["sequences"] for r in self.block_records().values())

    @property
    def n_blocks(self) -> int:
        """Blocks the store was planned with."""
        return math.ceil(self.group.attrs["n_sequences"] / self.seqs_per_block)

    @property
    def seqs_per_block(self) -> int:
        return self.block_rows // max(1, self.n_rows // max(1, self.group.attrs["n_sequences"]))

    def block_records(self) -> dict[int, dict]:
        """Block → its record (rows, sequences, norm sums, chunk checksums), for the blocks done."""
        records = {}
        for key in self.file_sizes(integrity.BLOCK_MANIFESTS):
            record = json.loads(self.read_file(key))
            if "rows" in record:  # not the checksums-only file of a block a store before records wrote
                records[int(key.rsplit("/", 1)[1].split(".")[0])] = record
        return records

    def blocks_done(self) -> set[int]:
        """Blocks that need no writing: those with a record, and those a store written before
        block records counted as written (its `rows_written` prefix)."""
        legacy = self.group.attrs["rows_written"] // self.block_rows
        return set(range(legacy)) | set(self.block_records())

    @property
    def complete(self) -> bool:
        return bool(self.group.attrs["complete"])

    @property
    def info(self) -> dict[str, Any]:
        return self.group.attrs["info"]

    def loaded_with(self, source: str) -> dict[str, Any]:
        """How to load the model that `source` came from so that it computes the stored values:
        {"model_class_name", "model_from_pretrained_kwargs"} as SAELens's load_model takes them
        (the weight processing, dtype and BOS default the cache ran with)."""
        model = self.model_entry(source)
        if "loaded_with" in model:
            return model["loaded_with"]
        kwargs = {**LEGACY_LOADING["model_from_pretrained_kwargs"], "dtype": self.identity.get("model_dtype", "float32"),
                  "default_prepend_bos": self.info["prepend_bos"]}
        return {**LEGACY_LOADING, "model_from_pretrained_kwargs": kwargs}

    def model_entry(self, source: str) -> dict[str, Any]:
        """The info["models"] entry of the model that wrote `source` (by its label: chat/… of a
        pair is the second model's); a store of one model has one entry, whatever the name."""
        label = source.split("/", 1)[0] if "/" in source else None
        models = self.info["models"]
        found = [m for m in models if m["label"] == label]
        if found:
            return found[0]
        if len(models) == 1:
            return models[0]
        raise StoreError(f"store {self.path} does not record the model of {source}")

    @property
    def model_recorded(self) -> bool:
        """Whether the store names a model that evaluation can load and run again on its
        sequences (generate_activations.py's stores; not write_store's)."""
        entry = self.info["models"][0]
        return bool(entry.get("model") or entry.get("model_path"))

    @property
    def tokens_recorded(self) -> bool:
        """Whether each row's token id is known (write_store without tokens records none)."""
        return self.info.get("has_tokens", True)

    def norm_scale(self, source: str) -> float:
        """Normalisation factor s = E‖x‖ / √d over every stored row of `source`."""
        sums = self.group.attrs["norm_sums"][source]
        if sums["count"] == 0:
            raise StoreError(f"store {self.path} has no rows of {source} yet")
        return sums["sum_norm"] / sums["count"] / math.sqrt(self.source(source).d)

    def array_names(self) -> list[str]:
        return [*ROW_ARRAYS, "sequences", *(f"acts/{s.name}" for s in self.sources)]

    # ---------------------------------------------------------------- chunk files
    def chunk_keys(self, array: str, first: int = 0, stop: int | None = None) -> list[str]:
        """Store keys of the chunk files of `array` whose first index lies in chunks [first, stop)."""
        arr = self.group[array]
        grid = arr.cdata_shape
        rows = range(first, grid[0] if stop is None else min(stop, grid[0]))
        rest = [(0,) * (len(grid) - 1)]
        return [f"{array}/{arr.metadata.encode_chunk_key((i, *tail))}" for i in rows for tail in rest]

    def read_file(self, key: str, cached: bool = False) -> bytes:
        """A file's bytes (`cached`: through the read-through cache, for chunk data)."""
        fs, root = (self._read_fs, self._read_root) if cached else (self._fs, self._root)
        try:
            return fs.cat_file(f"{root}/{key}")
        except FileNotFoundError:
            raise StoreError(integrity.damage(self.path, key, "is missing")) from None

    def write_file(self, key: str, data: bytes) -> None:
        path = f"{self._root}/{key}"
        try:
            self._fs.pipe_file(path, data)
        except FileNotFoundError:  # a local directory that does not exist yet (object stores have none)
            self._fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
            self._fs.pipe_file(path, data)

    def remove_files(self, prefix: str) -> None:
        if self._fs.exists(f"{self._root}/{prefix}"):
            self._fs.rm(f"{self._root}/{prefix}", recursive=True)

    def remove(self) -> None:
        """Delete the whole store."""
        self._fs.rm(self._root, recursive=True)

    def file_sizes(self, prefix: str) -> dict[str, int]:
        """Store key → byte size of every file under `prefix` (one listing)."""
        base = f"{self._root}/{prefix}"
        if not self._fs.exists(base):
            return {}
        start = len(self._root.rstrip("/")) + 1
        return {path[start:]: info["size"] for path, info in self._fs.find(base, detail=True).items()}

    def check_files(self, arrays: list[str]) -> None:
        """Presence and size of every chunk file of `arrays` (cheap: one listing per array)."""
        integrity.check_files(self, arrays)

    def verify(self, progress: bool = True) -> list[str]:
        """Every problem of every chunk file (presence, size, checksum, finite activations)."""
        return integrity.verify(self, progress)

    @property
    def manifest(self) -> dict[str, tuple[int, int]] | None:
        """Chunk key → (byte size, crc32c), or None for a store written before checksums (format 1)."""
        if self._manifest is None and self.group.attrs["format_version"] >= 2 and self.complete:
            self._manifest = integrity.read_manifest(self)
        return self._manifest

    # ---------------------------------------------------------------- writing
    def write_block(self, index: int, block: "RowBlock | None") -> None:
        """Write block `index` (its rows and sequences at their places), checksum its chunk files,
        then write its record: the block is done. `None`: the text ran out before this block (an
        empty record, so the store knows where it ends).

        Data first, record last: a crash between the two leaves no record, and the block is
        simply rewritten on resume. Blocks touch disjoint chunks, so processes may write
        different blocks at once."""
        if block is None:
            self._record(index, None, 0, 0)
            return
        row_start = index * self.block_rows
        row_end = row_start + len(block.tokens)
        seq_start = index * self.seqs_per_block
        self._writable("tokens")[row_start:row_end] = block.tokens
        self._writable("positions")[row_start:row_end] = block.positions
        self._writable("sequence")[row_start:row_end] = block.sequence
        self._writable("sequences")[seq_start : seq_start + len(block.sequences)] = block.sequences
        for name, values in block.acts.items():
            self._writable(f"acts/{name}")[row_start:row_end] = values
        self._record(index, block, row_end - row_start, len(block.sequences))

    def _record(self, index: int, block: "RowBlock | None", rows: int, sequences: int) -> None:
        chunks = integrity.block_checksums(self, (index * self.block_rows, index * self.block_rows + rows),
                                           (index * self.seqs_per_block, index * self.seqs_per_block + sequences))
        norm_sums = {name: list(sums) for name, sums in (block.norm_sums.items() if block else ())}
        record = {"rows": rows, "sequences": sequences, "norm_sums": norm_sums, "chunks": chunks}
        self.write_file(f"{integrity.BLOCK_MANIFESTS}/{index:06d}.json", json.dumps(record).encode())

    def grow(self, n_sequences: int) -> None:
        """Plan `n_sequences` sequences (more blocks) for a writer that learns its length as it goes
        (store/write.py); `finish` trims what stays unwritten."""
        rows_per_seq = self.n_rows // self.group.attrs["n_sequences"]
        if n_sequences <= self.group.attrs["n_sequences"]:
            return
        n_rows = n_sequences * rows_per_seq
        for name in ROW_ARRAYS:
            self.group[name].resize((n_rows,))
        for src in self.sources:
            self.group[f"acts/{src.name}"].resize((n_rows, src.d))
        self.group["sequences"].resize((n_sequences, self.group.attrs["context_length"]))
        self.group.attrs.update({"n_rows": n_rows, "n_sequences": n_sequences})

    def _writable(self, array: str) -> zarr.Array:
        """`array` writing every chunk, even one of fill values: a missing chunk file is then damage."""
        return self.group[array].with_config({"write_empty_chunks": True})

    def missing_blocks(self) -> list[int]:
        """Planned blocks with no record (none: every block is written, or the text ran out)."""
        done = self.blocks_done()
        return [b for b in range(self.n_blocks) if b not in done]

    def finish(self) -> None:
        """Once every block is done: sum the blocks' norm sums (in block order, so the result does
        not depend on which process wrote what), trim the arrays to the rows written, write the
        manifest, mark the store complete."""
        missing = self.missing_blocks()
        if missing:
            raise StoreError(f"store {self.path} lacks blocks {missing[:5]}{'…' if len(missing) > 5 else ''}: "
                             "rerun the same generate_activations.py command to write them")
        records = self.block_records()
        totals = self.group.attrs["norm_sums"]  # a store written before block records keeps its prefix's sums here
        for index in sorted(records):
            for name, (s, s2, n) in records[index]["norm_sums"].items():
                t = totals[name]
                totals[name] = {"sum_norm": t["sum_norm"] + s, "sum_sq_norm": t["sum_sq_norm"] + s2, "count": t["count"] + n}
        rows = self.group.attrs["rows_written"] + sum(r["rows"] for r in records.values())
        seqs = self.group.attrs["sequences_written"] + sum(r["sequences"] for r in records.values())
        self.group.attrs.update({"norm_sums": totals, "rows_written": rows, "sequences_written": seqs})
        if rows < self.n_rows:
            for name in ROW_ARRAYS:
                self.group[name].resize((rows,))
            for src in self.sources:
                self.group[f"acts/{src.name}"].resize((rows, src.d))
            self.group["sequences"].resize((seqs, self.group.attrs["context_length"]))
        scales = {src.name: self.norm_scale(src.name) for src in self.sources}
        self.group.attrs.update({"n_rows": rows, "n_sequences": seqs, "norm_scale": scales})
        integrity.write_manifest(self, records)
        self.group.attrs.update({"complete": True})

    # ---------------------------------------------------------------- reading
    def read_rows(self, source: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of `source` as a CPU tensor in the storage dtype, assembled from
        checked chunks (size, checksum, finite values).  # [stop-start, d]"""
        size = self.chunk_rows
        parts = []
        for chunk in range(start // size, -(-stop // size)):
            rows = self.read_chunk(source, chunk)
            parts.append(rows[max(start - chunk * size, 0): stop - chunk * size])
        return parts[0] if len(parts) == 1 else torch.cat(parts) if parts else self.empty_rows(self.source(source).d)

    def empty_rows(self, width: int) -> torch.Tensor:
        """No rows, in the storage dtype.  → [0, width]"""
        return from_storage(np.empty((0, width), dtype=_NUMPY_DTYPE[self.storage_dtype]), self.storage_dtype)

    def read_chunk(self, source: str, chunk: int) -> torch.Tensor:
        """One stored chunk of `source`, checked.  # [chunk_rows (or fewer for the last), d]"""
        cached = self._last_chunk.get(source)
        if cached is not None and cached[0] == chunk:
            return cached[1]
        (key,) = self.chunk_keys(f"acts/{source}", chunk, chunk + 1)
        data = integrity.checked_bytes(self, key)
        d, n = self.source(source).d, min(self.chunk_rows, self.n_rows - chunk * self.chunk_rows)
        values = np.frombuffer(bytearray(data), dtype=np.dtype(_NUMPY_DTYPE[self.storage_dtype]).newbyteorder("<"))
        if values.size != self.chunk_rows * d:
            raise StoreError(integrity.damage(self.path, key, f"holds {values.size} values, {self.chunk_rows * d} expected"))
        rows = from_storage(values.reshape(self.chunk_rows, d)[:n], self.storage_dtype)
        if not torch.isfinite(rows).all():
            raise StoreError(integrity.damage(self.path, key, "holds NaN or inf values"))
        self._last_chunk[source] = (chunk, rows)
        return rows

    def _checked_range(self, array: str, start: int, stop: int | None, chunk_len: int) -> None:
        """Check the chunk files under rows [start, stop) of an int array once per process."""
        n = self.group[array].shape[0]
        stop = n if stop is None else min(stop, n)
        for key in self.chunk_keys(array, start // chunk_len, -(-stop // chunk_len)):
            if key not in self._verified:
                integrity.checked_bytes(self, key)
                self._verified.add(key)

    def read_column(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows [start, stop) of one of the int32 row arrays: tokens, positions, sequence."""
        self._checked_range(name, start, stop, self.chunk_rows)
        return self.group[name][start:stop]

    def read_sequences(self, start: int, stop: int) -> np.ndarray:
        """Token sequences [start, stop).  # [stop-start, ctx]"""
        self._checked_range("sequences", start, stop, self.group["sequences"].chunks[0])
        return self.group["sequences"][start:stop]


def json_normal(obj: dict[str, Any]) -> dict[str, Any]:
    """What zarr will give back for `obj` (tuples become lists): lets configs compare equal."""
    return json.loads(json.dumps(obj))
