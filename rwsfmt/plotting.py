"""The figure of a comparison (`rwsfmt compare --plot`): the paper's Figures 2-4 in one PNG.

matplotlib is an optional extra (`pip install 'rwsfmt[plot]'`), imported only here and
only when a figure is drawn; no pyplot state is used, so drawing never opens a window.
"""

from __future__ import annotations

import os
from typing import Any

from .atomic import atomic_path
from .comparison import Comparison
from .errors import RwsError

MISSING = "drawing a figure needs matplotlib, which is not installed"
INSTALL = "pip install 'rwsfmt[plot]'"


def require_matplotlib() -> None:
    """Raise an `RwsError` naming the extra to install when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise RwsError(MISSING, fix=INSTALL) from None


def check_png(path: str | os.PathLike) -> None:
    """Refuse a figure path that does not end in `.png`: the figure is a PNG image."""
    if not os.fspath(path).lower().endswith(".png"):
        raise RwsError(
            "the figure is written as a PNG image, and this path does not end in .png",
            path=path,
            fix="give a path ending in .png",
        )


def plot_comparison(result: Comparison, path: str | os.PathLike) -> None:
    """Draw `result` (cosine heatmap, per-layer similarity, per-layer norms) to a PNG at
    `path`, atomically."""
    check_png(path)
    require_matplotlib()
    from matplotlib.figure import Figure

    n, layers = len(result.signatures), result.layers
    side = max(5.0, 0.42 * n + 2.5)  # the heatmap's side in inches: room for its numbers
    fig = Figure(figsize=(side + max(6.0, 0.5 * len(layers) + 3), side + 4.2), layout="constrained")
    grid = fig.add_gridspec(2, 2, width_ratios=[side, max(6.0, 0.5 * len(layers) + 3)],
                            height_ratios=[side, 4.2])  # fmt: skip
    _heatmap(fig, fig.add_subplot(grid[0, 0]), result)
    _similarity_bars(fig.add_subplot(grid[0, 1]), result)
    _norm_bars(fig.add_subplot(grid[1, :]), result)
    fig.suptitle(_headline(result), fontsize=12)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)


def _headline(result: Comparison) -> str:
    n, layers = len(result.signatures), result.layers
    count = f"{len(layers)} layers" if len(layers) > 1 else f"layer {layers[0].name}"
    return (
        f"{n} robust weight signatures compared on {count} "
        f"({result.overall.parameters:,} parameters each)"
    )


def _heatmap(fig: Any, ax: Any, result: Comparison) -> None:
    """The overall cosine matrix, every cell annotated (the paper's Figure 4, left)."""
    labels, cos = result.labels, result.overall.cosine
    n = len(labels)
    grid = [[float("nan") if c is None else c for c in row] for row in cos]
    image = ax.imshow(grid, cmap="RdBu_r", vmin=-1, vmax=1)
    size = max(5.0, min(10.0, 120 / n))
    for i, row in enumerate(grid):
        for j, c in enumerate(row):
            text = "-" if c != c else f"{c:.2f}".replace("0.", ".", 1)
            ax.text(j, i, text, ha="center", va="center", fontsize=size,
                    color="white" if abs(c) > 0.6 else "black")  # fmt: skip
    ax.set_xticks(range(n), labels, rotation=60, ha="right", rotation_mode="anchor", fontsize=9)
    ax.set_yticks(range(n), labels, fontsize=9)
    where = result.overall.name if len(result.layers) == 1 else "all compared layers"
    ax.set_title(f"cosine similarity between signatures, {where}", fontsize=10)
    bar = fig.colorbar(image, ax=ax, shrink=0.8)
    bar.set_label("1 same direction, 0 unrelated, -1 opposite", fontsize=8)


def _similarity_bars(ax: Any, result: Comparison) -> None:
    """Per layer, the mean cosine between different signatures, with the range from the least
    to the most similar pair (the paper's Figure 3, one bar per layer)."""
    xs = range(len(result.layers))
    for x, layer in zip(xs, result.layers, strict=True):
        mean, low, high = layer.mean_cosine, layer.least_similar, layer.most_similar
        if mean is None or low is None or high is None:  # every signature is zero there
            continue
        ax.bar(x, mean, color="#4c72b0")
        ax.plot([x, x], [low[2], high[2]], color="black", linewidth=1)
        ax.plot([x - 0.15, x + 0.15], [low[2], low[2]], color="black", linewidth=1)
        ax.plot([x - 0.15, x + 0.15], [high[2], high[2]], color="black", linewidth=1)
        ax.annotate(f"{mean:.2f}", (x, mean), xytext=(6, 2), textcoords="offset points",
                    fontsize=8)  # fmt: skip
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set_xticks(xs, [layer.name for layer in result.layers], rotation=30, ha="right",
                  fontsize=9)  # fmt: skip
    lowest = min((layer.least_similar or (0, 0, 0.0))[2] for layer in result.layers)
    ax.set_ylim(min(0.0, lowest) - 0.05, 1.05)  # all of [-1, 1] only when a pair is opposed
    ax.set_ylabel("cosine similarity between signatures")
    ax.set_title("per layer: mean over pairs (bar), least to most similar pair (line)\n"
                 "lower: the corruption types differ more there", fontsize=10)  # fmt: skip


def _norm_bars(ax: Any, result: Comparison) -> None:
    """Per signature, one bar per layer: its norm relative to the std weight (the paper's
    Figure 2), or its absolute norm when some file records no relative one."""
    from matplotlib import colormaps

    layers, labels = result.layers, result.labels
    relative = result.relative
    colors = colormaps["viridis"]
    width = 0.8 / len(layers)
    highest = 0.0
    for k, layer in enumerate(layers):
        values = layer.rel_norm if relative else layer.norm
        xs = [i + (k - (len(layers) - 1) / 2) * width for i in range(len(labels))]
        color = colors(k / max(1, len(layers) - 1) * 0.9)
        ax.bar(xs, values, width, color=color, label=layer.name)
        highest = max(highest, *(v or 0.0 for v in values))
    ax.set_ylim(0, 1.3 * highest or 1.0)  # room for the legend above the bars
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=9)
    ax.set_xlim(-0.6, len(labels) - 0.4)
    if relative:
        ax.set_ylabel("||RWS|| / ||std weight||")
        title = "norm of each signature per layer, relative to the std model's weight"
    else:
        ax.set_ylabel("||RWS|| (absolute)")
        title = "norm of each signature per layer (absolute: some files record no std norm)"
    ax.set_title(title, fontsize=10)
    ax.legend(title="layer (shallow to deep)", fontsize=8, title_fontsize=8,
              ncols=min(len(layers), 6), loc="upper right")  # fmt: skip
