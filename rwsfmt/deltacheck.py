"""Do imported tensors look like a model's weights rather than differences between two models?

A model imported as if it were deltas and then applied adds the model to itself: every weight
doubles. Two statistics tell them apart without the base model:

1. Normalization scales (the 1-D `weight`/`gamma` of LayerNorm, RMSNorm, BatchNorm, GroupNorm:
   names with `norm`, `ln` or `bn` in their module) and BatchNorm `running_var`: in a model
   they are positive, near their initialization 1 (all-MiniLM-L6-v2: 99.9% positive, median
   0.62), in a difference small and of either sign. Weights when at least 90% of their
   entries are positive and their median is at least 0.1. One such tensor decides.
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
POSITIVE_SHARE = 0.9  # of a model's normalization scales, at least
NORM_MEDIAN = 0.1  # the median of a model's normalization scales, at least
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
            values = torch.cat(self._norm_values)
            positive, median = float((values > 0).float().mean()), float(values.median())
            if positive >= POSITIVE_SHARE and median >= NORM_MEDIAN:
                return (
                    f"its {len(self._norm_values)} normalization scale(s) (norm weights, "
                    f"running_var) are {positive:.1%} positive with median {median:.3g}, as "
                    "a model's are (differences are small and of either sign)"
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
