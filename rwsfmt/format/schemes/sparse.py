"""`sparse` (format 1.2): the positions of the kept values as a bitmap, then the kept values
coded by another scheme (`values`), as ComPEFT and DARE keep a delta's largest entries.

Payload: `bitmap (ceil(n / 8) bytes) | the values scheme's payload for nnz values`. Bit `j`
of byte `k` (least significant first) is set when element `8k + j` (row-major) is kept; the
kept values follow in row-major order and every other element decodes to +0.0. With
`channel` granularity (axis 0 only), a kept value's group is its channel, and the kept
values of one channel are contiguous, so a reader expands the scales by per-channel counts.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from .base import Bad, Quant, Scheme, Shape, whole

if TYPE_CHECKING:
    import numpy as np
    import torch

INDEXES = ("bitmap",)


class Sparse(Scheme):
    name = "sparse"
    minor = 2

    def __init__(self, registry: dict[str, Scheme]) -> None:
        self._registry = registry

    def inner(self, q: Quant) -> Scheme:
        return self._registry[q["values"]["scheme"]]

    def validate(self, q: Quant, shape: Shape, bad: Bad) -> None:
        index = q.get("index")
        if type(index) is not str:
            raise bad(f"quant.index {index!r} must name how positions are stored")
        if index not in INDEXES:
            raise bad(f"unknown sparse index {index!r}", newer=True)
        nnz, numel = q.get("nnz"), math.prod(shape)
        if not whole(nnz) or not 0 <= nnz <= numel:
            raise bad(f"quant.nnz {nnz!r} must be a whole number from 0 to {numel}")
        values = q.get("values")
        if type(values) is not dict:
            raise bad("quant.values must be an object")
        scheme, bits = values.get("scheme"), values.get("bits")
        if not whole(bits) or bits != q["bits"]:
            raise bad(f"quant.values.bits {bits!r} must equal quant.bits {q['bits']}")
        if type(scheme) is not str or scheme == self.name:
            raise bad(f"scheme {scheme!r} cannot code the values of a sparse tensor")
        if scheme not in self._registry:
            raise bad(f"unknown scheme {scheme!r} for the values of a sparse tensor", newer=True)
        self._registry[scheme].validate(values, shape, bad)
        if _by_channel(values) and values.get("axis") != 0:
            raise bad("the values of a sparse tensor have channels along axis 0 only")

    def entry_minor(self, q: Quant) -> int:
        return max(self.minor, self.inner(q).entry_minor(q["values"]))

    def affine(self, q: Quant) -> bool:
        return self.inner(q).affine(q["values"])

    def scale_groups(self, q: Quant, shape: Shape, count: int) -> int:
        return self.inner(q).scale_groups(q["values"], shape, q["nnz"])

    def values_offset(self, q: Quant, shape: Shape, count: int) -> int:
        return (count + 7) // 8 + self.inner(q).values_offset(q["values"], shape, q["nnz"])

    def payload_length(self, q: Quant, shape: Shape, count: int) -> int:
        return (count + 7) // 8 + self.inner(q).payload_length(q["values"], shape, q["nnz"])

    def check(self, payload: np.ndarray, q: Quant, shape: Shape, count: int, filt: str) -> str:
        import numpy as np

        bitmap = (count + 7) // 8
        kept = np.unpackbits(payload[:bitmap], count=count, bitorder="little")
        if int(np.count_nonzero(kept)) != q["nnz"]:
            return f"has a bitmap of {np.count_nonzero(kept)} positions for nnz {q['nnz']}"
        return self.inner(q).check(payload[bitmap:], q["values"], shape, q["nnz"], filt)

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

        bitmap, values = (count + 7) // 8, q["values"]
        if raw.device.type == "cpu":  # numpy unpacks and counts bits 20-40x faster
            bits, counts = _kept_numpy(raw[:bitmap].numpy(), count, shape, values)
            kept = torch.from_numpy(bits).view(torch.bool)
            counts = None if counts is None else torch.from_numpy(counts)
        else:
            shifts = torch.arange(8, dtype=torch.uint8, device=raw.device)
            kept = ((raw[:bitmap, None] >> shifts) & 1).view(-1)[:count].bool()
            counts = kept.view(_rows(shape)).sum(dim=1) if _by_channel(values) else None
        coded = raw[bitmap:] if bitmap % 4 == 0 else raw[bitmap:].clone()  # float32-aligned
        decoded = self.inner(q).decode(coded, values, shape, q["nnz"], filt, counts)
        out = torch.zeros(count, dtype=torch.float32, device=raw.device)
        return out.masked_scatter_(kept, decoded.reshape(-1))

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

        bitmap, values = (count + 7) // 8, q["values"]
        bits, counts = _kept_numpy(raw[:bitmap], count, shape, values)
        kept = bits.view(bool)
        decoded = self.inner(q).decode_numpy(raw[bitmap:], values, shape, q["nnz"], filt, counts)
        out = np.zeros(count, dtype=np.float32)
        out[kept] = decoded.reshape(-1)
        return out


def _kept_numpy(
    bitmap: np.ndarray, count: int, shape: Shape, values: Quant
) -> tuple[np.ndarray, np.ndarray | None]:
    """The bitmap unpacked to `count` uint8 flags, and with channel scales the number of
    kept values per channel (int64), else None."""
    import numpy as np

    bits = np.unpackbits(bitmap, count=count, bitorder="little")
    if not _by_channel(values):
        return bits, None
    return bits, bits.reshape(_rows(shape)).sum(axis=1, dtype=np.int64)


def _rows(shape: Shape) -> tuple[int, int]:
    """The shape as [channels, members]; `reshape(shape[0], -1)` fails on 0 channels."""
    return shape[0], math.prod(shape[1:])


def _by_channel(values: Quant) -> bool:
    return values.get("scheme") != "float" and values["granularity"] == "channel"
