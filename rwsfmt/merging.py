"""Merging signatures into one: a weighted sum (or mean) of their tensors, re-quantized.

    merged[k] = sum_i w_i * RWS_i[k]        for delta entries (absent = 0)
    merged[k] = sum_i w_i * target_i[k]     for target entries (weights must sum to 1)

A target entry is patched as `std + alpha * (target - std)`; a merged target reproduces
`std + alpha * sum_i w_i (target_i - std)` only when the weights of the signatures that
carry it sum to 1, so any other weighting of targets is refused rather than approximated.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import torch

from .errors import RwsError
from .quant import QuantConfig
from .signature import Signature, SignatureBuilder


def merge(
    signatures: Sequence[Signature],
    weights: Sequence[float] | None = None,
    *,
    mean: bool = False,
    quant: QuantConfig | None = None,
    label: str | None = None,
) -> Signature:
    """Combine `signatures` tensor by tensor into a new in-memory signature.

    `weights` default to 1 each (a plain sum); `mean=True` rescales them to sum to 1.
    `quant` defaults to the first signature's quantization settings.
    """
    if len(signatures) < 2:
        raise RwsError("merge needs at least two signatures")
    weights = _weights(len(signatures), weights, mean)
    plan = _plan(signatures)
    quant = quant or signatures[0].quant or QuantConfig()
    builder = SignatureBuilder(label or "+".join(s.label or "?" for s in signatures), quant)
    for name, (kind, members) in plan.items():
        total = weights[members[0]] * signatures[members[0]].tensor(name)
        for i in members[1:]:
            total += weights[i] * signatures[i].tensor(name)
        if kind == "target":
            share = math.fsum(weights[i] for i in members)
            if abs(share - 1.0) > 1e-6:
                raise RwsError(
                    f"target tensor {name!r} (a normalization statistic) would get weights "
                    f"summing to {share:g}; a merged target is only exact when they sum to 1",
                    fix="use --mean, or weights that sum to 1 over the signatures holding it",
                )
        builder.add(name, total, kind=kind, dtype=_dtype(signatures[members[0]], name))
    models = {s.model_fingerprint for s in signatures}
    provenance: dict[str, Any] = {
        "method": "merge-mean" if mean else "merge-sum",
        "components": [_component(s, w) for s, w in zip(signatures, weights, strict=True)],
    }
    return builder.build(provenance, model_fingerprint=models.pop() if len(models) == 1 else None)


def _weights(n: int, weights: Sequence[float] | None, mean: bool) -> list[float]:
    w = [1.0] * n if weights is None else [float(x) for x in weights]
    if len(w) != n:
        raise RwsError(
            f"{len(w)} weights for {n} signatures", fix="give one weight per signature, in order"
        )
    if not all(math.isfinite(x) for x in w):
        raise RwsError("weights must be finite numbers")
    if mean:
        total = math.fsum(w)
        if total == 0:
            raise RwsError("weights sum to 0; --mean cannot normalize them")
        w = [x / total for x in w]
    return w


def _plan(signatures: Sequence[Signature]) -> dict[str, tuple[str, list[int]]]:
    """Union of tensor names in first-seen (depth) order, with their kind and holders."""
    plan: dict[str, tuple[str, list[int]]] = {}
    for i, sig in enumerate(signatures):
        for info in sig.infos:
            if info.name not in plan:
                plan[info.name] = (info.kind, [i])
                continue
            kind, members = plan[info.name]
            first = signatures[members[0]].info(info.name)
            if info.shape != first.shape or info.kind != kind:
                raise RwsError(
                    f"tensor {info.name!r} is {info.kind} {list(info.shape)} in "
                    f"{_where(sig)} but {kind} {list(first.shape)} in "
                    f"{_where(signatures[members[0]])}",
                    fix="merge signatures of the same architecture",
                )
            members.append(i)
    return plan


def _dtype(sig: Signature, name: str) -> torch.dtype:
    return getattr(torch, sig.info(name).dtype)


def _where(sig: Signature) -> str:
    return os.path.basename(sig.path) if sig.path else repr(sig.label)


def _component(sig: Signature, weight: float) -> dict[str, Any]:
    out: dict[str, Any] = {
        "label": sig.label,
        "weight": weight,
        "signature_fingerprint": sig.fingerprint.get("signature"),
    }
    if sig.path:
        from .provenance import input_record

        record = input_record("component", sig.path)
        out.update(name=record["name"], sha256=record["sha256"])
    return out
