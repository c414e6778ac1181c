"""`linear` (4, 8 and 16 bits, format 1.0) and `int2` (2 bits, format 1.2): uniform codes
`(u - zp) * scale` per group, symmetric (`zp = 2^(B-1)`, implied) or affine (`zp` stored).

`int2` is linear quantization at 2 bits under its own scheme name, so that readers older
than 1.2 refuse it with "unknown scheme, upgrade" rather than as a damaged `linear` entry.
Its symmetric writer uses the codes 1, 2, 3 (levels -1, 0, +1: ternary) and fits the scale
to the values instead of taking their maximum (see `Int2.fit_scale`).
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

from .base import Bad, Quant, Shape
from .grouped import Grouped, row_sums

if TYPE_CHECKING:
    import torch

FLOAT32_MAX = 3.4028234663852886e38


class Linear(Grouped):
    name = "linear"
    minor = 0
    bits_allowed = (4, 8, 16)

    def validate(self, q: Quant, shape: Shape, bad: Bad) -> None:
        super().validate(q, shape, bad)
        if not isinstance(q.get("symmetric"), bool):
            raise bad("quant.symmetric must be true or false")

    def affine(self, q: Quant) -> bool:
        return not q["symmetric"]

    def quantize(
        self, rows: torch.Tensor, counts: torch.Tensor, q: Quant
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-row (scale, zero point, codes) in float32 for [groups, members] `rows`
        (padding members are 0); zero rows get scale +0.0 (spec 3.4).

        Scales never exceed the exact quotient (see `_scale`), so symmetric codes decode
        within the row's largest magnitude and can never overflow. The codes are whole
        numbers held in a new float32 tensor the caller may reuse.
        """
        bits, symmetric = q["bits"], q["symmetric"]
        if rows.shape[1] == 0:
            zeros = rows.new_zeros(rows.shape[0])
            return zeros, zeros + (1 << (bits - 1) if symmetric else 0), rows.clone()
        scale, zp, fit = self.fit(rows, q)
        return scale, zp, self.codes(rows, fit)

    def fit(
        self, rows: torch.Tensor, q: Quant, width: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
        """Per-row (scale, zero point, what `codes` needs) of `quantize`, for rows of at
        least one member (zero-padded to `width` columns, see `row_sums`)."""
        import torch

        bits, symmetric = q["bits"], q["symmetric"]
        levels, half = (1 << bits) - 1, 1 << (bits - 1)
        high, low = rows.amax(dim=1), rows.amin(dim=1)
        if symmetric:
            # max |x| without a full-size abs() copy; the cap keeps the code 0 (u - zp =
            # -half, never written) finite too, as readers require of every code
            peak = torch.maximum(high, -low)
            scale = self.fit_scale(rows, peak, half, width)
        else:
            low, high = low.clamp(max=0), high.clamp(min=0)
            scale = scale_toward_zero(high.double() - low.double(), levels)
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))  # zero rows: codes = zp
        if symmetric:
            zp = torch.full_like(scale, float(half))
            lo, hi = zp - (half - 1), zp + (half - 1)
        else:
            zp = _no_negative_zero(torch.round(-low / safe).clamp_(0, levels))
            lo, hi = torch.zeros_like(zp), torch.full_like(zp, float(levels))
        return scale, zp, (safe, zp, lo, hi)

    def codes(self, rows: torch.Tensor, fit: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The float32 codes of `rows` (any columns of them) for the per-row `fit`."""
        import torch

        safe, zp, lo, hi = fit
        u = torch.div(rows, safe[:, None]).round_().add_(zp[:, None])
        return u.clamp_(min=lo[:, None], max=hi[:, None])

    def fit_scale(
        self, rows: torch.Tensor, peak: torch.Tensor, half: int, width: int = 0
    ) -> torch.Tensor:
        """The symmetric scale of each row: its largest magnitude over `half - 1` levels."""
        return scale_toward_zero(peak, half - 1, cap=FLOAT32_MAX / half)


class Int2(Linear):
    name = "int2"
    minor = 2
    bits_allowed = (2,)

    def fit_scale(
        self, rows: torch.Tensor, peak: torch.Tensor, half: int, width: int = 0
    ) -> torch.Tensor:
        """The ternary scale `s` that locally minimises the squared error of rounding each
        value to -s, 0 or +s: Lloyd's iteration `s = mean |x| over |x| > s / 2`, from
        `s = peak / 2`. Padding zeros never pass the threshold, so they do not count."""
        import torch

        scale = peak / 2
        for _ in range(8):
            threshold = (scale / 2)[:, None]
            total = row_sums(rows, partial(_above, threshold, True), width)
            n = row_sums(rows, partial(_above, threshold, False), width)
            scale = torch.where(n > 0, total / n.clamp(min=1), scale.double())
        return scale_toward_zero(scale, 1, cap=FLOAT32_MAX / half)


def _above(
    threshold: torch.Tensor, magnitudes: bool, piece: torch.Tensor, s: slice, _: slice
) -> torch.Tensor:
    """Of `piece` (rows `s`), the magnitudes above their row's threshold (else 0), or 1 for
    each of them (float32)."""
    import torch

    magnitude = piece.abs()
    kept = magnitude > threshold[s]
    return torch.where(kept, magnitude, 0) if magnitudes else kept.float()


def scale_toward_zero(span: torch.Tensor, divisor: int, cap: float = FLOAT32_MAX) -> torch.Tensor:
    """float32 scales `min(span / divisor, cap)` per group, rounded toward zero.

    The quotient is taken in float64 (a float32 `span` may be near 3.4e38, and a float32
    quotient could round up past it), and rounding toward zero guarantees
    `divisor * scale <= span`. A zero span gives +0.0, never -0.0: torch.maximum(+0.0, -0.0)
    is -0.0 on the vectorised CPU path, and readers refuse scales with the sign bit set.
    """
    import torch

    exact = span.double().div_(divisor).clamp_(max=cap)
    scale = exact.float()
    above = scale.double() > exact  # rounded up: step one float32 toward zero
    scale = torch.where(above, torch.nextafter(scale, torch.zeros_like(scale)), scale)
    return _no_negative_zero(scale)


def _no_negative_zero(t: torch.Tensor) -> torch.Tensor:
    """`t` (all >= 0) with any -0.0 replaced by +0.0."""
    import torch

    return torch.where(t > 0, t, torch.zeros_like(t))
