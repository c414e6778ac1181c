"""Hostile but valid `.rws` files: how long `inspect` takes on the largest header the format
allows, and how much memory reading a file can cost, side by side with the baselines.

    python benchmarks/hostile_bench.py [--out benchmarks/results/hostile_inputs.md]

1. `rwsfmt inspect` (tables, and `--json`) on files of 4,096 and 65,536 tensors (the format's
   maximum; 16 MiB of header), against `python -c pass`: the best of 5 wall times.
2. Valid files that cannot be worked on (issue 20): how long `convert` and `merge` of
   65,536 tensors take to refuse a result whose header would pass 16 MiB, and `inspect` on
   a 16 MiB header of one provenance string; and lying `torch.save` files (a storage record
   shorter or longer than its pickle declares, a view past its storage, overlapping
   records): the exit code and fix line of every command that reads models.
3. How much the peak resident memory grows during `rwsfmt verify` and during a full read
   (`rwsfmt.load`, every tensor decoded to float32), each in a fresh process, for real
   signatures and for decompression bombs just under and far over
   the decode limit (`rwsfmt.limits`). The ratio to the limit is the guarantee: a file may
   make a reader allocate about its decoded float32 size, never more than the limit.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import zstandard

import rwsfmt
from rwsfmt.container import TensorInfo, write_file
from rwsfmt.limits import decode_limit
from rwsfmt.quant import QuantConfig
from rwsfmt.signature import SignatureBuilder

REPEATS = 5
MiB = 1 << 20

READ_ALL = """
import sys, rwsfmt, torch

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))

mode, path = sys.argv[1], sys.argv[2]
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak (VmHWM) to the current RSS: imports and exec do not count
before = status("VmRSS:")
try:
    if mode == "verify":
        rwsfmt.verify(path)
    else:
        with rwsfmt.load(path) as sig:
            for name in sig.names:
                sig.tensor(name)
    outcome = "read"
except rwsfmt.RwsError:
    outcome = "refused"
print(outcome, status("VmHWM:") - before)
"""


def many_tensors(path: Path, count: int) -> None:
    """`count` one-element float32 tensors: the most entries a 16 MiB header holds."""
    payload = struct.pack("<f", 1e-3)
    digest = hashlib.sha256(payload).hexdigest()
    infos = [
        TensorInfo(
            name=f"t{i}",
            kind="delta",
            shape=(1,),
            dtype="float32",
            quant={"scheme": "float", "bits": 32},
            filter="none",
            codec="raw",
            offset=0,
            length=4,
            decoded_length=4,
            sha256=digest,
        )
        for i in range(count)
    ]
    write_file(path, {"label": "many", "provenance": {}}, infos, lambda _: payload)


def bomb(path: Path, values: int, bits: int = 8) -> None:
    """One tensor of `values` identical 8-bit codes (or exact float32 zeros, `bits` 32): a few
    KB that decode to 4 * values bytes of float32."""
    if bits == 8:
        quant = {"scheme": "linear", "bits": 8, "symmetric": True, "granularity": "tensor"}
        payload = struct.pack("<f", 1e-3) + bytes([128]) * values
    else:
        quant, payload = {"scheme": "float", "bits": 32}, bytes(4 * values)
    frame = zstandard.ZstdCompressor(write_checksum=True).compress(payload)
    info = TensorInfo(
        name="features.0.weight",
        kind="delta",
        shape=(values,),
        dtype="float32",
        quant=quant,
        filter="none",
        codec="zstd",
        offset=0,
        length=len(frame),
        decoded_length=len(payload),
        sha256=hashlib.sha256(frame).hexdigest(),
    )
    write_file(path, {"label": "bomb", "provenance": {}}, [info], lambda _: frame)


def real_signature(path: Path, bits: int, dead: float) -> None:
    """Eight 3x3 convolutions of 256 channels (4.7M parameters), a share of channels dead."""
    g = torch.Generator().manual_seed(0)
    builder = SignatureBuilder("real", QuantConfig(bits=bits))
    for i in range(8):
        delta = 0.01 * torch.randn(256, 256, 3, 3, generator=g)
        delta[: int(256 * dead)] = 0
        builder.add(f"features.{i}.weight", delta)
    rwsfmt.save(builder.build(), path)


def best_wall(args: list[str]) -> float:
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        subprocess.run(args, check=True, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return min(times)


def added_peak(mode: str, path: Path) -> tuple[str, int]:
    """(outcome, bytes the peak resident memory grew by) of a fresh process reading `path`
    in `mode` ('verify', or 'load' to decode every tensor), after its imports (Linux)."""
    out = subprocess.run(
        [sys.executable, "-c", READ_ALL, mode, str(path)],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    ).stdout.split()
    return out[0], int(out[1])


def one_string(path: Path, chars: int) -> None:
    """One small tensor and a provenance string of `chars` characters (a 16 MiB header)."""
    builder = SignatureBuilder("long", QuantConfig())
    builder.add("fc.weight", torch.ones(2, 2))
    rwsfmt.save(builder.build(provenance={"meta": {"note": "x" * chars}}), path)


def run_once(args: list[str]) -> tuple[float, int, str]:
    """(wall time, exit code, the last line of stderr) of one command."""
    start = time.perf_counter()
    done = subprocess.run(args, capture_output=True, text=True)
    last = (done.stderr.strip().splitlines() or [""])[-1].strip()
    return time.perf_counter() - start, done.returncode, last


def early_refusals(folder: Path, cli: list[str]) -> list[str]:
    """Valid files refused early or shown quickly, and lying PyTorch files refused."""
    many = folder / "many65536.rws"
    other = folder / "other.rws"
    other.write_bytes(many.read_bytes())
    long = folder / "long.rws"
    one_string(long, 16_000_000)
    out = folder / "out.rws"
    lines = [
        "",
        "## Valid files: refused before the work, or shown quickly (one run each)",
        "",
        "| command | wall | exit | last line |",
        "|---|---:|---:|---|",
    ]
    for label, args in [
        ("convert --bits 8, 65,536 tensors", ["convert", many, "--bits", "8"]),
        (
            "convert --bits auto, 65,536 tensors",
            ["convert", many, "--bits", "auto", "--target-bpp", 8],
        ),
        ("merge --mean of two, 65,536 tensors", ["merge", many, other, "--mean"]),
    ]:
        wall, code, last = run_once([*cli, *map(str, args), "-o", str(out)])
        lines.append(f"| {label} | {wall:.2f} s | {code} | {last[:90]} |")
        print(lines[-1], flush=True)
    for label, args in [("inspect", []), ("inspect --json", ["--json"])]:
        wall, code, _ = run_once([*cli, "inspect", *args, str(long)])
        lines.append(f"| {label}, 16 MB provenance string | {wall:.2f} s | {code} | |")
        print(lines[-1], flush=True)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from lying_pytorch import lying_files

    model = folder / "std.pt"
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))
    torch.save(net.state_dict(), model)
    sig = folder / "sig.rws"
    deltas = {k: 0.01 * torch.ones(v.shape) for k, v in net.state_dict().items() if "num" not in k}
    rwsfmt.save(rwsfmt.from_tensors(deltas, label="sig"), sig)
    lines += [
        "",
        "## Lying PyTorch files: exit code of each command (2 and a fix line: refused)",
        "",
        "| file | apply | extract | inspect | fix line every time |",
        "|---|---:|---:|---:|---|",
    ]
    for lie, path in lying_files(model, folder / "lies").items():
        commands = [
            ["apply", path, sig, "-a", "0.5", "-o", folder / "patched.pt"],
            ["extract", model, path, "--method", "subtract", "-o", folder / "x.rws"],
            ["inspect", path],
        ]
        results = [run_once([*cli, *map(str, c)]) for c in commands]
        fixed = all(last.startswith("fix:") for _, code, last in results if code)
        codes = " | ".join(str(code) for _, code, _ in results)
        lines.append(f"| {lie} | {codes} | {'yes' if fixed else 'NO'} |")
        print(lines[-1], flush=True)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="also write the report here")
    args = parser.parse_args()
    lines = ["# Hostile inputs: inspect on the largest headers, memory of reading", ""]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        rwsfmt_cli = [sys.executable, "-m", "rwsfmt"]
        base = best_wall([sys.executable, "-c", "pass"])
        lines += [
            f"## `rwsfmt inspect` (best of {REPEATS} wall times)",
            "",
            f"`python -c pass`: {base:.3f} s.",
            "",
            "| tensors | header | inspect | more than `python -c pass` | inspect --json | more |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        for count in (4_096, 65_536):
            path = folder / f"many{count}.rws"
            many_tensors(path, count)
            header = rwsfmt.container.RwsReader(path).header.data_offset
            table = best_wall([*rwsfmt_cli, "inspect", str(path)])
            as_json = best_wall([*rwsfmt_cli, "inspect", "--json", str(path)])
            lines.append(
                f"| {count:,} | {header / MiB:.1f} MiB | {table:.3f} s | {table - base:.3f} s "
                f"| {as_json:.3f} s | {as_json - base:.3f} s |"
            )
            print(lines[-1], flush=True)

        lines += early_refusals(folder, rwsfmt_cli)
        lines += [
            "",
            "## Peak memory of reading one file (fresh process each)",
            "",
            "How much the peak resident memory grows while reading (after the imports).",
            "",
            "| file | size | float32 size | limit | verify | full read | full read / limit |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        cases = [
            ("real, 8-bit", lambda p: real_signature(p, 8, 0.0)),
            ("real, 4-bit, 90% dead channels", lambda p: real_signature(p, 4, 0.9)),
            ("bomb just under the limit", lambda p: bomb(p, (256 * MiB) // 4 - 64)),
            ("float32 bomb just under the limit", lambda p: bomb(p, (256 * MiB) // 4 - 64, 32)),
            ("bomb of 1 GiB", lambda p: bomb(p, 1 << 28)),
            ("bomb of 8 GiB", lambda p: bomb(p, 1 << 31)),
        ]
        for label, make in cases:
            path = folder / "case.rws"
            make(path)
            size = os.path.getsize(path)
            with rwsfmt.load(path, max_decoded_bytes=float("inf")) as sig:
                float32 = 4 * sum(info.numel for info in sig.infos)
            limit = decode_limit(size)
            extra = {mode: added_peak(mode, path) for mode in ("verify", "load")}
            cells = [f"{outcome}, {peak / MiB:,.0f} MiB" for outcome, peak in extra.values()]
            lines.append(
                f"| {label} | {size / 1e3:,.1f} KB | {float32 / MiB:,.0f} MiB "
                f"| {limit / MiB:,.0f} MiB | {cells[0]} | {cells[1]} "
                f"| {extra['load'][1] / limit:.2f} |"
            )
            print(lines[-1], flush=True)
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        args.out.write_text(report)


if __name__ == "__main__":
    main()
