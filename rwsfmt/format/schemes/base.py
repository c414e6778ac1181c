"""The interface every storage scheme implements (spec section 3), numcodecs-style.

A scheme turns `count` values of a tensor of `shape` into a payload and back. Dense tensors
code all `count = numel` values; the sparse scheme codes its kept values with another scheme
(`count = nnz`), so every method takes `count` separately from `shape`.

Layout and validation use the standard library only (`inspect` must not import numpy or
torch); checking and decoding import numpy or torch when called.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import numpy as np
    import torch

Quant = dict[str, Any]
Shape = tuple[int, ...]
Bad = Callable[..., Exception]  # bad(problem, newer=False): the error for an entry's problem


class Scheme(ABC):
    """One value of `quant.scheme`: its header rules, payload layout, checks and codec."""

    name: ClassVar[str]
    minor: ClassVar[int]  # the format minor version that introduced it (spec section 10)

    @abstractmethod
    def validate(self, q: Quant, shape: Shape, bad: Bad) -> None:
        """Raise `bad(problem)` when `q` breaks the scheme's header rules (spec 3.1), or
        `bad(problem, newer=True)` for a value a newer version of the format may define."""

    @abstractmethod
    def values_offset(self, q: Quant, shape: Shape, count: int) -> int:
        """Bytes before the packed values in the payload (scales, zero points, positions)."""

    @abstractmethod
    def payload_length(self, q: Quant, shape: Shape, count: int) -> int:
        """The payload's exact length in bytes: `decoded_length`."""

    def scale_groups(self, q: Quant, shape: Shape, count: int) -> int:
        """Number of stored scales (0 for schemes without)."""
        return 0

    def affine(self, q: Quant) -> bool:
        """Whether zero points are stored beside the scales."""
        return False

    def entry_minor(self, q: Quant) -> int:
        """The lowest format minor version that can hold an entry with this `quant`."""
        return self.minor

    @abstractmethod
    def check(self, payload: np.ndarray, q: Quant, shape: Shape, count: int, filt: str) -> str:
        """The problem with a payload's numbers (spec 3.6), or '' when it may be decoded."""

    @abstractmethod
    def decode(
        self,
        raw: torch.Tensor,
        q: Quant,
        shape: Shape,
        count: int,
        filt: str,
        channel_counts: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The `count` float32 values of a checked payload (`raw`: uint8, on the target
        device), flat. `channel_counts` (sparse tensors) gives how many of the values fall
        in each channel of axis 0, for channel granularity."""

    @abstractmethod
    def decode_numpy(
        self,
        raw: np.ndarray,
        q: Quant,
        shape: Shape,
        count: int,
        filt: str,
        channel_counts: np.ndarray | None = None,
    ) -> np.ndarray:
        """`decode` with numpy, to the same float32 bits (for commands that avoid torch)."""


def whole(value: Any) -> bool:
    """Whether a JSON value is an integer (JSON `true` is not)."""
    return isinstance(value, int) and not isinstance(value, bool)
