"""`ties`: TIES-merging (Yadav et al., NeurIPS 2023), exactly as PEFT's `merge_utils.ties`
with `majority_sign_method="total"`.

Per tensor, for inputs i = 1..n with weights w_i:

1. trim: keep the `int(density * numel)` entries of each delta with the largest magnitude
   (ties at the cut broken as `torch.topk` breaks them), zero the rest; none dropped at
   density 1;
2. elect: each entry's sign is the sign of the sum of the *unweighted* trimmed deltas
   (+ when that sum is 0);
3. disjoint mean: sum the *weighted* trimmed entries whose sign (-1, 0 or +1) equals the
   elected one, divided by how many there are (at least 1). Weights enter only here, so a
   weight scales an input's votes in the mean but not in the election: for task negation
   use `sum`.

The engine then multiplies by `lambda_`.
"""

from __future__ import annotations

import torch

from .base import DEFAULT_DENSITY, MergeOptions, broadcast, register


def trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """`delta` with all but its `int(density * numel)` largest-magnitude entries zeroed."""
    k = int(density * delta.numel())
    if k >= delta.numel():
        return delta
    flat = delta.reshape(-1)
    keep = flat.abs().topk(k).indices
    out = torch.zeros_like(flat)
    out[keep] = flat[keep]
    return out.view_as(delta)


def elect(deltas: torch.Tensor) -> torch.Tensor:
    """Mask (n, *shape) of the entries whose sign equals their column sum's (0 counts as +)."""
    majority = torch.where(deltas.sum(0) >= 0, 1.0, -1.0)
    return deltas.sign() == majority


def disjoint_mean(deltas: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Elect signs on `deltas`, then average the weighted entries that agree."""
    agree = elect(deltas)
    total = (deltas * broadcast(weights, deltas) * agree).sum(0)
    return total / agree.sum(0).clamp(min=1)


@register(
    "ties",
    "trim each delta to its top density share by magnitude, elect signs, mean of the agreeing",
    uses={"density": DEFAULT_DENSITY},
)
def ties(
    deltas: torch.Tensor, weights: torch.Tensor, options: MergeOptions, name: str
) -> torch.Tensor:
    """TIES-merging of one tensor (see the module's docstring)."""
    assert options.density is not None  # filled in by MergeMethod.resolve
    return disjoint_mean(torch.stack([trim(d, options.density) for d in deltas]), weights)
