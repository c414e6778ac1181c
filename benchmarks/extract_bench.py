"""Benchmark `rwsfmt extract --layers all` on three ~1 GB safetensors checkpoints.

Generates init, std = init + delta and robust = init + another delta (transformer-like
shapes, float32, fixed seed) in a temporary folder, then measures in fresh subprocesses:

  * Python starting and importing torch and safetensors (paid by every command below);
  * loading the three with `safetensors.torch.load_file` (lazy: memory-mapped, not yet read);
  * the same, then reading every tensor once (`.sum()`), so all 3 GB pass through memory;
  * `rwsfmt extract STD ROBUST INIT --layers all` (8-bit, the default).

Each is timed (wall clock, best of `--repeat`) with its peak RSS from `os.wait4`, printed side
by side with ratios. Goals: extract's peak RSS below 1 GiB, its time at most 2x the load.
The parent process stays small (no torch) because a child's peak RSS includes its parent's
at fork time.

    python benchmarks/extract_bench.py [--size-gb 1.0] [--repeat 2] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

HIDDEN, FFN, VOCAB = 1024, 4096, 32000
ROLES = ("init", "std", "robust")

LOAD_SCRIPT = """
import sys
from safetensors.torch import load_file
models = [load_file(p) for p in sys.argv[2:]]
if sys.argv[1] == "read":
    print(sum(float(t.sum()) for m in models for t in m.values()))
"""


def shapes(size_gb: float) -> dict[str, tuple[int, ...]]:
    """A transformer-like layout (embedding, attention, MLP, norms) of about `size_gb` float32."""
    out: dict[str, tuple[int, ...]] = {"embed_tokens.weight": (VOCAB, HIDDEN)}
    per_layer = 4 * HIDDEN * HIDDEN + 2 * HIDDEN * FFN + FFN + 5 * HIDDEN
    layers = max(1, round((size_gb * 1e9 / 4 - VOCAB * HIDDEN) / per_layer))
    for i in range(layers):
        p = f"layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out[p + f"attn.{name}.weight"] = (HIDDEN, HIDDEN)
        out[p + "mlp.up.weight"] = (FFN, HIDDEN)
        out[p + "mlp.up.bias"] = (FFN,)
        out[p + "mlp.down.weight"] = (HIDDEN, FFN)
        out[p + "mlp.down.bias"] = (HIDDEN,)
        for norm in ("norm1", "norm2"):
            out[p + f"{norm}.weight"] = (HIDDEN,)
            out[p + f"{norm}.bias"] = (HIDDEN,)
    out["norm.weight"] = (HIDDEN,)
    return out


def generate(folder: str, size_gb: float) -> dict[str, str]:
    """Write init/std/robust .safetensors files (run in a child process); returns role -> path."""
    import torch
    from safetensors.torch import save_file

    layout = shapes(size_gb)
    g = torch.Generator().manual_seed(0)
    init = {n: torch.randn(s, generator=g) * 0.02 for n, s in layout.items()}
    paths = {}
    for role in ROLES:
        if role == "init":
            tensors = init
        else:
            tensors = {n: t + 1e-3 * torch.randn(t.shape, generator=g) for n, t in init.items()}
        paths[role] = os.path.join(folder, f"{role}.safetensors")
        save_file(tensors, paths[role])
        del tensors
    return paths


def measure(cmd: list[str]) -> tuple[float, float]:
    """Run `cmd`; returns (wall seconds, peak RSS in MiB) of that process alone."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr.read().decode()}")
    proc.stderr.close()
    return wall, usage.ru_maxrss / 1024  # ru_maxrss is in KiB on Linux


def best(cmd: list[str], repeat: int) -> tuple[float, float]:
    runs = [measure(cmd) for _ in range(repeat)]
    return min(r[0] for r in runs), max(r[1] for r in runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gb", type=float, default=1.0, help="size of each checkpoint")
    parser.add_argument("--repeat", type=int, default=2, help="runs per measurement (best time)")
    parser.add_argument("--dir", default=None, help="where to write the temporary checkpoints")
    parser.add_argument("--generate-into", help=argparse.SUPPRESS)  # internal: the child's job
    args = parser.parse_args()
    if args.generate_into:
        generate(args.generate_into, args.size_gb)
        return

    need = 3.3 * args.size_gb * 1e9
    free = shutil.disk_usage(args.dir or tempfile.gettempdir()).free
    if free < need:
        raise SystemExit(f"needs {need / 1e9:.1f} GB free for the checkpoints, {free / 1e9:.1f} GB")
    with tempfile.TemporaryDirectory(prefix="rws-extract-bench-", dir=args.dir) as folder:
        t0 = time.perf_counter()
        subprocess.run(
            [sys.executable, __file__, "--size-gb", str(args.size_gb), "--generate-into", folder],
            check=True,
        )
        paths = {r: os.path.join(folder, f"{r}.safetensors") for r in ROLES}
        sizes = [os.path.getsize(paths[r]) for r in ROLES]
        n_tensors = len(shapes(args.size_gb))
        print(
            f"3 checkpoints of {sizes[0] / 2**30:.2f} GiB ({n_tensors} float32 tensors each), "
            f"generated in {time.perf_counter() - t0:.1f} s; CPUs: {os.cpu_count()}"
        )
        files = [paths["std"], paths["robust"], paths["init"]]
        for p in files:  # read once so that both measurements find the files in the page cache
            with open(p, "rb") as f:
                while f.read(64 << 20):
                    pass
        startup = best([sys.executable, "-c", "import torch, safetensors.torch"], args.repeat)
        load = best([sys.executable, "-c", LOAD_SCRIPT, "lazy", *files], args.repeat)
        read = best([sys.executable, "-c", LOAD_SCRIPT, "read", *files], args.repeat)
        out = os.path.join(folder, "sig.rws")
        cmd = [
            sys.executable,
            "-m",
            "rwsfmt",
            "extract",
            *files,
            "-o",
            out,
            "--layers",
            "all",
            "-q",
        ]
        extract = best(cmd, args.repeat)
        sig_size = os.path.getsize(out)

    print(f"signature: {sig_size / 2**20:,.1f} MiB (8-bit, all {n_tensors} tensors)\n")
    print(f"{'':34}{'wall s':>10}{'peak RSS MiB':>15}")
    print(f"{'python + import torch (startup)':34}{startup[0]:>10.2f}{startup[1]:>15,.0f}")
    print(f"{'load_file x3 (baseline)':34}{load[0]:>10.2f}{load[1]:>15,.0f}")
    print(f"{'load_file x3 + read every tensor':34}{read[0]:>10.2f}{read[1]:>15,.0f}")
    print(f"{'rwsfmt extract --layers all':34}{extract[0]:>10.2f}{extract[1]:>15,.0f}")
    for label, base in (("load", load), ("load + read", read)):
        print(
            f"{'ratio extract / ' + label:34}{extract[0] / base[0]:>9.2f}x"
            f"{extract[1] / base[1]:>14.2f}x"
        )
    work = extract[0] - startup[0]
    print(
        f"{'extract minus startup':34}{work:>10.2f}{'':>15}"
        f"  ({3 * sizes[0] / 2**30 / work:.2f} GiB of input per second)"
    )
    rss_ok = extract[1] < 1024
    time_ok = extract[0] <= 2 * load[0]
    print(
        f"\ngoals: peak RSS < 1 GiB: {'met' if rss_ok else 'MISSED'} ({extract[1]:,.0f} MiB); "
        f"time <= 2x load: {'met' if time_ok else 'MISSED'} ({extract[0] / load[0]:.2f}x)"
    )


if __name__ == "__main__":
    main()
