"""`rwsfmt merge`: combine signatures into one file (sum, mean, TIES or DARE)."""

from __future__ import annotations

import contextlib
import json
import math
import os

import click

from .console import UsageError, bits_per_parameter, describe_bits, human_bytes, progress_bar, say
from .options import (
    STORAGE,
    GroupedCommand,
    Storage,
    number_list,
    quant_options,
    rws_output_option,
)

# the names of rwsfmt.merging.REGISTRY, repeated so that `rwsfmt --help` does not import torch
# (tests/test_merge.py checks that they agree)
METHODS = ("sum", "mean", "ties", "dare", "dare_ties")

_GROUPS = {
    "Combining": ["method", "weights", "mean", "density", "lambda_", "seed", "label"],
    "Output": ["output", "as_json", "quiet"],
    "Storage": STORAGE,
}


def _finite(_ctx: click.Context, _param: click.Parameter, value: float) -> float:
    """Refuse nan and inf, which click's float type accepts."""
    if not math.isfinite(value):
        raise click.BadParameter(f"{value} is not a finite number")
    return value


@click.command(cls=GroupedCommand, groups=_GROUPS)
@click.argument("signatures", nargs=-1, required=True, type=click.Path(dir_okay=False))
@rws_output_option("Merged .rws file to write.")
@click.option(
    "--method",
    "-m",
    type=click.Choice(METHODS),
    help="sum (default): sum of w_i * signature_i (task arithmetic; a negative weight "
    "negates). mean: weights rescaled to sum to 1. ties: per tensor, keep each signature's "
    "top --density share by magnitude, elect each entry's sign by the summed values, average "
    "the weighted entries that agree (as PEFT's ties). dare: drop entries at random "
    "(keeping --density), rescale the kept by 1/density, sum. dare_ties: DARE's drops, "
    "then TIES's election and mean.",
)
@click.option(
    "--weights", metavar="W1,W2,...", help="One weight per signature, in order (default: 1 each)."
)
@click.option("--mean", is_flag=True, help="Same as --method mean.")
@click.option(
    "--density",
    type=click.FloatRange(0, 1, min_open=True),
    help="ties, dare, dare_ties: share of each signature's entries kept, in (0, 1] (default 0.5).",
)
@click.option(
    "--lambda",
    "lambda_",
    type=float,
    default=1.0,
    show_default=True,
    callback=_finite,
    help="Scale of the merged deltas (not of normalization statistics).",
)
@click.option(
    "--seed",
    type=click.IntRange(min=0),
    help="dare, dare_ties: seed of the random drops (default 0); one seed, one result.",
)
@click.option(
    "--name", "label", help="Label of the merged signature (default: labels joined by '+')."
)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary instead of text.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar and no summary line.")
@quant_options(inherit="the first signature", density_flag="--store-density")
def merge(
    signatures: tuple[str, ...],
    output: str,
    method: str | None,
    weights: str | None,
    mean: bool,
    density: float | None,
    lambda_: float,
    seed: int | None,
    label: str | None,
    as_json: bool,
    quiet: bool,
    storage: Storage,
) -> None:
    """Merge SIGNATURES (two or more .rws files) into OUTPUT.

    Delta tensors merge with --method over the union of the files' tensors (a tensor a file
    lacks counts as zero there), then are scaled by --lambda. Normalization-statistic
    targets are always the weighted mean of the targets (negative weights count as 0). The
    result is re-quantized (by default as the first file was stored) and records its components
    (label, weight, file SHA-256), the method and its parameters in its provenance.
    """
    import rwsfmt
    from rwsfmt.atomic import check_destination, refuse_overwriting_inputs

    if len(signatures) < 2:
        raise click.UsageError("give at least two signatures to merge")
    if mean and method not in (None, "mean"):
        raise click.UsageError(f"--mean is --method mean; it cannot be combined with {method}")
    method = "mean" if mean else method or "sum"
    parsed = _parse_weights(weights, len(signatures))
    _refuse_unused(method, density, seed)
    check_destination(output)
    refuse_overwriting_inputs(
        output, [("input signature", p) for p in signatures], fix="choose another -o path"
    )
    with contextlib.ExitStack() as stack:
        loaded = [stack.enter_context(rwsfmt.load(p)) for p in signatures]
        base = loaded[0].quant or rwsfmt.QuantConfig()
        quant = storage.inherit(base)
        merged = rwsfmt.merge(
            loaded,
            parsed,
            method=method,
            density=density,
            seed=seed,
            lambda_=lambda_,
            quant=quant,
            label=label,
            progress=progress_bar(quiet or as_json),
        )
        rwsfmt.save(merged, output)
    size = os.path.getsize(output)
    bits = bits_per_parameter(size, merged)
    if as_json:
        summary = {
            "output": output,
            "label": merged.label,
            "tensors": len(merged),
            "bytes": size,
            "bits_per_parameter": bits,
            "merge": merged.provenance["merge"],
            "components": merged.provenance["components"],
        }
        click.echo(json.dumps(summary, indent=2, sort_keys=True))
    elif not quiet:
        record = merged.provenance["merge"]
        params = ", ".join(
            f"{k} {record[k]:g}" for k in ("density", "seed", "lambda") if k in record
        )
        plural = "" if len(merged) == 1 else "s"
        say(
            f"wrote {output}: {merged.label!r}, {method} ({params}), {len(merged)} "
            f"tensor{plural}, {human_bytes(size)}, {describe_bits(bits)}"
        )


def _parse_weights(text: str | None, count: int) -> list[float] | None:
    """--weights as floats: finite, one per signature."""
    if text is None:
        return None
    values = number_list(text, "--weights")
    if len(values) != count:
        raise click.BadParameter(
            f"{len(values)} value(s) for {count} signatures; give one per signature, in order",
            param_hint="--weights",
        )
    return values


def _refuse_unused(method: str, density: float | None, seed: int | None) -> None:
    """Refuse --density or --seed with a method that ignores them (as if they had worked)."""
    from rwsfmt.merging import MergeOptions, get_method
    from rwsfmt.merging.base import users

    ignored = get_method(method).unused(MergeOptions(density=density, seed=seed))
    if ignored:
        key = ignored[0]
        fix = f"drop --{key}, or use --method {' or '.join(users(key))}"
        if key == "density":
            fix += "; --store-density D stores the merged signature sparse"
        raise UsageError(
            f"--{key} has no effect with --method {method}; it applies to {', '.join(users(key))}",
            fix=fix,
        )
