"""`dare` and `dare_ties`: DARE (Yu et al., ICML 2024), drop and rescale, then merge.

Each entry of each delta is dropped with probability `1 - density` and the kept ones are
divided by `density` (so each delta keeps its expected value), as PEFT's `random_pruning`;
`dare` then takes the weighted sum, `dare_ties` TIES's sign election and disjoint mean
(`rwsfmt.merging.ties`). The drops are drawn on the CPU from a generator seeded by
SHA-256 of (seed, input index, tensor name): the same seed gives the same result whatever
the order of the tensors, the thread count or the device.
"""

from __future__ import annotations

import hashlib

import torch

from .base import DEFAULT_DENSITY, MergeOptions, register, weighted_sum
from .ties import disjoint_mean

DEFAULT_SEED = 0


def generator(seed: int, index: int, name: str) -> torch.Generator:
    """A CPU generator for input `index`'s tensor `name`, independent of every other one."""
    digest = hashlib.sha256(f"{seed}\0{index}\0{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def drop(delta: torch.Tensor, density: float, gen: torch.Generator) -> torch.Tensor:
    """Zero each entry with probability `1 - density`, divide the kept ones by `density`."""
    keep = torch.rand(delta.shape, generator=gen) < density
    return delta * keep.to(delta.device) / density


def dropped(deltas: torch.Tensor, options: MergeOptions, name: str) -> torch.Tensor:
    """Every input's delta after `drop`, each with its own generator."""
    assert options.density is not None and options.seed is not None  # MergeMethod.resolve
    return torch.stack(
        [drop(d, options.density, generator(options.seed, i, name)) for i, d in enumerate(deltas)]
    )


_USES = {"density": DEFAULT_DENSITY, "seed": DEFAULT_SEED}


@register("dare", "drop entries at random (keep density), rescale by 1/density, sum", uses=_USES)
def dare(
    deltas: torch.Tensor, weights: torch.Tensor, options: MergeOptions, name: str
) -> torch.Tensor:
    """DARE with a weighted sum (PEFT's `dare_linear`)."""
    return weighted_sum(dropped(deltas, options, name), weights)


@register("dare_ties", "DARE's drops, then TIES's sign election and mean", uses=_USES)
def dare_ties(
    deltas: torch.Tensor, weights: torch.Tensor, options: MergeOptions, name: str
) -> torch.Tensor:
    """DARE's drops followed by TIES's sign election and disjoint mean (PEFT's `dare_ties`)."""
    return disjoint_mean(dropped(deltas, options, name), weights)
