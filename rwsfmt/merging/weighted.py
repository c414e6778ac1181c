"""`WeightedSum`: what signature arithmetic gives, a lazy linear merge.

    both = fog + 0.5 * snow            # nothing decoded yet
    both.tensor("features.0.weight")   # fog's + 0.5 * snow's, float32, computed now
    rwsfmt.save(both, "both.rws")      # merged and re-quantized, as rwsfmt.merge would

It is `rwsfmt.merge(signatures, weights, method="sum")` left unevaluated: the same union of
tensor names (a tensor absent from a signature counts as 0 there; one name with two shapes or
kinds is refused), the same target rule (a normalization statistic is the weighted mean of
the targets with positive weights), the same provenance (method `merge-sum`, each component
and its weight). Every function that takes a signature takes a `WeightedSum` and builds it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from functools import cached_property

import torch

from ..quant import QuantConfig
from ..signature import Signature, SignatureBase
from .base import MergeOptions, get_method
from .engine import MergePlan, Progress


class WeightedSum(SignatureBase):
    """sum_i w_i * signature_i, read tensor by tensor without quantizing; `build` (or
    `rwsfmt.save`) quantizes it into a `Signature`."""

    def __init__(self, terms: Sequence[tuple[Signature, float]]) -> None:
        self._terms = [(sig, float(weight)) for sig, weight in terms]

    def terms(self) -> list[tuple[Signature, float]]:
        return list(self._terms)

    @cached_property
    def _plan(self) -> MergePlan:
        """The linear merge of the terms, planned from their headers (on first use, so that an
        intermediate such as `-fog` in `-fog + snow` is never planned on its own)."""
        signatures, weights = zip(*self._terms, strict=True)
        return MergePlan(signatures, weights, get_method("sum"), MergeOptions())

    @property
    def label(self) -> str:
        """The sum as written: `fog+snow`, `0.5*fog`, `fog-snow`, `-fog`."""
        out = ""
        for sig, weight in self._terms:
            sign = "-" if weight < 0 else ("+" if out else "")
            size = abs(weight)
            out += sign + ("" if size == 1 else f"{size:g}*") + (sig.label or "?")
        return out

    @property
    def names(self) -> list[str]:
        """The union of the components' tensor names, in first-seen (depth) order."""
        return list(self._plan.entries)

    def tensor(self, name: str, device: torch.device | str | None = None) -> torch.Tensor:
        """One tensor of the sum as float32 on `device` (CPU by default), from the components'
        dequantized tensors: sum_i w_i * delta_i, or for a target their weighted mean."""
        return self._plan.tensor(name, device)

    def build(
        self,
        quant: QuantConfig | None = None,
        label: str | None = None,
        progress: Progress | None = None,
    ) -> Signature:
        """The sum quantized per `quant` (default: the first component's settings) into an
        in-memory signature labelled `label` (default: the sum as written)."""
        return self._plan.build(quant, label or self.label, progress)

    def __len__(self) -> int:
        return len(self._plan.entries)

    def __contains__(self, name: object) -> bool:
        return name in self._plan.entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __repr__(self) -> str:
        return f"<WeightedSum {self.label!r}: {len(self._terms)} signatures>"
