"""`rwsfmt inspect`: show what a .rws file holds, reading only its header."""

from __future__ import annotations

import json

import click

from rwsfmt.summary import describe

from .console import console, human_bytes, plain, short_hash

ROWS = 100  # tensor rows shown without --all


@click.command()
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of tables.")
@click.option(
    "--all", "show_all", is_flag=True, help=f"List every tensor (default: the first {ROWS})."
)
def inspect(file: str, as_json: bool, show_all: bool) -> None:
    """Show FILE's label, fingerprints, provenance and per-tensor table.

    Reads the header only: fast on a file of any size, and works on a file whose data
    section is damaged (use `rwsfmt verify` to check the data).
    """
    info = describe(file, max_tensors=None if as_json or show_all else ROWS)
    if as_json:
        click.echo(dumps(info))
        return
    render(info)


def dumps(info: dict) -> str:
    """`info` as indented JSON with one line per tensor: readable, and fast for a header of
    65,536 tensors (json's indenting encoder is pure Python; the compact one is C)."""
    tensors = info["tensors"]
    text = json.dumps({**info, "tensors": None}, indent=2, sort_keys=True, ensure_ascii=False)
    # "tensors" sorts last among the top-level keys: its null is the last one in the text
    before, null, after = text.rpartition('"tensors": null')
    encode = json.JSONEncoder(sort_keys=True, ensure_ascii=False).encode  # one, reused
    rows = ",\n    ".join(map(encode, tensors))
    return before + ('"tensors": [\n    ' + rows + "\n  ]" if tensors else '"tensors": []') + after


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
        ("depth order", _depth_order(prov.get("selection"))),
        ("quantization", describe_quant(prov.get("quantization"))),
        ("model fingerprint", short_hash(str(fp.get("model") or ""))),
        ("signature fingerprint", short_hash(str(fp.get("signature") or ""))),
        ("signed by", _signed_by(info["signature"])),
        (
            "size",
            f"{human_bytes(info['file_bytes'])} for {info['parameters']:,} parameters "
            + (f"({info['ratio_to_float32']:.3f}x of float32)" if info["ratio_to_float32"] else ""),
        ),
    ]
    for key in ("corruption", "severity", "dataset"):
        if key in prov:
            rows.append((key, str(prov[key])))
    for item in _dicts(prov.get("inputs")):
        digest = str(item.get("sha256", ""))[:12]
        size = item.get("size")
        size = human_bytes(size) if isinstance(size, int) else "?"
        rows.append(
            (f"input: {item.get('role')}", f"{item.get('name')} ({size}, sha256 {digest}…)")
        )
    for comp in _dicts(prov.get("components")):
        rows.append(("component", f"{comp.get('label')} x {comp.get('weight')}"))
    meta = prov.get("meta")
    for key, value in sorted(meta.items()) if isinstance(meta, dict) else []:
        rows.append((f"meta: {key}", str(value)))
    for key, value in rows:
        summary.add_row(plain(key), plain(value))
    out.print(summary)

    tensors = info["tensors"]
    stats = [(key, title) for key, title in _STATS if any(key in t["stats"] for t in tensors)]
    count = info["tensor_count"]
    title = f"{count:,} tensor" + ("" if count == 1 else "s")
    table = _tensor_table(title, tensors, stats)
    wide = out.options.update_width(1 << 16)
    if stats and table.__rich_measure__(out, wide).maximum > out.width:  # statistics apart
        out.print(_tensor_table(title, tensors, []))
        table = _tensor_table("statistics", tensors, stats, layout=False)
    out.print(table)
    if len(tensors) < count:
        out.print(f"the first {len(tensors):,} of {count:,} tensors: --all lists every one")


_STATS = [("rel_norm", "rel. norm"), ("cos_base", "cos(v_c,v_base)"), ("quant_rel_error", "q. err")]


def _tensor_table(title: str, tensors: list[dict], stats: list[tuple[str, str]], layout=True):
    """One row per tensor: the name always shows in full (folded), other columns stay short."""
    from rich import box
    from rich.table import Table

    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    longest = max((len(t["name"]) for t in tensors), default=4)
    table.add_column("name", overflow="fold", min_width=min(longest, 24))
    columns = [("shape", "left"), ("kind", "left"), ("quant", "left"), ("stored", "right")]
    columns += [("x f32", "right")]
    columns = columns if layout else []
    columns += [(title, "right") for _, title in stats]
    for col, justify in columns:
        table.add_column(col, justify=justify, no_wrap=True)
    for t in tensors:
        row = [t["name"]]
        if layout:
            row += [
                "x".join(map(str, t["shape"])) or "scalar",
                t["kind"],
                _bits(t),
                human_bytes(t["stored_bytes"]),
                f"{t['ratio_to_float32']:.3f}" if t["ratio_to_float32"] is not None else "-",
            ]
        row += [_num(t["stats"].get(key)) for key, _ in stats]
        table.add_row(*map(plain, row))
    return table


def _bits(t: dict) -> str:
    """Storage in a few characters: `f32`, `8 ch0`, `16 t`, `4a g128` (a = affine)."""
    if t["scheme"] == "float":
        return f"f{t['bits']}"
    kind = "" if t["symmetric"] else "a"
    gran = {"tensor": "t", "channel": "ch", "group": "g"}.get(t["granularity"], "?")
    if t["granularity"] == "channel":
        gran += str(t.get("axis", ""))
    elif t["granularity"] == "group":
        gran += str(t.get("group_size", ""))
    return f"{t['bits']}{kind} {gran}"


def _dicts(value: object) -> list[dict]:
    """The objects of a provenance list, skipping anything else a newer writer put there."""
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


def _num(value: object) -> str:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return f"{value:.3g}" if number else "-"


def _signed_by(signature: dict | None) -> str:
    if signature is None:
        return "- (unsigned)"
    return f"key {short_hash(signature['fingerprint'])} (check with verify --key)"


def _method(prov: dict) -> str:
    method = prov.get("method")
    if not method:
        return "-"
    layers = prov.get("layers")
    merge = prov.get("merge")  # a merged file's parameters, e.g. density and lambda
    params = [
        f"{k} {v}"
        for k, v in (merge.items() if isinstance(merge, dict) else ())
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    ]
    return (
        f"{method}"
        + (f", layers {layers}" if layers is not None else "")
        + (f" ({', '.join(params)})" if params else "")
    )


def _depth_order(selection: object) -> str:
    from rwsfmt.order import describe_order

    return describe_order(selection) if isinstance(selection, dict) else "-"


def describe_quant(q: object) -> str:
    """Quantization settings (a provenance `quantization` object) in words."""
    if not isinstance(q, dict):
        return "-"
    if q.get("bits") == 32:
        return "exact float32"
    kind = "symmetric" if q.get("symmetric", True) else "affine"
    gran = q.get("granularity", "?")
    if gran == "group":
        gran = f"groups of {q.get('group_size')}"
    return f"{q.get('bits')}-bit linear, {kind}, per {gran}"
