"""`rwsfmt export` and `rwsfmt import`: signatures to and from safetensors files."""

from __future__ import annotations

import os

import click

from rwsfmt.errors import RwsError

from .console import bits_per_parameter, describe_bits, human_bytes, progress_bar, report, say
from .inspect import describe_quant
from .options import (
    STORAGE,
    GroupedCommand,
    Storage,
    quant_options,
    report_options,
    rws_output_option,
)


@click.command(cls=GroupedCommand, groups={"Output": ["output", "quiet", "as_json"]})
@click.argument("signature", type=click.Path(dir_okay=False))
@rws_output_option(
    "The safetensors file to write (atomically): float32 tensors, the signature's header "
    "fields as metadata.",
    metavar="OUT.safetensors",
)
@report_options
def export(signature: str, output: str, quiet: bool, as_json: bool) -> None:
    """Write SIGNATURE's tensors, dequantized to float32, to OUT.safetensors.

    For tools that read safetensors only. The label, fingerprints, provenance, entry kinds
    (delta or target) and statistics travel as metadata (`rwsfmt.*` keys), so `rwsfmt
    import` of the file restores them.
    """
    import rwsfmt
    from rwsfmt.atomic import check_destination, refuse_overwriting_inputs

    if not output.endswith(".safetensors"):
        raise RwsError(
            "the output of export is a safetensors file, but its name does not end in .safetensors",
            path=output,
            fix="name it OUT.safetensors",
        )
    check_destination(output)
    refuse_overwriting_inputs(
        output, [("input signature", signature)], fix="choose another -o path"
    )
    with rwsfmt.load(signature) as sig:
        rwsfmt.export_safetensors(sig, output, progress=progress_bar(quiet or as_json))
        label, n = sig.label, len(sig)
    size = os.path.getsize(output)
    report(
        {"output": output, "label": label, "tensors": n, "bytes": size},
        f"wrote {output}: {label!r}, {n} float32 tensor{'' if n == 1 else 's'}, "
        f"{human_bytes(size)}",
        quiet=quiet,
        as_json=as_json,
    )


@click.command(
    name="import",
    cls=GroupedCommand,
    groups={
        "Storage": STORAGE,
        "Output": ["output", "label", "quiet", "as_json"],
    },
)
@click.argument("tensors", type=click.Path())
@rws_output_option("The signature file to write (atomically).")
@quant_options()
@click.option(
    "--name",
    "label",
    metavar="LABEL",
    help="The signature's label (default: an exported signature's own, else the file's stem, "
    "or its folder's name when the stem is generic: runs/fog/model.safetensors -> fog).",
)
@report_options
def import_(
    tensors: str,
    output: str,
    storage: Storage,
    label: str | None,
    quiet: bool,
    as_json: bool,
) -> None:
    """Make a signature OUT.rws from TENSORS, a safetensors file of weight differences or a
    PEFT LoRA adapter.

    Any safetensors file of floating tensors (a task vector made elsewhere, say) becomes
    delta entries, in depth order; integer and bool tensors (such as num_batches_tracked)
    are skipped and listed; tensors that look like a model's weights rather than
    differences get a warning. A PEFT LoRA adapter (its folder, or adapter_model.safetensors
    beside adapter_config.json) becomes the deltas scale x B @ A under the base model's
    weight names. A file written by `rwsfmt export` gets back its label, kinds, statistics,
    fingerprints and provenance.
    """
    import rwsfmt
    from rwsfmt.atomic import check_destination, refuse_overwriting_inputs

    check_destination(output)
    refuse_overwriting_inputs(
        output, [("input safetensors file", tensors)], fix="choose another -o path"
    )
    sig = rwsfmt.import_safetensors(
        tensors,
        label=label,
        quant=storage.config(),
        progress=progress_bar(quiet or as_json),
    )
    rwsfmt.save(sig, output)
    prov = sig.provenance  # this import's record: `imported` (an exported signature's file)
    skipped = (prov["imported"] if "imported" in prov else prov["inputs"][0]).get("skipped", [])
    if skipped and not quiet:
        shown = ", ".join(f"{s['name']} ({s['dtype']})" for s in skipped[:5])
        more = f" and {len(skipped) - 5} more" if len(skipped) > 5 else ""
        say(f"note: skipped {len(skipped)} non-floating tensor(s): {shown}{more}", err=True)
    size = os.path.getsize(output)
    report(
        {
            "output": output,
            "label": sig.label,
            "tensors": len(sig),
            "skipped": [s["name"] for s in skipped],
            "quantization": sig.quant.to_json() if sig.quant else None,
            "bytes": size,
            "bits_per_parameter": bits_per_parameter(size, sig),
        },
        f"wrote {output}: {sig.label!r}, {len(sig)} tensor{'' if len(sig) == 1 else 's'}, "
        f"{describe_quant(sig.provenance['quantization'])}, {human_bytes(size)}, "
        f"{describe_bits(bits_per_parameter(size, sig))}",
        quiet=quiet,
        as_json=as_json,
    )
