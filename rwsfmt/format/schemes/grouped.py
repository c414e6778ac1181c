"""What the schemes with per-group scales share: `linear`, `int2` and `sign` (spec 3.1-3.3).

Their payload is `scales (float32 x G) | zero points (float32 x G, affine only) | codes`;
element `i` of group `g` decodes to `(level(u[i]) - zp[g]) * scale[g]` in float32. Codes of
fewer than 8 bits are packed little-end first: element `k * (8 / B) + j` sits in bits
`[B*j, B*j + B)` of byte `k`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .base import Bad, Quant, Scheme, Shape, whole

if TYPE_CHECKING:
    import numpy as np
    import torch

# elements per torch sum in `row_sums`: under torch's parallel grain (32,768), so a sum is
# never split between threads and each row's float64 sum has one order
SERIAL = 1 << 14
GRANULARITIES = ("tensor", "channel", "group")
MAX_GROUP_SIZE = 1 << 31
NEGATIVE_ZERO = 0x8000_0000  # the bits of float32 -0.0, read as +0.0 in a scale


class Grouped(Scheme):
    """A scheme whose values are `bits`-wide codes with one scale (and maybe zero point) per
    group of elements: per tensor, per channel along `axis`, or per `group_size` run."""

    bits_allowed: tuple[int, ...]

    # ---- what a subclass decides
    def implied_zero_point(self, q: Quant) -> float:
        return float(1 << (q["bits"] - 1))

    def level_range(self, bits: int) -> tuple[float, float]:
        """The lowest and highest level a code stands for before the zero point."""
        return 0.0, float((1 << bits) - 1)

    def to_levels(self, u: Any) -> Any:
        """The levels of float32 codes `u`, in place: the codes themselves."""
        return u

    # ---- header rules and layout
    def validate(self, q: Quant, shape: Shape, bad: Bad) -> None:
        if q["bits"] not in self.bits_allowed:
            raise bad(f"{self.name} quantization with {q['bits']!r} bits is not supported")
        granularity = q.get("granularity")
        if granularity not in GRANULARITIES:
            raise bad(f"unknown quantization granularity {granularity!r}")
        if granularity == "channel":
            axis = q.get("axis")
            if not whole(axis) or not 0 <= axis < len(shape):
                raise bad(f"quant.axis {axis!r} is not an axis of shape {list(shape)}")
        elif granularity == "group":
            size = q.get("group_size")
            if not whole(size) or not 1 <= size <= MAX_GROUP_SIZE:
                raise bad(f"quant.group_size {size!r} is out of range")

    def scale_groups(self, q: Quant, shape: Shape, count: int) -> int:
        granularity = q["granularity"]
        if granularity == "tensor":
            return 1
        if granularity == "channel":
            return shape[q["axis"]]
        return -(-count // q["group_size"])

    def values_offset(self, q: Quant, shape: Shape, count: int) -> int:
        return 4 * self.scale_groups(q, shape, count) * (2 if self.affine(q) else 1)

    def payload_length(self, q: Quant, shape: Shape, count: int) -> int:
        return self.values_offset(q, shape, count) + (count * q["bits"] + 7) // 8

    # ---- checks (spec 3.6)
    def check(self, payload: np.ndarray, q: Quant, shape: Shape, count: int, filt: str) -> str:
        import numpy as np

        g = self.scale_groups(q, shape, count)
        scale_bits = payload[: 4 * g].view("<u4")
        scales = (scale_bits & 0x7FFF_FFFF).view("<f4")  # -0.0 reads as +0.0 ...
        if (scale_bits > NEGATIVE_ZERO).any() or not np.isfinite(scales).all():  # others fail
            return "has a negative or non-finite scale"
        if self.affine(q):
            zero_points = payload[4 * g : 8 * g].view("<f4")
            if not np.isfinite(zero_points).all():
                return "has a non-finite zero point"
        else:
            zero_points = np.float32(self.implied_zero_point(q))
        if not decodes_finite(scales, zero_points, *self.level_range(q["bits"])).all():
            return "has a scale and zero point that decode codes beyond the float32 range"
        return ""

    # ---- decoding
    def decode(
        self,
        raw: torch.Tensor,
        q: Quant,
        shape: Shape,
        count: int,
        filt: str,
        channel_counts: torch.Tensor | None = None,
    ) -> torch.Tensor:
        import torch

        bits, g = q["bits"], self.scale_groups(q, shape, count)
        scale = raw[: 4 * g].view(torch.float32).abs()  # -0.0 (rwsfmt 0.1.0) reads as +0.0
        zp = raw[4 * g : 8 * g].view(torch.float32) if self.affine(q) else None
        values = raw[self.values_offset(q, shape, count) :]
        if bits == 8:
            u = values.to(torch.float32)
        elif bits == 16:
            pairs = values.view(2, count).t() if filt == "byteplane" else values.view(count, 2)
            u = (pairs[:, 0].to(torch.int32) | (pairs[:, 1].to(torch.int32) << 8)).float()
        else:
            u = _unpack(values, bits, count).to(torch.float32)
        u = self.to_levels(u)
        if zp is None:
            zp = self.implied_zero_point(q)
            zp = None if zp == 0 else torch.full_like(scale, zp)
        return _per_group(u, scale, zp, q, shape, channel_counts, torch)

    def decode_numpy(
        self,
        raw: np.ndarray,
        q: Quant,
        shape: Shape,
        count: int,
        filt: str,
        channel_counts: np.ndarray | None = None,
    ) -> np.ndarray:
        import numpy as np

        bits, g = q["bits"], self.scale_groups(q, shape, count)
        scale = np.abs(raw[: 4 * g].view("<f4"))
        zp = raw[4 * g : 8 * g].view("<f4") if self.affine(q) else None
        values = raw[self.values_offset(q, shape, count) :]
        if bits == 8:
            u = values.astype(np.float32)
        elif bits == 16:
            low, high = (
                values.reshape(2, count) if filt == "byteplane" else values.reshape(count, 2).T
            )
            u = (low.astype(np.uint16) | (high.astype(np.uint16) << 8)).astype(np.float32)
        else:
            u = _unpack_numpy(values, bits, count).astype(np.float32)
        u = self.to_levels(u)
        if zp is None:
            zp = self.implied_zero_point(q)
            zp = None if zp == 0 else np.full(g, zp, dtype=np.float32)
        return _per_group(u, scale, zp, q, shape, channel_counts, np)


def decodes_finite(scales: Any, zero_points: Any, lowest: float, highest: float) -> Any:
    """Per group (numpy float32 arrays), whether every level from `lowest` to `highest`
    decodes to a finite value: `(level - zp) * scale` is monotone in the level, so the two
    ends cover every code, without decoding the values."""
    import numpy as np

    with np.errstate(over="ignore", invalid="ignore"):
        low = (np.float32(lowest) - zero_points) * scales
        high = (np.float32(highest) - zero_points) * scales
    return np.isfinite(low) & np.isfinite(high)


def _unpack(values: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """The `count` uint8 codes of `bits` (1, 2 or 4) packed in `values` (spec 3.2)."""
    import torch

    if bits == 1 and values.device.type == "cpu":  # numpy's unpackbits: 5x faster
        return torch.from_numpy(_unpack_numpy(values.numpy(), 1, count))
    mask = (1 << bits) - 1  # stacking the shifted planes beats a broadcast shift 1.3x
    planes = [(values >> shift) & mask for shift in range(0, 8, bits)]
    return torch.stack(planes, dim=1).view(-1)[:count]


def _unpack_numpy(values: np.ndarray, bits: int, count: int) -> np.ndarray:
    import numpy as np

    if bits == 1:
        return np.unpackbits(values, count=count, bitorder="little")
    shifts = np.arange(0, 8, bits, dtype=np.uint8)
    return ((values[:, None] >> shifts) & ((1 << bits) - 1)).reshape(-1)[:count]


def _per_group(
    u: Any, scale: Any, zp: Any, q: Quant, shape: Shape, channel_counts: Any, xp: Any
) -> Any:
    """`(u - zp) * scale` in place, each element with its group's numbers; `xp` is numpy or
    torch (the operations used are spelled the same in both). `zp` None skips the
    subtraction (a zero point of 0)."""
    granularity = q["granularity"]
    if granularity == "group":
        size, count = q["group_size"], u.shape[0]
        full = count // size
        _affine(u[: full * size].reshape(full, size), scale[:full, None], _at(zp, full))
        if count > full * size:
            _affine(u[full * size :], scale[full], None if zp is None else zp[full])
        return u
    if granularity == "tensor":
        return _affine(u, scale[0], None if zp is None else zp[0])
    if channel_counts is not None:  # sparse: the kept values of channel c are contiguous
        expand = xp.repeat if xp.__name__ == "numpy" else xp.repeat_interleave
        scale = expand(scale, channel_counts)
        zp = None if zp is None else expand(zp, channel_counts)
        return _affine(u, scale, zp)
    view = [1] * len(shape)
    view[q["axis"]] = shape[q["axis"]]
    return _affine(u.reshape(shape), scale.reshape(view), None if zp is None else zp.reshape(view))


def _at(zp: Any, full: int) -> Any:
    return None if zp is None else zp[:full, None]


def _affine(u: Any, scale: Any, zp: Any) -> Any:
    if zp is not None:
        u -= zp
    u *= scale
    return u


def row_sums(
    rows: torch.Tensor, f: Callable[[torch.Tensor, slice, slice], torch.Tensor], width: int = 0
) -> torch.Tensor:
    """Per row of [R, m] `rows`, the float64 sum of `f(piece, row slice, column slice)`, an
    elementwise float32 function of `piece = rows[row slice, column slice]` that is 0 at 0;
    `width` > m sums the rows as if zero-padded to `width` columns. Rows of up to `SERIAL`
    columns are summed whole, longer ones by `SERIAL` columns added left to right, each
    torch sum serial: the same bits for any block of whole rows and any thread count, with
    temporaries of `SERIAL` elements, not of the rows."""
    import torch

    count, m = rows.shape
    width = max(width, m)
    step, columns = max(1, SERIAL // max(width, 1)), min(max(width, 1), SERIAL)
    sums = []
    for r0 in range(0, count, step):
        s, total = slice(r0, r0 + step), None
        for c0 in range(0, width, columns):
            c = slice(c0, max(c0, min(c0 + columns, m)))
            piece = _padded(f(rows[s, c], s, c), min(columns, width - c0))
            part = piece.sum(1, dtype=torch.float64)
            total = part if total is None else total + part
        empty = rows.new_zeros(len(rows[s]), dtype=torch.float64)  # rows of no columns
        sums.append(empty if total is None else total)
    return torch.cat(sums) if sums else rows.new_zeros(0, dtype=torch.float64)


def _padded(t: torch.Tensor, width: int) -> torch.Tensor:
    """[R, k] `t` with zero columns appended up to `width`."""
    import torch

    return t if t.shape[1] >= width else torch.nn.functional.pad(t, (0, width - t.shape[1]))
