"""Merging signatures into one, tensor by tensor, with a registered method, re-quantized.

For each tensor name in the union of the inputs (in first-seen, i.e. depth, order):

    delta entries:  merged[k] = lambda_ * method(stack_i RWS_i[k], w)    (absent = 0)
    target entries: merged[k] = sum_i a_i * target_i[k] / sum_i a_i,  a_i = max(w_i, 0)
                    over the inputs holding it

A target entry (a normalization statistic) is an absolute value that `apply` moves std
toward, not a direction, so it is never trimmed, dropped, summed or scaled by `lambda_`: it
merges as the weighted mean of the targets, negative weights counting as 0, as
`--stats convex` composes them (benchmarks/results/batchnorm_digits.md). Only one tensor of
each input is decoded at a time.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..device import resolve_device
from ..errors import RwsError
from ..provenance import input_record
from ..quant import QuantConfig
from ..signature import (
    Signature,
    SignatureBase,
    SignatureBuilder,
    SignatureLike,
    as_signature,
    warn_repeated,
    warn_unrelated,
)
from .base import MergeMethod, MergeOptions, get_method, is_real

Progress = Callable[[Iterable[Any], int, str], Iterable[Any]]
_SHOWN = 10  # shape conflicts listed in an error


def merge(
    signatures: Sequence[SignatureLike],
    weights: Sequence[float] | None = None,
    *,
    method: str | None = None,
    density: float | None = None,
    seed: int | None = None,
    lambda_: float = 1.0,
    mean: bool = False,
    quant: QuantConfig | None = None,
    label: str | None = None,
    progress: Progress | None = None,
) -> Signature:
    """Combine `signatures` (each a `Signature` or the path of a `.rws` file) tensor by
    tensor into a new in-memory signature.

    `method`: 'sum' (default), 'mean' (weights rescaled to sum to 1; `mean=True` is its
    older spelling), 'ties', 'dare' or 'dare_ties' (see `rwsfmt.merging`). `weights` default
    to 1 each; `density` (ties, dare: the share of entries kept, in (0, 1]) and `seed`
    (dare) default per method; `lambda_` scales the merged deltas. `quant` defaults to the
    first signature's storage settings. `progress(items, total, description)` may wrap the
    loop over tensors (a progress bar).
    """
    if isinstance(signatures, (str, os.PathLike, SignatureBase)):
        signatures = [signatures]
    signatures = [as_signature(s) for s in signatures]
    if len(signatures) < 2:
        raise RwsError(
            f"merge needs at least two signatures, got {len(signatures)}",
            fix="pass a list of two or more signatures",
        )
    spec = get_method(_method_name(method, mean))
    options = spec.resolve(MergeOptions(density=density, seed=seed, lambda_=lambda_))
    plan = MergePlan(signatures, _weights(len(signatures), weights, spec), spec, options)
    return plan.build(quant, label, progress)


class MergePlan:
    """A merge planned from the inputs' headers alone: the output's tensors (the union of the
    inputs', in first-seen order, conflicts refused at once) and how each is computed. Nothing
    is decoded until `tensor` or `build` asks."""

    def __init__(
        self,
        signatures: Sequence[Signature],
        weights: Sequence[float],
        spec: MergeMethod,
        options: MergeOptions,
    ) -> None:
        self.signatures = list(signatures)
        self.weights = [float(w) for w in weights]
        self.spec = spec
        self.options = options
        self.entries = _plan(self.signatures)

    def tensor(self, name: str, device: torch.device | str | None = None) -> torch.Tensor:
        """The merged tensor `name`, float32 on `device` (CPU by default)."""
        entry = self.entries.get(name)
        if entry is None:
            raise RwsError(
                f"no tensor {name!r} in any of the merged signatures",
                fix="pick one of their names (.names)",
            )
        dev = resolve_device(device)
        if entry.kind == "target":
            return _weighted_mean(self.signatures, name, self._shares(name), dev)
        w = torch.tensor(self.weights, dtype=torch.float32, device=dev)
        return _merge_delta(self.signatures, name, entry, self.spec, self.options, w, dev)

    def _shares(self, name: str) -> dict[int, float]:
        return _shares(name, self.entries[name].members, self.weights, self.signatures)

    def default_label(self) -> str:
        return "+".join(s.label or "?" for s in self.signatures)

    def build(
        self,
        quant: QuantConfig | None = None,
        label: str | None = None,
        progress: Progress | None = None,
    ) -> Signature:
        """Every merged tensor quantized per `quant` (default: the first input's settings)
        into a new signature whose provenance names the method and each component's weight."""
        signatures = self.signatures
        for name, entry in self.entries.items():  # refuse a target without a mean before work
            if entry.kind == "target":
                self._shares(name)
        warn_repeated(signatures, "it counts twice in the merge")
        warn_unrelated(signatures)
        quant = quant or signatures[0].quant or QuantConfig()
        builder = SignatureBuilder(label or self.default_label(), quant)
        builder.check_room((n, e.kind, e.shape, e.dtype, {}) for n, e in self.entries.items())
        track = progress or (lambda items, total, description: items)
        for name in track(self.entries, len(self.entries), f"merging ({self.spec.name})"):
            entry = self.entries[name]
            value = self.tensor(name)
            builder.add(name, value, kind=entry.kind, dtype=entry.dtype)
            del value
        models = {s.model_fingerprint for s in signatures}
        record = {"method": self.spec.name, **self.options.to_json(), "targets": "weighted mean"}
        components = zip(signatures, self.weights, strict=True)
        provenance: dict[str, Any] = {
            "method": f"merge-{self.spec.name}",
            "merge": record,
            "components": [_component(s, x) for s, x in components],
        }
        fingerprint = models.pop() if len(models) == 1 else None
        return builder.build(provenance, model_fingerprint=fingerprint)


def _method_name(method: str | None, mean: bool) -> str:
    """The method asked for; `mean=True` is 'mean' (rwsfmt 0.1.0's spelling)."""
    if not mean:
        return "sum" if method is None else method
    if method in (None, "mean"):
        return "mean"
    raise RwsError(
        f"mean=True asks for method 'mean', but method={method!r} was given",
        fix="pass only one of them",
    )


def _weights(n: int, weights: Sequence[float] | None, spec: MergeMethod) -> list[float]:
    """One finite weight per signature (default 1), rescaled to sum to 1 for 'mean'."""
    try:
        w = [1.0] * n if weights is None else list(weights)
    except TypeError:
        raise RwsError(
            f"weights={weights!r} is not a list of numbers", fix="e.g. weights=[0.5, 0.5]"
        ) from None
    if len(w) != n:
        raise RwsError(
            f"{len(w)} weights for {n} signatures", fix="give one weight per signature, in order"
        )
    if not all(is_real(x) and math.isfinite(x) for x in w):
        raise RwsError(f"weights={w!r} are not all finite numbers", fix="e.g. weights=[0.5, 0.5]")
    w = [float(x) for x in w]
    if spec.normalize:
        total = math.fsum(w)
        if total == 0:
            raise RwsError(
                "weights sum to 0; method 'mean' cannot rescale them to sum to 1",
                fix="use method='sum', or weights with a nonzero sum",
            )
        w = [x / total for x in w]
    return w


@dataclass
class _Entry:
    """One output tensor: its kind, shape, source dtype and the inputs holding it."""

    kind: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    members: list[int] = field(default_factory=list)


def _plan(signatures: Sequence[Signature]) -> dict[str, _Entry]:
    """Union of tensor names in first-seen (depth) order; every conflict refused at once."""
    plan: dict[str, _Entry] = {}
    conflicts: list[str] = []
    for i, sig in enumerate(signatures):
        for info in sig.infos:
            entry = plan.get(info.name)
            if entry is None:
                plan[info.name] = _Entry(info.kind, info.shape, getattr(torch, info.dtype), [i])
            elif (info.kind, info.shape) != (entry.kind, entry.shape):
                first = signatures[entry.members[0]]
                conflicts.append(
                    f"{info.name!r} is {info.kind} {list(info.shape)} in {_where(sig)} but "
                    f"{entry.kind} {list(entry.shape)} in {_where(first)}"
                )
            else:
                entry.members.append(i)
    if conflicts:
        more = f"; and {len(conflicts) - _SHOWN} more" if len(conflicts) > _SHOWN else ""
        raise RwsError(
            f"the signatures disagree on {len(conflicts)} tensor(s): "
            + "; ".join(conflicts[:_SHOWN])
            + more,
            fix="merge signatures of one architecture (`rwsfmt inspect` lists their tensors)",
        )
    return plan


def _shares(
    name: str, members: list[int], weights: Sequence[float], signatures: Sequence[Signature]
) -> dict[int, float]:
    """Each holder's weight in a target's mean: max(w, 0), rescaled to sum to 1."""
    positive = {i: max(weights[i], 0.0) for i in members}
    total = math.fsum(positive.values())
    if total == 0:
        holders = ", ".join(_where(signatures[i]) for i in members)
        raise RwsError(
            f"target tensor {name!r} (a normalization statistic) is held only by signatures "
            f"with weights <= 0 ({holders}); a merged target is the weighted mean of the "
            "targets with positive weights",
            fix="give at least one of those signatures a positive weight",
        )
    return {i: x / total for i, x in positive.items() if x > 0}


def _weighted_mean(
    signatures: Sequence[Signature], name: str, shares: dict[int, float], device: torch.device
) -> torch.Tensor:
    """sum_i share_i * target_i, accumulated in float32 on `device`."""
    total: torch.Tensor | None = None
    for i, share in shares.items():
        term = share * signatures[i].tensor(name, device)
        total = term if total is None else total.add_(term)
    assert total is not None  # _shares keeps at least one holder
    return total


def _merge_delta(
    signatures: Sequence[Signature],
    name: str,
    entry: _Entry,
    spec: MergeMethod,
    options: MergeOptions,
    weights: torch.Tensor,
    device: torch.device,
) -> torch.Tensor:
    """The method applied to the inputs' deltas (zeros where absent), times `lambda_`."""
    deltas = torch.zeros((len(signatures), *entry.shape), dtype=torch.float32, device=device)
    for i in entry.members:
        signatures[i].tensor(name, out=deltas[i])
    value = spec.fn(deltas, weights, options, name)
    return value if options.lambda_ == 1 else value * options.lambda_


def _where(sig: Signature) -> str:
    return os.path.basename(sig.path) if sig.path else repr(sig.label)


def _component(sig: Signature, weight: float) -> dict[str, Any]:
    """The provenance of one input: label, weight, signature fingerprint, file name and
    SHA-256 (for a signature read from a file)."""
    out: dict[str, Any] = {
        "label": sig.label,
        "weight": weight,
        "signature_fingerprint": sig.fingerprint.get("signature"),
    }
    if sig.path:
        record = input_record("component", sig.path)
        out.update(name=record["name"], sha256=record["sha256"])
    return out
