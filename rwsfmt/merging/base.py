"""The small interface every merge method implements, and the registry of methods by name.

A method is a pure function of one tensor's values across the inputs (as in mergekit's
`merge_methods/` and PEFT's `utils/merge_utils.py`): it gets the inputs' float32 deltas
stacked on dim 0, shape `(n, *shape)` with zeros where an input lacks the tensor, their
weights (float32, shape `(n,)`), the options and the tensor's name (only to seed random
choices), and returns the merged tensor, shape `shape`. Loading, target entries, `lambda_`,
re-quantizing and provenance belong to the engine (`rwsfmt.merging.engine`).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import torch

from ..errors import RwsError

OPTIONAL = ("density", "seed")  # the options only some methods read
# ties and dare keep half of each delta by default: on digits, at alpha 1, the TIES paper's
# 0.2 gained about half as much as 0.5 (benchmarks/results/merge_digits.md)
DEFAULT_DENSITY = 0.5


@dataclass(frozen=True)
class MergeOptions:
    """Parameters of the methods, checked when made.

    `density`: the share of each input's entries kept, in (0, 1] (ties, dare, dare_ties);
    `seed`: the seed of dare's random drops; `lambda_`: the scale of the merged deltas.
    None means "not given": the method's default applies, or it reads no such option.
    """

    density: float | None = None
    seed: int | None = None
    lambda_: float = 1.0

    def __post_init__(self) -> None:
        d = self.density
        if d is not None and not (is_real(d) and 0 < d <= 1):
            raise RwsError(
                f"density={d!r} is outside (0, 1]",
                fix="pass the share of entries to keep, e.g. density=0.5",
            )
        seed = self.seed
        if seed is not None and not (_is_integer(seed) and seed >= 0):
            raise RwsError(f"seed={seed!r} is not a whole number >= 0", fix="e.g. seed=0")
        if not (is_real(self.lambda_) and math.isfinite(self.lambda_)):
            raise RwsError(f"lambda_={self.lambda_!r} is not a finite number", fix="e.g. 1.0")
        # plain Python numbers (a NumPy scalar is accepted, and recorded as JSON)
        object.__setattr__(self, "density", None if d is None else float(d))
        object.__setattr__(self, "seed", None if seed is None else int(seed))
        object.__setattr__(self, "lambda_", float(self.lambda_))

    def to_json(self) -> dict[str, Any]:
        """The options given or defaulted, as the provenance records them."""
        out: dict[str, Any] = {
            k: getattr(self, k) for k in OPTIONAL if getattr(self, k) is not None
        }
        return {**out, "lambda": self.lambda_}


def is_real(value: object) -> bool:
    """A real number (NumPy's included), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_integer(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


class MergeFn(Protocol):
    """Merge one tensor: `deltas` (n, *shape) float32, `weights` (n,) float32 -> (*shape)."""

    def __call__(
        self, deltas: torch.Tensor, weights: torch.Tensor, options: MergeOptions, name: str
    ) -> torch.Tensor: ...


@dataclass(frozen=True)
class MergeMethod:
    """A registered method: its function, the optional options it reads (with defaults), and
    whether the engine rescales the weights to sum to 1 first (`mean`)."""

    name: str
    fn: MergeFn
    summary: str
    uses: Mapping[str, Any] = field(default_factory=dict)  # option -> default
    normalize: bool = False

    def resolve(self, options: MergeOptions) -> MergeOptions:
        """`options` with this method's defaults filled in; an option it ignores is an error
        (it would otherwise look as if it had an effect)."""
        ignored = self.unused(options)
        if ignored:
            key = ignored[0]
            raise RwsError(
                f"{key} has no effect with method {self.name!r}",
                fix=f"leave it out, or use a method that reads it: {', '.join(users(key))}",
            )
        filled = {k: v for k, v in self.uses.items() if getattr(options, k) is None}
        return replace(options, **filled)

    def unused(self, options: MergeOptions) -> list[str]:
        """The optional options given in `options` that this method does not read."""
        return [k for k in OPTIONAL if getattr(options, k) is not None and k not in self.uses]


REGISTRY: dict[str, MergeMethod] = {}


def register(
    name: str, summary: str, *, uses: Mapping[str, Any] | None = None, normalize: bool = False
) -> Callable[[MergeFn], MergeFn]:
    """Decorator: add a merge function to `REGISTRY` under `name`."""

    def add(fn: MergeFn) -> MergeFn:
        REGISTRY[name] = MergeMethod(name, fn, summary, dict(uses or {}), normalize)
        return fn

    return add


def get_method(name: str) -> MergeMethod:
    """The registered method `name`; `RwsError` naming the choices when there is none."""
    try:
        return REGISTRY[name]
    except (KeyError, TypeError):
        raise RwsError(
            f"unknown merge method {name!r}",
            fix=f"use one of {', '.join(repr(n) for n in REGISTRY)}",
        ) from None


def users(option: str) -> list[str]:
    """The methods that read `option`."""
    return [m.name for m in REGISTRY.values() if option in m.uses]


def broadcast(weights: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
    """`weights` (n,) shaped (n, 1, ..., 1) to multiply `deltas` (n, *shape)."""
    return weights.view(-1, *([1] * (deltas.dim() - 1)))


def weighted_sum(deltas: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_i w_i * deltas[i], the products taken in place: `deltas` is overwritten (no
    temporary of its size)."""
    return deltas.mul_(broadcast(weights, deltas)).sum(0)
