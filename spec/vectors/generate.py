"""Generate the golden `.rws` v1.0 files in this folder and their expected decoded values.

The committed files are FROZEN: the tests read them and never call this script. It exists so
that anyone can see exactly how they were made. It refuses to overwrite existing files unless
`--force` is given; regenerating may change the compressed bytes (zstd version), never the
values, and a release must never change a committed vector.

    python spec/vectors/generate.py --out /tmp/vectors
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

os.environ["SOURCE_DATE_EPOCH"] = "1700000000"  # 2023-11-14T22:13:20Z, before importing rwsfmt

import torch  # noqa: E402

import rwsfmt  # noqa: E402
from rwsfmt.quant import QuantConfig  # noqa: E402
from rwsfmt.signature import SignatureBuilder  # noqa: E402

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


VECTORS = [sym8_channel, sym16_byteplane, float32_exact, affine4_group, mixed]


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
    parser.add_argument("--out", type=Path, default=HERE)
    parser.add_argument("--force", action="store_true", help="overwrite existing files")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    sums = []
    for make in VECTORS:
        rws, expected = (
            args.out / f"{make.__name__}.rws",
            args.out / f"{make.__name__}.expected.json",
        )
        if not args.force and (rws.exists() or expected.exists()):
            print(f"{rws} exists: golden files are frozen (use --force or --out)", file=sys.stderr)
            return 1
        rwsfmt.save(make(), rws)
        text = json.dumps(expected_values(rws), indent=1, sort_keys=True) + "\n"
        expected.write_text(text, encoding="utf-8")
        for p in (rws, expected):
            sums.append(f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.name}\n")
    (args.out / "SHA256SUMS").write_text("".join(sums), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
