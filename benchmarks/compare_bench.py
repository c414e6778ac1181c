"""`rwsfmt compare` on the paper's scale: 19 signatures of VGG-16's five shallowest convs.

    python benchmarks/compare_bench.py [--out benchmarks/results/compare_bench.md]

Builds 19 seeded synthetic 8-bit signatures of a CIFAR VGG-16's shallow set (features.0,
2, 5, 7 and 10, weight and bias: 555,328 parameters each, see apply_bench.py), one per
ImageNet-C corruption, and times the command line (best and median wall time of 5 runs, a
fresh process each) beside `python -c pass`. Goal: under a second on 2 cores.

The signatures are synthetic: a direction common to all, one per corruption family
(noise, blur, weather, digital) and one of their own, with the common share growing with
depth, so that the figure shows the structure the paper reports (families alike, shallow
layers more diverse and larger). Their timing does not depend on that structure.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from apply_bench import SHALLOW, VGG, synthetic_delta

import rwsfmt
from rwsfmt.signature import SignatureBuilder

REPEATS = 5
FAMILIES = {
    "noise": ["gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise"],
    "blur": ["defocus_blur", "glass_blur", "motion_blur", "zoom_blur", "gaussian_blur"],
    "weather": ["snow", "frost", "fog", "brightness", "spatter"],
    "digital": ["contrast", "elastic_transform", "pixelate", "jpeg_compression", "saturate"],
}
RESULTS = Path(__file__).resolve().parent / "results"


def build(folder: Path) -> list[Path]:
    """Write the 19 signatures (8-bit, per channel) with the statistics extract records."""
    torch.manual_seed(0)
    weights = VGG().state_dict()
    g = torch.Generator().manual_seed(1)
    unit = lambda shape: synthetic_delta(shape, g, rel=1.0)  # noqa: E731
    common = {n: unit(weights[n].shape) for n in SHALLOW}
    family = {f: {n: unit(weights[n].shape) for n in SHALLOW} for f in FAMILIES}
    paths = []
    for fam, corruptions in FAMILIES.items():
        for corruption in corruptions:
            builder = SignatureBuilder(corruption)
            for depth, name in enumerate(SHALLOW):
                share = 0.15 + 0.12 * (depth // 2)  # the common direction grows with depth
                own = unit(weights[name].shape)
                delta = share * common[name] + 0.45 * family[fam][name] + 0.5 * own
                std = weights[name]
                size = 0.08 / (1 + depth // 2) * (0.6 + 0.8 * torch.rand(1, generator=g))
                delta *= size * std.norm() / delta.norm()
                rel = float(delta.norm() / std.norm())
                builder.add(name, delta, stats={"rel_norm": rel, "norm": float(delta.norm())})
            provenance = {"method": "project", "layers": 5, "corruption": corruption}
            path = folder / f"{corruption}.rws"
            rwsfmt.save(builder.build(provenance), path)
            paths.append(path)
    return paths


def wall(args: list[str]) -> tuple[float, float]:
    """Best and median wall time of `args`, a fresh process each run, after one warm-up."""
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL)
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        subprocess.run(args, check=True, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return min(times), statistics.median(times)


def in_process(paths: list[Path]) -> float:
    """Best time of the library call alone (no interpreter start-up, no imports)."""
    best = float("inf")
    for _ in range(REPEATS):
        start = time.perf_counter()
        rwsfmt.compare(paths)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="also write the report here")
    args = parser.parse_args()
    figure = RESULTS / "compare_vgg16_synthetic.png"
    with tempfile.TemporaryDirectory() as tmp:
        paths = build(Path(tmp))
        files = [str(p) for p in paths]
        size = sum(os.path.getsize(p) for p in paths)
        cli = [sys.executable, "-m", "rwsfmt", "compare", *files]
        rows = [
            ("`python -c pass`", [sys.executable, "-c", "pass"]),
            ("`rwsfmt compare` (19 files, tables)", cli),
            ("`rwsfmt compare --json`", [*cli, "--json"]),
            ("`rwsfmt compare --layer features.0`", [*cli, "--layer", "features.0"]),
            ("`rwsfmt compare --plot FILE.png`", [*cli, "--plot", str(Path(tmp) / "f.png")]),
        ]
        timings = [(label, *wall(command)) for label, command in rows]
        library = in_process(paths)
        env = {**os.environ, "COLUMNS": "80"}
        shown = subprocess.run(cli, check=True, capture_output=True, text=True, env=env).stdout
        subprocess.run([*cli, "--plot", str(figure)], check=True, stdout=subprocess.DEVNULL)
    base = timings[0][1]
    lines = [
        "# `rwsfmt compare` on 19 VGG-16 shallow signatures",
        "",
        f"19 synthetic 8-bit signatures of a CIFAR VGG-16's five shallowest convs (555,328 "
        f"parameters each, {size / 2**20:.1f} MiB of files); {os.cpu_count()} cores, Python "
        f"{sys.version.split()[0]}. Wall time of a fresh process, best and median of {REPEATS} "
        "(goal: under a second).",
        "",
        "| command | best | median | more than `python -c pass` |",
        "|---|---:|---:|---:|",
        *(
            f"| {label} | {best:.3f} s | {median:.3f} s | {best - base:.3f} s |"
            for label, best, median in timings
        ),
        "",
        f"Goal (the tables under a second): {'met' if timings[1][1] < 1 else 'MISSED'}, "
        f"{timings[1][1]:.3f} s.",
        "",
        f"The comparison alone, in process (`rwsfmt.compare`, best of {REPEATS}): "
        f"{library:.3f} s; the rest is starting Python and importing numpy, click and rich.",
        "",
        "The tables, at 80 columns:",
        "",
        "```",
        shown.rstrip(),
        "```",
        "",
        f"The figure (`--plot`): [{figure.name}]({figure.name})",
        "",
    ]
    report = "\n".join(lines)
    print(report)
    if args.out:
        args.out.write_text(report)


if __name__ == "__main__":
    main()
