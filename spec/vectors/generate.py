"""Generate the golden `.rws` v1.0 files in this folder and their expected decoded values.

The committed files are FROZEN: the tests read them and never call this script. It exists so
that anyone can see exactly how they were made. It refuses to overwrite existing files unless
`--force` is given; regenerating may change the compressed bytes (zstd version), never the
values, and a release must never change a committed vector. Name vectors to make only those
(a new vector is added beside the frozen ones this way); SHA256SUMS always lists every vector
present in the folder.

    python spec/vectors/generate.py --out /tmp/vectors
    python spec/vectors/generate.py legacy_negzero_scale
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from dataclasses import replace
from pathlib import Path

os.environ["SOURCE_DATE_EPOCH"] = "1700000000"  # 2023-11-14T22:13:20Z, before importing rwsfmt

import numpy as np  # noqa: E402
import torch  # noqa: E402

import rwsfmt  # noqa: E402
from rwsfmt.container import encode_blob  # noqa: E402
from rwsfmt.format.schemes import NEGATIVE_ZERO  # noqa: E402
from rwsfmt.quant import QuantConfig  # noqa: E402
from rwsfmt.signature import Signature, SignatureBuilder  # noqa: E402

HERE = Path(__file__).resolve().parent


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def sym8_channel() -> rwsfmt.Signature:
    """8-bit symmetric per output channel (the default), with an all-zero channel."""
    g = _gen(1)
    weight = 0.05 * torch.randn(8, 3, 3, 3, generator=g)
    weight[3] = 0.0
    builder = SignatureBuilder("fog", QuantConfig(bits=8))
    builder.add("features.0.weight", weight)
    builder.add("features.0.bias", 0.01 * torch.randn(8, generator=g))
    return builder.build(provenance={"method": "project", "layers": 1})


def sym16_byteplane() -> rwsfmt.Signature:
    """16-bit symmetric per channel: values split into two byte planes."""
    g = _gen(2)
    builder = SignatureBuilder("snow", QuantConfig(bits=16))
    builder.add("layer.weight", 1e-3 * torch.randn(16, 24, generator=g))
    builder.add("layer.bias", 1e-3 * torch.randn(16, generator=g))
    return builder.build(provenance={"method": "project", "layers": "all"})


def float32_exact() -> rwsfmt.Signature:
    """Exact float32 (`--bits 32`), including -0.0, a subnormal and a value near the maximum."""
    g = _gen(3)
    weight = torch.randn(5, 4, generator=g)
    weight[0, :3] = torch.tensor([-0.0, 1e-40, 3.0e38])
    builder = SignatureBuilder("contrast", QuantConfig(bits=32))
    builder.add("w", weight)
    builder.add("b", torch.randn(3, generator=g))
    return builder.build()


def affine4_group() -> rwsfmt.Signature:
    """4-bit affine per group of 16: odd element counts, a short last group, a zero offset."""
    g = _gen(4)
    builder = SignatureBuilder(
        "motion_blur", QuantConfig(bits=4, symmetric=False, granularity="group", group_size=16)
    )
    builder.add("conv.weight", torch.randn(5, 7, generator=g))
    builder.add("positive", torch.rand(33, generator=g) + 0.5)
    return builder.build()


def mixed() -> rwsfmt.Signature:
    """Several layers with BatchNorm targets, other source dtypes, a scalar, an empty tensor,
    per-tensor stats and a full provenance record."""
    g = _gen(5)
    builder = SignatureBuilder("fog", QuantConfig(bits=8))
    stats = {"rel_norm": 0.125, "cos_base": 0.5}
    builder.add("conv1.weight", 0.1 * torch.randn(4, 2, 3, 3, generator=g), stats=stats)
    builder.add("bn1.weight", 0.1 * torch.randn(4, generator=g))
    builder.add("bn1.bias", 0.1 * torch.randn(4, generator=g))
    builder.add("bn1.running_mean", torch.randn(4, generator=g), kind="target")
    builder.add("bn1.running_var", torch.rand(4, generator=g) + 0.5, kind="target")
    builder.add("fc.weight", (0.1 * torch.randn(3, 16, generator=g)).half())
    builder.add("fc.bias", (0.1 * torch.randn(3, generator=g)).bfloat16())
    builder.add("scale", torch.tensor(0.75))
    builder.add("empty", torch.zeros(0, 5))
    model = [(i.name, i.shape) for i in builder.build().infos] + [("head.weight", (10, 3))]
    return builder.build(
        provenance={
            "method": "project",
            "layers": 2,
            "inputs": [
                {"role": "std", "name": "std.pt", "size": 1234, "sha256": "ab" * 32},
                {"role": "robust", "name": "fog.pt", "size": 1234, "sha256": "cd" * 32},
                {"role": "init", "name": "init.pt", "size": 1234, "sha256": "ef" * 32},
            ],
            "corruption": "fog",
            "severity": 5,
            "dataset": "digits-32",
            "meta": {"note": "golden file"},
        },
        model_fingerprint=rwsfmt.architecture_fingerprint(model),
    )


def legacy_negzero_scale() -> rwsfmt.Signature:
    """-0.0 scales, as rwsfmt 0.1.0 wrote them for the all-zero groups of tensors with many
    groups; readers MUST decode them as +0.0 (spec section 3.6).

    The fixed writer writes +0.0, so this vector is made by a deliberate patch after
    quantization: every +0.0 scale (and, for affine, every +0.0 zero point, which 0.1.0 also
    wrote as -0.0) gets the bits 0x80000000, and the blob is re-encoded and re-checksummed.
    Zero groups sit first, last, in the middle and side by side; one tensor per layout.
    """
    g = _gen(6)
    conv = 0.05 * torch.randn(16, 3, 3, 3, generator=g)
    conv[[0, 7, 8, 15]] = 0.0
    fc = 0.1 * torch.randn(240, generator=g)
    fc[32:64] = 0.0  # groups 2 and 3 of 16
    fc[224:] = 0.0  # the last group
    proj = torch.randn(12, 10, generator=g)
    proj[[3, 4, 11]] = 0.0
    builder = SignatureBuilder("legacy")
    for name, tensor, quant in [
        ("conv.weight", conv, QuantConfig(bits=8)),
        ("fc.weight", fc, QuantConfig(bits=4, granularity="group", group_size=16)),
        ("proj.weight", proj, QuantConfig(bits=16, symmetric=False)),
    ]:
        builder.quant = quant  # one setting per tensor
        builder.add(name, tensor)
    sig = builder.build(provenance={"quantization": {"bits": 8}, "note": "-0.0 scales"})
    infos, blobs = [], {}
    for info in sig.infos:
        payload = bytearray(sig.payload(info.name))
        numbers = np.frombuffer(payload, dtype="<u4", count=info.values_offset // 4)
        patched = numbers if info.affine else numbers[: info.n_scales]
        patched[patched == 0] = NEGATIVE_ZERO
        codec, blob = encode_blob(bytes(payload))
        infos.append(
            replace(info, codec=codec, length=len(blob), sha256=hashlib.sha256(blob).hexdigest())
        )
        blobs[info.name] = blob
    return Signature(sig.meta, infos, blobs)


VECTORS = [
    sym8_channel,
    sym16_byteplane,
    float32_exact,
    affine4_group,
    mixed,
    legacy_negzero_scale,
]


def expected_values(path: Path) -> dict:
    """{name: {"shape", "values"}} as decoded by rwsfmt (exact float32 values as JSON floats)."""
    with rwsfmt.load(path) as sig:
        out = {}
        for name in sig.names:
            t = sig.tensor(name)
            out[name] = {"shape": list(t.shape), "values": t.reshape(-1).tolist()}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="vectors to make (default: all)")
    parser.add_argument("--out", type=Path, default=HERE)
    parser.add_argument("--force", action="store_true", help="overwrite existing files")
    args = parser.parse_args()
    known = {make.__name__: make for make in VECTORS}
    unknown = set(args.names) - set(known)
    if unknown:
        parser.error(f"unknown vectors {sorted(unknown)}; known: {sorted(known)}")
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.names or known:
        rws, expected = args.out / f"{name}.rws", args.out / f"{name}.expected.json"
        if not args.force and (rws.exists() or expected.exists()):
            print(f"{rws} exists: golden files are frozen (use --force or --out)", file=sys.stderr)
            return 1
        rwsfmt.save(known[name](), rws)
        text = json.dumps(expected_values(rws), indent=1, sort_keys=True) + "\n"
        expected.write_text(text, encoding="utf-8")
    sums = []
    for name in known:
        for p in (args.out / f"{name}.rws", args.out / f"{name}.expected.json"):
            if p.exists():
                sums.append(f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.name}\n")
    (args.out / "SHA256SUMS").write_text("".join(sums), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
