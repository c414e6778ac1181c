"""Bit-for-bit comparison of tensors and state dicts, shared by the patching tests."""

from __future__ import annotations

import torch
from torch import nn

BIT_VIEWS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def bits_of(t: torch.Tensor) -> torch.Tensor:
    """A float tensor's bits as integers (so -0.0 differs from 0.0 and NaNs compare)."""
    return t.detach().cpu().contiguous().view(BIT_VIEWS[t.dtype])


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of every entry of `model.state_dict()`."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_bit_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Same names, dtypes and bits in two state dicts."""
    assert a.keys() == b.keys()
    for k in a:
        if a[k].is_floating_point():
            assert a[k].dtype == b[k].dtype, k
            assert torch.equal(bits_of(a[k]), bits_of(b[k])), k
        else:
            assert torch.equal(a[k], b[k]), k
