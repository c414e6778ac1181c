"""The schemes of format 1.2 (spec section 3.7: `int2`, `sign`, `sparse`) against the spec's
text: payloads built by hand and decoded to values worked out from sections 3.2, 3.3 and 3.7;
every refusal rule of sections 3.1, 3.5, 3.6, 3.7 and 9 for the new fields; random round
trips through rwsfmt's writer, where rwsfmt (torch and numpy decoders) and the reference
reader must give identical float32 bits; and the upgrade message a reader that does not know
a 1.2 scheme gives."""

from __future__ import annotations

import hashlib
import math
import random
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import reference_reader
import torch
from conftest import VECTORS, assemble

import rwsfmt
from rwsfmt.dequant import dequantize
from rwsfmt.errors import IntegrityError, RwsError
from rwsfmt.format.schemes import SCHEMES
from rwsfmt.quant import QuantConfig

FLT_MAX = float(np.finfo(np.float32).max)
NEW_SCHEMES = ("int2", "sign", "sparse")


def f32(*values: float) -> bytes:
    return np.array(values, dtype="<f4").tobytes()


def u32(*values: int) -> bytes:
    return np.array(values, dtype="<u4").tobytes()


def entry(name: str, shape: list, quant: dict, payload: bytes, filt: str = "none", **extra):
    """(header entry, blob) of a raw tensor holding `payload`; `extra` overrides fields."""
    e = {
        "name": name,
        "kind": "delta",
        "shape": shape,
        "dtype": "float32",
        "quant": quant,
        "filter": filt,
        "codec": "raw",
        "decoded_length": len(payload),
        "length": len(payload),
        **extra,
    }
    return e, payload


def write(path: Path, entries: list, minor: int = 2) -> Path:
    """A file around `entries`: offsets, checksums and the header digest made valid, so
    that only the rules under test decide."""
    doc, offset = {"label": "spec", "tensors": []}, 0
    for e, blob in entries:
        e = {**e, "offset": offset, "sha256": hashlib.sha256(blob).hexdigest()}
        doc["tensors"].append(e)
        offset += len(blob)
    path.write_bytes(assemble(doc, b"".join(blob for _, blob in entries), minor=minor))
    return path


def read_rwsfmt(path: Path) -> dict[str, np.ndarray]:
    """Every tensor, decoded by rwsfmt with torch and with numpy (which must agree)."""
    out = {}
    with rwsfmt.load(path) as sig:
        for name in sig.names:
            values = sig.tensor(name).numpy()
            by_numpy = dequantize(sig.payload(name), sig.info(name))
            assert by_numpy.dtype == np.float32 and by_numpy.shape == values.shape, name
            assert by_numpy.tobytes() == values.tobytes(), name
            out[name] = values
    return out


def bits_of(values) -> np.ndarray:
    return np.asarray(values, dtype=np.float32).view(np.uint32)


SYM8 = {"scheme": "linear", "bits": 8, "symmetric": True, "granularity": "tensor"}


def sparse(bits: int, nnz: int, values: dict, **extra) -> dict:
    return {"scheme": "sparse", "bits": bits, "index": "bitmap", "nnz": nnz, "values": values}


# --------------------------------------------------------------------------- hand-made payloads

# (id, shape, quant, filter, payload, expected values in row-major order): each payload is
# laid out by hand from sections 3.1, 3.2 and 3.7, each value worked out from 3.3 and 3.7
HAND = [
    (
        # codes 0 1 2 3 | 3 2 1, four to a byte from the low bits: (u - 2) * 0.5
        "int2 symmetric tensor",
        [7],
        {"scheme": "int2", "bits": 2, "symmetric": True, "granularity": "tensor"},
        "none",
        f32(0.5) + bytes([0 | 1 << 2 | 2 << 4 | 3 << 6, 3 | 2 << 2 | 1 << 4]),
        [-1.0, -0.5, 0.0, 0.5, 0.5, 0.0, -0.5],
    ),
    (
        "int2 symmetric tensor, padding bits set (ignored)",
        [7],
        {"scheme": "int2", "bits": 2, "symmetric": True, "granularity": "tensor"},
        "none",
        f32(0.5) + bytes([0 | 1 << 2 | 2 << 4 | 3 << 6, 3 | 2 << 2 | 1 << 4 | 3 << 6]),
        [-1.0, -0.5, 0.0, 0.5, 0.5, 0.0, -0.5],
    ),
    (
        # scales 1, 0.25; zero points 1, 3; codes 0 1 3 | 3 0 2
        "int2 affine channel axis 0",
        [2, 3],
        {"scheme": "int2", "bits": 2, "symmetric": False, "granularity": "channel", "axis": 0},
        "none",
        f32(1.0, 0.25) + f32(1.0, 3.0) + bytes([0 | 1 << 2 | 3 << 4 | 3 << 6, 0 | 2 << 2]),
        [-1.0, 0.0, 2.0, 0.0, -0.75, -0.25],
    ),
    (
        # a scale per column: element (r, c) takes scale c
        "int2 symmetric channel axis 1",
        [2, 3],
        {"scheme": "int2", "bits": 2, "symmetric": True, "granularity": "channel", "axis": 1},
        "none",
        f32(1.0, 2.0, 4.0) + bytes([0xFF, 0x0F]),
        [1.0, 2.0, 4.0, 1.0, 2.0, 4.0],
    ),
    (
        # groups of 2: scales 2, 0.25, 8 (the last group short); bits 1 0 0 1 1
        "sign group, short last group",
        [5],
        {"scheme": "sign", "bits": 1, "granularity": "group", "group_size": 2},
        "none",
        f32(2.0, 0.25, 8.0) + bytes([0b11001]),
        [2.0, -2.0, -0.25, 0.25, 8.0],
    ),
    (
        "sign channel axis 1, an unused symmetric key",
        [2, 2],
        {"scheme": "sign", "bits": 1, "granularity": "channel", "axis": 1, "symmetric": "x"},
        "none",
        f32(1.0, 3.0) + bytes([0b0011]),
        [1.0, 3.0, -1.0, -3.0],
    ),
    (
        # a scale of -0.0 reads as +0.0 (3.6); bit 0 then decodes to -(+0.0) = -0.0
        "sign with a legacy -0.0 scale",
        [2],
        {"scheme": "sign", "bits": 1, "granularity": "tensor"},
        "none",
        u32(0x8000_0000) + bytes([0b01]),
        [0.0, -0.0],
    ),
    (
        # kept: 1, 3 (channel 0), none (channel 1), 8, 9, 11 (channel 2); bits 1 0 1 1 0
        "sparse sign channel, a channel keeping nothing",
        [3, 4],
        sparse(1, 5, {"scheme": "sign", "bits": 1, "granularity": "channel", "axis": 0}),
        "none",
        bytes([0b1010, 0b1011]) + f32(0.5, 7.0, 2.0) + bytes([0b01101]),
        [0.0, 0.5, 0.0, -0.5, 0.0, 0.0, 0.0, 0.0, 2.0, 2.0, 0.0, -2.0],
    ),
    (
        # kept 0 2 4 6 9; groups of 2 kept values: scales 1, 0.5, 0.25; (u - 128) * scale
        "sparse int8 group of kept values",
        [10],
        sparse(8, 5, {**SYM8, "granularity": "group", "group_size": 2}),
        "none",
        bytes([0b01010101, 0b10]) + f32(1.0, 0.5, 0.25) + bytes([129, 127, 130, 120, 0]),
        [1.0, 0.0, -1.0, 0.0, 1.0, 0.0, -4.0, 0.0, 0.0, -32.0],
    ),
    (
        "sparse float32, byte planes of the kept values",
        [2, 2],
        sparse(32, 2, {"scheme": "float", "bits": 32}),
        "byteplane",
        bytes([0b0110]) + np.frombuffer(f32(1.5, -2.0), np.uint8).reshape(2, 4).T.tobytes(),
        [0.0, 1.5, -2.0, 0.0],
    ),
    (
        # codes 32773 and 32765 as low bytes, then high bytes: (u - 32768) * 2^-10
        "sparse linear16, byte planes of the kept codes",
        [3],
        sparse(16, 2, {**SYM8, "bits": 16}),
        "byteplane",
        bytes([0b101]) + f32(2.0**-10) + bytes([0x05, 0xFD, 0x80, 0x7F]),
        [5 * 2.0**-10, 0.0, -3 * 2.0**-10],
    ),
    (
        "sparse int2 affine, one kept value",
        [5],
        sparse(2, 1, {"scheme": "int2", "bits": 2, "symmetric": False, "granularity": "tensor"}),
        "none",
        bytes([0b10000]) + f32(0.5) + f32(1.0) + bytes([3]),
        [0.0, 0.0, 0.0, 0.0, 1.0],
    ),
    (
        # nnz 0: a scale per channel is still stored (Gn = shape[0]), no value bytes
        "sparse sign channel, nnz 0",
        [2, 3],
        sparse(1, 0, {"scheme": "sign", "bits": 1, "granularity": "channel", "axis": 0}),
        "none",
        bytes([0]) + f32(0.0, 0.0),
        [0.0] * 6,
    ),
    (
        # nnz 0 per tensor: one scale, no value bytes; per group: no scale at all
        "sparse int8 tensor, nnz 0",
        [4],
        sparse(8, 0, SYM8),
        "none",
        bytes([0]) + f32(3.0),
        [0.0] * 4,
    ),
    (
        "sparse int8 group, nnz 0",
        [4],
        sparse(8, 0, {**SYM8, "granularity": "group", "group_size": 3}),
        "none",
        bytes([0]),
        [0.0] * 4,
    ),
    (
        "sparse bitmap with padding bits set (ignored)",
        [3],
        sparse(8, 1, SYM8),
        "none",
        bytes([0b11111010]) + f32(0.5) + bytes([130]),
        [0.0, 1.0, 0.0],
    ),
    (
        "sparse, zero elements",
        [0, 4],
        sparse(8, 0, {**SYM8, "granularity": "channel", "axis": 0}),
        "none",
        b"",
        [],
    ),
    (
        "sparse scalar",
        [],
        sparse(1, 1, {"scheme": "sign", "bits": 1, "granularity": "tensor"}),
        "none",
        bytes([1]) + f32(0.75) + bytes([0]),
        [-0.75],
    ),
]


@pytest.mark.parametrize(
    ("shape", "quant", "filt", "payload", "expected"),
    [case[1:] for case in HAND],
    ids=[case[0] for case in HAND],
)
def test_hand_made_payloads_decode_as_the_spec_says(
    tmp_path, shape, quant, filt, payload, expected
):
    path = write(tmp_path / "hand.rws", [entry("t", shape, quant, payload, filt)])
    _, reference = reference_reader.read(str(path))
    ours = read_rwsfmt(path)
    want = bits_of(expected)
    assert reference["t"].shape == tuple(shape) and ours["t"].shape == tuple(shape)
    assert np.array_equal(reference["t"].reshape(-1).view(np.uint32), want)
    assert np.array_equal(ours["t"].reshape(-1).view(np.uint32), want)
    report = rwsfmt.verify(path)
    assert report.ok, report.problems


# --------------------------------------------------------------------------- refusals

SIGN_T = {"scheme": "sign", "bits": 1, "granularity": "tensor"}
SIGN_C = {"scheme": "sign", "bits": 1, "granularity": "channel", "axis": 0}
INT2_T = {"scheme": "int2", "bits": 2, "symmetric": True, "granularity": "tensor"}
INT2_A = {"scheme": "int2", "bits": 2, "symmetric": False, "granularity": "tensor"}
# a valid sparse [2, 3] tensor keeping elements 0 and 4, as signs per channel
SPARSE_OK = ([2, 3], sparse(1, 2, SIGN_C), bytes([0b10001]) + f32(1.0, 2.0) + bytes([0b01]))


def _sparse_case(shape=None, payload=None, filt="none", **quant):
    """SPARSE_OK with quant keys replaced (None deletes one), as (shape, quant, filt, payload)."""
    q = {**SPARSE_OK[1], **quant}
    q = {k: v for k, v in q.items() if v is not None}
    return (shape or SPARSE_OK[0], q, filt, SPARSE_OK[2] if payload is None else payload)


def _values_case(payload=None, **values):
    v = {**SIGN_C, **values}
    return _sparse_case(payload=payload, values={k: x for k, x in v.items() if x is not None})


# (id, (shape, quant, filter, payload), what rwsfmt's message must say or None)
REFUSED = [
    # ---- header rules (decoded_length always matches the payload given)
    ("sparse index unknown", _sparse_case(index="rle"), "upgrade"),
    ("sparse index missing", _sparse_case(index=None), "must name how positions are stored"),
    ("sparse index a list", _sparse_case(index=["bitmap"]), None),
    ("sparse index an object", _sparse_case(index={"bitmap": 1}), None),
    ("nnz missing", _sparse_case(nnz=None), None),
    ("nnz negative", _sparse_case(nnz=-1), None),
    ("nnz above n", _sparse_case(shape=[1, 1], nnz=2, payload=bytes([1]) + f32(1.0) + b"\0"), None),
    ("nnz a float", _sparse_case(nnz=2.0), None),
    ("nnz a bool", _sparse_case(nnz=True, payload=bytes([1]) + f32(1.0, 2.0) + b"\0"), None),
    ("nnz a string", _sparse_case(nnz="2"), None),
    ("nnz a list", _sparse_case(nnz=[2]), None),
    ("values missing", _sparse_case(values=None), None),
    ("values a list", _sparse_case(values=[SIGN_C]), None),
    ("values a string", _sparse_case(values="sign"), None),
    ("values sparse", _sparse_case(values=sparse(1, 2, SIGN_C)), None),
    ("values scheme unknown", _values_case(scheme="int3"), None),
    ("values scheme a list", _values_case(scheme=["sign"]), None),
    ("values scheme an object", _values_case(scheme={"sign": 1}), None),
    ("values scheme missing", _values_case(scheme=None), None),
    ("values bits differ", _sparse_case(bits=2), None),
    ("values bits a bool", _sparse_case(bits=True, values={**SIGN_C, "bits": True}), None),
    ("values bits not of the scheme", _sparse_case(bits=2, values={**SIGN_C, "bits": 2}), None),
    (
        "values linear at 2 bits",
        _sparse_case(bits=2, values={**INT2_T, "scheme": "linear", "granularity": "channel"}),
        None,
    ),
    (
        "values channel axis 1",
        _values_case(axis=1, payload=SPARSE_OK[2][:1] + f32(1, 2, 3) + b"\1"),
        None,
    ),
    ("values channel axis missing", _values_case(axis=None), None),
    ("values channel axis a bool", _values_case(axis=False), None),
    (
        "values channel, rank 0",
        _sparse_case(shape=[], nnz=1, payload=bytes([1]) + f32(1) + b"\1"),
        None,
    ),
    ("values granularity unknown", _values_case(granularity="row"), None),
    ("values granularity a list", _values_case(granularity=["channel"]), None),
    ("values group_size 0", _values_case(granularity="group", group_size=0), None),
    ("values group_size 2^31 + 1", _values_case(granularity="group", group_size=2**31 + 1), None),
    ("int2 without symmetric", ([4], {**INT2_T, "symmetric": None}, "none", f32(1) + b"\0"), None),
    (
        "int2 symmetric a string",
        ([4], {**INT2_T, "symmetric": "true"}, "none", f32(1) + b"\0"),
        None,
    ),
    ("int2 at 4 bits", ([4], {**INT2_T, "bits": 4}, "none", f32(1) + b"\0\0"), None),
    ("sign at 2 bits", ([4], {**SIGN_T, "bits": 2}, "none", f32(1) + b"\0"), None),
    ("sign channel axis 2", ([2, 2], {**SIGN_C, "axis": 2}, "none", f32(1, 1) + b"\0"), None),
    (
        "sign granularity missing",
        ([4], {**SIGN_T, "granularity": None}, "none", f32(1) + b"\0"),
        None,
    ),
    ("linear at 2 bits", ([4], {**INT2_T, "scheme": "linear"}, "none", f32(1) + b"\0"), None),
    (
        "linear at 1 bit",
        ([8], {**SIGN_T, "scheme": "linear", "symmetric": True}, "none", f32(1) + b"\0"),
        None,
    ),
    ("byteplane on int2", ([4], INT2_T, "byteplane", f32(1) + b"\0"), None),
    ("byteplane on sign", ([8], SIGN_T, "byteplane", f32(1) + b"\0"), None),
    ("byteplane on sparse sign", _sparse_case(filt="byteplane"), None),
    (
        "byteplane on sparse int8",
        ([3], sparse(8, 1, SYM8), "byteplane", bytes([1]) + f32(1) + b"\x81"),
        None,
    ),
    ("int2 payload a byte long", ([4], INT2_T, "none", f32(1) + b"\0\0"), None),
    ("int2 payload a byte short", ([5], INT2_T, "none", f32(1) + b"\0"), None),
    ("sign payload a byte long", ([8], SIGN_T, "none", f32(1) + b"\0\0"), None),
    (
        "sign group payload short",
        ([5], {**SIGN_T, "granularity": "group", "group_size": 2}, "none", f32(1, 1) + b"\0"),
        None,
    ),
    ("sparse payload a byte long", _sparse_case(payload=SPARSE_OK[2] + b"\0"), None),
    ("sparse payload a byte short", _sparse_case(payload=SPARSE_OK[2][:-1]), None),
    ("sparse payload sized for nnz 1", _sparse_case(nnz=1, payload=SPARSE_OK[2]), None),
    # ---- payload rules (3.6 and 3.7.4): the header is valid, the numbers are not
    (
        "bitmap holds more than nnz",
        _sparse_case(payload=bytes([0b10011]) + SPARSE_OK[2][1:]),
        "nnz",
    ),
    (
        "bitmap holds fewer than nnz",
        _sparse_case(payload=bytes([0b10000]) + SPARSE_OK[2][1:]),
        "nnz",
    ),
    ("bitmap empty, nnz 2", _sparse_case(payload=bytes([0]) + SPARSE_OK[2][1:]), "nnz"),
    ("sign scale negative", ([3], SIGN_T, "none", f32(-1.0) + b"\x05"), "scale"),
    ("sign scale NaN", ([3], SIGN_T, "none", f32(math.nan) + b"\x05"), "scale"),
    ("sign scale +inf", ([3], SIGN_T, "none", f32(math.inf) + b"\x05"), "scale"),
    ("sign scale -inf", ([3], SIGN_T, "none", f32(-math.inf) + b"\x05"), "scale"),
    ("sign scale -NaN", ([3], SIGN_T, "none", u32(0xFFC0_0000) + b"\x05"), "scale"),
    ("sign scale, smallest negative", ([3], SIGN_T, "none", u32(0x8000_0001) + b"\x05"), "scale"),
    (
        "sparse sign scale NaN",
        _sparse_case(payload=SPARSE_OK[2][:1] + f32(1, math.nan) + b"\1"),
        "scale",
    ),
    # the scale of a channel that keeps nothing is still a scale of the payload
    (
        "sparse unused scale inf",
        _sparse_case(payload=bytes([0b11]) + f32(1, math.inf) + b"\1"),
        "scale",
    ),
    ("int2 scale negative", ([4], INT2_T, "none", f32(-0.5) + b"\0"), "scale"),
    # symmetric: code 0 decodes to -2 * scale, infinite past FLT_MAX / 2
    (
        "int2 scale past FLT_MAX / 2",
        ([4], INT2_T, "none", f32(FLT_MAX / 1.5) + b"\xff"),
        "float32 range",
    ),
    ("int2 zero point NaN", ([4], INT2_A, "none", f32(1) + f32(math.nan) + b"\0"), "zero point"),
    ("int2 zero point -inf", ([4], INT2_A, "none", f32(1) + f32(-math.inf) + b"\0"), "zero point"),
    # affine: (3 - zp) * scale overflows although both are finite
    (
        "int2 code 3 overflows",
        ([4], INT2_A, "none", f32(FLT_MAX / 2) + f32(-1.0) + b"\0"),
        "float32 range",
    ),
    (
        "int2 code 0 overflows",
        ([4], INT2_A, "none", f32(FLT_MAX) + f32(2.0) + b"\0"),
        "float32 range",
    ),
    (
        "sparse float value inf",
        ([2], sparse(32, 1, {"scheme": "float", "bits": 32}), "none", b"\1" + f32(math.inf)),
        "NaN or infinite",
    ),
    (
        "sparse int2 zero point NaN",
        ([2], sparse(2, 1, INT2_A), "none", b"\1" + f32(1) + f32(math.nan) + b"\0"),
        "zero point",
    ),
]


@pytest.mark.parametrize(("case", "says"), [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED])
def test_both_readers_refuse(tmp_path, case, says):
    shape, quant, filt, payload = case
    path = write(tmp_path / "bad.rws", [entry("t", shape, quant, payload, filt)])
    with pytest.raises(reference_reader.Invalid):
        reference_reader.read(str(path))
    with pytest.raises(RwsError) as caught:  # (IntegrityError is a subclass)
        read_rwsfmt(path)
    if says:
        assert says in str(caught.value)
    _verify_refuses(path)


def _verify_refuses(path: Path) -> None:
    """`verify` reports damage as problems; a file that needs a newer reader (spec 10) is an
    RwsError that is not an IntegrityError and asks to upgrade (spec 9)."""
    try:
        report = rwsfmt.verify(path)
    except RwsError as exc:
        assert not isinstance(exc, IntegrityError) and "upgrade" in str(exc)
    else:
        assert not report.ok and report.problems


def test_the_refusal_cases_are_one_edit_from_valid_files(tmp_path):
    """The base of the sparse refusals is valid, so each case fails by its own edit."""
    shape, quant, payload = SPARSE_OK
    path = write(tmp_path / "ok.rws", [entry("t", shape, quant, payload)])
    _, reference = reference_reader.read(str(path))
    assert np.array_equal(reference["t"], [[1.0, 0.0, 0.0], [0.0, -2.0, 0.0]])
    assert read_rwsfmt(path)["t"].tobytes() == reference["t"].tobytes()


@pytest.mark.parametrize(
    ("case", "says"),
    [
        (_sparse_case(index="rle"), "unknown sparse index 'rle'"),
        (_values_case(scheme="int3"), "unknown scheme 'int3' for the values of a sparse tensor"),
    ],
    ids=["index", "values scheme"],
)
def test_unknown_sparse_values_ask_to_upgrade(tmp_path, case, says):
    """Spec 3.7.4 and 10: an index or a values scheme a later version may define is refused
    as needing a newer reader (an RwsError that is not an IntegrityError), not as damage."""
    shape, quant, filt, payload = case
    path = write(tmp_path / "newer.rws", [entry("t", shape, quant, payload, filt)])
    with pytest.raises(RwsError, match=rf"(?s){re.escape(says)}.*upgrade") as caught:
        read_rwsfmt(path)
    assert not isinstance(caught.value, IntegrityError)
    _verify_refuses(path)


def test_unused_channel_keys_of_float_values_are_ignored(tmp_path):
    """The `float` scheme has no granularity: `granularity` and `axis` keys in a sparse
    entry's float values are unused, so ignored (3.1), whatever they hold."""
    values = {"scheme": "float", "bits": 32, "granularity": "channel", "axis": 1}
    payload = bytes([0b0101]) + f32(1.5, -2.0)
    path = write(tmp_path / "float.rws", [entry("t", [2, 2], sparse(32, 2, values), payload)])
    _, reference = reference_reader.read(str(path))
    assert np.array_equal(reference["t"], [[1.5, 0.0], [-2.0, 0.0]])
    assert read_rwsfmt(path)["t"].tobytes() == reference["t"].tobytes()


# --------------------------------------------------------------------------- random round trips


def _random_tensor(rng: random.Random, g: torch.Generator) -> torch.Tensor:
    """Odd shapes (rank 0 to 4, 0-size dimensions), dead rows, zeros, ties, wide ranges."""
    rank = rng.choice([0, 1, 1, 2, 2, 2, 3, 4])
    shape = [rng.choice([1, 2, 3, 5, 7, 8, 13, 17, 33]) for _ in range(rank)]
    if rank and rng.random() < 0.1:
        shape[rng.randrange(rank)] = 0
    x = torch.randn(shape, generator=g) * 10.0 ** rng.randint(-6, 3)
    if rank >= 1 and shape[0] > 1 and x.numel():
        x[rng.randrange(shape[0])] = 0.0  # a dead row (channel)
    roll = rng.random()
    if roll < 0.1:
        x.zero_()
    elif roll < 0.2 and x.numel():
        x.view(-1)[: x.numel() // 2] = float(x.view(-1)[0])  # ties at the sparsity threshold
    elif roll < 0.25:
        x = x.abs()  # one-signed: affine zero points at an end
    return x


def _random_config(rng: random.Random) -> QuantConfig:
    bits = rng.choice([1, 1, 1, 2, 2, 2, 4, 8, 16, 32])
    return QuantConfig(
        bits=bits,
        symmetric=True if bits == 1 else rng.random() < 0.6,
        granularity=rng.choice(["tensor", "channel", "group"]),
        group_size=rng.choice([1, 2, 3, 7, 16, 1000]),
        density=rng.choice([1.0, 1.0, 0.7, 0.5, 0.1, 0.01]),
        sparsity=rng.choice(["tensor", "channel"]),
    )


SEEDS = [1, 2, 3, 4, 5, 6, 7, 8]
FILES_PER_SEED = 40
TENSORS_PER_FILE = 4


@pytest.mark.parametrize("seed", SEEDS)
def test_random_files_decode_to_the_same_bits_in_every_reader(tmp_path, seed):
    """Random tensors in random configs (every bit width, granularity, density and sparsity
    in turn; several configs in one file): `rwsfmt.load(...).tensor`,
    `rwsfmt.dequant.dequantize` and the reference reader give identical float32 bits,
    `verify` passes, and the values follow the config (sparse tensors keep at most their
    share, dense sign values are +-scale)."""
    torch.set_num_threads(1)
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    for f in range(FILES_PER_SEED):
        builder = rwsfmt.SignatureBuilder(f"r{seed}")
        tensors, configs = {}, {}
        for t in range(TENSORS_PER_FILE):
            x, config = _random_tensor(rng, g), _random_config(rng)
            x = x.to(rng.choice([torch.float32, torch.float32, torch.float16, torch.bfloat16]))
            builder.quant = config
            name = f"t{t}"
            builder.add(name, x)  # vectors under 4 bits or sparse are stored at 8 bits
            tensors[name], configs[name] = x, builder.config_for("delta", tuple(x.shape))
        path = tmp_path / f"{f}.rws"
        rwsfmt.save(builder.build(), path)
        report = rwsfmt.verify(path)
        assert report.ok, report.problems
        _, reference = reference_reader.read(str(path))
        ours = read_rwsfmt(path)
        with rwsfmt.load(path) as sig:
            minor = struct.unpack_from("<H", path.read_bytes(), 10)[0]
            schemes = {sig.info(name).quant["scheme"] for name in sig.names}
            assert minor == (2 if schemes & set(NEW_SCHEMES) else 0)
            for name, x in tensors.items():
                got = ours[name]
                assert got.shape == tuple(x.shape)
                assert got.tobytes() == reference[name].tobytes(), (name, configs[name])
                assert np.isfinite(got).all()
                q, config = sig.info(name).quant, configs[name]
                assert config.describes(q, tuple(x.shape))
                source = x.float().numpy()
                if q["scheme"] == "sparse":
                    assert np.count_nonzero(got) <= q["nnz"] <= np.count_nonzero(source)
                    assert not got[source == 0].view(np.uint32).any()  # +0.0, never -0.0
                    q = q["values"]
                if q["scheme"] == "sign":  # bit 1 for x >= 0 (3.7.2, informative)
                    assert (got[source >= 0] >= 0).all() and (got[source < 0] <= 0).all()


def test_random_round_trips_cover_the_new_schemes():
    """The random configs above reach every scheme of 3.7 in every granularity."""
    seen = set()
    for seed in SEEDS:
        rng = random.Random(seed)
        g = torch.Generator().manual_seed(seed)
        for _ in range(FILES_PER_SEED * TENSORS_PER_FILE):
            x, config = _random_tensor(rng, g), _random_config(rng)
            q = config.values_metadata(tuple(x.shape))
            seen.add((q["scheme"], q.get("granularity"), config.sparse and config.sparsity))
            seen.add(("rank", x.dim(), x.numel() == 0))
    for scheme in ("int2", "sign"):
        for granularity in ("tensor", "channel", "group"):
            assert (scheme, granularity, False) in seen
            assert any(s == (scheme, granularity, "tensor") for s in seen)
        assert (scheme, "channel", "channel") in seen
    assert {("rank", 0, False), ("rank", 1, False), ("rank", 2, True)} <= seen


@pytest.mark.parametrize("shape", [(0, 4), (0, 0, 3), (4, 0)])  # (vectors are stored 8-bit)
def test_sparsity_of_tensors_without_elements(tmp_path, shape):
    """(rwsfmt's writer crashed on channel sparsity of a tensor with shape[0] == 0.)"""
    tensors = {"w": torch.zeros(shape)}
    for sparsity in ("tensor", "channel"):
        config = QuantConfig(bits=1, density=0.5, sparsity=sparsity)
        path = tmp_path / f"{sparsity}.rws"
        rwsfmt.save(rwsfmt.from_tensors(tensors, label="t", quant=config), path)
        assert rwsfmt.load(path).info("w").quant["nnz"] == 0
        _, reference = reference_reader.read(str(path))
        assert reference["w"].shape == shape and read_rwsfmt(path)["w"].shape == shape


# --------------------------------------------------------------------------- older readers


@pytest.mark.parametrize("name", ["int2_sym_channel", "sign_group", "sparse_empty", "mixed_1_2"])
def test_a_reader_without_the_1_2_schemes_asks_to_upgrade(monkeypatch, name):
    """Spec 10 and 13: a pre-1.2 reader (rwsfmt with the 1.2 schemes taken out of its
    registry) refuses a 1.2 entry by its scheme name and asks to upgrade; it still reads
    every 1.0 golden file to the same bits."""
    path = VECTORS / f"{name}.rws"
    expected = read_rwsfmt(path)
    for scheme in NEW_SCHEMES:
        monkeypatch.delitem(SCHEMES, scheme)
    with pytest.raises(
        RwsError, match=r"(?s)unknown quantization scheme '(int2|sign|sparse)'.*upgrade"
    ) as caught:
        rwsfmt.load(path)
    assert not isinstance(caught.value, IntegrityError)  # not damage: a newer file (spec 9)
    with pytest.raises(RwsError, match="upgrade"):
        rwsfmt.verify(path)
    for old in ("sym8_channel", "mixed", "legacy_negzero_scale"):
        assert rwsfmt.verify(VECTORS / f"{old}.rws").ok
        read_rwsfmt(VECTORS / f"{old}.rws")
    monkeypatch.undo()
    assert {k: v.tobytes() for k, v in read_rwsfmt(path).items()} == {
        k: v.tobytes() for k, v in expected.items()
    }


@pytest.mark.parametrize(
    ("scheme", "name", "says"),
    [
        ("int2", "int2_affine_group", "unknown quantization scheme 'int2'"),
        ("sign", "sign_channel", "unknown quantization scheme 'sign'"),
        ("sparse", "sparse_int8_tensor", "unknown quantization scheme 'sparse'"),
        ("sign", "sparse_sign_channel", "unknown scheme 'sign' for the values of a sparse"),
    ],
)
def test_each_1_2_scheme_alone_is_refused_by_name(monkeypatch, scheme, name, says):
    """A reader that lacks one scheme names it, also as the values of a sparse entry, and
    asks to upgrade."""
    monkeypatch.delitem(SCHEMES, scheme)
    with pytest.raises(RwsError, match=rf"(?s){re.escape(says)}.*upgrade") as caught:
        rwsfmt.load(VECTORS / f"{name}.rws")
    assert not isinstance(caught.value, IntegrityError)
