"""`sign` (format 1.2): one bit per value and a float32 scale per group, as BitDelta stores
a delta. Bit 1 decodes to `+scale`, bit 0 to `-scale`; the writer sets each scale to the mean
magnitude of its group's values, which minimises the squared error for the given signs."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .base import Quant
from .grouped import Grouped

if TYPE_CHECKING:
    import torch


class Sign(Grouped):
    name = "sign"
    minor = 2
    bits_allowed = (1,)

    def implied_zero_point(self, q: Quant) -> float:
        return 0.0

    def level_range(self, bits: int) -> tuple[float, float]:
        return -1.0, 1.0

    def to_levels(self, u: Any) -> Any:
        """Bit 1 stands for +1, bit 0 for -1: `2u - 1`, exact in float32."""
        u *= 2
        u -= 1
        return u

    def quantize(
        self, rows: torch.Tensor, counts: torch.Tensor, q: Quant
    ) -> tuple[torch.Tensor, None, torch.Tensor]:
        """Per-row (scale, None, codes): scale = mean |x| over the row's `counts` real
        members (float32, +0.0 for a zero row), code 1 for x >= 0."""
        import torch

        total = rows.abs().sum(dim=1, dtype=torch.float64)
        scale = (total / counts.clamp(min=1)).float()
        scale = torch.where(scale > 0, scale, torch.zeros_like(scale))
        return scale, None, (rows >= 0).to(torch.float32)
