"""`rwsfmt extract`: compute a signature from std, robust and init checkpoints into a .rws file."""

from __future__ import annotations

import json
import os
import re

import click

from rwsfmt.errors import RwsError

from .console import (
    bits_per_parameter,
    console,
    describe_bits,
    human_bytes,
    plain,
    print_table,
    progress_bar,
)
from .options import (
    STORAGE,
    GroupedCommand,
    Storage,
    check_hub_options,
    hub_options,
    quant_options,
    rws_output_option,
    trust_pickle_option,
)

_GROUPS = {
    "Output": ["output", "quiet", "as_json"],
    "Storage": STORAGE,
    "Tensor selection": ["layers", "include", "exclude", "energy", "order"],
    "Reading": ["state_key", "trust_pickle", "revision", "download"],
    "Method": ["method", "device"],
    "Description": ["name", "meta", "corruption", "severity", "dataset"],
}


@click.command(cls=GroupedCommand, groups=_GROUPS)
@click.argument("std", type=click.Path())
@click.argument("robust", type=click.Path())
@click.argument("init", type=click.Path(), required=False)
@rws_output_option("The signature file to write (atomically).")
@quant_options()
@click.option("--quiet", "-q", is_flag=True, help="No progress bar and no summary table.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary instead of the table.")
@click.option(
    "--layers",
    metavar="N|all",
    help="The N shallowest layers, counted as blocks on transformers (N blocks and what "
    "precedes them), or all. Default 5, the paper's rule; all with --include, --energy or "
    "--method subtract.",
)
@click.option("--include", metavar="RE", help="Keep only tensors whose name matches RE.")
@click.option("--exclude", metavar="RE", help="Drop tensors whose name matches RE.")
@click.option(
    "--energy",
    type=float,
    metavar="F",
    help="Keep the shallowest layers holding share F of the signature's squared norm.",
)
@click.option(
    "--order",
    metavar="REF",
    type=click.Path(exists=True),
    help="Take the depth order from REF: a PyTorch checkpoint of the same architecture, or a "
    "text file of tensor names (one per line). Default: the file's own order (PyTorch) or "
    "naming rules (safetensors, which stores names sorted).",
)
@click.option(
    "--state-key",
    metavar="KEY",
    help="The entry of a training checkpoint that holds the weights, e.g. state_dict_ema "
    "(default: found automatically).",
)
@click.option(
    "--method",
    type=click.Choice(["project", "subtract"]),
    default="project",
    show_default=True,
    help="project: Eq. 1, needs INIT. subtract: robust - std (no INIT needed).",
)
@click.option(
    "--device",
    default="cpu",
    show_default=True,
    metavar="cpu|cuda",
    help="Where the arithmetic runs.",
)
@trust_pickle_option("PyTorch checkpoints")
@click.option(
    "--name",
    metavar="LABEL",
    help="The signature's label (default: --corruption, else ROBUST's file stem or folder name; "
    "when that name is generic, OUT's stem (-o fog.rws -> fog), else the folder above "
    "(runs/fog/robust.pt -o out.rws -> fog)).",
)
@click.option("--meta", multiple=True, metavar="KEY=VALUE", help="Free metadata; repeatable.")
@click.option("--corruption", help="The corruption the robust model was trained on, e.g. fog.")
@click.option("--severity", type=int, help="The corruption's severity, e.g. 5.")
@click.option("--dataset", help="The training data set, e.g. cifar10.")
@hub_options
def extract(
    std: str,
    robust: str,
    init: str | None,
    output: str,
    storage: Storage,
    quiet: bool,
    as_json: bool,
    layers: str | None,
    include: str | None,
    exclude: str | None,
    energy: float | None,
    order: str | None,
    state_key: str | None,
    method: str,
    device: str,
    trust_pickle: bool,
    name: str | None,
    meta: tuple[str, ...],
    corruption: str | None,
    severity: int | None,
    dataset: str | None,
    revision: str | None,
    download: bool,
) -> None:
    """Extract the robust weight signature of ROBUST relative to STD into OUT.rws.

    STD and ROBUST were both trained from INIT (needed by the default projection method).
    Each may be a PyTorch file (.pt/.pth/.bin), a .safetensors file, a sharded Hugging
    Face folder, or a Hugging Face id org/name[@REV] read from the local Hugging Face cache.
    """
    import rwsfmt
    from rwsfmt.atomic import check_destination, refuse_overwriting_inputs
    from rwsfmt.extraction import output_label

    check_destination(output)
    check_hub_options([std, robust, init], revision, download)
    roles = [("std", std), ("robust", robust), ("init", init), ("order reference", order)]
    refuse_overwriting_inputs(
        output, [(f"{r} checkpoint", p) for r, p in roles if p], fix="choose another -o path"
    )
    sig = rwsfmt.extract(
        std,
        robust,
        init,
        layers=layers,
        include=include,
        exclude=exclude,
        energy=energy,
        order=order,
        method=method,
        quant=storage.config(),
        label=name or (None if corruption else output_label(robust, output)),
        meta=_parse_meta(meta),
        corruption=corruption,
        severity=severity,
        dataset=dataset,
        device=device,
        trust_pickle=trust_pickle,
        state_key=state_key,
        progress=progress_bar(quiet or as_json),
        revision=revision,
        download=download,
    )
    rwsfmt.save(sig, output)
    if as_json:
        click.echo(json.dumps(_summary_json(sig, output), indent=2, sort_keys=True))
    elif not quiet:
        _summary(sig, output)


def _summary_json(sig, output: str) -> dict:
    """What --json prints: the file, its label and size, and every tensor with its stats."""
    size = os.path.getsize(output)
    return {
        "output": output,
        "label": sig.label,
        "bytes": size,
        "bits_per_parameter": bits_per_parameter(size, sig),
        "float32_bytes": sum(4 * info.numel for info in sig.infos),
        "layers": sig.provenance.get("selection", {}).get("layer_count"),
        "unit": sig.provenance.get("selection", {}).get("unit"),
        "parameters": sum(info.numel for info in sig.infos),
        "tensors": [
            {"name": i.name, "shape": list(i.shape), "kind": i.kind, "stats": i.stats}
            for i in sig.infos
        ],
    }


def _parse_meta(pairs: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise RwsError(f"--meta {pair!r} is not KEY=VALUE", fix="e.g. --meta run=42")
        out[key] = value
    return out


def _summary(sig, output: str) -> None:
    """The per-tensor table and the size line; names, labels and paths come from files and
    users, so nothing printed is read as rich markup."""
    from rwsfmt.order import describe_order

    selection = sig.provenance.get("selection", {})
    parameters = sum(info.numel for info in sig.infos)
    title = (
        f"{sig.label}: {len(sig)} tensors, {parameters:,} parameters, "
        f"{describe_kept(selection)}; depth order from {describe_order(selection)}"
    )
    float32 = 4 * parameters
    rows = [
        [
            info.name,
            "x".join(map(str, info.shape)) or "scalar",
            info.kind,
            *(_num(info.stats.get(k)) for k in ("rel_norm", "cos_base", "quant_rel_error")),
        ]
        for info in sig.infos
    ]
    out = console()
    print_table(out, title, _COLUMNS, rows, right=_COLUMNS[3:])
    size = os.path.getsize(output)
    ratio = f" ({size / float32:.3f}x, {describe_bits(bits_per_parameter(size, sig))})"
    ratio = ratio if float32 else ""
    out.print(
        plain(
            f"wrote {output}: {human_bytes(size)}{ratio} against {human_bytes(float32)} "
            "for the same tensors in float32"
        )
    )
    for record in sig.provenance.get("inputs", []):
        if record.get("names"):
            out.print(plain(f"note: {record['name']} read under std's names: {record['names']}"))
        for key in record.get("alternatives", []):
            out.print(
                plain(
                    f"note: {record['name']} also holds weights under {key!r} "
                    f"(--state-key {key} extracts from those)"
                )
            )


def describe_kept(selection: dict) -> str:
    """`in 5 of 6 blocks (encoder.layer.0-4, ...)` or `in 5 of 16 layers (features.0, ...)`."""
    unit, total = selection.get("unit", "layer"), selection.get("layer_total")
    count = selection.get("layer_count", "?")
    kept = _ranges(selection.get("kept", []))
    if unit == "block" and kept:
        kept += " and everything " + (
            "outside blocks" if total == count else "before the next block"
        )
    of = f" of {total}" if total else ""
    plural = "" if (total or count) == 1 else "s"
    return f"in {count}{of} {unit}{plural}" + (f" ({kept})" if kept else "")


def _ranges(labels: list[str], most: int = 6) -> str:
    """Module names with runs of consecutive numbers folded: `encoder.layer.0-4`; at most
    `most` items, the middle elided."""
    runs: list[list] = []  # [stem, first, last] or [label, None, None]
    for label in labels:
        match = re.fullmatch(r"(.*?)(\d+)", label)
        stem, number = (match.group(1), int(match.group(2))) if match else (label, None)
        last = runs[-1] if runs else None
        if number is not None and last and last[0] == stem and last[2] == number - 1:
            last[2] = number
        else:
            runs.append([stem, number, number])
    items = [
        stem if a is None else f"{stem}{a}" if a == b else f"{stem}{a}-{b}" for stem, a, b in runs
    ]
    if len(items) > most:
        items = [*items[: most - 2], "...", *items[-1:]]
    return ", ".join(items)


_COLUMNS = ["name", "shape", "kind", "rel. norm", "cos(v_c, v_base)", "quant err"]


def _num(value: object) -> str:
    return f"{value:.3g}" if isinstance(value, (int, float)) else "-"
