"""Decoding a large tensor a chunk at a time, straight into its float32 output.

A payload can take more bytes than the float32 tensor it stands for (8-bit affine codes with
a group per element: a scale, a zero point and a code, 9 bytes for 4), and decoding it whole
holds the payload, the output and full-size temporaries at once. Here the payload is read by
ranges (`container.PayloadReader`: scales, zero points and codes each by their own zstd
reader) and `CHUNK` elements at a time are checked (spec 3.6) and decoded into one
preallocated output, with the same float32 operations as the schemes' own `decode`, so the
bits are identical. What decoding adds beyond the output is then a few chunks, whatever the
scheme and granularity. Small payloads (up to `WHOLE` bytes with their output) are decoded
whole, which is faster.

The arithmetic runs on numpy arrays or torch tensors on any device (`Numpy`, `Torch`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from . import schemes
from .schemes.grouped import Grouped, _affine, _unpack, _unpack_numpy

if TYPE_CHECKING:
    import numpy as np
    import torch

    from ..container import PayloadReader, TensorInfo

CHUNK = 1 << 18  # elements decoded at once (a multiple of 8): 1 MiB of float32
WHOLE = 16 << 20  # payload + float32 bytes up to which a tensor is decoded whole
PRELOAD = 4 << 20  # scale and zero-point bytes read at once rather than by ranges


def chunked(info: TensorInfo) -> bool:
    """Whether `info` is decoded a chunk at a time (its payload and output exceed `WHOLE`)."""
    return info.decoded_length + 4 * info.numel > WHOLE


class Numpy:
    """Chunk arithmetic with numpy (commands that avoid torch)."""

    def array(self, data: bytearray, dtype: str = "u1") -> np.ndarray:
        import numpy as np

        return np.frombuffer(data, dtype=dtype)

    def empty(self, n: int) -> np.ndarray:
        import numpy as np

        return np.empty(n, dtype=np.float32)

    def unpack(self, codes: np.ndarray, bits: int, count: int) -> np.ndarray:
        return _unpack_numpy(codes, bits, count)

    def full_like(self, a: np.ndarray, value: float) -> np.ndarray:
        import numpy as np

        return np.full_like(a, value)

    def repeat(self, a: np.ndarray, counts: np.ndarray) -> np.ndarray:
        import numpy as np

        return np.repeat(a, counts)

    def counts(self, counts: np.ndarray) -> np.ndarray:
        return counts

    def scatter(self, dest: np.ndarray, kept: np.ndarray, values: np.ndarray) -> None:
        dest[:] = 0
        dest[kept.view(bool)] = values


class Torch:
    """Chunk arithmetic with torch on `device`: only payload bytes cross to it."""

    def __init__(self, device: torch.device | str | None) -> None:
        self.device = device

    def array(self, data: bytearray, dtype: str = "u1") -> torch.Tensor:
        import torch

        raw = (
            torch.frombuffer(data, dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
        )
        raw = raw.to(self.device) if self.device is not None else raw
        return raw if dtype == "u1" else raw.view(torch.float32)

    def empty(self, n: int) -> torch.Tensor:
        import torch

        return torch.empty(n, dtype=torch.float32, device=self.device)

    def unpack(self, codes: torch.Tensor, bits: int, count: int) -> torch.Tensor:
        return _unpack(codes, bits, count)

    def full_like(self, a: torch.Tensor, value: float) -> torch.Tensor:
        import torch

        return torch.full_like(a, value)

    def repeat(self, a: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        import torch

        return torch.repeat_interleave(a, counts)

    def counts(self, counts: np.ndarray) -> torch.Tensor:
        import torch

        return torch.from_numpy(counts).to(self.device)

    def scatter(self, dest: torch.Tensor, kept: np.ndarray, values: torch.Tensor) -> None:
        import torch

        mask = torch.from_numpy(kept).view(torch.bool).to(dest.device)
        dest.zero_().masked_scatter_(mask, values)


def decode(payload: PayloadReader, info: TensorInfo, xp: Numpy | Torch, out: Any = None) -> Any:
    """The float32 values of `info` (flat), its payload checked and decoded by chunks into
    `out` (flat, float32; default a new array)."""
    out = xp.empty(info.numel) if out is None else out
    _run(payload, info, xp, out)
    return out


def check(payload: PayloadReader, info: TensorInfo) -> None:
    """Check a payload's numbers (spec 3.6) and its frame by chunks, decoding no values."""
    _run(payload, info, None, None)


def _run(payload: PayloadReader, info: TensorInfo, xp: Numpy | Torch | None, out: Any) -> None:
    q, count = info.quant, info.numel
    if q["scheme"] == "sparse":
        _Sparse(payload, info, xp, out).run()
    else:
        _Dense(payload, info, q, count, 0, xp, out).run(0, count)
    payload.finish()


class _Dense:
    """The values of a dense payload (or a sparse tensor's kept values) starting at payload
    byte `base`: `count` values, written to `out[0:count]`."""

    def __init__(
        self,
        payload: PayloadReader,
        info: TensorInfo,
        q: dict[str, Any],
        count: int,
        base: int,
        xp: Numpy | Torch | None,
        out: Any,
        channel_counts: Any = None,
    ) -> None:
        self.payload, self.info, self.q, self.count, self.base = payload, info, q, count, base
        self.xp, self.out, self.filt = xp, out, info.filter
        self.scheme = schemes.scheme_of(q)
        self.bits = q["bits"]
        self.channel_counts = channel_counts  # sparse, by channel: blocks of counts
        if isinstance(self.scheme, Grouped):
            self.groups = self.scheme.scale_groups(q, info.shape, count)
            self.affine = self.scheme.affine(q)
            self.codes_at = base + self.scheme.values_offset(q, info.shape, count)
            self._scales: tuple[bytearray, bytearray | None] | None = None
            if 8 * self.groups <= PRELOAD:
                self._scales = self._read_scales(0, self.groups)

    def fail(self, problem: str) -> Exception:
        return _damaged(self.payload, problem)

    # ---- float values
    def run(self, start: int, stop: int) -> None:
        """Check (and with `xp`, decode) values `[start, stop)` into `out[start:stop]`."""
        if not isinstance(self.scheme, Grouped):
            for v0 in range(start, stop, CHUNK):
                self._floats(v0, min(v0 + CHUNK, stop))
            return
        for v0, v1, spans in self._spans(start, stop):
            self._grouped(v0, v1, spans)

    def _floats(self, v0: int, v1: int) -> None:
        n, read = v1 - v0, self.payload.read
        if self.filt == "byteplane":
            planes = [read(f"p{p}", self.base + p * self.count + v0, n) for p in range(4)]
            raw = bytearray().join(planes)
        else:
            raw = read("values", self.base + 4 * v0, 4 * n)
        problem = self.scheme.check(Numpy().array(raw), self.q, (n,), n, self.filt)
        if problem:
            raise self.fail(problem)
        if self.xp is not None:
            values = self.scheme_decode(raw, n)
            self.out[v0:v1] = values

    def scheme_decode(self, raw: bytearray, n: int) -> Any:
        """`n` float values decoded by the scheme itself (byteplane: re-interleaved)."""
        xp = self.xp
        if isinstance(xp, Numpy):
            return self.scheme.decode_numpy(xp.array(raw), self.q, (n,), n, self.filt).reshape(-1)
        return self.scheme.decode(xp.array(raw), self.q, (n,), n, self.filt).reshape(-1)

    # ---- grouped values
    def _spans(self, start: int, stop: int) -> Iterator[tuple[int, int, list[tuple]]]:
        """Chunks `(v0, v1, spans)` of values `[start, stop)`; each span
        `(s0, s1, g, k, counts)` covers values `[s0, s1)` of the `k` groups from scale
        index `g`: of equal size, or (a sparse tensor's channels) of `counts` values each."""
        q, shape = self.q, self.info.shape
        granularity = q["granularity"]
        if self.channel_counts is not None:  # sparse, by channel: sizes vary
            yield from self._counted_spans(start, stop)
            return
        if granularity == "tensor":
            size, cycle = max(self.count, 1), 1
        elif granularity == "group":
            size, cycle = q["group_size"], self.groups
        else:
            axis = q["axis"]
            size, cycle = math.prod(shape[axis + 1 :]), shape[axis]
        for v0 in range(start, stop, CHUNK):
            v1, spans, v = min(v0 + CHUNK, stop), [], v0
            while v < v1:
                g = v // size
                if v % size or v1 - v < size:  # part of one group
                    end = min((g + 1) * size, v1)
                    spans.append((v, end, g % cycle, 1, None))
                else:  # whole groups, not wrapping around the channel axis
                    k = min((v1 - v) // size, cycle - g % cycle)
                    end = v + k * size
                    spans.append((v, end, g % cycle, k, None))
                v = end
            yield v0, v1, spans

    def _counted_spans(self, start: int, stop: int) -> Iterator[tuple[int, int, list[tuple]]]:
        """Chunks of whole channels, counted from the bitmap a block at a time (a channel
        with more than `CHUNK` kept values is split in parts)."""
        v = 0
        for c, counts in self.channel_counts():
            total = int(counts.sum())
            if len(counts) == 1 and total > CHUNK:
                for s in range(v, v + total, CHUNK):
                    e = min(s + CHUNK, v + total)
                    yield s, e, [(s, e, c, 1, None)]
            elif total:
                yield v, v + total, [(v, v + total, c, len(counts), counts)]
            v += total

    def _read_scales(self, g: int, k: int) -> tuple[bytearray, bytearray | None]:
        """The scale and zero-point bytes of groups `[g, g + k)` (checked, spec 3.6)."""
        if self._scales is not None:
            scales, zps = self._scales
            return scales[4 * g : 4 * (g + k)], None if zps is None else zps[4 * g : 4 * (g + k)]
        read = self.payload.read
        scales = read("scales", self.base + 4 * g, 4 * k)
        zps = read("zps", self.base + 4 * (self.groups + g), 4 * k) if self.affine else None
        q = {**self.q, "granularity": "group", "group_size": 1}  # k groups of one
        problem = self.scheme.check(Numpy().array(scales + (zps or b"")), q, (k,), k, "")
        if problem:
            raise self.fail(problem)
        return scales, zps

    def _grouped(self, v0: int, v1: int, spans: list[tuple]) -> None:
        xp = self.xp
        if self._scales is None or xp is not None:
            pieces = [self._read_scales(g, k) for _, _, g, k, _ in spans]
        if xp is None:
            return
        u = self.out[v0:v1]
        self._levels(v0, v1, u)
        for (s0, s1, _, k, counts), (scales, zps) in zip(spans, pieces, strict=True):
            scale = abs(xp.array(scales, "f4"))  # -0.0 (rwsfmt 0.1.0) reads as +0.0
            if zps is not None:
                zp = xp.array(zps, "f4")
            else:
                implied = self.scheme.implied_zero_point(self.q)
                zp = None if implied == 0 else xp.full_like(scale, implied)
            part = u[s0 - v0 : s1 - v0]
            if counts is not None:  # channels of a sparse tensor: expand by their counts
                counts = xp.counts(counts)
                zp = None if zp is None else xp.repeat(zp, counts)
                _affine(part, xp.repeat(scale, counts), zp)
            elif k == 1:
                _affine(part, scale[0], None if zp is None else zp[0])
            else:
                rows = part.reshape(k, -1)
                _affine(rows, scale[:, None], None if zp is None else zp[:, None])

    def _levels(self, v0: int, v1: int, u: Any) -> None:
        """The levels of codes `[v0, v1)` written into float32 `u` (spec 3.2, 3.3)."""
        xp, bits, n, read = self.xp, self.bits, v1 - v0, self.payload.read
        if bits == 8:
            u[:] = xp.array(read("codes", self.codes_at + v0, n))
        elif bits == 16:
            if self.filt == "byteplane":
                low = xp.array(read("low", self.codes_at + v0, n))
                high = xp.array(read("high", self.codes_at + self.count + v0, n))
            else:
                pairs = xp.array(read("codes", self.codes_at + 2 * v0, 2 * n))
                low, high = pairs[0::2], pairs[1::2]
            u[:] = high
            u *= 256
            u += low  # exact: whole numbers below 2^16
        else:
            first, skip = divmod(v0 * bits, 8)
            last = -(-v1 * bits // 8)
            codes = xp.array(read("codes", self.codes_at + first, last - first))
            u[:] = xp.unpack(codes, bits, skip // bits + n)[skip // bits :]
        self.scheme.to_levels(u)


def _damaged(payload: PayloadReader, problem: str) -> Exception:
    from ..errors import IntegrityError

    return IntegrityError(
        f"tensor {payload.info.name!r} {problem}",
        path=payload.path,
        fix="copy or download the file again",
    )


class _Sparse:
    """A sparse tensor: the bitmap (1/32 of the output) read whole, the kept values decoded
    into the front of `out`, then spread to their positions from the back, in place."""

    def __init__(self, payload: PayloadReader, info: TensorInfo, xp: Any, out: Any) -> None:
        import numpy as np

        self.payload, self.info, self.xp, self.out = payload, info, xp, out
        q = info.quant
        self.count, self.nnz, self.values = info.numel, q["nnz"], q["values"]
        self.bitmap = np.frombuffer(payload.read("bitmap", 0, (self.count + 7) // 8), np.uint8)

    def kept(self, e0: int, e1: int) -> np.ndarray:
        """The kept flags (uint8) of elements `[e0, e1)`, `e0` a multiple of 8."""
        import numpy as np

        return np.unpackbits(self.bitmap[e0 // 8 : -(-e1 // 8)], count=e1 - e0, bitorder="little")

    def run(self) -> None:
        import numpy as np

        starts = range(0, self.count, CHUNK)
        kept = [int(np.count_nonzero(self.kept(e, min(e + CHUNK, self.count)))) for e in starts]
        if sum(kept) != self.nnz:
            problem = f"has a bitmap of {sum(kept)} positions for nnz {self.nnz}"
            raise _damaged(self.payload, problem)
        values, counts = self.values, None
        if values["scheme"] != "float" and values["granularity"] == "channel":
            counts = self._channel_counts
        base = len(self.bitmap)
        dense = _Dense(self.payload, self.info, values, self.nnz, base, self.xp, self.out, counts)
        dense.run(0, self.nnz)
        if self.xp is None:
            return
        before = np.cumsum([0, *kept])
        for i in reversed(range(len(starts))):  # from the back: values move up, never down
            e0 = starts[i]
            e1 = min(e0 + CHUNK, self.count)
            moved = self.out[int(before[i]) : int(before[i + 1])]
            moved = moved.copy() if isinstance(self.xp, Numpy) else moved.clone()
            self.xp.scatter(self.out[e0:e1], self.kept(e0, e1), moved)

    def _channel_counts(self) -> Iterator[tuple[int, np.ndarray]]:
        """`(first channel, kept values per channel)` (int64) for blocks of channels of axis
        0 of about `CHUNK` elements, counted from the bitmap."""
        channels, members = self.info.shape[0], math.prod(self.info.shape[1:])
        step = max(1, CHUNK // max(members, 1))
        for c in range(0, channels, step):
            c1 = min(c + step, channels)
            e0, e1 = c * members, c1 * members
            first = e0 - e0 % 8
            bits = self.kept(first, e1)[e0 - first :]
            yield c, bits.reshape(c1 - c, members).sum(axis=1, dtype="i8")
