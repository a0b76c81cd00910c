"""Text sources → fixed-length token sequences.

A source is one of:
  * a local `.txt` file (one document), `.jsonl`/`.json` or `.parquet` file (one document per
    record, read through `datasets`), or a folder of such files (sorted, recursive);
  * `stdlib-docstrings`: the docstrings of the running Python's standard library (real English
    and code prose that exists on every machine; the embedded default);
  * any other string: a Hugging Face dataset name, streamed (works offline when cached).

Documents are tokenised without special tokens, each followed by EOS, concatenated, and cut
into rows of `context_length` tokens; with `prepend_bos` every row starts with BOS and carries
`context_length - 1` text tokens. This does not pad, filter by length, or deduplicate.
"""
from __future__ import annotations

import ast
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

STDLIB_DOCSTRINGS = "stdlib-docstrings"
_RECORD_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
_TEXT_SUFFIXES = {".txt", ".md"}


class TextSourceError(ValueError):
    """A dataset that cannot be read as text: missing, empty, or without the text column."""


@dataclass
class TextCount:
    """How much text token_sequences has read (for saying why a dataset is too short)."""

    documents: int = 0
    tokens: int = 0


def iter_documents(dataset: str, text_column: str = "text", split: str = "train") -> Iterator[str]:
    """Yield the documents of `dataset` in a fixed order."""
    if dataset == STDLIB_DOCSTRINGS:
        yield from _stdlib_docstrings()
        return
    path = Path(dataset).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in _TEXT_SUFFIXES | set(_RECORD_SUFFIXES))
        if not files:
            raise TextSourceError(f"folder {path} holds no .txt/.md/.jsonl/.json/.parquet files")
        for file in files:
            yield from _file_documents(file, text_column)
    elif path.suffix in _TEXT_SUFFIXES | set(_RECORD_SUFFIXES) or path.exists():
        if not path.exists():
            raise TextSourceError(f"dataset file {path} does not exist")
        yield from _file_documents(path, text_column)
    else:
        yield from _hub_documents(dataset, text_column, split)


def _file_documents(path: Path, text_column: str) -> Iterator[str]:
    if path.suffix not in _RECORD_SUFFIXES:
        yield path.read_text(encoding="utf-8", errors="replace")
        return
    import datasets

    if path.suffix != ".parquet" and not _has_content(path):
        return  # an empty .json/.jsonl: no documents (datasets would fail on it)
    records = datasets.load_dataset(_RECORD_SUFFIXES[path.suffix], data_files=str(path), split="train", streaming=True)
    yield from _column(records, text_column, str(path))


def _has_content(path: Path) -> bool:
    """Whether a text file holds anything but whitespace (reads only up to its first such byte)."""
    with open(path, "rb") as f:
        while block := f.read(1 << 16):
            if block.strip():
                return True
    return False


def _hub_documents(name: str, text_column: str, split: str) -> Iterator[str]:
    import datasets

    try:
        records = datasets.load_dataset(name, split=split, streaming=True)
    except Exception as err:  # the hub client raises many types; all mean "cannot load this name"
        raise TextSourceError(
            f"cannot load dataset {name!r}: not a local file or folder, and the Hugging Face hub/cache "
            f"could not provide it ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
        ) from err
    yield from _column(records, text_column, name)


def _column(records: Iterable[dict], text_column: str, where: str) -> Iterator[str]:
    for record in records:
        if text_column not in record:
            raise TextSourceError(
                f"{where} has no column {text_column!r} (columns: {', '.join(record)}); pass --text_column"
            )
        text = record[text_column]
        if text:
            yield text


def _stdlib_docstrings() -> Iterator[str]:
    """Module, class and function docstrings of the standard library, file by file."""
    root = Path(sysconfig.get_paths()["stdlib"])
    for file in sorted(root.rglob("*.py")):
        if "site-packages" in file.parts or "test" in file.parts or "tests" in file.parts:
            continue
        try:
            tree = ast.parse(file.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 40:
                    yield doc


def token_sequences(
    documents: Iterable[str],
    tokenize: "callable[[list[str]], list[list[int]]]",
    *,
    context_length: int,
    bos_id: int | None,
    eos_id: int | None,
    batch_docs: int = 64,
    count: TextCount | None = None,
) -> Iterator[np.ndarray]:
    """Yield int32 rows of `context_length` tokens (BOS first when `bos_id` is not None);
    `count` tallies the documents and tokens read."""
    count = count if count is not None else TextCount()
    body = context_length - (bos_id is not None)
    if body < 1:
        raise ValueError(f"context_length {context_length} leaves no room for text")
    buffer: list[int] = []
    batch: list[str] = []

    def flush() -> Iterator[np.ndarray]:
        for ids in tokenize(batch):
            buffer.extend(ids)
            count.documents += 1
            count.tokens += len(ids)
            if eos_id is not None:
                buffer.append(eos_id)
        batch.clear()
        start = 0
        while len(buffer) - start >= body:
            row = buffer[start : start + body]
            start += body
            yield np.asarray(row if bos_id is None else [bos_id, *row], dtype=np.int32)
        del buffer[:start]

    for doc in documents:
        batch.append(doc)
        if len(batch) == batch_docs:
            yield from flush()
    if batch:
        yield from flush()
