"""`rwsfmt inspect`: show what a .rws file holds, reading only its header, or what a model
checkpoint is and which signatures were applied to it."""

from __future__ import annotations

import json
import os
import sys

import click

from rwsfmt.applied import is_model
from rwsfmt.errors import RwsError
from rwsfmt.hub import is_hub_id
from rwsfmt.naming import describe as describe_naming
from rwsfmt.summary import describe

from .console import (
    EXIT_OK,
    EXIT_USAGE,
    UsageError,
    console,
    human_bytes,
    json_text,
    plain,
    print_error,
    print_table,
    short_hash,
)
from .options import trust_pickle_option

ROWS = 100  # tensor rows shown without --all
# metadata values longer than this are cut in the tables (--json shows them whole): rich
# folds a cell line by line, in time quadratic in its length (7 s for 16 MB)
MAX_CELL = 2_000


@click.command()
@click.argument("files", nargs=-1, type=click.Path())
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print JSON instead of tables: one object for one FILE, a list for several.",
)
@click.option(
    "--all", "show_all", is_flag=True, help=f"List every tensor (default: the first {ROWS})."
)
@trust_pickle_option("a PyTorch model")
@click.option(
    "--quiet",
    "-q",
    is_flag=True,
    help="Print nothing: the exit code tells whether every FILE could be read.",
)
def inspect(
    files: tuple[str, ...], as_json: bool, show_all: bool, trust_pickle: bool, quiet: bool
) -> None:
    """Show each FILE's label, fingerprints, provenance and per-tensor table.

    Reads the headers only: fast on files of any size, and works on a file whose data
    section is damaged (use `rwsfmt verify` to check the data). A FILE may also be a model
    checkpoint (a PyTorch or safetensors file, a Hugging Face folder, or a Hugging Face id
    org/name[@REV] in the local cache): then its format, tensors and the signatures `rwsfmt
    apply` applied to it. Without FILE: the .rws files of the current folder (exit code 2
    when there are none). Exit code 0 when every FILE could be read, 2 when any could not
    (the others are still shown).
    """
    here = not files
    if here:
        files = _rws_files_here()
        if not as_json and not quiet:
            click.echo(f"the {len(files)} .rws file(s) of the current folder:\n")
    worst, infos = EXIT_OK, []
    for path in files:
        try:
            infos.append(_describe(path, as_json or show_all, trust_pickle))
        except RwsError as exc:
            if len(files) == 1 and not here:
                raise
            worst = EXIT_USAGE
            infos.append({"path": path, "error": exc.problem, "fix": exc.fix})
            if not as_json and not quiet:
                print_error(str(exc))
    if as_json and len(files) == 1 and not here:
        click.echo(json_text(_json(infos[0])))
    elif as_json:
        click.echo(json_text("[\n" + ",\n".join(map(_json, infos)) + "\n]"))
    elif not quiet:
        for n, info in enumerate(i for i in infos if "error" not in i):
            if n:
                click.echo()
            (render if "tensors" in info else _render_model)(info)
    sys.exit(worst)


def _rws_files_here() -> tuple[str, ...]:
    """The `.rws` files of the current folder, sorted (hidden ones left out); a usage error
    when there are none."""
    found = sorted(
        name
        for name in os.listdir(".")
        if name.endswith(".rws") and not name.startswith(".") and os.path.isfile(name)
    )
    if not found:
        raise UsageError(
            f"no FILE given, and the current folder ({os.getcwd()}) holds no .rws files",
            fix="give the files: rwsfmt inspect FILE.rws ... (or a model checkpoint), or run "
            "it in the folder holding them",
        )
    return tuple(found)


def _describe(path: str, every_tensor: bool, trust_pickle: bool) -> dict:
    """A `.rws` file's description (its first ROWS tensors unless `every_tensor`), or a
    model checkpoint's, or a Hugging Face id's (`rwsfmt.applied.describe_model`, which may
    import torch)."""
    if is_model(path) or is_hub_id(path):
        from rwsfmt.applied import describe_model

        return describe_model(path, trust_pickle=trust_pickle)
    return describe(path, max_tensors=None if every_tensor else ROWS)


def _json(info: dict) -> str:
    if "tensors" in info:
        return dumps(info)
    return json.dumps(info, indent=2, sort_keys=True, ensure_ascii=False)


def _render_model(info: dict) -> None:
    """A checkpoint's format, tensors, and its record of applied signatures."""
    from rich.table import Table

    out = console()
    kind = info["format"] + (" folder" if info["folder"] else "")
    kind += ", sharded" if info["sharded"] else ""
    dtypes = ", ".join(f"{count} {dtype}" for dtype, count in info["dtypes"].items())
    tensors = f"{info['tensor_count']:,} ({dtypes or 'none'}), {info['parameters']:,} values"
    summary = Table.grid(padding=(0, 2))
    summary.add_column(style="bold")
    summary.add_column(overflow="fold")
    for key, value in [
        ("model", info["path"]),
        ("format", kind),
        ("layout", info["layout"]),
        ("tensors", tensors),
        ("applied", f"{len(info['applied'])} signature(s) recorded" if info["applied"] else "none"),
    ]:
        summary.add_row(plain(key), plain(clip(value)))
    out.print(summary)
    if not info["applied"]:
        return
    header = ["label", "file", "alpha", "stats", "sha256", "created"]
    rows = []
    for e in info["applied"]:
        digest, created = e.get("sha256"), e.get("created")
        rows.append(
            [
                e.get("label") or "-",
                e.get("file") or "-",
                _num(e.get("alpha")),
                e.get("stats") or "-",
                f"{digest[:12]}…" if isinstance(digest, str) else "-",
                created[:16].replace("T", " ") if isinstance(created, str) else "-",
            ]
        )
    print_table(out, "applied signatures, in order", header, rows, right=["alpha"])


def dumps(info: dict) -> str:
    """`info` as indented JSON with one line per tensor: readable, and fast for a header of
    65,536 tensors (json's indenting encoder is pure Python; the compact one is C)."""
    tensors = info["tensors"]
    text = json.dumps({**info, "tensors": None}, indent=2, sort_keys=True, ensure_ascii=False)
    # "tensors" sorts last among the top-level keys: its null is the last one in the text
    before, null, after = text.rpartition('"tensors": null')
    # one encoder, reused; describe_tensor's keys come sorted, and sorting each of 65,536
    # rows again would cost a sixth of the time
    encode = json.JSONEncoder(ensure_ascii=False).encode
    rows = ",\n    ".join(map(encode, tensors))
    return before + ('"tensors": [\n    ' + rows + "\n  ]" if tensors else '"tensors": []') + after


def render(info: dict) -> None:
    from rich.table import Table

    out = console()
    prov = info["provenance"]
    fp = info["fingerprint"]
    summary = Table.grid(padding=(0, 2))
    summary.add_column(style="bold")
    summary.add_column(overflow="fold")
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
        ("bits/parameter", _file_bits(info)),
    ]
    if isinstance(prov.get("naming"), dict):
        rows.append(("tensor names", describe_naming(prov["naming"])))
    for key in ("corruption", "severity", "dataset"):
        if key in prov:
            rows.append((key, str(prov[key])))
    for item in _dicts(prov.get("inputs")):
        digest = str(item.get("sha256", ""))[:12]
        size = item.get("size")
        size = human_bytes(size) if isinstance(size, int) else "?"
        hub = item.get("hub")
        where = f" at {str(hub.get('commit'))[:12]}" if isinstance(hub, dict) else ""
        rows.append(
            (
                f"input: {item.get('role')}",
                f"{item.get('name')}{where} ({size}, sha256 {digest}…)",
            )
        )
    for comp in _dicts(prov.get("components")):
        rows.append(("component", f"{comp.get('label')} x {comp.get('weight')}"))
    meta = prov.get("meta")
    for key, value in sorted(meta.items()) if isinstance(meta, dict) else []:
        rows.append((f"meta: {key}", str(value)))
    for key, value in rows:
        summary.add_row(plain(clip(key)), plain(clip(value)))
    out.print(summary)

    tensors = info["tensors"]
    stats = [(key, title) for key, title in _STATS if any(key in t["stats"] for t in tensors)]
    sparse = any(t["scheme"] == "sparse" for t in tensors)
    count = info["tensor_count"]
    header = ["name", "shape", "kind", "storage", *(["kept"] if sparse else [])]
    header += ["stored", "bits/param", *(t for _, t in stats)]
    rows = [
        [
            t["name"],
            "x".join(map(str, t["shape"])) or "scalar",
            t["kind"],
            storage(t),
            *([f"{t['nnz']:,}" if t["scheme"] == "sparse" else "all"] if sparse else []),
            human_bytes(t["stored_bytes"]),
            _num(t["bits_per_parameter"]),
            *(_num(t["stats"].get(key)) for key, _ in stats),
        ]
        for t in tensors
    ]
    title = f"{count:,} tensor" + ("" if count == 1 else "s")
    print_table(out, title, header, rows, right=header[4:])
    if len(tensors) < count:
        out.print(f"the first {len(tensors):,} of {count:,} tensors: --all lists every one")


_STATS = [("rel_norm", "rel. norm"), ("cos_base", "cos(v_c,v_base)"), ("quant_rel_error", "q. err")]


def storage(t: dict) -> str:
    """How a tensor (a `describe_tensor` record) is stored, in words: `f32`,
    `linear 8 sym, channel`, `int2 affine, group 64`, `sign, tensor`,
    `sparse 10% · sign, channel` (10%: the share of entries kept)."""
    scheme, bits, gran = t["values_scheme"], t["bits"], t["granularity"]
    if scheme == "float":
        values = f"f{bits}"
    else:
        if gran == "channel":
            axis = t.get("axis")
            gran = "channel" if axis in (0, None) else f"channel {axis}"
        elif gran == "group":
            gran = f"group {t.get('group_size')}"
        sym = "sym" if t["symmetric"] else "affine"
        words = {"sign": "sign", "int2": f"int2 {sym}", "linear": f"linear {bits} {sym}"}
        values = f"{words.get(scheme, f'{scheme} {bits}')}, {gran}"
    if t["scheme"] != "sparse":
        return values
    density = t["density"]
    kept = "-" if density is None else _percent(density)
    return f"sparse {kept} · {values}"


def clip(text: str) -> str:
    """`text` cut to MAX_CELL characters, saying how long it is (for a table cell)."""
    if len(text) <= MAX_CELL:
        return text
    return f"{text[:MAX_CELL]}… ({len(text):,} characters: --json shows them all)"


def _percent(share: float) -> str:
    """A share as a percentage of three significant digits: `10%`, `0.39%`, `33.3%`."""
    return f"{100 * share:.3g}%"


def _file_bits(info: dict) -> str:
    """Bits per parameter of the whole file, and how they split: the tensors' blobs, the
    preamble and header (with its share of the file), any signature block."""
    bits = info["bits_per_parameter"]
    if bits is None:
        return "- (no parameters)"
    per = 8 / info["parameters"]
    parts = [
        f"tensors {_num(info['data_bytes'] * per)}",
        f"header {_num(info['header_bytes'] * per)} "
        f"({_percent(info['header_bytes'] / info['file_bytes'])} of the file)",
    ]
    if info["signature_block_bytes"]:
        parts.append(f"signature block {_num(info['signature_block_bytes'] * per)}")
    return f"{bits:.4g}: " + ", ".join(parts)


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
    kept = _kept(prov.get("selection"))
    return (
        f"{method}"
        + (f", layers {layers}" if layers is not None else "")
        + (f": {kept}" if kept else "")
        + (f" ({', '.join(params)})" if params else "")
    )


def _kept(selection: object) -> str:
    """What the layer rule kept, as extract's summary says it (`in 5 of 6 blocks
    (encoder.layer.0-4 and ...)`); '' when the provenance does not say it in those types."""
    from .extract import describe_kept

    if not isinstance(selection, dict):
        return ""
    kept, count, total = (selection.get(k) for k in ("kept", "layer_count", "layer_total"))
    numbers = all(isinstance(n, int) and not isinstance(n, bool) for n in (count, total))
    names = isinstance(kept, list) and all(isinstance(k, str) for k in kept)
    if not (numbers and names and selection.get("unit") in ("block", "layer")):
        return ""
    return describe_kept(selection)


def _depth_order(selection: object) -> str:
    from rwsfmt.order import describe_order

    return describe_order(selection) if isinstance(selection, dict) else "-"


def describe_quant(q: object) -> str:
    """Quantization settings (a provenance `quantization` object) in words."""
    if not isinstance(q, dict):
        return "-"
    bits = q.get("bits")
    if bits == "auto":
        return f"auto: a scheme per tensor, to fit {_num(q.get('target_bpp'))} bits per parameter"
    gran = q.get("granularity", "?")
    if bits == 32:
        text = "exact float32"
    elif bits == 1:
        gran = f"group of {q.get('group_size')}" if gran == "group" else gran
        text = f"1-bit signs, a scale per {gran}"
    else:
        gran = f"groups of {q.get('group_size')}" if gran == "group" else gran
        kind = "symmetric" if q.get("symmetric", True) else "affine"
        text = f"{bits}-bit linear, {kind}, per {gran}"
    density = q.get("density")
    if isinstance(density, (int, float)) and not isinstance(density, bool) and density < 1:
        where = "output channel" if q.get("sparsity") == "channel" else "tensor"
        text += f"; the largest {_percent(density)} of each {where} kept"
    fit = q.get("fit")
    if fit in ("direction", "error"):
        text += "; scales keep the direction" if fit == "direction" else "; least-squares scales"
    return text
