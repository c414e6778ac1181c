"""`float` (format 1.0): exact float32 values, little-endian, optionally split in byte planes."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import Bad, Quant, Scheme, Shape

if TYPE_CHECKING:
    import numpy as np
    import torch


class Float32(Scheme):
    name = "float"
    minor = 0

    def validate(self, q: Quant, shape: Shape, bad: Bad) -> None:
        if q["bits"] != 32:
            raise bad(f"float scheme with {q['bits']} bits is not supported")

    def values_offset(self, q: Quant, shape: Shape, count: int) -> int:
        return 0

    def payload_length(self, q: Quant, shape: Shape, count: int) -> int:
        return 4 * count

    def check(self, payload: np.ndarray, q: Quant, shape: Shape, count: int, filt: str) -> str:
        planes = payload.reshape(4, count) if filt == "byteplane" else payload.reshape(count, 4).T
        # a little-endian float32 is NaN or infinite when its exponent bits are all ones
        if (((planes[3] & 0x7F) == 0x7F) & (planes[2] >= 0x80)).any():
            return "holds NaN or infinite values"
        return ""

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

        if filt == "byteplane":
            raw = raw.view(4, count).t().contiguous().reshape(-1)
        return raw.view(torch.float32)

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

        if filt == "byteplane":
            raw = np.ascontiguousarray(raw.reshape(4, count).T)
        return raw.view("<f4")
