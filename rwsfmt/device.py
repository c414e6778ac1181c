"""Choosing the torch device that arithmetic runs on."""

from __future__ import annotations

import torch

from .errors import RwsError, spell


def resolve_device(device: str | torch.device | None) -> torch.device:
    """A torch device (CPU by default), with a clear error when CUDA is asked for and absent."""
    try:
        dev = torch.device(device or "cpu")
    except (RuntimeError, TypeError):
        raise RwsError(
            f"unknown device {device!r}",
            fix=f"use {spell('--device', 'device=')} cpu, cuda or cuda:N",
        ) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RwsError(
            f"device {str(device)!r} was asked for, but CUDA is not available on this machine",
            fix="use the CPU: " + spell("--device cpu", "device='cpu'") + ", the default",
        )
    return dev
