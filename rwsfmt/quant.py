"""How tensors are stored: `QuantConfig`, and `encode`/`decode` through the format's schemes.

Dense tensors are stored in one scheme (`format.schemes`): exact float32, linear codes of
4/8/16 bits, 2-bit codes (`int2`) or signs with a scale (`sign`, 1 bit). With `density` below
1 only the largest entries are kept (`sparse`): a bitmap of their positions, then their
values in one of those schemes. Decoding happens on the target device.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

import torch

from .container import TensorInfo
from .errors import RwsError, spell
from .format import chunked
from .format.schemes import GRANULARITIES, MAX_GROUP_SIZE, decodes_finite, scheme_of
from .format.schemes.grouped import row_sums
from .format.schemes.linear import FLOAT32_MAX, scale_toward_zero

if sys.byteorder != "little":  # payloads are little-endian and decoded by reinterpretation
    raise ImportError("rwsfmt needs a little-endian machine")

BITS = (1, 2, 4, 8, 16, 32)
SPARSITIES = ("tensor", "channel")
FITS = ("direction", "error")
_VALUE_SCHEMES = {1: "sign", 2: "int2", 32: "float"}  # every other width is "linear"
AUTO_DENSITIES = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5)  # sparse choices of 'auto'


@dataclass(frozen=True)
class QuantConfig:
    """How to store tensors.

    `bits`: 32 (exact float32), 16/8/4 (linear codes), 2 (2-bit codes: ternary when
    symmetric), 1 (the sign of each value and a scale per group), or "auto" (a scheme per
    tensor, chosen to fit `target_bpp` bits per parameter over the whole file).
    `granularity`: 'channel' (one scale per output channel, axis 0; tensors of rank < 2
    fall back to one scale), 'tensor' or 'group' (`group_size` consecutive values).
    `density` < 1 keeps only that share of each tensor's entries, the largest in magnitude,
    chosen per tensor or per output channel (`sparsity`).
    `fit` says how the scales of 1- and 2-bit codes and of sparse tensors are chosen:
    'error' (default) for the least squared error, which shrinks the stored direction;
    'direction' so that the stored tensor's projection on the original is the original,
    group by group, which on the digits signatures kept more of the robustness gain at
    2 bits (0.98 against 0.90) and for sparse signs (density 0.5: 1.04 against 0.95), and
    less for dense signs (0.51 against 0.83) and the sparsest storage, whose few kept values
    it scales up many times (`benchmarks/results/rate_distortion.md`). 4/8/16-bit dense
    codes round without that bias and always use their 1.0 scales.
    """

    bits: int | str = 8
    symmetric: bool = True
    granularity: str = "channel"
    group_size: int = 128
    density: float = 1.0
    sparsity: str = "tensor"
    target_bpp: float | None = None
    fit: str = "error"

    def __post_init__(self) -> None:
        """Refuse settings no file can hold (they may come from another file's provenance)."""
        auto = self.bits == "auto"
        if not auto and (type(self.bits) is not int or self.bits not in BITS):
            raise RwsError(
                f"bits={self.bits!r} is not supported", fix="use 1, 2, 4, 8, 16, 32 or 'auto'"
            )
        if not isinstance(self.symmetric, bool):
            raise RwsError(f"symmetric={self.symmetric!r} must be True or False", fix="pass a bool")
        if self.bits == 1 and not self.symmetric:
            raise RwsError(
                "1-bit codes store signs, which have no zero point to make them affine",
                fix="use symmetric=True with bits=1, or 2 bits or more for affine codes",
            )
        if not isinstance(self.granularity, str) or self.granularity not in GRANULARITIES:
            raise RwsError(
                f"unknown granularity {self.granularity!r}", fix=f"use one of {GRANULARITIES}"
            )
        if type(self.group_size) is not int or not 1 <= self.group_size <= MAX_GROUP_SIZE:
            raise RwsError(
                f"group_size={self.group_size!r} must be a whole number from 1 to "
                f"{MAX_GROUP_SIZE:,}",
                fix="use a group size such as 64 or 128",
            )
        if not _real(self.density) or not 0 < self.density <= 1:
            raise RwsError(
                f"density={self.density!r} must be a share of entries kept, above 0 and at most 1",
                fix="use e.g. density=0.1 to keep the largest 10%, or 1 to keep every entry",
            )
        if not isinstance(self.sparsity, str) or self.sparsity not in SPARSITIES:
            raise RwsError(f"unknown sparsity {self.sparsity!r}", fix=f"use one of {SPARSITIES}")
        if not isinstance(self.fit, str) or self.fit not in FITS:
            raise RwsError(f"unknown fit {self.fit!r}", fix=f"use one of {FITS}")
        if auto != (self.target_bpp is not None):
            raise RwsError(
                "bits='auto' and target_bpp go together",
                fix="give both (bits='auto', target_bpp=0.5), or neither",
            )
        if auto and (not _real(self.target_bpp) or not 0 < self.target_bpp <= 32):
            raise RwsError(
                f"target_bpp={self.target_bpp!r} must be a number of bits per parameter, "
                "above 0 and at most 32",
                fix="use e.g. target_bpp=0.5",
            )

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> QuantConfig:
        """The config a `to_json` record describes (missing keys take their defaults);
        `RwsError` for anything a config does not accept."""
        known = {k: v for k, v in record.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    @property
    def sparse(self) -> bool:
        return self.density < 1

    @property
    def fitted(self) -> bool:
        """Whether `fit` applies: to 1- and 2-bit codes and to sparse tensors."""
        return self.bits in (1, 2, "auto") or self.sparse

    def values_metadata(self, shape: tuple[int, ...]) -> dict[str, Any]:
        """The header's `quant` object for the stored values of a tensor of this shape
        (a sparse tensor's `values`)."""
        scheme = _VALUE_SCHEMES.get(self.bits, "linear")
        q: dict[str, Any] = {"scheme": scheme, "bits": self.bits}
        if scheme == "float":
            return q
        if scheme != "sign":
            q["symmetric"] = self.symmetric
        if self.fitted:
            q["fit"] = self.fit  # informative (spec 3.7): readers ignore it
        if self.granularity == "channel" and len(shape) >= 2:
            q.update(granularity="channel", axis=0)
        elif self.granularity == "group":
            q.update(granularity="group", group_size=self.group_size)
        else:
            q["granularity"] = "tensor"
        return q

    def metadata(self, shape: tuple[int, ...], nnz: int) -> dict[str, Any]:
        """The header's `quant` object for a tensor of this shape (`nnz`: the entries a
        sparse one keeps); `bits='auto'` has none of its own."""
        values = self.values_metadata(shape)
        if not self.sparse:
            return values
        return {
            "scheme": "sparse",
            "bits": self.bits,
            "index": "bitmap",
            "nnz": nnz,
            "values": values,
        }

    def describes(self, quant: dict[str, Any], shape: tuple[int, ...]) -> bool:
        """Whether a tensor stored with `quant` is stored as this config would store it."""
        if self.bits == "auto":
            return False
        if not self.sparse:
            return quant == self.values_metadata(shape)
        return quant.get("scheme") == "sparse" and quant.get("values") == self.values_metadata(
            shape
        )

    def to_json(self) -> dict[str, Any]:
        """The settings as recorded in provenance: those that matter for `bits`."""
        out: dict[str, Any] = {"bits": self.bits}
        if self.bits == "auto":  # the settings its candidates share
            out.update(target_bpp=self.target_bpp, sparsity=self.sparsity)
        if self.bits != 32:
            if self.bits != 1:
                out["symmetric"] = self.symmetric
            out["granularity"] = self.granularity
            if self.granularity == "group":
                out["group_size"] = self.group_size
        if self.sparse:
            out.update(density=self.density, sparsity=self.sparsity)
        if self.fitted:
            out["fit"] = self.fit
        return out

    def replace(self, **changes: Any) -> QuantConfig:
        return QuantConfig(**{**asdict(self), **changes})

    def candidates(self) -> list[QuantConfig]:
        """The storages `bits='auto'` chooses from for each tensor: signs of the largest
        entries at rising density (the sparsest also with one scale per tensor, as per-channel
        scales outweigh a few kept signs), dense signs, then 2/4/8/16-bit codes; all with
        this config's granularity, group size and sparsity otherwise."""
        base = self.replace(bits=8, target_bpp=None, density=1.0)
        signs = base.replace(bits=1, symmetric=True)
        return [
            *(signs.replace(density=d, granularity="tensor") for d in AUTO_DENSITIES[:3]),
            *(signs.replace(density=d) for d in AUTO_DENSITIES),
            signs,
            *(base.replace(bits=b) for b in (2, 4, 8, 16)),
        ]


def _real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class Encoded:
    """A tensor turned into payload bytes, with the header fields that describe them."""

    quant: dict[str, Any]
    filter: str
    payload: bytes
    rel_error: float  # ||decoded - x|| / ||x||, measured at write time (0 for a zero tensor)


def encode(x: torch.Tensor, config: QuantConfig, name: str = "tensor") -> Encoded:
    """Store `x` (any float dtype, any device) per `config` (not 'auto': one scheme).

    Raises `RwsError` (naming the tensor `name`) when affine codes would decode beyond the
    float32 range, which only happens for values within a step of +-3.4e38.
    """
    if config.bits == "auto":
        raise RwsError(
            "encode() stores one tensor in one scheme; bits='auto' picks them per file",
            fix="pass a QuantConfig with bits=1, 2, 4, 8, 16 or 32 to encode()",
        )
    x32 = x.detach().to(torch.float32)
    shape, flat = tuple(x.shape), x32.reshape(-1)
    values_quant = config.values_metadata(shape)
    parts: list[bytes] = []
    channel_counts = None
    lost: torch.Tensor | float | None = 1.0 if config.fitted and config.fit == "direction" else None
    if config.sparse:
        kept = top_share(x32, config.density, config.sparsity)
        by_channel = values_quant.get("granularity") == "channel"
        if lost is not None:  # per channel where both the choice and the scales are
            per_channel = by_channel and config.sparsity == "channel"
            lost = _energy_ratio(flat, kept, shape[0] if per_channel else 1)
        flat = flat[kept]
        if by_channel:
            channel_counts = kept.view(shape[0], math.prod(shape[1:])).sum(dim=1)
        quant = config.metadata(shape, nnz=flat.numel())
        parts.append(_pack_codes(kept.to(torch.uint8), 1))
    else:
        quant = values_quant
        if _by_chunks(flat, quant):
            filt, payload, rel_error = _encode_chunked(flat, quant, shape, name, lost)
            return Encoded(quant, filt, payload, rel_error)
    filt, coded = _encode_values(flat, values_quant, shape, channel_counts, name, lost)
    payload = b"".join([*parts, *coded])
    info = TensorInfo(name, "delta", shape, "float32", quant, filt, "raw", 0, 0, 0, "")
    error = decode(bytearray(payload), info, x32.device).sub_(x32).reshape(-1)
    if not config.sparse and values_quant["scheme"] != "float":
        # summed as rows, as rwsfmt before 1.2 did, so 1.0 files keep their bytes (the
        # float32 sum of a zero-padded last group rounds differently)
        error = _as_rows(error, values_quant, shape, None)[0]
    norm = vector_norm(x32)
    return Encoded(quant, filt, payload, vector_norm(error) / norm if norm else 0.0)


def _by_chunks(flat: torch.Tensor, q: dict[str, Any]) -> bool:
    """Whether a dense tensor is large enough to be encoded by chunks (every dense scheme:
    scales need only their own group's values)."""
    return 4 * flat.numel() > chunked.WHOLE


def _encode_chunked(
    flat: torch.Tensor,
    q: dict[str, Any],
    shape: tuple[int, ...],
    name: str,
    lost: float | None,
) -> tuple[str, bytearray, float]:
    """(filter, payload, relative error) of a large dense tensor, written a block of rows or
    columns at a time into the payload, so that encoding adds the payload and a few chunks
    to the tensor, not copies of it (with `lost`, `fit='direction'` scales). The bytes are
    `_encode_values`' exactly (its row sums are `row_sums`' too); the error is summed in
    float64 by chunks (for `_encode_values` it is a float32 norm)."""
    count, scheme, step = flat.numel(), scheme_of(q), chunked.CHUNK
    payload = bytearray(scheme.payload_length(q, shape, count))
    if q["scheme"] == "float":
        for v0 in range(0, count, step):
            part = flat[v0 : v0 + step].cpu().view(torch.uint8).view(-1, 4).t()
            for p in range(4):
                at = p * count + v0
                payload[at : at + part.shape[1]] = part[p].contiguous().numpy().tobytes()
        return "byteplane", payload, 0.0  # exact
    bits, groups = q["bits"], scheme.scale_groups(q, shape, count)
    codes_at = scheme.values_offset(q, shape, count)
    pending, packed_at = torch.empty(0, dtype=torch.uint8), codes_at  # codes not yet packed
    squares = 0.0
    for rows, r0, e0, members in _row_blocks(flat, q, shape, groups):
        scale, zp, fit = scheme.fit(rows, q, members)  # a last partial group as if padded
        short = rows.shape[1] <= step  # one pass of columns: its codes made once
        codes = scheme.codes(rows, fit) if short else None
        if lost is not None:
            pieces = partial(_known, codes) if short else partial(_codes, scheme, fit)
            scale = _direction_scales(rows, pieces, zp, q, lost, scale, members)
        _refuse_overflow(scale, zp if scheme.affine(q) else None, q, name)
        scale_np = scale.cpu().numpy()
        payload[4 * r0 : 4 * (r0 + len(scale_np))] = scale_np.tobytes()
        if scheme.affine(q):
            at = 4 * (groups + r0)
            payload[at : at + 4 * len(scale_np)] = zp.cpu().numpy().tobytes()
        for c0 in range(0, rows.shape[1], step):  # one pass, unless one row is longer
            part = rows[:, c0 : c0 + step]
            u = codes if short else scheme.codes(part, fit)
            decoded = _levels(scheme, u, zp).mul_(scale[:, None])  # the decoder's steps
            squares += float(decoded.sub_(part).double().square().sum())
            del decoded
            start, n = e0 + c0, u.numel()
            if bits == 8:
                payload[codes_at + start : codes_at + start + n] = _bytes(u.to(torch.uint8))
            elif bits == 16:
                whole = u.to(torch.int32)
                low, high = (whole & 0xFF).to(torch.uint8), (whole >> 8).to(torch.uint8)
                payload[codes_at + start : codes_at + start + n] = _bytes(low)
                at = codes_at + count + start
                payload[at : at + n] = _bytes(high)
            else:  # packed whole bytes at a time; the codes of a partial byte wait
                pending = torch.cat([pending, u.reshape(-1).to(torch.uint8).cpu()])
                ready = len(pending) - len(pending) % (8 // bits)
                piece = _pack_codes(pending[:ready], bits)
                payload[packed_at : packed_at + len(piece)] = piece
                pending, packed_at = pending[ready:], packed_at + len(piece)
    if len(pending):
        payload[packed_at:] = _pack_codes(pending, bits)  # zero-padded, as `_pack_codes` is
    norm = vector_norm(flat)
    return (
        "none" if bits != 16 else "byteplane",
        payload,
        math.sqrt(squares) / norm if norm else 0.0,
    )


def _codes(scheme: Any, fit: tuple, piece: torch.Tensor, s: slice, _: slice) -> torch.Tensor:
    """The codes of `piece`, rows `s` of those `fit` was fitted to."""
    return scheme.codes(piece, tuple(t[s] for t in fit))


def _known(codes: torch.Tensor, _: torch.Tensor, s: slice, c: slice) -> torch.Tensor:
    """The codes of rows `s`, columns `c`, from the block's `codes`."""
    return codes[s, c]


def _row_blocks(flat: torch.Tensor, q: dict[str, Any], shape: tuple[int, ...], groups: int) -> Any:
    """`(rows, first row, first element, members)` for blocks of whole rows (groups that
    share a scale, of `members` values) of at most `chunked.CHUNK` elements, or single rows
    when they are longer; the last partial group is its own block, unpadded (its scale is
    fitted as if padded with zeros to `members`, as `_as_rows` pads it)."""
    count, granularity = flat.numel(), q["granularity"]
    if granularity == "channel":
        members = math.prod(shape[1:])
    elif granularity == "group":
        members = min(q["group_size"], count)
    else:
        members = count
    full = count // members if members else 0
    per_block = max(1, chunked.CHUNK // max(members, 1))
    for r0 in range(0, full, per_block):
        r1 = min(r0 + per_block, full)
        rows = flat[r0 * members : r1 * members].view(r1 - r0, members)
        yield rows, r0, r0 * members, members
    if full * members < count:
        yield flat[full * members :].view(1, -1), full, full * members, members


def _refuse_overflow(
    scale: torch.Tensor, zp: torch.Tensor | None, q: dict[str, Any], name: str
) -> None:
    """Raise `RwsError` when affine codes of these groups would decode beyond float32."""
    if zp is None:
        return
    scheme = scheme_of(q)
    if not decodes_finite(
        scale.cpu().numpy(), zp.cpu().numpy(), *scheme.level_range(q["bits"])
    ).all():
        raise RwsError(
            f"tensor {name!r} holds values too close to the float32 limit (3.4e38) for "
            f"{q['bits']}-bit affine quantization: they would decode to infinity",
            fix=f"store it exactly ({spell('--bits 32', 'bits=32')}) or symmetrically quantized",
        )


def _bytes(t: torch.Tensor) -> bytes:
    return t.reshape(-1).cpu().numpy().tobytes()


def top_share(x: torch.Tensor, density: float, sparsity: str) -> torch.Tensor:
    """Flat bool mask of the `round(density * m)` (at least 1) largest-magnitude nonzero
    entries of each row of `m` entries: the whole tensor, or each output channel (axis 0)
    for `sparsity='channel'` on tensors of rank >= 2. Ties at the threshold go to the
    earliest entries in row-major order, so the choice is deterministic."""
    by_channel = sparsity == "channel" and x.dim() >= 2
    rows = x.shape[0] if by_channel else 1
    magnitude = x.abs().reshape(rows, x.numel() // rows if rows else 0)
    m = magnitude.shape[1]
    keep = min(m, max(1, round(density * m)))
    if m == 0 or magnitude.shape[0] == 0:
        return torch.zeros(x.numel(), dtype=torch.bool, device=x.device)
    threshold = magnitude.kthvalue(m - keep + 1, dim=1).values[:, None]
    above = magnitude > threshold
    tie = magnitude == threshold
    room = keep - above.sum(dim=1, keepdim=True)
    kept = above | (tie & (tie.cumsum(dim=1) <= room))
    return (kept & (magnitude > 0)).reshape(-1)


def _energy_ratio(flat: torch.Tensor, kept: torch.Tensor, rows: int) -> torch.Tensor:
    """Per row of the tensor (1, or one per channel): its squared norm over that of its kept
    entries (1 where nothing is kept), float64 [rows]."""
    square = flat.square().view(rows, -1) if rows else flat.square().view(0, 0)
    whole = square.sum(dim=1, dtype=torch.float64)
    kept_part = torch.where(kept.view(square.shape), square, 0).sum(dim=1, dtype=torch.float64)
    return torch.where(kept_part > 0, whole / kept_part.clamp(min=1e-300), 1.0)


def _encode_values(
    flat: torch.Tensor,
    q: dict[str, Any],
    shape: tuple[int, ...],
    channel_counts: torch.Tensor | None,
    name: str,
    lost: torch.Tensor | float | None,
) -> tuple[str, list[bytes]]:
    """(filter, payload parts) for the `count` values `flat` stored per `q`; with `lost`
    (the `fit='direction'` energy ratios of `_energy_ratio`, or 1), scales are fitted so
    each row's projection on its values keeps `lost` times their energy."""
    if q["scheme"] == "float":
        if isinstance(lost, torch.Tensor):  # sparse exact values: scaled up as a whole
            flat = (flat.double() * lost).float()
        return "byteplane", [_planes(flat.cpu().view(torch.uint8), 4)]
    bits, count, scheme = q["bits"], flat.numel(), scheme_of(q)
    rows, counts, order = _as_rows(flat, q, shape, channel_counts)
    scale, zp, u = scheme.quantize(rows, counts, q)
    if lost is not None:
        scale = _direction_scales(rows, lambda _, s, c: u[s, c], zp, q, lost, scale)
    scale_np = scale.cpu().numpy()
    parts = [scale_np.tobytes()]
    if scheme.affine(q):
        _refuse_overflow(scale, zp, q, name)
        parts.append(zp.cpu().numpy().tobytes())
    codes = order(u)[:count]
    if bits == 16:
        codes = codes.to(torch.int32).cpu()
        low_high = torch.stack([codes & 0xFF, codes >> 8], dim=1).to(torch.uint8)
        return "byteplane", [*parts, _planes(low_high.reshape(-1), 2)]
    return "none", [*parts, _pack_codes(codes.to(torch.uint8), bits)]


def _direction_scales(
    rows: torch.Tensor,
    codes: Callable[[torch.Tensor, slice, slice], torch.Tensor],
    zp: torch.Tensor | None,
    q: dict[str, Any],
    lost: torch.Tensor | float,
    scale: torch.Tensor,
    width: int = 0,
) -> torch.Tensor:
    """Scales that make each row's decoded values project onto the row with `lost` times
    its squared norm: `scale = lost * sum(x^2) / sum(level * x)` over its members, with the
    codes kept (rows whose codes do not point along them keep their scale); `codes(piece,
    rows, columns)` gives the codes of `rows[rows, columns]`, and the sums are `row_sums`'
    (`width`: see there). Rounded toward zero to float32, capped so that every code decodes
    to a finite value."""
    scheme = scheme_of(q)

    def projection(piece: torch.Tensor, s: slice, c: slice) -> torch.Tensor:
        return _levels(scheme, codes(piece, s, c), None if zp is None else zp[s]).mul_(piece)

    along = row_sums(rows, projection, width)
    target = row_sums(rows, lambda piece, _, __: piece.square(), width) * lost
    fitted = torch.where(along > 0, target / along.clamp(min=1e-300), scale.double())
    return scale_toward_zero(fitted, 1, cap=FLOAT32_MAX / (1 << (q["bits"] - 1)))


def _levels(scheme: Any, u: torch.Tensor, zp: torch.Tensor | None) -> torch.Tensor:
    """`level(u) - zp` per row of float32 codes `u` (a new tensor), the decoder's steps."""
    levels = scheme.to_levels(u.clone())
    return levels if zp is None else levels.sub_(zp[:, None])


def _as_rows(
    flat: torch.Tensor,
    q: dict[str, Any],
    shape: tuple[int, ...],
    channel_counts: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """The values as [groups, members] rows that share one scale, zero-padded; the real
    members per row; and a function that puts per-row codes back in value order."""
    count, granularity = flat.numel(), q["granularity"]
    flatten = torch.Tensor.reshape
    if granularity == "channel" and channel_counts is not None:  # sparse: ragged channels
        rows = torch.zeros(shape[0], int(channel_counts.max()) if count else 0, device=flat.device)
        valid = torch.arange(rows.shape[1], device=flat.device) < channel_counts[:, None]
        rows[valid] = flat
        return rows, channel_counts, lambda u: u[valid]
    if granularity == "channel":
        rows = flat.view(shape[0], math.prod(shape[1:]))
    elif granularity == "group" and -(-count // q["group_size"]) != 1:
        size = q["group_size"]
        groups = -(-count // size)
        rows = torch.nn.functional.pad(flat, (0, groups * size - count)).view(groups, size)
    else:  # one group: no padding up to a group size much larger than the tensor
        rows = flat.view(1, -1)
    counts = torch.full((rows.shape[0],), rows.shape[1], device=flat.device)
    if rows.shape[0] and rows.numel() > count:
        counts[-1] -= rows.numel() - count
    return rows, counts, lambda u: flatten(u, -1)


# Below this a float32 norm may have lost the squares that underflow (values under ~1e-19).
_SMALL_NORM = 1e-6


def vector_norm(t: torch.Tensor) -> float:
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
    """The float32 tensor a checked payload stands for, decoded on `device`.

    Only the payload bytes are moved to the device; the arithmetic happens there.
    """
    raw = (
        torch.frombuffer(payload, dtype=torch.uint8)
        if len(payload)
        else torch.empty(0, dtype=torch.uint8)
    )
    raw = raw.to(device) if device is not None else raw
    q = info.quant
    return scheme_of(q).decode(raw, q, info.shape, info.numel, info.filter).reshape(info.shape)


def _pack_codes(codes: torch.Tensor, bits: int) -> bytes:
    """uint8 codes of `bits` (1, 2, 4 or 8) packed little-end first (spec 3.2)."""
    codes = codes.cpu()
    if bits == 8:
        return codes.numpy().tobytes()
    per_byte = 8 // bits
    padded = torch.nn.functional.pad(codes, (0, -codes.numel() % per_byte))
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8)
    return (padded.view(-1, per_byte) << shifts).sum(dim=1, dtype=torch.uint8).numpy().tobytes()


def _planes(byte_view: torch.Tensor, itemsize: int) -> bytes:
    """Split interleaved little-endian items into `itemsize` byte planes."""
    return byte_view.view(-1, itemsize).t().contiguous().numpy().tobytes()
