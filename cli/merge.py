"""`rwsfmt merge`: combine signatures into one file (weighted sum or mean)."""

from __future__ import annotations

import os

import click

from .console import human_bytes, say
from .options import GroupedCommand, quant_config, quant_options, rws_output_option


@click.command(
    cls=GroupedCommand,
    groups={
        "Combining": ["weights", "mean", "label"],
        "Output": ["output"],
        "Storage": ["bits", "granularity", "group_size", "affine"],
    },
)
@click.argument("signatures", nargs=-1, required=True, type=click.Path(dir_okay=False))
@rws_output_option("Merged .rws file to write.")
@click.option("--weights", help="Comma-separated weights, one per signature (default: 1 each).")
@click.option(
    "--mean", is_flag=True, help="Rescale the weights to sum to 1 (a mean instead of a sum)."
)
@click.option(
    "--name", "label", help="Label of the merged signature (default: labels joined by '+')."
)
@quant_options(default_bits=None)
def merge(signatures, output, weights, mean, label, bits, granularity, group_size, affine) -> None:
    """Merge SIGNATURES (two or more .rws files) into OUTPUT.

    Delta tensors are summed with their weights; normalization-statistic targets are
    averaged and need weights that sum to 1 (use --mean). The result is re-quantized
    (by default as the first file was) and records its components in its provenance.
    """
    import rwsfmt
    from rwsfmt.atomic import check_destination, refuse_overwriting_inputs
    from rwsfmt.errors import RwsError

    if len(signatures) < 2:
        raise click.UsageError("give at least two signatures to merge")
    check_destination(output)
    refuse_overwriting_inputs(
        output, [("input signature", p) for p in signatures], fix="choose another -o path"
    )
    parsed = None
    if weights is not None:
        try:
            parsed = [float(w) for w in weights.split(",")]
        except ValueError:
            raise RwsError(
                f"--weights {weights!r} is not a comma-separated list of numbers"
            ) from None
    loaded = [rwsfmt.load(p) for p in signatures]
    try:
        quant = quant_config(bits, granularity, group_size, affine) if bits else None
        merged = rwsfmt.merge(loaded, parsed, mean=mean, quant=quant, label=label)
        rwsfmt.save(merged, output)
    finally:
        for sig in loaded:
            sig.close()
    plural = "" if len(merged) == 1 else "s"
    say(
        f"wrote {output}: {merged.label!r}, {len(merged)} tensor{plural}, "
        f"{human_bytes(os.path.getsize(output))}"
    )
