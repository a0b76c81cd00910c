"""A store knows what it holds: the byte size and crc32c of every chunk file, and the checks
that use them.

  * While generating, each block's chunk files are checksummed right after they are written
    (read back: ~1 ms per MB from the page cache, measured in bench/RESULTS.md) into the block's
    record `manifest.blocks/<block>.json`; at completion these merge into `manifest.json`,
    written before the store is marked complete.
  * `check_files`: presence and size of every chunk a reader will use, from one listing per
    array, before training starts (a missing or truncated file costs a second, not a run).
  * `checked_bytes`: a chunk's bytes, with its size and checksum checked, as it is read (the
    stream reads in its prefetch thread); activation values are also checked to be finite.
  * `verify`: all of it for every chunk (generate_activations.py --verify).
Every failure is one line naming the file, what is wrong and what to do. Stores written before
checksums (format 1) get the presence, size and value checks only.

Each function takes the store (store/zarr_store.py's ActivationStore) and uses its file methods
(read_file, write_file, chunk_keys, file_sizes, ...): the store calls in here, never the reverse.
"""
from __future__ import annotations

import json
from typing import Iterator

import google_crc32c

from store.errors import StoreError

MANIFEST = "manifest.json"
BLOCK_MANIFESTS = "manifest.blocks"
REGENERATE = "regenerate it: rerun generate_activations.py with the same arguments and --overwrite"


def damage(path, key: str, problem: str) -> str:
    """The one-line message for a damaged chunk file."""
    return f"store {path}: {key} {problem}; the store is damaged: {REGENERATE}"


def crc32c(data: bytes) -> int:
    return google_crc32c.value(data)


def block_checksums(store, rows: tuple[int, int], sequences: tuple[int, int]) -> dict[str, list[int]]:
    """Size and crc32c of every chunk file a block touched (rows [a, b) of the row arrays,
    sequences [c, d)): the `chunks` of its record."""
    entries = {}
    for array, (lo, hi) in _ranges(store, rows, sequences):
        length = _chunk_length(store, array)
        for key in store.chunk_keys(array, lo // length, -(-hi // length)):
            data = store.read_file(key)
            entries[key] = [len(data), crc32c(data)]
    return entries


def write_manifest(store, records: dict[int, dict]) -> None:
    """Merge the block records' checksums, keep the chunks the trimmed arrays still have,
    checksum again any chunk no block or more than one block recorded (a store written before
    blocks aligned with chunks), write manifest.json, drop the block records."""
    merged: dict[str, list[int]] = {}
    shared: set[str] = set()
    for index in sorted(records):
        for key, entry in records[index]["chunks"].items():
            if key in merged:
                shared.add(key)
            merged[key] = entry
    chunks = {}
    for array in store.array_names():
        for key in store.chunk_keys(array):
            if key not in merged or key in shared:
                data = store.read_file(key)
                merged[key] = [len(data), crc32c(data)]
            chunks[key] = merged[key]
    store.write_file(MANIFEST, json.dumps({"algorithm": "crc32c", "chunks": chunks}).encode())
    store.remove_files(BLOCK_MANIFESTS)


def read_manifest(store) -> dict[str, tuple[int, int]]:
    data = store.read_file(MANIFEST)
    try:
        content = json.loads(data)
    except ValueError as err:
        raise StoreError(damage(store.path, MANIFEST, f"cannot be read ({err})")) from None
    return {key: (size, crc) for key, (size, crc) in content["chunks"].items()}


def checked_bytes(store, key: str) -> bytes:
    """The bytes of one chunk file (through the store's read-through cache, if it has one), after
    checking its size and checksum against the manifest."""
    data = store.read_file(key, cached=True)
    manifest = store.manifest
    if manifest is None:
        return data
    if key not in manifest:
        raise StoreError(damage(store.path, key, f"is not in {MANIFEST}"))
    size, crc = manifest[key]
    if len(data) != size:
        raise StoreError(damage(store.path, key, f"has {len(data):,} bytes, {size:,} were written (truncated or overwritten)"))
    if crc32c(data) != crc:
        raise StoreError(damage(store.path, key, "fails its checksum (its bytes changed since they were written)"))
    return data


def check_files(store, arrays: list[str]) -> None:
    """Presence and size of every chunk file of `arrays` (one listing each); the first problem raises."""
    problem = next(_file_problems(store, arrays), None)
    if problem is not None:
        raise StoreError(problem[1])


def verify(store, progress: bool = True) -> list[str]:
    """Every problem of every chunk file: presence, size, checksum, and finite activations."""
    from tqdm.auto import tqdm

    listed = list(_file_problems(store, store.array_names()))
    problems = [message for _, message in listed]
    unreadable = {key for key, _ in listed}
    sources = {f"acts/{s.name}": s.name for s in store.sources}
    keys = [(array, key) for array in store.array_names() for key in store.chunk_keys(array)]
    for i, (array, key) in enumerate(tqdm(keys, desc="verifying", unit="chunk", disable=not progress)):
        if key in unreadable:
            continue
        try:
            if array in sources:
                store.read_chunk(sources[array], int(key.split("/c/")[1].split("/")[0]))
            else:
                checked_bytes(store, key)
        except ValueError as err:
            problems.append(str(err))
    return problems


def _file_problems(store, arrays: list[str]) -> Iterator[tuple[str, str]]:
    """(key, message) of every missing or wrongly sized chunk file of `arrays`."""
    manifest = store.manifest
    for array in arrays:
        if array not in store.group:
            yield array, f"store {store.path}: the array {array} is missing; the store is damaged: {REGENERATE}"
            continue
        sizes = store.file_sizes(array)
        raw = _raw_chunk_bytes(store, array)
        for key in store.chunk_keys(array):
            if key not in sizes:
                yield key, damage(store.path, key, "is missing")
                continue
            expected = manifest[key][0] if manifest is not None and key in manifest else raw
            if expected is not None and sizes[key] != expected:
                yield key, damage(store.path, key, f"has {sizes[key]:,} bytes, {expected:,} were written "
                                                   "(truncated or overwritten)")


def _raw_chunk_bytes(store, array: str) -> int | None:
    """Byte size of an uncompressed activation chunk (None for the compressed int arrays)."""
    if not array.startswith("acts/"):
        return None
    arr = store.group[array]
    return int(arr.chunks[0] * arr.chunks[1] * arr.dtype.itemsize)


def _chunk_length(store, array: str) -> int:
    return store.group[array].chunks[0]


def _ranges(store, rows: tuple[int, int], sequences: tuple[int, int]):
    for array in store.array_names():
        yield array, (sequences if array == "sequences" else rows)

