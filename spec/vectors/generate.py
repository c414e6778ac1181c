"""Generate the golden `.rws` v1.x files in this folder and their expected decoded values.

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


# ---- version 1.2 (spec section 3.7): int2, sign and sparse entries; these files have minor 2


def _per_tensor(label: str, tensors: list, **build) -> rwsfmt.Signature:
    """A signature whose tensors are each stored with their own QuantConfig:
    `tensors` lists (name, tensor, config, add() keywords)."""
    builder = SignatureBuilder(label)
    for name, tensor, config, extra in tensors:
        builder.quant = config  # one setting per tensor
        builder.add(name, tensor, **extra)
    return builder.build(**build)


def int2_sym_channel() -> rwsfmt.Signature:
    """2-bit symmetric per output channel (ternary: codes 1, 2, 3), with an all-zero channel,
    a channel of one repeated value, a rank-1 bias (one scale) and a compressible tensor."""
    g = _gen(7)
    weight = 0.05 * torch.randn(6, 4, 3, generator=g)
    weight[2] = 0.0
    weight[4] = -0.25
    builder = SignatureBuilder("fog", QuantConfig(bits=2))
    builder.add("conv.weight", weight)
    builder.add("conv.bias", 0.01 * torch.randn(6, generator=g))
    builder.add("smooth", torch.linspace(-1, 1, 64).repeat(8, 1))  # a zstd frame
    return builder.build(provenance={"method": "project", "layers": 1})


def int2_affine_group() -> rwsfmt.Signature:
    """2-bit affine per group of 12: a short last group, element counts that leave padding
    bits in the last byte, all-positive values (zero point 0) and a scalar."""
    g = _gen(8)
    config = QuantConfig(bits=2, symmetric=False, granularity="group", group_size=12)
    builder = SignatureBuilder("snow", config)
    builder.add("fc.weight", torch.randn(5, 7, generator=g))
    builder.add("positive", torch.rand(27, generator=g) + 0.5)
    builder.add("scalar", torch.tensor(-1.25))
    builder.add("wide", torch.randn(12, 16, generator=g))  # 16 groups: a zstd frame
    return builder.build()


def sign_channel() -> rwsfmt.Signature:
    """1 bit per value and one scale per output channel: a dead (all-zero) channel decodes
    to +0.0, a channel with zeros among its values, and a rank-1 bias (one scale)."""
    g = _gen(9)
    weight = 0.02 * torch.randn(8, 3, 3, 3, generator=g)
    weight[5] = 0.0
    weight[1, 0] = 0.0
    builder = SignatureBuilder("contrast", QuantConfig(bits=1))
    builder.add("features.0.weight", weight)
    builder.add("features.0.bias", 0.01 * torch.randn(8, generator=g))
    return builder.build(provenance={"method": "project", "layers": 1})


def sign_group() -> rwsfmt.Signature:
    """1 bit per value, one scale per group of 10: 53 elements leave a short last group of 3
    and 3 padding bits; a float16 source."""
    g = _gen(10)
    builder = SignatureBuilder(
        "motion_blur", QuantConfig(bits=1, granularity="group", group_size=10)
    )
    builder.add("proj.weight", 0.1 * torch.randn(53, generator=g))
    builder.add("head.weight", (0.1 * torch.randn(4, 5, generator=g)).half())
    return builder.build()


def sparse_sign_channel() -> rwsfmt.Signature:
    """The largest 10% of each output channel's values (sparsity 'channel'), stored as signs
    with one scale per channel: channels keep different counts (ties, zeros dropped), a dead
    channel keeps nothing and still has its scale."""
    g = _gen(11)
    weight = torch.randn(16, 4, 18, generator=g)  # a zstd frame (the bitmap is mostly 0)
    weight[3] = 0.0
    weight[7, :, 1:] = 0.0  # 4 nonzero values: round(0.1 * 72) = 7 kept, only 4 stored
    weight[8, 0, :9] = 9.0  # a tie at the threshold: the earliest seven are kept
    builder = SignatureBuilder("fog", QuantConfig(bits=1, density=0.1, sparsity="channel"))
    builder.add("conv.weight", weight)
    builder.add("conv.bias", torch.randn(16, generator=g))  # rank 1: kept per tensor
    return builder.build(provenance={"method": "project", "layers": 1})


def sparse_int8_tensor() -> rwsfmt.Signature:
    """The largest 20% of each tensor (sparsity 'tensor'), as 8-bit codes: per channel of
    axis 0 (channels with no kept value keep their scale), per tensor, and affine per group
    of kept values."""
    g = _gen(12)
    weight = torch.randn(6, 9, generator=g)
    weight[0] *= 10  # channel 0 holds most of the largest values
    return _per_tensor(
        "snow",
        [
            ("fc.weight", weight, QuantConfig(bits=8, density=0.2), {}),
            ("fc.bias", torch.randn(11, generator=g), QuantConfig(bits=8, density=0.2), {}),
            (
                "proj.weight",
                torch.randn(7, 7, generator=g),
                QuantConfig(
                    bits=8, symmetric=False, granularity="group", group_size=4, density=0.2
                ),
                {},
            ),
        ],
        provenance={"quantization": {"bits": 8, "density": 0.2, "sparsity": "tensor"}},
    )


def sparse_float32() -> rwsfmt.Signature:
    """The largest 30% stored as exact float32 values split into byte planes, with -0.0
    and a subnormal that are not kept, and a 16-bit per-channel variant (byteplane too)."""
    g = _gen(13)
    weight = torch.randn(5, 6, generator=g)
    weight[0, :2] = torch.tensor([-0.0, 1e-40])
    return _per_tensor(
        "contrast",
        [
            ("w", weight, QuantConfig(bits=32, density=0.3), {}),
            ("w16", torch.randn(4, 7, generator=g), QuantConfig(bits=16, density=0.3), {}),
        ],
    )


def sparse_empty() -> rwsfmt.Signature:
    """Sparse entries that keep nothing (nnz = 0): all-zero tensors in every values scheme
    and granularity (a per-channel or per-tensor scale is still stored; per-group scales are
    not), a zero scalar and zero-element tensors."""
    zeros = torch.zeros(4, 6)
    return _per_tensor(
        "empty",
        [
            ("sign_channel", zeros, QuantConfig(bits=1, density=0.1, sparsity="channel"), {}),
            ("int2_tensor", zeros, QuantConfig(bits=2, granularity="tensor", density=0.5), {}),
            (
                "int8_group",
                zeros,
                QuantConfig(bits=8, granularity="group", group_size=4, density=0.5),
                {},
            ),
            ("float", zeros, QuantConfig(bits=32, density=0.5), {}),
            ("scalar", torch.tensor(0.0), QuantConfig(bits=1, density=0.5), {}),
            ("no_rows", torch.zeros(0, 5), QuantConfig(bits=8, density=0.5), {}),
            (
                "no_columns",
                torch.zeros(5, 0),
                QuantConfig(bits=1, density=0.5, sparsity="channel"),
                {},
            ),
        ],
    )


def mixed_1_2() -> rwsfmt.Signature:
    """Every scheme in one file, in model order: exact targets, 8- and 4-bit linear, int2,
    sign, and sparse values in each of float, linear, int2 and sign; other source dtypes,
    a scalar and an empty tensor, stats and a provenance record."""
    g = _gen(14)
    stats = {"rel_norm": 0.125, "cos_base": 0.5}
    conv = 0.1 * torch.randn(4, 2, 3, 3, generator=g)
    sign = QuantConfig(bits=1)
    tensors = [
        ("conv1.weight", conv, QuantConfig(bits=2), {"stats": stats}),
        ("bn1.weight", 0.1 * torch.randn(4, generator=g), sign, {}),
        ("bn1.bias", 0.1 * torch.randn(4, generator=g), QuantConfig(bits=8), {}),
        ("bn1.running_mean", torch.randn(4, generator=g), sign, {"kind": "target"}),
        ("bn1.running_var", torch.rand(4, generator=g) + 0.5, sign, {"kind": "target"}),
        (
            "conv2.weight",
            0.1 * torch.randn(6, 4, 3, 3, generator=g),
            QuantConfig(bits=1, density=0.25, sparsity="channel"),
            {},
        ),
        (
            "conv2.bias",
            0.1 * torch.randn(6, generator=g),
            QuantConfig(bits=4, symmetric=False, granularity="group", group_size=4),
            {},
        ),
        (
            "fc1.weight",
            (0.1 * torch.randn(8, 16, generator=g)).half(),
            QuantConfig(bits=2, symmetric=False, density=0.5),
            {},
        ),
        (
            "fc1.bias",
            (0.1 * torch.randn(8, generator=g)).bfloat16(),
            QuantConfig(bits=32, density=0.5),
            {},
        ),
        (
            "fc2.weight",
            0.1 * torch.randn(3, 16, generator=g),
            QuantConfig(bits=16, granularity="group", group_size=5, density=0.4),
            {},
        ),
        (
            "fc2.bias",
            0.1 * torch.randn(3, generator=g),
            QuantConfig(bits=1, granularity="group", group_size=2),
            {},
        ),
        (
            "proj.weight",
            0.1 * torch.randn(3, 10, generator=g),
            QuantConfig(bits=2, granularity="group", group_size=8),
            {},
        ),
        ("scale", torch.tensor(0.75), QuantConfig(bits=2, symmetric=False), {}),
        ("empty", torch.zeros(0, 5), QuantConfig(bits=1), {}),
    ]
    sig = _per_tensor("fog", tensors)
    model = [(i.name, i.shape) for i in sig.infos] + [("head.weight", (10, 3))]
    return _per_tensor(
        "fog",
        tensors,
        provenance={
            "method": "project",
            "layers": 3,
            "corruption": "fog",
            "severity": 5,
            "dataset": "digits-32",
            "meta": {"note": "golden file, format 1.2"},
        },
        model_fingerprint=rwsfmt.architecture_fingerprint(model),
    )


VECTORS = [
    sym8_channel,
    sym16_byteplane,
    float32_exact,
    affine4_group,
    mixed,
    legacy_negzero_scale,
    int2_sym_channel,
    int2_affine_group,
    sign_channel,
    sign_group,
    sparse_sign_channel,
    sparse_int8_tensor,
    sparse_float32,
    sparse_empty,
    mixed_1_2,
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
