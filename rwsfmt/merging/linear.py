"""`sum` and `mean`: weighted task arithmetic, sum_i w_i * delta_i (negative weights negate)."""

from __future__ import annotations

import torch

from .base import MergeOptions, register, weighted_sum


@register("mean", "weights rescaled to sum to 1, then summed", normalize=True)
@register("sum", "sum_i w_i * delta_i (task arithmetic; a negative weight negates)")
def linear(
    deltas: torch.Tensor, weights: torch.Tensor, options: MergeOptions, name: str
) -> torch.Tensor:
    """The weighted sum of the deltas (for `mean` the engine has rescaled the weights)."""
    return weighted_sum(deltas, weights)
