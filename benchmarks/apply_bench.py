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


def timed(fn: Callable[[], object], repeat: int, before: Callable[[], None] = lambda: None):
    """Median and best wall time (seconds) of `fn` over `repeat` runs after a warm-up;
    `before` runs ahead of each, untimed."""
    before()
    fn()
    times = []
    for _ in range(repeat):
        before()
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), min(times)


def evict(*paths: str) -> None:
    """Drop the files' pages from the OS page cache, so the next read comes from disk."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


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

    def full_model() -> None:
        model.load_state_dict(load_file(robust_path))

    def open_patch_remove() -> None:
        with rwsfmt.load(sig_path) as sig:
            rwsfmt.patch(model, sig, 0.8).remove()

    before = {k: v.clone() for k, v in sd.items()}
    with rwsfmt.load(sig_path) as sig, rwsfmt.patched(model, sig, 0.8):
        assert not torch.equal(model.features[0].weight, before["features.0.weight"])
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())

    print("\n(a) switching robustness on a live VGG-16 (median ms over runs, best in brackets)")
    print(f"  {'':44} {'page cache warm':>18} {'files evicted':>18}")
    rows = [
        ("robust .safetensors load + load_state_dict", full_model, robust_path),
        ("open .rws + patch + remove (8-bit, 5 convs)", open_patch_remove, sig_path),
    ]
    results = []
    for label, fn, path in rows:
        warm = timed(fn, 30)
        cold = timed(fn, 15, before=lambda p=path: evict(p))
        results.append((warm[0], cold[0]))
        cells = [f"{m * 1e3:8.2f} ({b * 1e3:6.2f})" for m, b in (warm, cold)]
        print(f"  {label:44} {cells[0]:>18} {cells[1]:>18}")
    (full_warm, full_cold), (rws_warm, rws_cold) = results
    for what, ratio in (("warm", full_warm / rws_warm), ("evicted", full_cold / rws_cold)):
        verdict = "met" if ratio >= 20 else "MISSED"
        print(f"  speed-up, {what:8}: {ratio:6.1f}x (goal >= 20x: {verdict})")
    print(
        "  (patch + remove switches robustness on AND off; the full-model row only switches it on)"
    )


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


def bench_file_apply(work: str, megabytes: int) -> None:
    side = 4096
    count = max(1, round(megabytes * 2**20 / (side * side * 4)))
    g = torch.Generator().manual_seed(0)
    model_path = os.path.join(work, "big.safetensors")
    tensors = {f"layers.{i}.weight": torch.randn(side, side, generator=g) for i in range(count)}
    save_file(tensors, model_path)
    builder = rwsfmt.SignatureBuilder("all", QuantConfig(bits=8))
    for name, t in tensors.items():
        builder.add(name, synthetic_delta(t.shape, g))
    sig_path = os.path.join(work, "all.rws")
    rwsfmt.save(builder.build(), sig_path)
    del tensors, builder
    size = os.path.getsize(model_path)

    def copy() -> None:
        shutil.copyfile(model_path, os.path.join(work, "copy.safetensors"))

    def copy_fsync() -> None:
        copy()
        with open(os.path.join(work, "copy.safetensors"), "rb+") as f:
            os.fsync(f.fileno())

    def read_write() -> None:  # the floor for any tool that rewrites the bytes in user space
        with open(model_path, "rb") as src, open(os.path.join(work, "rw.safetensors"), "wb") as dst:
            while chunk := src.read(64 << 20):
                dst.write(chunk)
            dst.flush()
            os.fsync(dst.fileno())

    def apply() -> None:
        rwsfmt.apply_checkpoint(
            model_path, [(sig_path, 0.8)], os.path.join(work, "out.safetensors")
        )

    print(
        f"\n(c) apply to a file: {size / 1e9:.2f} GB safetensors ({count} x {side}x{side} float32),"
    )
    print(
        f"    an 8-bit signature over all of it ({os.path.getsize(sig_path) / 1e6:.0f} MB);"
        " page cache warm"
    )
    rows = [
        ("shutil.copyfile", copy),
        ("shutil.copyfile + fsync", copy_fsync),
        ("python read/write + fsync", read_write),
        ("rwsfmt apply", apply),
    ]
    seconds = {}
    for label, fn in rows:
        seconds[label] = timed(fn, 3)[0]
        print(f"  {label:24} {seconds[label]:6.2f} s  {size / seconds[label] / 1e6:7.0f} MB/s")
    for base in ("shutil.copyfile", "shutil.copyfile + fsync", "python read/write + fsync"):
        ratio = seconds[base] / seconds["rwsfmt apply"]
        verdict = "met" if ratio >= 0.5 else "MISSED"
        print(f"  apply speed / {base} speed: {ratio:.2f} (goal >= 0.5: {verdict})")


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
        bench_file_apply(work, args.big_mb)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
