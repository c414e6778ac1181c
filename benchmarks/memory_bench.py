"""The memory each command adds on the worst-case file of every scheme and granularity.

    python benchmarks/memory_bench.py [--limit 256MiB] [--out benchmarks/results/memory.md]

A worst-case file is one tensor whose float32 size is exactly the decode limit (so it is
accepted) and whose payload takes the most bytes per element its scheme allows: group size 1,
affine zero points, every element kept by a sparse bitmap; a repeated byte makes it a few KB.
Each command runs in a fresh process (the CLI in-process, after every import), and the table
reports how much its peak resident memory grew, against the README's bound (`BOUND` x the
limit). `verify`, `export`, `convert` and `load().tensor()` read one file; `merge` and
`compare` read the file twice (two inputs: the bound is twice as large); `apply` patches a
safetensors model holding the tensor, whose own size (read, patched, written) is counted too.
The tests (`tests/test_memory_bound.py`) run the same cases under a smaller limit.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import struct
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

MiB = 1 << 20
BOUND = 1.5  # the README's promise: added memory <= BOUND x the decode limit per input file

# (label, quant, filter): the densest payload of each scheme and granularity
_AFFINE = {"symmetric": False}
CASES: list[tuple[str, dict[str, Any], str]] = [
    ("float", {"scheme": "float", "bits": 32}, "none"),
    ("float byteplane", {"scheme": "float", "bits": 32}, "byteplane"),
    *[
        (f"linear {bits} affine {gran}", {"scheme": "linear", "bits": bits, **_AFFINE, **g}, f)
        for bits, f in ((4, "none"), (8, "none"), (16, "byteplane"))
        for gran, g in (
            ("tensor", {"granularity": "tensor"}),
            ("channel", {"granularity": "channel", "axis": 0}),
            ("group 1", {"granularity": "group", "group_size": 1}),
        )
    ],
    (
        "int2 affine group 1",
        {"scheme": "int2", "bits": 2, **_AFFINE, "granularity": "group", "group_size": 1},
        "none",
    ),
    (
        "sign group 1",
        {"scheme": "sign", "bits": 1, "granularity": "group", "group_size": 1},
        "none",
    ),
    (
        "sparse, float values",
        {
            "scheme": "sparse",
            "bits": 32,
            "index": "bitmap",
            "values": {"scheme": "float", "bits": 32},
        },
        "none",
    ),
    (
        "sparse, linear 8 affine channel",
        {
            "scheme": "sparse",
            "bits": 8,
            "index": "bitmap",
            "values": {
                "scheme": "linear",
                "bits": 8,
                **_AFFINE,
                "granularity": "channel",
                "axis": 0,
            },
        },
        "none",
    ),
    (
        "sparse, linear 8 affine group 1",
        {
            "scheme": "sparse",
            "bits": 8,
            "index": "bitmap",
            "values": {
                "scheme": "linear",
                "bits": 8,
                **_AFFINE,
                "granularity": "group",
                "group_size": 1,
            },
        },
        "none",
    ),
]
# what `convert` writes (`--encodings`): the schemes encoded by chunks and the others
ENCODINGS: dict[str, list[str]] = {
    "bits 4": ["--bits", "4"],
    "bits 1": ["--bits", "1"],
    "bits 2": ["--bits", "2"],
    "bits 1 tensor": ["--bits", "1", "--granularity", "tensor"],
    "bits 2 tensor": ["--bits", "2", "--granularity", "tensor"],
    "bits 2 fit direction": ["--bits", "2", "--fit", "direction"],
    "bits 1 density 0.1": ["--bits", "1", "--density", "0.1"],
}
UNBOUNDED = {"bits 1 density 0.1"}  # sparse storage is still encoded whole
# the input file of `--encodings`, as a matrix (vectors are never stored below 8 bits)
ENCODED = "linear 8 affine group 1"
ENCODED_COLUMNS = 1024
COMMANDS = ("verify", "tensor", "export", "convert", "merge", "compare", "apply")
READING = ("verify", "tensor")  # run on every case; the other commands on DENSEST (or --all)
DENSEST = {
    "float byteplane",
    "linear 8 affine group 1",
    "linear 16 affine group 1",
    "sparse, linear 8 affine channel",
    "sign group 1",
}


def worst_case(
    path: Path, quant: dict[str, Any], filt: str, numel: int, columns: int | None = None
) -> None:
    """One valid tensor `t` of shape (numel,) (or (numel / columns, columns)) stored per
    `quant`, every scale 1e-3, every zero point 0, every code 1 (or float32 1e-3), every
    sparse position kept."""
    import zstandard

    from rwsfmt.container import TensorInfo, write_file
    from rwsfmt.format.schemes import scheme_of

    if quant["scheme"] == "sparse":
        quant = {**quant, "nnz": numel}
    shape = (numel,) if columns is None else (numel // columns, columns)
    scheme = scheme_of(quant)
    payload = bytearray(scheme.payload_length(quant, shape, numel))
    values = quant.get("values", quant)
    start = (numel + 7) // 8 if quant["scheme"] == "sparse" else 0
    payload[:start] = b"\xff" * start
    if values["scheme"] == "float":
        payload[start:] = struct.pack("<f", 1e-3) * numel if filt == "none" else _planes(numel)
    else:
        groups = scheme.scale_groups(quant, shape, numel)
        payload[start : start + 4 * groups] = struct.pack("<f", 1e-3) * groups
        offset = scheme.values_offset(quant, shape, numel)
        payload[offset:] = b"\x01" * (len(payload) - offset)  # zero points of 0 are 0 bytes
    frame = zstandard.ZstdCompressor(write_checksum=True, write_content_size=True).compress(
        bytes(payload)
    )
    del payload
    info = TensorInfo(
        name="t",
        kind="delta",
        shape=shape,
        dtype="float32",
        quant=quant,
        filter=filt,
        codec="zstd",
        offset=0,
        length=len(frame),
        decoded_length=scheme.payload_length(quant, shape, numel),
        sha256=hashlib.sha256(frame).hexdigest(),
    )
    write_file(path, {"label": "worst", "provenance": {}}, [info], lambda _: frame)


def _planes(numel: int) -> bytes:
    return b"".join(bytes([b]) * numel for b in struct.pack("<f", 1e-3))


CHILD = r"""
import contextlib, io, json, sys
import numpy, torch, safetensors.torch, zstandard
import rwsfmt, rwsfmt.patching, rwsfmt.conversion, rwsfmt.interchange, rwsfmt.comparison
import rwsfmt.merging, rwsfmt.dequant, rwsfmt.format.chunked
from rwsfmt_cli.main import main

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))

for command, args in json.loads(sys.argv[1]):
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current RSS: imports do not count
    before = status("VmRSS:")
    code = 0
    if command == "tensor":
        with rwsfmt.load(args[0]) as sig:
            for name in sig.names:
                sig.tensor(name)
    else:
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                main([command, *args] if command in ("verify", "compare") else
                     [command, "--quiet", *args])
        except SystemExit as exc:
            code = exc.code
    print(code, status("VmHWM:") - before, flush=True)
"""


def arguments(command: str, path: Path, folder: Path) -> list[str]:
    """The command line that runs `command` on `path` (outputs under `folder`)."""
    out = folder / "out"
    return {
        "verify": [str(path)],
        "tensor": [str(path)],
        "export": [str(path), "-o", f"{out}.safetensors"],
        "convert": [str(path), "-o", f"{out}.rws", "--bits", "4"],
        "merge": [str(path), str(path), "-o", f"{out}.rws"],
        "compare": [str(path), str(path)],
        "apply": [
            str(folder / "model.safetensors"),
            str(path),
            "-a",
            "1",
            "-o",
            f"{out}.safetensors",
        ],
    }[command]


def added_peaks(jobs: list[tuple[str, list[str]]], limit: int) -> list[tuple[int, int]]:
    """(exit code, bytes the peak resident memory grew by) of each `(command, args)` of
    `jobs`, run one after the other in one fresh process (Linux: `/proc/self/clear_refs`
    resets the peak before each), with the decode limit set to `limit` bytes."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RWSFMT_MAX_DECODED": str(limit)}
    done = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(jobs)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    lines = done.stdout.split("\n")[: len(jobs)]
    if done.returncode != 0 or len(lines) < len(jobs):
        raise RuntimeError(f"{jobs} failed:\n{done.stderr[-2000:]}")
    return [(int(code), int(peak)) for code, peak in (line.split() for line in lines)]


def bound(command: str, limit: int) -> float:
    """What the README promises `command` adds, in bytes: `BOUND` x the limit per input file;
    merge also holds the merged tensor (float32, up to the limit); apply holds the model's
    tensor as read and as written (twice the limit here)."""
    inputs = 2 if command in ("merge", "compare") else 1
    extra = {"merge": limit, "apply": 2 * limit}.get(command, 0)
    return BOUND * limit * inputs + extra


def measure(
    limit: int,
    every: bool = False,
    report: Callable[[str, str, int, int], None] | None = None,
) -> dict[tuple[str, str], tuple[int, int]]:
    """(case label, command) -> (exit code, added peak bytes): `READING` on every case, the
    other commands on `DENSEST` (on every case with `every`), each in a fresh process."""
    import torch
    from safetensors.torch import save_file

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        numel = limit // 4
        save_file({"t": torch.zeros(numel)}, str(folder / "model.safetensors"))
        for label, quant, filt in CASES:
            path = folder / "worst.rws"
            worst_case(path, quant, filt, numel)
            commands = COMMANDS if every or label in DENSEST else READING
            for command in commands:
                job = (command, arguments(command, path, folder))
                results[label, command] = added_peaks([job], limit)[0]
                if report:
                    report(label, command, *results[label, command])
    return results


def measure_encodings(
    limit: int, report: Callable[[str, str, int, int], None] | None = None
) -> dict[tuple[str, str], tuple[int, int]]:
    """(encoding label, command) -> (exit code, added peak bytes) of `convert` and `merge`
    (of the file with itself) writing each of `ENCODINGS` from the `ENCODED` worst-case
    file, as a matrix, each in a fresh process."""
    quant, filt = next((q, f) for label, q, f in CASES if label == ENCODED)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        path, out = Path(tmp) / "worst.rws", str(Path(tmp) / "out.rws")
        worst_case(path, quant, filt, limit // 4, ENCODED_COLUMNS)
        for label in ENCODINGS:
            for command in ("convert", "merge"):
                job = encoding_job(command, label, path, out)
                results[label, command] = added_peaks([job], limit)[0]
                if report:
                    report(f"{ENCODED}, {label}", command, *results[label, command])
    return results


def encoding_job(command: str, label: str, path: Path, out: str) -> tuple[str, list[str]]:
    """The `(command, args)` of `convert` or `merge` (of `path` with itself) writing `out`
    as `ENCODINGS[label]` says."""
    args = ENCODINGS[label]
    if command == "merge":  # merge's --density is its method's
        args = [{"--density": "--store-density"}.get(a, a) for a in args]
    inputs = [str(path)] * (2 if command == "merge" else 1)
    return command, [*inputs, "-o", out, *args]


def encodings_table(results: dict[tuple[str, str], tuple[int, int]], limit: int) -> str:
    """`measure_encodings`' results as a markdown table: MiB (ratio to the bound)."""
    lines = ["| written as | convert | merge |", "|---|---:|---:|"]
    for label in ENCODINGS:
        cells = [
            f"{results[label, c][1] / MiB:,.0f} ({results[label, c][1] / bound(c, limit):.2f})"
            for c in ("convert", "merge")
        ]
        lines.append(f"| {' '.join(ENCODINGS[label])} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    from rwsfmt.limits import parse_size

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", default="256MiB", help="decode limit (the float32 size)")
    parser.add_argument("--out", type=Path, default=None, help="also write the report here")
    parser.add_argument("--all", action="store_true", help="every command on every case")
    parser.add_argument(
        "--encodings", action="store_true", help="only convert and merge writing each of ENCODINGS"
    )
    args = parser.parse_args()
    limit = int(parse_size(args.limit))
    progress = lambda label, command, code, peak: print(  # noqa: E731
        f"{label:34} {command:8} exit {code} {peak / MiB:8.0f} MiB "
        f"{peak / bound(command.split()[0], limit):.2f} of the bound",
        flush=True,
    )
    if args.encodings:
        print(encodings_table(measure_encodings(limit, report=progress), limit))
        return
    results = measure(limit, args.all, report=progress)
    lines = [
        f"# Memory added per command, worst-case files of {limit / MiB:,.0f} MiB of float32",
        "",
        f"Peak resident memory added (MiB) and its ratio to the bound ({BOUND} x the limit per "
        "input file; merge: plus the merged tensor; apply: plus the model tensor, read and "
        "written).",
        "",
        "| file | " + " | ".join(COMMANDS) + " |",
        "|---|" + "---:|" * len(COMMANDS),
    ]
    for label, _, _ in CASES:
        cells = [
            f"{results[label, c][1] / MiB:,.0f} ({results[label, c][1] / bound(c, limit):.2f})"
            if (label, c) in results
            else "-"
            for c in COMMANDS
        ]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
