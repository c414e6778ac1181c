"""Size, fidelity and speed of `.rws` against safetensors, side by side, in one run.

    python benchmarks/format_bench.py [--mb 120] [--inspect-gb 1.0] [--keep DIR]

Writes signature-like float32 tensors (conv and linear shapes, Gaussian, fixed seed) as
safetensors float32 / float16 and as `.rws` at 16, 8 and 4 bits; prints bytes, ratios to
float32 safetensors, write and read times (read = every tensor as a float32 torch tensor),
relative reconstruction error, and the wall time of `rwsfmt inspect` on a ~1 GB `.rws` file
against `python -c pass`. Temporary files are removed at the end.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import rwsfmt
from rwsfmt.container import write_file
from rwsfmt.quant import QuantConfig

REPEATS = 5


def make_tensors(megabytes: float) -> dict[str, torch.Tensor]:
    """Conv and linear weights with biases, ~`megabytes` of float32, scaled like deltas."""
    g = torch.Generator().manual_seed(0)
    shapes = [(256, 128, 3, 3), (512, 256, 3, 3), (512, 512, 3, 3), (1024, 1024), (4096, 1024)]
    out, total, i = {}, 0, 0
    while total < megabytes * 1e6:
        shape = shapes[i % len(shapes)]
        out[f"layers.{i}.weight"] = 1e-3 * torch.randn(*shape, generator=g)
        out[f"layers.{i}.bias"] = 1e-4 * torch.randn(shape[0], generator=g)
        total += 4 * (out[f"layers.{i}.weight"].numel() + shape[0])
        i += 1
    return out


def best_time(fn) -> float:
    """Best (minimum) wall time of `fn()` over REPEATS runs, in seconds: on a shared machine
    the minimum is the cost of the work itself, the median mostly measures the neighbours."""
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def rel_error(tensors: dict, decoded: dict) -> float:
    num = sum(float((decoded[k].double() - v.double()).pow(2).sum()) for k, v in tensors.items())
    den = sum(float(v.double().pow(2).sum()) for v in tensors.values())
    return (num / den) ** 0.5


def read_rws(path: Path) -> dict[str, torch.Tensor]:
    with rwsfmt.load(path) as sig:
        return {name: sig.tensor(name) for name in sig.names}


def touched(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Read every byte of every tensor (a lazy mmap load pays its I/O here)."""
    for t in tensors.values():
        t.sum()
    return tensors


def bench_formats(tensors: dict, folder: Path) -> list[dict]:
    """One row per format: file, write time, read time (as returned, and with every tensor
    summed so lazily mapped data is really read), decoded tensors."""
    rows = []
    readers = {}
    for label, dtype in [("safetensors f32", torch.float32), ("safetensors f16", torch.float16)]:
        path = folder / f"{dtype}.safetensors"
        cast = {k: v.to(dtype).contiguous() for k, v in tensors.items()}
        write = best_time(lambda path=path, cast=cast: save_file(cast, path))
        readers[label] = (path, write, lambda p: {k: v.float() for k, v in load_file(p).items()})
        if dtype == torch.float32:
            pread = (path, write, lambda p: load_file(p, backend="pread"))
            readers["st f32 pread"] = pread
    for bits in (16, 8, 4):
        path = folder / f"q{bits}.rws"
        config = QuantConfig(bits=bits)

        def write(path=path, config=config):
            rwsfmt.save(rwsfmt.from_tensors(tensors, label="bench", quant=config), path)

        readers[f"rws {bits}-bit"] = (path, best_time(write), read_rws)
    for label, (path, write, read) in readers.items():
        rows.append(
            dict(
                label=label,
                path=path,
                write=write,
                read=best_time(lambda path=path, read=read: read(path)),
                touched=best_time(lambda path=path, read=read: touched(read(path))),
                dec=read(path),
            )
        )
    return rows


def make_big_rws(path: Path, gigabytes: float) -> int:
    """A valid ~`gigabytes` 8-bit `.rws` file: one real encoded 4096x4096 tensor whose blob
    is stored under many names (each entry is complete and checksummed)."""
    g = torch.Generator().manual_seed(1)
    sig = rwsfmt.from_tensors({"t": torch.randn(4096, 4096, generator=g)}, label="big")
    info, blob = sig.info("t"), bytes(sig.stored("t"))
    count = max(1, int(gigabytes * 1e9 // len(blob)))
    infos = [replace(info, name=f"block.{i}.weight") for i in range(count)]
    write_file(path, sig.meta, infos, lambda _info: blob)
    return count


def wall(cmd: list[str]) -> float:
    times = []
    for _ in range(max(REPEATS, 7)):
        start = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=120, help="float32 megabytes of tensors")
    parser.add_argument("--inspect-gb", type=float, default=1.0, help="size of the inspect file")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(min(torch.get_num_threads(), os.cpu_count() or 1))
    folder = Path(tempfile.mkdtemp(prefix="rws-bench-", dir=os.environ.get("BENCH_DIR")))
    try:
        tensors = make_tensors(args.mb)
        n = sum(v.numel() for v in tensors.values())
        print(f"{len(tensors)} tensors, {n:,} parameters, {4 * n / 1e6:.1f} MB as float32")
        print(
            f"torch {torch.__version__}, {torch.get_num_threads()} threads, best of {REPEATS}; "
            "files are read warm from the page cache"
        )
        rows = bench_formats(tensors, folder)
        base = rows[0]
        base_size = base["path"].stat().st_size
        head = f"{'format':<16}{'bytes':>13}{'x f32 st':>9}{'write s':>9}{'read s':>8}"
        print(head + f"{'read+sum s':>11}{'speed vs f32':>13}{'rel. error':>11}")
        for r in rows:
            size = r["path"].stat().st_size
            print(
                f"{r['label']:<16}{size:>13,}{size / base_size:>9.3f}{r['write']:>9.3f}"
                f"{r['read']:>8.3f}{r['touched']:>11.3f}{base['touched'] / r['touched']:>12.2f}x"
                f"{rel_error(tensors, r['dec']):>11.2e}"
            )
        rws8 = next(r for r in rows if r["label"] == "rws 8-bit")
        pread = next(r for r in rows if r["label"] == "st f32 pread")
        print(
            "read speed of rws 8-bit relative to safetensors f32 load_file (goal >= 0.5x): "
            f"{base['touched'] / rws8['touched']:.2f}x with every tensor summed (mmap), "
            f"{pread['touched'] / rws8['touched']:.2f}x against backend='pread', "
            f"{base['read'] / rws8['read']:.2f}x against the lazy mmap load alone"
        )
        for r in rows:
            r.pop("dec")
        del tensors

        big = folder / "big.rws"
        count = make_big_rws(big, args.inspect_gb)
        script = Path(sys.executable).with_name("rwsfmt")
        cmd = [str(script)] if script.exists() else [sys.executable, "-m", "rwsfmt"]
        inspect = wall([*cmd, "inspect", str(big)])
        inspect_json = wall([*cmd, "inspect", "--json", str(big)])
        bare = wall([sys.executable, "-c", "pass"])
        print(
            f"inspect on {big.stat().st_size / 1e9:.2f} GB ({count} tensors): "
            f"{inspect:.3f} s, --json {inspect_json:.3f} s; python -c pass {bare:.3f} s; "
            f"difference {inspect - bare:.3f} s (goal <= 0.3 s)"
        )
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
