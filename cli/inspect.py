"""`rwsfmt inspect`: show what a .rws file holds, reading only its header."""

from __future__ import annotations

import json

import click

from rwsfmt.summary import describe

from .console import console, human_bytes, short_hash


@click.command()
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of tables.")
def inspect(file: str, as_json: bool) -> None:
    """Show FILE's label, fingerprints, provenance and per-tensor table.

    Reads the header only: fast on a file of any size, and works on a file whose data
    section is damaged (use `rwsfmt verify` to check the data).
    """
    info = describe(file)
    if as_json:
        click.echo(json.dumps(info, indent=2, sort_keys=True, ensure_ascii=False))
        return
    render(info)


def render(info: dict) -> None:
    from rich.table import Table

    out = console()
    prov = info["provenance"]
    fp = info["fingerprint"]
    summary = Table.grid(padding=(0, 2))
    summary.add_column(style="bold")
    summary.add_column()
    rows = [
        ("file", info["path"]),
        ("format", f"rws {info['format_version']}"),
        ("label", info["label"] or "-"),
        (
            "created",
            f"{prov.get('created', '-')} by {prov.get('tool', '?')} {prov.get('tool_version', '')}",
        ),
        ("method", _method(prov)),
        ("quantization", _quant(prov.get("quantization"))),
        ("model fingerprint", short_hash(fp.get("model"))),
        ("signature fingerprint", short_hash(fp.get("signature"))),
        (
            "size",
            f"{human_bytes(info['file_bytes'])} for {info['parameters']:,} parameters "
            + (f"({info['ratio_to_float32']:.3f}x of float32)" if info["ratio_to_float32"] else ""),
        ),
    ]
    for key in ("corruption", "severity", "dataset"):
        if key in prov:
            rows.append((key, str(prov[key])))
    for item in prov.get("inputs", []):
        digest = str(item.get("sha256", ""))[:12]
        size = human_bytes(item.get("size", 0))
        rows.append(
            (f"input: {item.get('role')}", f"{item.get('name')} ({size}, sha256 {digest}…)")
        )
    for comp in prov.get("components", []):
        rows.append(("component", f"{comp.get('label')} x {comp.get('weight')}"))
    for key, value in sorted(prov.get("meta", {}).items()):
        rows.append((f"meta: {key}", str(value)))
    for key, value in rows:
        summary.add_row(key, value)
    out.print(summary)

    table = Table(title=f"{len(info['tensors'])} tensors", title_justify="left")
    for col, justify in [
        ("name", "left"),
        ("shape", "left"),
        ("kind", "left"),
        ("bits", "right"),
        ("granularity", "left"),
        ("stored", "right"),
        ("vs f32", "right"),
        ("rel. norm", "right"),
        ("cos(v_c, v_base)", "right"),
        ("quant err", "right"),
    ]:
        table.add_column(col, justify=justify, no_wrap=col != "name")
    for t in info["tensors"]:
        s = t["stats"]
        table.add_row(
            t["name"],
            "x".join(map(str, t["shape"])) or "scalar",
            t["kind"],
            str(t["bits"]),
            t["granularity"],
            human_bytes(t["stored_bytes"]),
            f"{t['ratio_to_float32']:.3f}" if t["ratio_to_float32"] is not None else "-",
            _num(s.get("rel_norm")),
            _num(s.get("cos_base")),
            _num(s.get("quant_rel_error")),
        )
    out.print(table)


def _num(value: object) -> str:
    return f"{value:.3g}" if isinstance(value, (int, float)) else "-"


def _method(prov: dict) -> str:
    method = prov.get("method")
    if not method:
        return "-"
    layers = prov.get("layers")
    return f"{method}" + (f", layers {layers}" if layers is not None else "")


def _quant(q: object) -> str:
    if not isinstance(q, dict):
        return "-"
    if q.get("bits") == 32:
        return "exact float32"
    kind = "symmetric" if q.get("symmetric", True) else "affine"
    gran = q.get("granularity", "?")
    if gran == "group":
        gran = f"groups of {q.get('group_size')}"
    return f"{q.get('bits')}-bit linear, {kind}, per {gran}"
