"""Linear quantization of signature tensors, and its exact inverse on any torch device.

A payload is `scales (float32 x G) | zero points (float32 x G, affine only) | values`.
Values are unsigned `bits`-wide integers `u`; a tensor element is `(u - zp) * scale`,
with `zp = 2**(bits-1)` implied for symmetric quantization. 16- and 32-bit values may be
split into byte planes (all low bytes, then the next, ...) so zstd sees similar bytes.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Any

import torch

from .container import GRANULARITIES, LINEAR_BITS, MAX_GROUP_SIZE, TensorInfo, decodes_finite
from .errors import RwsError, spell

if sys.byteorder != "little":  # payloads are little-endian and decoded by reinterpretation
    raise ImportError("rwsfmt needs a little-endian machine")

FLOAT32_MAX = float(torch.finfo(torch.float32).max)


@dataclass(frozen=True)
class QuantConfig:
    """How to store tensors: `bits` 4/8/16 (linear) or 32 (exact float32).

    `granularity` is 'channel' (one scale per output channel, axis 0; tensors of rank < 2
    fall back to one scale), 'tensor' or 'group' (`group_size` consecutive elements).
    """

    bits: int = 8
    symmetric: bool = True
    granularity: str = "channel"
    group_size: int = 128

    def __post_init__(self) -> None:
        """Refuse settings no file can hold (they may come from another file's provenance)."""
        if type(self.bits) is not int or self.bits not in (*LINEAR_BITS, 32):
            raise RwsError(f"bits={self.bits!r} is not supported", fix="use 4, 8, 16 or 32")
        if not isinstance(self.symmetric, bool):
            raise RwsError(f"symmetric={self.symmetric!r} must be True or False")
        if not isinstance(self.granularity, str) or self.granularity not in GRANULARITIES:
            raise RwsError(
                f"unknown granularity {self.granularity!r}", fix=f"use one of {GRANULARITIES}"
            )
        if type(self.group_size) is not int or not 1 <= self.group_size <= MAX_GROUP_SIZE:
            raise RwsError(
                f"group_size={self.group_size!r} must be a whole number from 1 to "
                f"{MAX_GROUP_SIZE:,}"
            )

    def metadata(self, shape: tuple[int, ...]) -> dict[str, Any]:
        """The header's `quant` object for a tensor of this shape."""
        if self.bits == 32:
            return {"scheme": "float", "bits": 32}
        q: dict[str, Any] = {"scheme": "linear", "bits": self.bits, "symmetric": self.symmetric}
        if self.granularity == "channel" and len(shape) >= 2:
            q.update(granularity="channel", axis=0)
        elif self.granularity == "group":
            q.update(granularity="group", group_size=self.group_size)
        else:
            q["granularity"] = "tensor"
        return q

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"bits": self.bits}
        if self.bits != 32:
            out.update(symmetric=self.symmetric, granularity=self.granularity)
            if self.granularity == "group":
                out["group_size"] = self.group_size
        return out


@dataclass(frozen=True)
class Encoded:
    """A tensor turned into payload bytes, with the header fields that describe them."""

    quant: dict[str, Any]
    filter: str
    payload: bytes
    rel_error: float  # ||decoded - x|| / ||x||, measured at write time (0 for a zero tensor)


def encode(x: torch.Tensor, config: QuantConfig, name: str = "tensor") -> Encoded:
    """Quantize `x` (any float dtype, any device) into a payload per `config`.

    Raises `RwsError` (naming the tensor `name`) when affine codes would decode beyond the
    float32 range, which only happens for values within a step of +-3.4e38.
    """
    x32 = x.detach().to(torch.float32)
    quant = config.metadata(tuple(x.shape))
    if quant["scheme"] == "float":
        payload = _planes(x32.reshape(-1).cpu().view(torch.uint8), 4)
        return Encoded(quant, "byteplane", payload, 0.0)
    bits, n = quant["bits"], x32.numel()
    groups = _as_groups(x32.reshape(-1), quant, x.shape)
    scale, zp, u = _quantize_groups(groups, bits, quant["symmetric"])
    scale_np, zp_np = scale.cpu().numpy(), zp.cpu().numpy()
    if not decodes_finite(scale_np, zp_np, bits).all():
        raise RwsError(
            f"tensor {name!r} holds values too close to the float32 limit (3.4e38) for "
            f"{bits}-bit affine quantization: they would decode to infinity",
            fix=f"store it exactly ({spell('--bits 32', 'bits=32')}) or symmetrically quantized",
        )
    codes = u.reshape(-1)[:n].to(torch.uint8 if bits == 8 else torch.int32).cpu()
    # reuse u for the error: decoded - x = (u - zp) * scale - x, one pass, no new tensor
    error = u.sub_(zp[:, None]).mul_(scale[:, None]).sub_(groups)
    norm = _norm(x32)
    rel_error = _norm(error) / norm if norm else 0.0
    parts = [scale_np.tobytes()]
    if not quant["symmetric"]:
        parts.append(zp_np.tobytes())
    filt = "none"
    if bits == 8:
        parts.append(codes.numpy().tobytes())
    elif bits == 16:
        low_high = torch.stack([codes & 0xFF, codes >> 8], dim=1).to(torch.uint8)
        parts.append(_planes(low_high.reshape(-1), 2))
        filt = "byteplane"
    else:  # 4 bits: element 2i in the low nibble, 2i+1 in the high nibble
        padded = torch.nn.functional.pad(codes, (0, n % 2))
        parts.append(((padded[0::2] | (padded[1::2] << 4)).to(torch.uint8)).numpy().tobytes())
    return Encoded(quant, filt, b"".join(parts), rel_error)


# Below this a float32 norm may have lost the squares that underflow (values under ~1e-19).
_SMALL_NORM = 1e-6


def _norm(t: torch.Tensor) -> float:
    """||t||_2 as a Python float, finite for any finite `t`.

    float32 accumulation overflows once squares pass 3.4e38 (values over ~1.8e19) and drops
    tiny values whose squares underflow; only then is the norm recomputed in float64, which
    costs a full-size float64 copy of `t`.
    """
    norm = float(torch.linalg.vector_norm(t))
    if math.isinf(norm) or (norm < _SMALL_NORM and bool(t.any())):
        norm = float(torch.linalg.vector_norm(t, dtype=torch.float64))
    return norm


def decode(
    payload: bytearray, info: TensorInfo, device: torch.device | str | None = None
) -> torch.Tensor:
    """The float32 tensor a payload stands for, dequantized on `device`.

    Only the payload bytes are moved to the device; the arithmetic happens there.
    """
    n, q = info.numel, info.quant
    raw = (
        torch.frombuffer(payload, dtype=torch.uint8)
        if len(payload)
        else torch.empty(0, dtype=torch.uint8)
    )
    raw = raw.to(device) if device is not None else raw
    values = raw[info.values_offset :]
    if q["scheme"] == "float":
        if info.filter == "byteplane":
            values = values.view(4, n).t().contiguous().reshape(-1)
        return values.view(torch.float32).reshape(info.shape)
    bits, g = q["bits"], info.n_scales
    # abs(): a -0.0 scale (rwsfmt 0.1.0, all-zero groups) reads as +0.0, spec 3.6;
    # check_payload has refused every other negative scale
    scale = raw[: 4 * g].view(torch.float32).abs()
    if q["symmetric"]:
        zp = torch.full_like(scale, float(1 << (bits - 1)))
    else:
        zp = raw[4 * g : 8 * g].view(torch.float32)
    if bits == 8:
        u = values
    elif bits == 16:
        pairs = values.view(2, n).t() if info.filter == "byteplane" else values.view(n, 2)
        u = pairs[:, 0].to(torch.int32) | (pairs[:, 1].to(torch.int32) << 8)
    else:
        u = torch.stack([values & 0x0F, values >> 4], dim=1).reshape(-1)[:n]
    u = u.to(torch.float32)
    if q["granularity"] == "group":
        return _dequantize_groups(u, scale, zp, q["group_size"]).reshape(info.shape)
    u = u.reshape(info.shape)
    if q["granularity"] == "channel":
        view = [1] * len(info.shape)
        view[q["axis"]] = g
        scale, zp = scale.view(view), zp.view(view)
    else:
        scale, zp = scale[0], zp[0]
    return u.sub_(zp).mul_(scale)


def _dequantize_groups(
    u: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, group_size: int
) -> torch.Tensor:
    """`(u - zp) * scale` per run of `group_size` elements; the last run may be short."""
    n = u.numel()
    full = n // group_size
    head = u[: full * group_size].view(full, group_size)
    head.sub_(zp[:full, None]).mul_(scale[:full, None])
    tail = u[full * group_size :]
    if tail.numel():
        tail.sub_(zp[full]).mul_(scale[full])
    return u


def _as_groups(flat: torch.Tensor, quant: dict[str, Any], shape: torch.Size) -> torch.Tensor:
    """View the flat tensor as [groups, members] rows that share one scale."""
    if quant["granularity"] == "channel":
        return flat.view(shape[0], math.prod(shape[1:]))
    if quant["granularity"] == "group":
        n, gs = flat.numel(), quant["group_size"]
        g = math.ceil(n / gs)
        if g == 1:  # no padding up to a group size much larger than the tensor
            return flat.view(1, -1)
        return torch.nn.functional.pad(flat, (0, g * gs - n)).view(g, gs)
    return flat.view(1, -1)


def _quantize_groups(
    g: torch.Tensor, bits: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row (scale, zero point, codes) in float32; zero rows get scale +0.0.

    Scales never exceed the exact quotient (see `_scale`), so symmetric codes decode within
    the row's largest magnitude and can never overflow. The codes are whole numbers held in
    a new float32 tensor the caller may reuse.
    """
    if g.shape[1] == 0:
        zeros = torch.zeros(g.shape[0], dtype=torch.float32, device=g.device)
        return zeros, zeros + (1 << (bits - 1) if symmetric else 0), g.clone()
    levels, half = (1 << bits) - 1, 1 << (bits - 1)
    high, low = g.amax(dim=1), g.amin(dim=1)
    if symmetric:
        # max |x| without a full-size abs() copy; the cap keeps the code 0 (u - zp = -half,
        # never written) finite too, as readers require of every code
        scale = _scale(torch.maximum(high, -low), half - 1, cap=FLOAT32_MAX / half)
    else:
        low, high = low.clamp(max=0), high.clamp(min=0)
        scale = _scale(high.double() - low.double(), levels)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))  # zero groups: codes = zp
    if symmetric:
        zp = torch.full_like(scale, float(half))
        lo, hi = zp - (half - 1), zp + (half - 1)
    else:
        zp = _no_negative_zero(torch.round(-low / safe).clamp_(0, levels))
        lo, hi = torch.zeros_like(zp), torch.full_like(zp, float(levels))
    u = torch.div(g, safe[:, None]).round_().add_(zp[:, None])
    return scale, zp, u.clamp_(min=lo[:, None], max=hi[:, None])


def _scale(span: torch.Tensor, divisor: int, cap: float = FLOAT32_MAX) -> torch.Tensor:
    """float32 scales `min(span / divisor, cap)` per group, rounded toward zero.

    The quotient is taken in float64 (a float32 `span` may be near 3.4e38, and a float32
    quotient could round up past it), and rounding toward zero guarantees
    `divisor * scale <= span`. A zero span gives +0.0, never -0.0: torch.maximum(+0.0, -0.0)
    is -0.0 on the vectorised CPU path, and readers refuse scales with the sign bit set.
    """
    exact = span.double().div_(divisor).clamp_(max=cap)
    scale = exact.float()
    above = scale.double() > exact  # rounded up: step one float32 toward zero
    scale = torch.where(above, torch.nextafter(scale, torch.zeros_like(scale)), scale)
    return _no_negative_zero(scale)


def _no_negative_zero(t: torch.Tensor) -> torch.Tensor:
    """`t` (all >= 0) with any -0.0 replaced by +0.0."""
    return torch.where(t > 0, t, torch.zeros_like(t))


def _planes(byte_view: torch.Tensor, itemsize: int) -> bytes:
    """Split interleaved little-endian items into `itemsize` byte planes."""
    return byte_view.view(-1, itemsize).t().contiguous().numpy().tobytes()
