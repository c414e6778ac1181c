"""`rwsfmt compare`: cosine similarities and norm profiles of signatures, per layer."""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING

import click

from .console import console, json_text, plain, print_table, progress_bar, say

if TYPE_CHECKING:
    from rich.console import Console

    from rwsfmt.comparison import Comparison


@click.command()
@click.argument("signatures", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--layer", metavar="NAME", help="Compare one layer only (e.g. features.0).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of tables.")
@click.option(
    "--plot",
    metavar="FILE.png",
    type=click.Path(dir_okay=False),
    help="Also draw the comparison to a PNG (needs: pip install 'rwsfmt[plot]').",
)
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def compare(
    signatures: tuple[str, ...], layer: str | None, as_json: bool, plot: str | None, quiet: bool
) -> None:
    """Compare SIGNATURES (two or more .rws files) layer by layer.

    Prints the cosine similarity between every pair of signatures over all their shared
    tensors, each signature's norm per layer relative to the std weight, and the layers
    ranked by how much the signatures differ there (lowest mean cosine between different
    signatures first). A layer is a module: its weight and bias together. Tensors stream
    one at a time; normalization-statistic targets are left out.
    """
    import rwsfmt.comparison as comparison

    if len(signatures) < 2:
        raise click.UsageError("give at least two signatures to compare")
    if plot is not None:
        from rwsfmt.atomic import check_destination, refuse_overwriting_inputs
        from rwsfmt.plotting import check_png, require_matplotlib

        check_png(plot)
        require_matplotlib()
        check_destination(plot)
        refuse_overwriting_inputs(
            plot, [("input signature", p) for p in signatures], fix="choose another --plot path"
        )
    result = comparison.compare(
        signatures,
        layer=layer,
        progress=progress_bar(quiet or as_json),
    )
    if plot is not None:
        from rwsfmt.plotting import plot_comparison

        plot_comparison(result, plot)
    if as_json:
        click.echo(json_text(json.dumps(result.to_json(), indent=2, ensure_ascii=False)))
        return
    render(result)
    if plot is not None:
        say(f"wrote {plot}")


def render(result: Comparison) -> None:
    """The comparison as rich tables that fit the terminal (80 columns included)."""
    from rich.table import Table

    out = console()
    labels, layers, overall = result.labels, result.layers, result.overall
    single = len(layers) == 1 and overall.name == layers[0].name
    where = f"layer {overall.name}" if single else f"{len(layers)} layers"
    plural = "" if len(overall.tensors) == 1 else "s"
    out.print(
        plain(
            f"{len(labels)} signatures compared on {len(overall.tensors)} tensor{plural} in "
            f"{where} ({overall.parameters:,} parameters each); a layer is a module: its "
            "weight and bias together"
        )
    )
    stems = [os.path.splitext(os.path.basename(s.path or ""))[0] for s in result.signatures]
    if labels != stems:  # say which file each label stands for
        legend = Table(box=None, pad_edge=False)
        for title in ("#", "signature", "file"):
            legend.add_column(title, overflow="fold")
        for i, s in enumerate(result.signatures, 1):
            legend.add_row(str(i), plain(s.label), plain(s.path or "(in memory)"))
        out.print(legend)

    digits = len(str(len(labels)))
    rows = [f"{i:>{digits}} {label}" for i, label in enumerate(labels, 1)]
    numbers = [str(i) for i in range(1, len(labels) + 1)]
    title = "cosine similarity, " + (f"layer {overall.name}" if single else "all layers")
    print_table(
        out,
        title + " (1: same direction, 0: unrelated, -1: opposite)",
        ["signature", *numbers],
        [[name, *map(_cos, row)] for name, row in zip(rows, overall.cosine, strict=True)],
        right=numbers,
    )
    if not single:
        _ranking(out, result)
    if result.relative:
        title = "norm relative to the std weight per layer, ||RWS|| / ||std||"
        norms = [layer.rel_norm for layer in layers]
    else:
        title = "norm ||RWS|| per layer (absolute: not every file records the std weight's norm)"
        norms = [layer.norm for layer in layers]
    cells = [[layer.name, *map(_num, norm)] for layer, norm in zip(layers, norms, strict=True)]
    print_table(out, title + "; columns: the signatures above", ["layer", *numbers], cells, numbers)
    for note in _notes(result):
        out.print(plain(note))


def _ranking(out: Console, result: Comparison) -> None:
    """Layers where the signatures differ most first, with their least and most alike pair."""
    header = ["layer", "rank", "params", "mean cos", "least alike", "most alike"]
    rows = [
        [
            layer.name,
            str(rank),
            f"{layer.parameters:,}",
            _cos(layer.mean_cosine),
            _pair(layer.least_similar),
            _pair(layer.most_similar),
        ]
        for rank, layer in enumerate(result.ranking(), 1)
    ]
    title = (
        "layers where the signatures differ most first (lowest mean cosine between "
        "different signatures)"
    )
    print_table(out, title, header, rows, right=header[1:])


def _notes(result: Comparison) -> list[str]:
    """What was left out, and why the numbers are what they are."""
    notes = []
    if result.partial:
        notes.append(
            f"compared on the {len(result.overall.tensors)} tensors every signature holds; "
            "left out:"
        )
        for s in result.signatures:
            if s.left_out:
                shown = ", ".join(s.left_out[:5]) + (" ..." if len(s.left_out) > 5 else "")
                notes.append(f"  {s.label}: {len(s.left_out)} tensors ({shown})")
    if result.targets_left_out:
        notes.append(
            f"{result.targets_left_out} normalization-statistic entries (targets, not "
            "directions) were left out"
        )
    if not result.relative:
        missing = [
            s.label
            for i, s in enumerate(result.signatures)
            if any(layer.rel_norm[i] is None for layer in result.layers)
        ]
        notes.append(
            "no norm relative to the std weight recorded in: "
            + ", ".join(missing)
            + " (merged signatures record none)"
        )
    return notes


def _cos(value: float | None) -> str:
    """A cosine in a table cell: two decimals, `-` where undefined."""
    return "-" if value is None else f"{value:.2f}"


def _num(value: float | None) -> str:
    """A norm in a table cell: three significant digits, `-` where unknown."""
    return "-" if value is None else f"{value:#.3g}"


def _pair(pair: tuple[int, int, float] | None) -> str:
    """A pair of signatures by their numbers in the matrix, with their cosine."""
    return "-" if pair is None else f"{pair[0] + 1}-{pair[1] + 1}: {pair[2]:.2f}"
