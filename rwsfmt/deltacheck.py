"""Do imported tensors look like a model's weights rather than differences between two models?

A model imported as if it were deltas and then applied adds the model to itself: every weight
doubles. Two statistics tell them apart without the base model:

1. Normalization scales (the 1-D `weight`/`gamma` of LayerNorm, RMSNorm, BatchNorm, GroupNorm:
   names with `norm`, `ln` or `bn` in their module) and BatchNorm `running_var`: in a model
   they sit near 1 (their initialization), in a difference near 0. The median of all their
   entries is the statistic; weights when it lies in [0.5, 2]. One such tensor decides.
2. Otherwise, the layer weights (>= 2-D): a trained or initialized layer has entries of size
   about 1 / sqrt(fan_in) (Kaiming, Xavier), a fine-tuning difference 10 to 1000 times less.
   The statistic is the median over layers of RMS(W) * sqrt(fan_in); weights when >= 0.5.
   (Transformers initialize at a fixed 0.02, which this undercounts: they have norm layers.)
"""

from __future__ import annotations

import math
import re
import statistics

import torch

_NORM_SCALE = re.compile(
    r"(.*\.)?[^.]*(norm|ln|bn)[^.]*\.(weight|gamma)|(.*\.)?running_var", re.IGNORECASE
)
NORM_RANGE = (0.5, 2.0)  # median normalization scale of a model's weights
LAYER_SCALE = 0.5  # median RMS * sqrt(fan_in) of a model's layer weights is above this


class DeltaCheck:
    """Collects the two statistics tensor by tensor (`add`); `verdict` says what they show."""

    def __init__(self) -> None:
        self._norm_values: list[torch.Tensor] = []  # small: hidden size x norm layers
        self._layer_scales: list[float] = []

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Take one imported tensor into account (any float dtype)."""
        if tensor.dim() == 1 and _NORM_SCALE.fullmatch(name) and tensor.numel():
            self._norm_values.append(tensor.detach().to(torch.float32).reshape(-1))
        elif tensor.dim() >= 2 and tensor.numel():
            fan_in = tensor.numel() // tensor.shape[0]
            rms = float(tensor.detach().to(torch.float32).pow(2).mean().sqrt())
            self._layer_scales.append(rms * math.sqrt(fan_in))

    def verdict(self) -> str | None:
        """Why the tensors look like weights (the statistic and its value), or None."""
        if self._norm_values:
            median = float(torch.cat(self._norm_values).median())
            low, high = NORM_RANGE
            if low <= median <= high:
                return (
                    f"its {len(self._norm_values)} normalization scale(s) (norm weights, "
                    f"running_var) have median {median:.3g}, as a model's do (differences sit "
                    "near 0)"
                )
            return None
        if self._layer_scales:
            scale = statistics.median(self._layer_scales)
            if scale >= LAYER_SCALE:
                return (
                    f"its {len(self._layer_scales)} layer weight(s) have median RMS x "
                    f"sqrt(fan_in) {scale:.3g}, as a model's do (>= {LAYER_SCALE:g}; "
                    "differences are 10 to 1000 times smaller)"
                )
        return None
