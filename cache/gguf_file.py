"""Read a GGUF file through transformers at one parse and about one copy of the weights.

transformers loads a GGUF checkpoint by parsing the file (`gguf.GGUFReader`) once for the config,
once for the tokenizer and once for the weights, and by dequantizing each tensor in one call to
`gguf.dequantize`. Both cost more than they need to for a large vocabulary (the demo model,
Gemma-3-270M, has 262,144 tokens):
  * a parse walks every metadata field, a third of the load's time each;
  * `gguf.dequantize` holds its intermediates for the whole tensor, twice the size of its float32
    output: 1.3 GB beside the [262,144, 640] embedding's 0.67 GB, the peak of the whole load.
`gguf_read_lean()` patches both for as long as it is held: one reader per file, and tensors
dequantized a block of rows at a time into their output (the same values, bit for bit).
"""
from __future__ import annotations

import contextlib

DEQUANTIZE_ROWS = 4096  # rows of a quantized tensor dequantized at once (the embedding: 4096 × 640 floats)


@contextlib.contextmanager
def gguf_read_lean(rows: int = DEQUANTIZE_ROWS):
    """While held, `gguf.GGUFReader(path)` returns one reader per file and `gguf.dequantize`
    works `rows` rows at a time. The reader is only read from, so sharing it is safe."""
    import gguf

    reader_class, dequantize = gguf.GGUFReader, gguf.dequantize
    readers: dict[tuple, object] = {}

    def reader(path, *args, **kwargs):
        key = (str(path), args, tuple(sorted(kwargs.items())))
        if key not in readers:
            readers[key] = reader_class(path, *args, **kwargs)
        return readers[key]

    gguf.GGUFReader = reader
    gguf.dequantize = lambda data, qtype: dequantize_in_rows(dequantize, data, qtype, rows)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.dequantize = reader_class, dequantize


def dequantize_in_rows(dequantize, data, qtype, rows: int):
    """`dequantize(data, qtype)` of a [n, bytes per row] quantized tensor, `rows` rows at a time
    into one preallocated output: its intermediates are those of `rows` rows, not of n. A GGUF
    row is a whole number of quantization blocks, so each slice dequantizes on its own. F32
    tensors are left whole: their dequantization is a view of the file, with no intermediates."""
    import numpy as np
    from gguf import GGMLQuantizationType

    if qtype == GGMLQuantizationType.F32 or data.ndim < 2 or data.shape[0] <= rows:
        return dequantize(data, qtype)
    first = dequantize(data[:rows], qtype)  # [rows, d]
    out = np.empty((data.shape[0], *first.shape[1:]), dtype=first.dtype)  # [n, d]
    out[:rows] = first
    for start in range(rows, data.shape[0], rows):
        out[start:start + rows] = dequantize(data[start:start + rows], qtype)
    return out
