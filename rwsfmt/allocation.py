"""Choosing a storage per tensor for `bits='auto'`: the least total squared error that fits
a byte budget, so bits go where a signature's norm is.

Each tensor comes with its candidate encodings as (bytes, squared error) pairs. On each
tensor's lower convex hull, upgrades are taken in order of error removed per byte spent
while they fit: the greedy solution of the Lagrangian relaxation, exact at hull points.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Option:
    """One way to store one tensor: its stored size and the squared error it leaves."""

    size: int  # bytes
    error: float  # ||decoded - x||^2


def allocate(options: Sequence[Sequence[Option]], budget: int) -> list[int]:
    """The index of the option chosen for each tensor, spending at most `budget` bytes
    beyond the smallest option of every tensor when the smallest options already exceed it
    (they are then all chosen)."""
    hulls = [_lower_hull(opts) for opts in options]
    chosen = [0] * len(hulls)  # position on each hull
    spent = sum(opts[hull[0]].size for opts, hull in zip(options, hulls, strict=True))
    heap: list[tuple[float, int]] = []

    def offer(t: int) -> None:
        hull, opts = hulls[t], options[t]
        if chosen[t] + 1 < len(hull):
            here, there = opts[hull[chosen[t]]], opts[hull[chosen[t] + 1]]
            gain = (here.error - there.error) / max(there.size - here.size, 1)
            heapq.heappush(heap, (-gain, t))

    for t in range(len(hulls)):
        offer(t)
    while heap:
        _, t = heapq.heappop(heap)
        opts, hull = options[t], hulls[t]
        cost = opts[hull[chosen[t] + 1]].size - opts[hull[chosen[t]]].size
        if spent + cost <= budget:
            spent += cost
            chosen[t] += 1
            offer(t)
    picked = [hull[c] for hull, c in zip(hulls, chosen, strict=True)]
    return _fill(options, picked, budget - spent)


def _fill(options: Sequence[Sequence[Option]], picked: list[int], room: int) -> list[int]:
    """Spend what is left on the best upgrades off the hulls: the next hull step of a tensor
    may not fit where a smaller step does."""
    while True:
        best: tuple[float, int, int, int] | None = None
        for t, opts in enumerate(options):
            here = opts[picked[t]]
            for i, there in enumerate(opts):
                cost = there.size - here.size
                if there.error < here.error and cost <= room:
                    gain = (here.error - there.error) / max(cost, 1)
                    if best is None or gain > best[0]:
                        best = (gain, t, i, cost)
        if best is None:
            return picked
        _, t, picked[t], cost = best
        room -= cost


def _lower_hull(options: Sequence[Option]) -> list[int]:
    """Indices of the options on the lower convex hull of (size, error), by size: the
    options no mix of two others beats."""
    order = sorted(range(len(options)), key=lambda i: (options[i].size, options[i].error))
    hull: list[int] = []
    for i in order:
        p = options[i]
        if hull and p.error >= options[hull[-1]].error:
            continue  # bigger and no better
        while len(hull) >= 2:
            a, b = options[hull[-2]], options[hull[-1]]
            # drop b when it lies on or above the segment from a to p
            if (b.error - a.error) * (p.size - a.size) >= (p.error - a.error) * (b.size - a.size):
                hull.pop()
            else:
                break
        hull.append(i)
    return hull
