"""The `Signature` object: a lazy view of a `.rws` file, or one built in memory.

sig = rwsfmt.load("fog.rws")        # reads and validates the header only
sig.names                           # tensor names, in depth order
sig.tensor("features.0.weight")     # float32, dequantized on the requested device
rwsfmt.save(sig, "copy.rws")        # blobs are copied, not re-encoded
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from .allocation import Option, allocate
from .container import (
    MAX_HEADER_BYTES,
    MAX_NAME_BYTES,
    MAX_RANK,
    MAX_TENSORS,
    PREAMBLE_SIZE,
    PayloadReader,
    RwsReader,
    TensorInfo,
    build_header,
    canonical_json,
    check_blob,
    decode_blob,
    encode_blob,
    write_file,
)
from .device import resolve_device
from .errors import RwsError, described, spell, warn
from .fingerprint import architecture_fingerprint
from .format import chunked
from .io.base import all_finite
from .provenance import base_provenance
from .quant import QuantConfig, decode, encode, vector_norm

_DTYPE_NAMES = {
    torch.float64: "float64",
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
}


class SignatureBase:
    """What a `Signature` and a `WeightedSum` share: their tensors as a state dict, and
    task-vector arithmetic: `fog + snow`, `0.5 * fog`, `fog * 0.5`, `fog / 2`, `-fog`,
    `fog - snow` and `sum([fog, snow])` give a lazy `rwsfmt.WeightedSum`: nothing is decoded
    until a tensor is read, and `rwsfmt.save` re-quantizes it as `rwsfmt.merge` would."""

    @property
    def names(self) -> list[str]:
        """Tensor names, in depth order."""
        raise NotImplementedError

    def tensor(self, name: str, device: torch.device | str | None = None) -> torch.Tensor:
        """One tensor as float32 on `device` (CPU by default)."""
        raise NotImplementedError

    def terms(self) -> list[tuple[Signature, float]]:
        """The (signature, weight) pairs this stands for."""
        raise NotImplementedError

    def state_dict(self, device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
        """Every tensor as float32 under its stored name, in order: the signature as a plain
        dict for code that knows state dicts (`torch.save`, `safetensors`)."""
        dev = resolve_device(device)
        return {name: self.tensor(name, dev) for name in self.names}

    def __add__(self, other: object) -> Any:
        if not isinstance(other, SignatureBase):
            return NotImplemented
        return _weighted_sum([*self.terms(), *other.terms()])

    def __radd__(self, other: object) -> Any:
        # `sum(signatures)` starts from 0
        if isinstance(other, int) and not isinstance(other, bool) and other == 0:
            return _weighted_sum(self.terms())
        return NotImplemented

    def __sub__(self, other: object) -> Any:
        if not isinstance(other, SignatureBase):
            return NotImplemented
        return self + (-other)

    def __mul__(self, factor: object) -> Any:
        weight = _weight(factor, "multiplied by")
        if weight is None:
            return NotImplemented
        return _weighted_sum([(sig, w * weight) for sig, w in self.terms()])

    __rmul__ = __mul__

    def __truediv__(self, divisor: object) -> Any:
        weight = _weight(divisor, "divided by")
        if weight is None:
            return NotImplemented
        if weight == 0:
            raise RwsError("a signature divided by 0", fix="divide by a nonzero number")
        return self * (1 / weight)

    def __neg__(self) -> Any:
        return self * -1.0


def _weight(value: object, how: str) -> float | None:
    """`value` as a float, None when it is no real number (the operation is not ours);
    `RwsError` unless finite."""
    from .merging.base import is_real

    if not is_real(value):
        return None
    if not math.isfinite(value):  # type: ignore[arg-type]
        raise RwsError(
            f"a signature {how} {value!r}: the weights of a sum of signatures are finite numbers",
            fix="use a finite number, e.g. 0.5 * sig",
        )
    return float(value)


def _weighted_sum(terms: Sequence[tuple[Signature, float]]) -> Any:
    """A `WeightedSum` of `terms`, the weights of a signature given more than once added."""
    from .merging.weighted import WeightedSum

    weights: dict[int, float] = {}
    signatures: dict[int, Signature] = {}
    for sig, weight in terms:
        signatures.setdefault(id(sig), sig)
        weights[id(sig)] = weights.get(id(sig), 0.0) + weight
    return WeightedSum([(signatures[key], weights[key]) for key in signatures])


class Signature(SignatureBase):
    """A robust weight signature: named `delta`/`target` tensors plus their metadata.

    `delta` entries are added to a model scaled by alpha; `target` entries (normalization
    statistics) are moved toward by alpha. Tensors decode lazily, one at a time.
    """

    def __init__(
        self, meta: dict[str, Any], infos: list[TensorInfo], blobs: Any, path: str | None = None
    ):
        self._meta = meta
        self._infos = {i.name: i for i in infos}
        self._blobs = blobs  # an RwsReader, or a dict name -> stored bytes
        self.path = path

    # ---- metadata
    @property
    def label(self) -> str:
        return self._meta.get("label", "")

    @property
    def provenance(self) -> dict[str, Any]:
        return self._meta.get("provenance", {})

    @property
    def fingerprint(self) -> dict[str, Any]:
        return self._meta.get("fingerprint", {})

    @property
    def model_fingerprint(self) -> str | None:
        """The source model's architecture fingerprint, or None when the file records none
        (or records something other than a string: fields from files are never trusted)."""
        value = self.fingerprint.get("model")
        return value if isinstance(value, str) and value else None

    @property
    def quant(self) -> QuantConfig | None:
        """The storage settings the file's provenance records, or None when it records none
        that a `QuantConfig` accepts."""
        q = self.provenance.get("quantization")
        if not isinstance(q, dict):
            return None
        try:
            return QuantConfig.from_json(q)
        except RwsError:
            return None

    @property
    def signed_by(self) -> str | None:
        """The fingerprint of the key that signed the file, or None (unsigned, or in memory).

        Read from the file without checking the signature: `load(path, key=...)` checks it."""
        if not isinstance(self._blobs, RwsReader) or self._blobs.header.signature is None:
            return None
        return self._blobs.header.signature.fingerprint

    @property
    def meta(self) -> dict[str, Any]:
        """File-level header fields (everything but the tensor list)."""
        return dict(self._meta)

    @property
    def names(self) -> list[str]:
        return list(self._infos)

    @property
    def infos(self) -> list[TensorInfo]:
        return list(self._infos.values())

    def info(self, name: str) -> TensorInfo:
        """The header entry of tensor `name`; `RwsError` when there is none."""
        try:
            return self._infos[name]
        except KeyError:
            raise RwsError(
                f"no tensor {name!r} in signature {self.label!r}",
                path=self.path,
                fix="pick one of its names (sig.names, or `rwsfmt inspect FILE`)",
            ) from None

    def terms(self) -> list[tuple[Signature, float]]:
        return [(self, 1.0)]

    def __len__(self) -> int:
        return len(self._infos)

    def __contains__(self, name: object) -> bool:
        return name in self._infos

    def __iter__(self) -> Iterator[str]:
        return iter(self._infos)

    def __repr__(self) -> str:
        where = f" from {self.path!r}" if self.path else ""
        return f"<Signature {self.label!r}: {len(self)} tensors{where}>"

    # ---- data
    def stored(self, name: str) -> bytes | bytearray:
        """The blob of one tensor exactly as stored (checksum verified when read from a file)."""
        info = self.info(name)
        if isinstance(self._blobs, RwsReader):
            return self._blobs.read_stored(info)
        return self._blobs[name]

    def payload(self, name: str) -> bytearray:
        """The decompressed payload of one tensor (scales, zero points, packed values)."""
        info = self.info(name)
        if isinstance(self._blobs, RwsReader):
            return self._blobs.read_payload(info)
        return decode_blob(bytearray(self._blobs[name]), info, "<memory>")

    def decodable(self, name: str) -> bytes | bytearray:
        """The stored blob of one tensor, once the file is known to stay within the decode
        limit (`limits`) and the blob's checksum verifies."""
        if isinstance(self._blobs, RwsReader):
            self._blobs.check_decoded_size()
        return self.stored(name)

    def check(self, name: str) -> None:
        """Check one tensor as decoding it would (limit, checksum, codec, numbers)."""
        check_blob(self.decodable(name), self.info(name), self.path or "<memory>")

    def tensor(
        self,
        name: str,
        device: torch.device | str | None = None,
        *,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One tensor as float32, dequantized on `device` (CPU by default); a large one a
        chunk at a time into its output (see `format.chunked`), which is `out` when given
        (a contiguous float32 tensor of its shape, on `device`).

        An unknown or unavailable device is an `RwsError`, raised before anything is read.
        """
        dev = resolve_device(device) if out is None else out.device
        info = self.info(name)
        stored, path = self.decodable(name), self.path or "<memory>"
        if not chunked.chunked(info):
            values = decode(decode_blob(bytearray(stored), info, path), info, dev)
            return values if out is None else out.copy_(values)
        payload = PayloadReader(stored, info, path)
        flat = None if out is None else out.view(-1)
        return chunked.decode(payload, info, chunked.Torch(dev), flat).view(info.shape)

    def close(self) -> None:
        if isinstance(self._blobs, RwsReader):
            self._blobs.close()

    def __del__(self) -> None:
        # a signature that rwsfmt.apply, patch, merge, ... loaded from a path is never seen by
        # the caller: its file closes with it (no ResourceWarning, no descriptor left open)
        if isinstance(getattr(self, "_blobs", None), RwsReader):
            self._blobs.close()

    def __enter__(self) -> Signature:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SignatureBuilder:
    """Encodes tensors one at a time (quantize, compress, checksum) into a `Signature`.

    Each tensor is encoded as it is added, so a caller can stream a model through it and
    hold only compressed bytes. With `bits='auto'` each delta is encoded every way
    `QuantConfig.candidates` lists, and `build` keeps one per tensor (see `allocation`).
    """

    def __init__(self, label: str, quant: QuantConfig | None = None) -> None:
        self.label = label
        self.quant = quant or QuantConfig()
        self._choices: list[list[_Encoding]] = []  # per tensor, in the order added
        self._names: set[str] = set()

    def config_for(self, kind: str, shape: tuple[int, ...]) -> QuantConfig:
        """How a tensor of `kind` and `shape` is stored: targets as exact float32 whatever
        the setting; vectors (rank < 2: biases) at 8 bits at least, dense, where the setting
        is below 4 bits or sparse (see `_VECTOR_QUANT`)."""
        if kind != "delta":
            return _TARGET_QUANT
        if len(shape) < 2 and (self.quant.bits in (1, 2) or self.quant.sparse):
            return _VECTOR_QUANT
        return self.quant

    def add(
        self,
        name: str,
        tensor: torch.Tensor,
        *,
        kind: str = "delta",
        dtype: torch.dtype | None = None,
        stats: Mapping[str, Any] | None = None,
        prior_error: float = 0.0,
    ) -> None:
        """Encode one tensor; `dtype` is the source checkpoint's dtype (default: the tensor's).

        `prior_error` is the relative error `tensor` already carries (it was decoded from a
        quantized file): the recorded `quant_rel_error` is then the bound
        `prior + new * (1 + prior)` on the error against the tensor as first stored.
        """
        self._check_entry(name, tuple(tensor.shape))
        if not torch.is_floating_point(tensor):
            raise RwsError(
                f"tensor {name!r} is not floating point ({tensor.dtype})",
                fix="add only floating-point tensors (weights, biases, statistics)",
            )
        if not all_finite(tensor):
            raise RwsError(
                f"tensor {name!r} contains NaN or infinite values",
                fix="check the checkpoints it was computed from",
            )
        if tensor.dtype == torch.float64 and not all_finite(tensor.to(torch.float32)):
            raise RwsError(
                f"tensor {name!r} holds values beyond the float32 range (3.4e38), which "
                "signatures store",
                fix="scale the tensor down, or leave it out",
            )
        config = self.config_for(kind, tuple(tensor.shape))
        configs = config.candidates() if config.bits == "auto" else [config]
        norm = vector_norm(tensor.detach().to(torch.float32)) if len(configs) > 1 else 0.0
        choices = []
        for each in configs:
            enc = encode(tensor, each, name)
            codec, blob = encode_blob(enc.payload)
            error = prior_error + enc.rel_error * (1 + prior_error)
            info = TensorInfo(
                name=name,
                kind=kind,
                shape=tuple(int(d) for d in tensor.shape),
                dtype=_DTYPE_NAMES.get(dtype or tensor.dtype, "float32"),
                quant=enc.quant,
                filter=enc.filter,
                codec=codec,
                offset=0,
                length=len(blob),
                decoded_length=len(enc.payload),
                sha256=hashlib.sha256(blob).hexdigest(),
                stats={**(stats or {}), "quant_rel_error": error},
            )
            choices.append(_Encoding(info, blob, (enc.rel_error * norm) ** 2))
        self._choices.append(choices)
        self._names.add(name)

    def copy(self, sig: Signature, name: str) -> None:
        """Add tensor `name` of `sig` exactly as stored, without re-encoding (no new error).

        Its payload is checked first, as decoding it would be (checksum, decompression-bomb
        limit, finite numbers), so a copy is never less safe than a re-encoding.
        """
        info = sig.info(name)
        self._check_entry(name, info.shape)
        sig.check(name)
        self._choices.append([_Encoding(replace(info, offset=0), bytes(sig.stored(name)), 0.0)])
        self._names.add(name)

    def _check_entry(self, name: str, shape: tuple[int, ...]) -> None:
        """Refuse what the `.rws` format cannot hold (spec section 9), before any encoding."""
        if name in self._names:
            raise RwsError(
                f"tensor {name!r} added twice to signature {self.label!r}",
                fix="add each tensor once",
            )
        if len(self._choices) >= MAX_TENSORS:
            raise RwsError(
                f"a signature holds at most {MAX_TENSORS:,} tensors; {name!r} is one too many",
                fix="split the tensors over several signatures",
            )
        try:
            size = len(name.encode("utf-8"))
        except UnicodeEncodeError:
            raise RwsError(
                f"tensor name {name!r} is not valid Unicode (it holds a lone surrogate)",
                fix="rename the tensor: .rws names are UTF-8 text",
            ) from None
        if not 1 <= size <= MAX_NAME_BYTES:
            raise RwsError(
                f"tensor name {name[:64]!r} is {size} bytes; a signature's tensor names "
                f"are 1 to {MAX_NAME_BYTES:,} bytes (UTF-8)",
                fix="rename the tensor",
            )
        if len(shape) > MAX_RANK:
            raise RwsError(
                f"tensor {name!r} has {len(shape)} dimensions; a signature holds at most "
                f"{MAX_RANK}",
                fix="reshape the tensor before storing it",
            )

    def check_room(
        self,
        added: Iterable[tuple[str, str, tuple[int, ...], torch.dtype | str, Mapping[str, Any]]],
        copied: Iterable[TensorInfo] = (),
        provenance: Mapping[str, Any] | None = None,
    ) -> None:
        """Refuse, before any encoding, a signature whose header could not fit the format's
        limit: `added` holds `(name, kind, shape, dtype, stats)` of each tensor to be
        `add`ed, `copied` the entries to be copied, `provenance` what is known of it. The
        header is estimated from below (the shortest quantization, codec, lengths and error
        a tensor can get), so a refusal is certain; a pass costs milliseconds."""
        shortest = {"scheme": "float", "bits": 32}
        entries = list(copied)
        for name, kind, shape, dtype, stats in added:
            config = self.config_for(kind, shape)
            quant = shortest if config.bits == "auto" else config.metadata(shape, nnz=0)
            stats = {**stats, "quant_rel_error": 0.0}
            dtype = dtype if isinstance(dtype, str) else _DTYPE_NAMES.get(dtype, "float32")
            entries.append(
                TensorInfo(name, kind, shape, dtype, quant, "none", "raw", 0, 0, 0, "0" * 64, stats)
            )
        prov = {**base_provenance(), "quantization": self.quant.to_json(), **(provenance or {})}
        fingerprint = {"signature": "sha256:" + "0" * 64, "model": None}
        meta = {"label": self.label, "fingerprint": fingerprint, "provenance": prov}
        size = len(canonical_json({**meta, "tensors": [e.to_json() for e in entries]}))
        if size > MAX_HEADER_BYTES:
            raise RwsError(
                f"the signature of {len(entries):,} tensors would not fit one file: its header "
                f"would take at least {size:,} bytes, over the format's {MAX_HEADER_BYTES:,}",
                fix="split the tensors over several files, or shorten the metadata",
            )

    def build(
        self,
        provenance: Mapping[str, Any] | None = None,
        model_fingerprint: str | None = None,
    ) -> Signature:
        """Finish: fingerprints over the tensors added, provenance with quantization settings."""
        prov = {**base_provenance(), "quantization": self.quant.to_json(), **(provenance or {})}
        fingerprint = {
            "signature": architecture_fingerprint(
                (c[0].info.name, c[0].info.shape) for c in self._choices
            ),
            "model": model_fingerprint,
        }
        meta = {"label": self.label, "fingerprint": fingerprint, "provenance": prov}
        kept = [choices[i] for choices, i in zip(self._choices, self._choose(meta), strict=True)]
        return Signature(meta, [k.info for k in kept], {k.info.name: k.blob for k in kept})

    def _choose(self, meta: dict[str, Any]) -> list[int]:
        """Which encoding of each tensor to keep: the only one, or for `bits='auto'` those
        that fit the whole file (preamble and header included) in `target_bpp` bits per
        parameter with the least squared error."""
        if all(len(choices) == 1 for choices in self._choices):
            return [0] * len(self._choices)
        parameters = sum(choices[0].info.numel for choices in self._choices)
        target = int(self.quant.target_bpp * parameters / 8)
        options = [[Option(c.info.length, c.error) for c in choices] for choices in self._choices]
        budget = target - self._file_bytes(meta, [0] * len(options), blobs=False)
        for _ in range(4):  # the header grows a little with the richer choices: refit
            chosen = allocate(options, budget)
            over = self._file_bytes(meta, chosen) - target
            if over <= 0:
                return chosen
            budget -= over
        cheapest = [min(range(len(o)), key=lambda i, o=o: o[i].size) for o in options]
        smallest = self._file_bytes(meta, cheapest) * 8 / max(parameters, 1)
        warn(
            f"signature {self.label!r} cannot be stored in {self.quant.target_bpp:g} bits per "
            f"parameter: its smallest encoding takes {smallest:.3g}",
            fix=f"raise {spell('--target-bpp', 'target_bpp')}, or store fewer tensors",
        )
        return chosen

    def _file_bytes(self, meta: dict[str, Any], chosen: list[int], blobs: bool = True) -> int:
        """Bytes of the file with encoding `chosen[t]` of each tensor (without blobs: the
        preamble and header only)."""
        infos = [choices[i].info for choices, i in zip(self._choices, chosen, strict=True)]
        _, header, _ = build_header(meta, infos)
        return PREAMBLE_SIZE + len(header) + (sum(i.length for i in infos) if blobs else 0)


@dataclass(frozen=True)
class _Encoding:
    """One way a tensor was encoded: its header entry, stored blob and squared error."""

    info: TensorInfo
    blob: bytes
    error: float


# Normalization statistics are targets: small 1-D vectors whose exact values matter
# (running_var near zero), so they are stored as exact float32 whatever the delta setting.
_TARGET_QUANT = QuantConfig(bits=32)
# A bias shifts a whole channel: a sign or ternary code with one shared scale moves every
# channel by about the same amount, which on the digits signatures cost much of the gain
# (benchmarks/rate_distortion.py). Vectors are a tiny share of a signature's parameters, so
# 8 bits cost next to nothing.
_VECTOR_QUANT = QuantConfig(bits=8)


def from_tensors(
    tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor, str]],
    *,
    label: str,
    quant: QuantConfig | None = None,
    provenance: Mapping[str, Any] | None = None,
    model_fingerprint: str | None = None,
) -> Signature:
    """Build a signature from `{name: delta}` or `(name, tensor, kind)` triples."""
    builder = SignatureBuilder(label, quant)
    items = (
        ((n, t, "delta") for n, t in tensors.items()) if isinstance(tensors, Mapping) else tensors
    )
    for name, tensor, kind in items:
        builder.add(name, tensor, kind=kind)
    return builder.build(provenance, model_fingerprint)


SignatureLike = SignatureBase | str | os.PathLike
"""What every function taking a signature accepts: a `Signature`, the path of a `.rws` file,
or a `WeightedSum` (signature arithmetic)."""


def as_signature(sig: object) -> Signature:
    """`sig` as a `Signature`: a path is loaded (lazily), a `WeightedSum` built (merged and
    re-quantized, as `rwsfmt.merge` would), a `Signature` returned as it is."""
    from .merging.weighted import WeightedSum

    if isinstance(sig, Signature):
        return sig
    if isinstance(sig, (str, os.PathLike)):
        return load(sig)
    if isinstance(sig, WeightedSum):
        return sig.build()
    raise RwsError(
        f"expected a signature, got {described(sig)}",
        fix="pass a Signature (rwsfmt.load), the path of a .rws file, or a sum of signatures",
    )


def save(sig: SignatureLike, path: str | os.PathLike) -> None:
    """Write `sig` to `path` atomically; a loaded signature's blobs are copied as stored,
    never re-encoded; a `WeightedSum` is merged and quantized first."""
    sig = as_signature(sig)
    write_file(path, sig.meta, sig.infos, lambda info: sig.stored(info.name))


def load(
    path: str | os.PathLike,
    *,
    max_decoded_bytes: float | None = None,
    key: Any = None,
    allow_unsigned: bool = False,
) -> Signature:
    """Open a `.rws` file lazily: the header is read and validated, tensors decode on demand.

    Decoding refuses a file whose tensors take more float32 memory than its size justifies
    (a decompression bomb): `max_decoded_bytes` raises that limit for a file you trust
    (`math.inf` lifts it; None uses `RWSFMT_MAX_DECODED` or the default, see `rwsfmt.limits`).

    With `key` (an Ed25519 public key, or the path of its file) the file must be signed by
    that key (`SignatureError` otherwise; `allow_unsigned` lets an unsigned file through).
    The signature covers the header, and every tensor read is checked against the header's
    SHA-256, so every tensor of a file opened with a key is what the key's holder signed.
    """
    reader = RwsReader(path, max_decoded_bytes=max_decoded_bytes)
    h = reader.header
    if key is not None and not (allow_unsigned and h.signature is None):
        from .signing.verify import check_signature

        try:
            check_signature(h, key, reader.path)
        except BaseException:
            reader.close()
            raise
    meta = {k: v for k, v in h.raw.items() if k != "tensors"}
    return Signature(meta, h.tensors, reader, path=reader.path)


def warn_repeated(signatures: Sequence[Signature], consequence: str) -> None:
    """Warn about each signature given again: the same file, or one holding the same tensors
    (the same bytes under another name); `consequence` says what that does."""
    from .atomic import same_file

    contents = [tuple((i.name, i.kind, i.sha256) for i in s.infos) for s in signatures]
    for j, sig in enumerate(signatures):
        for i, earlier in enumerate(signatures[:j]):
            if sig.path and earlier.path and same_file(sig.path, earlier.path):
                how = "is the same file as"
            elif contents[i] == contents[j]:
                how = "holds the same tensors as"
            else:
                continue
            warn(
                f"signature {j + 1} ({_shown(sig)}) {how} signature {i + 1} "
                f"({_shown(earlier)}): {consequence}",
                fix="give each signature once",
            )
            break


def warn_unrelated(signatures: Sequence[Signature]) -> None:
    """Warn when no two signatures share a tensor and their models' architectures differ (a
    merge of them is a union of unrelated tensors, which no model takes)."""
    models = {s.model_fingerprint for s in signatures} - {None}
    names = [set(s.names) for s in signatures]
    if len(models) < 2 or any(a & b for j, a in enumerate(names) for b in names[:j]):
        return
    warn(
        "the signatures share no tensor and come from models of different architectures ("
        + "; ".join(f"{_shown(s)}: {s.names[0]}, ..." for s in signatures if s.names)
        + "): merged, they are a union of unrelated tensors that no model takes",
        fix="merge signatures extracted from one architecture",
    )


def _shown(sig: Signature) -> str:
    return os.fspath(sig.path) if sig.path else repr(sig.label)
