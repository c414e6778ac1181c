"""Dequantization with numpy, for commands that must answer without importing torch.

`rwsfmt compare` reads every tensor of many files and must stay well under a second, and
importing torch alone takes longer than that on a loaded 2-core machine. This is the
arithmetic of `quant.decode` (spec section 3.3: `(u - zp) * scale` in float32, one
subtraction then one multiplication), so both give identical float32 bits; the tests
require it.
"""

from __future__ import annotations

import numpy as np

from .container import TensorInfo


def dequantize(payload: bytes | bytearray, info: TensorInfo) -> np.ndarray:
    """The float32 values of one checked payload (`RwsReader.read_payload`), shaped."""
    n, q = info.numel, info.quant
    raw = np.frombuffer(payload, dtype=np.uint8)
    values = raw[info.values_offset :]
    if q["scheme"] == "float":
        if info.filter == "byteplane":
            values = np.ascontiguousarray(values.reshape(4, n).T)
        return values.view("<f4").reshape(info.shape)
    bits, g = q["bits"], info.n_scales
    scale = np.abs(raw[: 4 * g].view("<f4"))  # a -0.0 scale (rwsfmt 0.1.0) reads as +0.0
    if q["symmetric"]:
        zp = np.full(g, 1 << (bits - 1), dtype=np.float32)
    else:
        zp = raw[4 * g : 8 * g].view("<f4")
    if bits == 8:
        u = values.astype(np.float32)
    elif bits == 16:
        low, high = values.reshape(2, n) if info.filter == "byteplane" else values.reshape(n, 2).T
        u = (low.astype(np.uint16) | (high.astype(np.uint16) << 8)).astype(np.float32)
    else:
        u = np.stack([values & 0x0F, values >> 4], axis=1).reshape(-1)[:n].astype(np.float32)
    if q["granularity"] == "group":
        gs = q["group_size"]
        full = n // gs
        head = u[: full * gs].reshape(full, gs)
        head -= zp[:full, None]
        head *= scale[:full, None]
        tail = u[full * gs :]
        if tail.size:
            tail -= zp[full]
            tail *= scale[full]
        return u.reshape(info.shape)
    u = u.reshape(info.shape)
    if q["granularity"] == "channel":
        view = [1] * len(info.shape)
        view[q["axis"]] = g
        scale, zp = scale.reshape(view), zp.reshape(view)
    else:
        scale, zp = scale[0], zp[0]
    u -= zp
    u *= scale
    return u
