"""`rwsfmt convert`: store a signature's tensors with other quantization settings."""

from __future__ import annotations

import os

import click

from .console import bits_per_parameter, describe_bits, human_bytes, progress_bar, report
from .inspect import describe_quant
from .options import (
    STORAGE,
    GroupedCommand,
    Storage,
    quant_options,
    report_options,
    rws_output_option,
)


@click.command(
    cls=GroupedCommand,
    groups={
        "Storage": STORAGE,
        "Output": ["output", "label", "quiet", "as_json"],
    },
)
@click.argument("signature", type=click.Path(dir_okay=False))
@rws_output_option("The re-quantized .rws file to write (atomically).")
@quant_options(inherit="the input")
@click.option("--name", "label", metavar="LABEL", help="A new label (default: the input's).")
@report_options
def convert(
    signature: str,
    output: str,
    storage: Storage,
    label: str | None,
    quiet: bool,
    as_json: bool,
) -> None:
    """Re-quantize SIGNATURE, a .rws file, into OUT.rws: from 8 bits to 4, say.

    Each tensor is decoded and re-encoded; targets (normalization statistics) stay exact
    float32, and a tensor already stored as asked is copied unchanged. Label, fingerprints,
    statistics and provenance are kept, and the provenance records the conversion.
    """
    import rwsfmt
    from rwsfmt.atomic import check_destination, refuse_overwriting_inputs

    check_destination(output)
    refuse_overwriting_inputs(
        output, [("input signature", signature)], fix="choose another -o path"
    )
    with rwsfmt.load(signature) as sig:
        quant = storage.inherit(sig.quant or rwsfmt.QuantConfig())
        converted = rwsfmt.convert(
            sig,
            quant,
            label=label,
            progress=progress_bar(quiet or as_json),
        )
        rwsfmt.save(converted, output)
    record = converted.provenance["conversions"][-1]
    size, before = os.path.getsize(output), os.path.getsize(signature)
    n, reencoded = len(converted), record["reencoded"]
    bits = bits_per_parameter(size, converted)
    if reencoded:
        change = f"{reencoded} of {n} tensors re-encoded"
    else:
        change = f"every tensor already stored so, all {n} copied unchanged"
    report(
        {
            "output": output,
            "label": converted.label,
            "tensors": n,
            "reencoded": reencoded,
            "from": record["from"],
            "to": record["to"],
            "bytes": size,
            "input_bytes": before,
            "bits_per_parameter": bits,
        },
        f"wrote {output}: {converted.label!r}, {describe_quant(record['from'])} -> "
        f"{describe_quant(record['to'])}, {change}; {human_bytes(size)}, {describe_bits(bits)} "
        f"(input {human_bytes(before)})",
        quiet=quiet,
        as_json=as_json,
    )
