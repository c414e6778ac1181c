"""Shared fixtures and helpers: small real `.rws` files, a header rewriter for bad input."""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "spec"
VECTORS = SPEC / "vectors"

os.environ.setdefault("SOURCE_DATE_EPOCH", "1700000000")

settings.register_profile(
    "rwsfmt",
    max_examples=60,
    deadline=2000,  # milliseconds per example: a reader that hangs fails the test
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("rwsfmt")


def small_tensors(seed: int = 0) -> dict:
    """A conv weight, a bias, a linear weight with an all-zero row: about 1.5 KB at 8 bits."""
    import torch

    g = torch.Generator().manual_seed(seed)
    linear = torch.randn(6, 20, generator=g)
    linear[2] = 0
    return {
        "features.0.weight": 0.05 * torch.randn(8, 3, 3, 3, generator=g),
        "features.0.bias": 0.01 * torch.randn(8, generator=g),
        "fc.weight": linear,
    }


def write_small(path: Path, **quant) -> Path:
    """Save `small_tensors()` (plus a BatchNorm target) to `path` with the given QuantConfig."""
    import torch

    import rwsfmt
    from rwsfmt.signature import SignatureBuilder

    builder = SignatureBuilder("fog", rwsfmt.QuantConfig(**quant))
    for name, t in small_tensors().items():
        builder.add(name, t)
    builder.add("bn.running_var", torch.linspace(0.5, 1.5, 8), kind="target")
    rwsfmt.save(builder.build(provenance={"method": "project", "layers": 1}), path)
    return path


@pytest.fixture
def small_rws(tmp_path: Path) -> Path:
    return write_small(tmp_path / "small.rws")


def split(data: bytes) -> tuple[dict, bytes, dict]:
    """(preamble fields, header JSON object, data section) of a well-formed file's bytes."""
    major, minor, flags, header_len, data_len = struct.unpack_from("<HHIQQ", data, 8)
    fields = dict(major=major, minor=minor, flags=flags)
    doc = json.loads(data[64 : 64 + header_len])
    return fields, doc, data[64 + header_len : 64 + header_len + data_len]


def assemble(doc: dict, data: bytes, major: int = 1, minor: int = 0, flags: int = 0) -> bytes:
    """A file with a valid digest around any header object: padding and lengths recomputed,
    so that the reader's validation, not its checksum, decides."""
    body = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    header = body + b" " * (-(64 + len(body)) % 64)
    head = b"\x89RWS\r\n\x1a\n" + struct.pack("<HHIQQ", major, minor, flags, len(header), len(data))
    return head + hashlib.sha256(head + header).digest() + header + data


# ---------------------------------------------------------------- every written file checked

_WRITTEN: dict[str, int] = {"rws": 0, "checkpoint": 0}
_CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")


def _check_written(path: str) -> None:
    """A file rwsfmt just put in place must read back: `.rws` files pass `verify`,
    checkpoints open (safetensors with the safetensors library itself too)."""
    import rwsfmt
    from rwsfmt.io import open_checkpoint
    from rwsfmt.io.folder import TRAINING_STATE

    if TRAINING_STATE.fullmatch(os.path.basename(path)):  # copied beside weights, not weights
        return
    if path.endswith(".rws"):  # (a crafted decompression bomb is valid, and checked too)
        report = rwsfmt.verify(path, max_decoded_bytes=math.inf)
        assert report.ok, f"rwsfmt wrote {path}, which its own verify refuses: {report.problems}"
        _WRITTEN["rws"] += 1
    elif path.endswith(_CHECKPOINT_SUFFIXES) and os.path.isfile(path):
        with open_checkpoint(path, trust_pickle=True) as ckpt:
            for name in ckpt.names:
                ckpt.tensor(name)
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            load_file(path)
        _WRITTEN["checkpoint"] += 1


@pytest.fixture(autouse=True, scope="session")
def _every_written_file_reads_back():
    """Every file rwsfmt writes ends with `os.replace(temporary, final)` (rwsfmt.atomic):
    check each one as it lands, so a writer that emits what its reader refuses fails the
    test that made it write."""
    real_replace = os.replace

    def replace(src, dst, *args, **kwargs):
        real_replace(src, dst, *args, **kwargs)
        if os.path.basename(os.fspath(src)).startswith("."):  # rwsfmt's temporary names
            _check_written(os.fspath(dst))

    os.replace = replace
    try:
        yield
    finally:
        os.replace = real_replace


def pytest_terminal_summary(terminalreporter) -> None:
    terminalreporter.write_line(
        f"files written by rwsfmt and read back: {_WRITTEN['rws']} .rws (all pass verify), "
        f"{_WRITTEN['checkpoint']} checkpoints (all readable)"
    )
