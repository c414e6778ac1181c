"""Dequantization with numpy, for commands that must answer without importing torch.

`rwsfmt compare` reads every tensor of many files and must stay well under a second, and
importing torch alone takes longer than that on a loaded 2-core machine. Each scheme's
`decode_numpy` does the arithmetic of its torch `decode` (spec section 3.3: float32, one
subtraction then one multiplication), so both give identical float32 bits; the tests
require it.
"""

from __future__ import annotations

import numpy as np

from .container import PayloadReader, TensorInfo, decode_blob
from .format import chunked
from .format.schemes import scheme_of


def dequantize(payload: bytes | bytearray, info: TensorInfo) -> np.ndarray:
    """The float32 values of one checked payload (`RwsReader.read_payload`), shaped."""
    raw = np.frombuffer(payload, dtype=np.uint8)
    q = info.quant
    values = scheme_of(q).decode_numpy(raw, q, info.shape, info.numel, info.filter)
    return values.reshape(info.shape)


def stored_values(stored: bytes | bytearray, info: TensorInfo, path: str, out: np.ndarray) -> None:
    """Write the float32 values of one verified stored blob (`RwsReader.read_stored`) into
    `out` (flat): a large tensor a chunk at a time, with nothing else of its size."""
    if chunked.chunked(info):
        chunked.decode(PayloadReader(stored, info, path), info, chunked.Numpy(), out)
    else:
        out[:] = dequantize(decode_blob(bytearray(stored), info, path), info).reshape(-1)
