"""Re-quantizing a signature: the same tensors, stored with other settings.

    small = rwsfmt.convert(rwsfmt.load("fog.rws"), rwsfmt.QuantConfig(bits=4))

Tensors are decoded and re-encoded one at a time, so memory holds one float32 tensor plus
the compressed result. A tensor already stored as asked is copied as it is (targets, always
exact float32, among them): converting never adds error to what needs no change. Label,
fingerprints, statistics and provenance are kept; the provenance gets the new quantization
and a `conversions` record.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

import torch

from .container import TensorInfo
from .errors import RwsError
from .extraction import Progress
from .provenance import base_provenance, input_record
from .quant import QuantConfig
from .signature import Signature, SignatureBuilder, SignatureLike, as_signature


def convert(
    sig: SignatureLike,
    quant: QuantConfig,
    *,
    label: str | None = None,
    progress: Progress | None = None,
) -> Signature:
    """`sig` (a `Signature` or the path of a `.rws` file) stored per `quant`, as a new
    in-memory signature (`rwsfmt.save` writes it).

    `label` replaces the label (default: kept). Each tensor's `quant_rel_error` becomes a
    bound on its error against the tensor as first stored (see `SignatureBuilder.add`).
    """
    sig = as_signature(sig)
    if not isinstance(quant, QuantConfig):
        raise RwsError(
            f"quant must be a rwsfmt.QuantConfig, got {type(quant).__name__}",
            fix="e.g. rwsfmt.QuantConfig(bits=4)",
        )
    track = progress or (lambda items, total, description: items)
    builder = SignatureBuilder(sig.label if label is None else label, quant)
    kept = {
        i.name for i in sig.infos if builder.config_for(i.kind, i.shape).describes(i.quant, i.shape)
    }
    builder.check_room(
        ((i.name, i.kind, i.shape, i.dtype, _stats(i)) for i in sig.infos if i.name not in kept),
        [i for i in sig.infos if i.name in kept],
        requantized(sig.provenance, quant),
    )
    reencoded = 0
    for name in track(sig.names, len(sig), "converting"):
        info = sig.info(name)
        if name in kept:
            builder.copy(sig, name)
            continue
        stats = _stats(info)
        prior = prior_error(info.stats.get("quant_rel_error"))
        builder.add(
            name,
            sig.tensor(name),
            kind=info.kind,
            dtype=getattr(torch, info.dtype),
            stats=stats,
            prior_error=prior,
        )
        reencoded += 1
    record: dict[str, Any] = {
        "from": sig.provenance.get("quantization"),
        "to": quant.to_json(),
        "reencoded": reencoded,
        **base_provenance(),
    }
    if sig.path:
        record["source"] = file_record(sig.path)
    previous = sig.provenance.get("conversions")
    conversions = [*previous, record] if isinstance(previous, list) else [record]
    provenance = requantized(sig.provenance, quant, conversions=conversions)
    return builder.build(provenance, model_fingerprint=sig.model_fingerprint)


def _stats(info: TensorInfo) -> dict[str, Any]:
    """A tensor's statistics to keep when it is stored anew (its error is measured anew)."""
    return {k: v for k, v in info.stats.items() if k != "quant_rel_error"}


def requantized(
    provenance: Mapping[str, Any], quant: QuantConfig, **records: Any
) -> dict[str, Any]:
    """A signature's provenance, kept for the same tensors stored anew: the quantization
    updated to `quant`, and `records` (what was done to it) added."""
    return {**provenance, "quantization": quant.to_json(), **records}


def file_record(path: str) -> dict[str, Any]:
    """Base name, size and SHA-256 of a file a signature was made from."""
    record = input_record("source", path)
    del record["role"]
    return record


def prior_error(value: object) -> float:
    """A recorded `quant_rel_error` as a number to build on; 0 when the file records none
    that is a finite number >= 0 (fields from files are never trusted)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return 0.0
    ok = 0 <= value <= sys.float_info.max  # exact for ints of any size; NaN fails it
    return float(value) if ok else 0.0
