"""`sign` (format 1.2): one bit per value and a float32 scale per group, as BitDelta stores
a delta. Bit 1 decodes to `+scale`, bit 0 to `-scale`; the writer sets each scale to the mean
magnitude of its group's values, which minimises the squared error for the given signs."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .base import Quant
from .grouped import Grouped, row_sums

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
        scale, _, fit = self.fit(rows, q, counts=counts)
        return scale, None, self.codes(rows, fit)

    def fit(
        self, rows: torch.Tensor, q: Quant, width: int = 0, counts: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, None, tuple[()]]:
        """Per-row (scale, None, what `codes` needs) of `quantize`; the rows zero-padded to
        `width` columns (see `row_sums`), `counts` real members each (default: all)."""
        import torch

        total = row_sums(rows, lambda piece, _, __: piece.abs(), width)
        if counts is None:
            counts = torch.full_like(total, rows.shape[1])
        scale = (total / counts.clamp(min=1)).float()
        return torch.where(scale > 0, scale, torch.zeros_like(scale)), None, ()

    def codes(self, rows: torch.Tensor, fit: tuple[()]) -> torch.Tensor:
        """The float32 codes of `rows` (any columns of them): 1 for x >= 0, else 0."""
        import torch

        return (rows >= 0).to(torch.float32)
