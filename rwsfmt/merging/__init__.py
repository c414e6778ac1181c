"""Merging signatures: one module per method behind one small interface, and an engine.

    merged = rwsfmt.merge([fog, snow], [0.5, 0.5])                        # 'sum'
    merged = rwsfmt.merge([fog, snow], method="ties", density=0.2, lambda_=1.0)
    merged = rwsfmt.merge([fog, snow], method="dare", density=0.5, seed=0)

`base` holds the interface (`MergeOptions`, `MergeFn`, `MergeMethod`) and the registry
(`REGISTRY`, `register`); `linear` ('sum', 'mean'), `ties` and `dare` ('dare', 'dare_ties')
are pure functions of one tensor's stacked deltas and weights; `engine.merge` does the rest:
the union of names, shape checks, target entries (always a weighted mean), `lambda_`,
re-quantizing and provenance; `weighted.WeightedSum` is the lazy linear merge that
signature arithmetic (`fog + 0.5 * snow`) gives.
"""

from __future__ import annotations

from . import dare, linear, ties  # noqa: F401 - each registers its methods
from .base import REGISTRY, MergeFn, MergeMethod, MergeOptions, get_method, register
from .engine import MergePlan, merge

__all__ = [
    "REGISTRY",
    "MergeFn",
    "MergeMethod",
    "MergeOptions",
    "MergePlan",
    "get_method",
    "merge",
    "register",
]
