"""Applying signatures, side by side with the alternatives, on a VGG-16 built in code.

    python benchmarks/apply_bench.py [--work DIR] [--big-mb 1024]

(a) Switching robustness on a live model: `patch` + `remove` of an 8-bit signature on the
    five shallowest convs, against loading a full robust VGG-16 from safetensors and
    `load_state_dict` (the "store every robust model" alternative). Goal: >= 20x faster.
(b) Storage of one VGG-16 (float32 safetensors) plus 19 five-layer signatures at 8 and
    4 bits, as a ratio to the model alone. Goals: <= 1.2x and <= 1.1x.
(c) `apply` to a file: throughput for a ~1 GB safetensors model and an 8-bit signature
    covering all of it, against copying the file. Goal: at least half the copy's speed.

Signature deltas for (a) and (b) are synthetic: Gaussian with a log-normal scale per
output channel (trained VGG-16 signatures are out of reach of a 2-core CPU box).
Everything is written under a temporary folder that is removed at the end.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable

import torch
from safetensors.torch import load_file, save_file
from torch import nn

import rwsfmt
from rwsfmt.quant import QuantConfig

VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
SHALLOW = [f"features.{i}.{p}" for i in (0, 2, 5, 7, 10) for p in ("weight", "bias")]


class VGG(nn.Module):
    """CIFAR-style VGG (configuration D = VGG-16): 3x3 convs, ReLU, max-pool, 512->10 head."""

    def __init__(self, config: list = VGG16, classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for v in config:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(channels, v, 3, padding=1), nn.ReLU(inplace=True)]
                channels = v
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(512, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


def synthetic_delta(shape: torch.Size, g: torch.Generator, rel: float = 0.05) -> torch.Tensor:
    """Gaussian noise whose scale varies per output channel (log-normal, sigma 0.5)."""
    scale = torch.exp(0.5 * torch.randn(shape[0], generator=g))
    view = [shape[0]] + [1] * (len(shape) - 1)
    return rel * scale.view(view) * torch.randn(shape, generator=g)


def best_of(fn: Callable[[], object], repeat: int) -> tuple[float, float]:
    """(median, best) wall time in seconds over `repeat` runs after one warm-up."""
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), min(times)


def shallow_signature(model: nn.Module, seed: int, bits: int, label: str) -> rwsfmt.Signature:
    g = torch.Generator().manual_seed(seed)
    sd = model.state_dict()
    deltas = {n: synthetic_delta(sd[n].shape, g) * sd[n].std() for n in SHALLOW}
    return rwsfmt.from_tensors(deltas, label=label, quant=QuantConfig(bits=bits))


def bench_switch(work: str) -> None:
    torch.manual_seed(0)
    model = VGG().eval()
    sd = model.state_dict()
    total = sum(t.numel() for t in sd.values())
    shallow = sum(sd[n].numel() for n in SHALLOW)
    print(f"VGG-16 (CIFAR, config D): {total:,} parameters; shallow five convs {shallow:,}")
    assert shallow == 555_328, shallow

    robust_path = os.path.join(work, "vgg16-robust.safetensors")
    robust = {k: v + 0.01 * torch.randn_like(v) for k, v in sd.items()}
    save_file(robust, robust_path)
    sig_path = os.path.join(work, "fog.rws")
    rwsfmt.save(shallow_signature(model, 1, 8, "fog"), sig_path)
    sig = rwsfmt.load(sig_path)

    def full_model() -> None:
        model.load_state_dict(load_file(robust_path))

    def patch_remove() -> None:
        rwsfmt.patch(model, sig, 0.8).remove()

    def open_patch_remove() -> None:
        with rwsfmt.load(sig_path) as s:
            rwsfmt.patch(model, s, 0.8).remove()

    full, full_best = best_of(full_model, 20)
    pr, pr_best = best_of(patch_remove, 50)
    opr, opr_best = best_of(open_patch_remove, 50)
    print("\n(a) switching robustness on a live VGG-16 (median of runs, best in brackets)")
    print(
        f"  load robust safetensors + load_state_dict : {full * 1e3:8.2f} ms ({full_best * 1e3:.2f})"
    )
    print(f"  patch + remove, signature already open    : {pr * 1e3:8.2f} ms ({pr_best * 1e3:.2f})")
    print(
        f"  open .rws + patch + remove                : {opr * 1e3:8.2f} ms ({opr_best * 1e3:.2f})"
    )
    print(f"  speed-up: {full / pr:.1f}x (open signature), {full / opr:.1f}x (including open)")
    print(f"  goal >= 20x: {'met' if full / opr >= 20 else 'MISSED'}")


def bench_storage(work: str) -> None:
    torch.manual_seed(0)
    model = VGG()
    model_path = os.path.join(work, "vgg16.safetensors")
    save_file(model.state_dict(), model_path)
    model_bytes = os.path.getsize(model_path)
    print("\n(b) storage: one VGG-16 (float32 safetensors) + 19 five-layer signatures")
    print(f"  model alone: {model_bytes / 1e6:.2f} MB")
    for bits, goal in ((8, 1.2), (4, 1.1)):
        sizes = []
        for i in range(19):
            path = os.path.join(work, f"c{i}-{bits}.rws")
            rwsfmt.save(shallow_signature(model, 100 + i, bits, f"c{i}"), path)
            sizes.append(os.path.getsize(path))
            os.unlink(path)
        ratio = (model_bytes + sum(sizes)) / model_bytes
        print(
            f"  {bits}-bit: {sum(sizes) / 19 / 1e6:.3f} MB per signature, "
            f"{sum(sizes) / 1e6:.2f} MB for 19; model + 19 = {ratio:.3f}x the model "
            f"(goal <= {goal}x: {'met' if ratio <= goal else 'MISSED'})"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", default=None, help="folder for temporary files")
    parser.add_argument("--big-mb", type=int, default=1024, help="size of the (c) model")
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="rws-apply-bench-", dir=args.work)
    try:
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
        bench_switch(work)
        bench_storage(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
