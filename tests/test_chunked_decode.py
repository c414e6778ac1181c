"""Decoding by chunks (`rwsfmt.format.chunked`) gives the bits of decoding whole, for every
scheme, granularity, filter and codec, with chunks that split groups, codes packed within a
byte and channels of sparse tensors at every place; and refuses the same damage."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
import torch
import zstandard

from rwsfmt.container import PayloadReader, TensorInfo, check_payload
from rwsfmt.errors import IntegrityError
from rwsfmt.format import chunked
from rwsfmt.format.schemes import grouped, scheme_of

AFFINE, SYMMETRIC = {"symmetric": False}, {"symmetric": True}
GRANULARITIES = [
    {"granularity": "tensor"},
    {"granularity": "channel", "axis": 0},
    {"granularity": "channel", "axis": 1},
    {"granularity": "channel", "axis": 2},
    {"granularity": "group", "group_size": 1},
    {"granularity": "group", "group_size": 7},
    {"granularity": "group", "group_size": 40},
]
DENSE = (
    [
        ({"scheme": "linear", "bits": b, **sym, **g}, f)
        for b, f in ((4, "none"), (8, "none"), (16, "none"), (16, "byteplane"))
        for sym in (AFFINE, SYMMETRIC)
        for g in GRANULARITIES
    ]
    + [({"scheme": "int2", "bits": 2, **AFFINE, **g}, "none") for g in GRANULARITIES]
    + [({"scheme": "sign", "bits": 1, **g}, "none") for g in GRANULARITIES]
    + [({"scheme": "float", "bits": 32}, f) for f in ("none", "byteplane")]
)
SPARSE_VALUES = [
    {"scheme": "float", "bits": 32},
    {"scheme": "linear", "bits": 8, **AFFINE, "granularity": "channel", "axis": 0},
    {"scheme": "linear", "bits": 4, **SYMMETRIC, "granularity": "group", "group_size": 3},
    {"scheme": "sign", "bits": 1, "granularity": "channel", "axis": 0},
    {"scheme": "int2", "bits": 2, **AFFINE, "granularity": "tensor"},
]
SHAPE = (6, 5, 13)  # 390 elements: odd rows, channels not a multiple of 8


def _payload(quant: dict, shape: tuple, filt: str, rng: np.random.Generator) -> bytearray:
    """A valid random payload: finite floats, scales in (0, 1), zero points 0-200."""
    numel = math.prod(shape)
    head = b""
    if quant["scheme"] == "sparse":
        kept = rng.random(numel) < 0.6
        kept[: shape[1] * shape[2]] = False  # a channel with nothing kept
        kept[-shape[1] * shape[2] :] = True
        quant["nnz"] = int(kept.sum())
        head = np.packbits(kept, bitorder="little").tobytes()
        q, count = quant["values"], quant["nnz"]
    else:
        q, count = quant, numel
    scheme = scheme_of(q)
    if q["scheme"] == "float":
        values = rng.standard_normal(count).astype("<f4").view(np.uint8)
        body = values.reshape(count, 4).T.tobytes() if filt == "byteplane" else values.tobytes()
        return bytearray(head + body)
    groups = scheme.scale_groups(q, shape, count)
    scales = rng.random(groups).astype("<f4")
    scales[:1] = -0.0  # as rwsfmt 0.1.0 wrote for zero rows: reads as +0.0
    body = scales.tobytes()
    if scheme.affine(q):
        body += rng.integers(0, 200, groups).astype("<f4").tobytes()
    length = scheme.payload_length(q, shape, count) - len(body)
    return bytearray(head + body + rng.integers(0, 256, length, dtype=np.uint8).tobytes())


def _info(
    quant: dict, shape: tuple, filt: str, payload: bytearray, codec: str
) -> tuple[TensorInfo, bytes]:
    blob = bytes(payload)
    if codec == "zstd":
        blob = zstandard.ZstdCompressor(write_checksum=True, write_content_size=True).compress(blob)
    info = TensorInfo(
        name="t",
        kind="delta",
        shape=shape,
        dtype="float32",
        quant=quant,
        filter=filt,
        codec=codec,
        offset=0,
        length=len(blob),
        decoded_length=len(payload),
        sha256=hashlib.sha256(blob).hexdigest(),
    )
    return info, blob


@pytest.fixture(params=[8, 24, 1 << 20], ids=["chunk8", "chunk24", "whole-chunk"])
def small_chunks(request, monkeypatch):
    monkeypatch.setattr(chunked, "CHUNK", request.param)
    return request.param


def _cases():
    for quant, filt in DENSE:
        yield dict(quant), filt
    for values in SPARSE_VALUES:
        yield (
            {"scheme": "sparse", "bits": values["bits"], "index": "bitmap", "values": dict(values)},
            "none",
        )


@pytest.mark.parametrize("preload", [0, 1 << 20], ids=["ranges", "preloaded"])
@pytest.mark.parametrize("codec", ["zstd", "raw"])
def test_chunks_decode_to_the_bits_of_the_whole(small_chunks, monkeypatch, preload, codec):
    monkeypatch.setattr(chunked, "PRELOAD", preload)
    rng = np.random.default_rng(small_chunks + preload)
    for quant, filt in _cases():
        payload = _payload(quant, SHAPE, filt, rng)
        info, blob = _info(quant, SHAPE, filt, payload, codec)
        raw = np.frombuffer(payload, np.uint8)
        q = info.quant
        whole = scheme_of(q).decode_numpy(raw, q, SHAPE, info.numel, filt).reshape(-1)
        expected = torch.from_numpy(np.array(whole, copy=True))
        reader = PayloadReader(blob, info, "case.rws")
        got = chunked.decode(reader, info, chunked.Numpy())
        assert np.array_equal(got.view(np.uint32), whole.view(np.uint32)), (quant, filt)
        reader = PayloadReader(blob, info, "case.rws")
        got = chunked.decode(reader, info, chunked.Torch("cpu"))
        assert torch.equal(got.view(torch.int32), expected.view(torch.int32)), (quant, filt)
        chunked.check(PayloadReader(blob, info, "case.rws"), info)


@pytest.mark.parametrize(
    "damage",
    ["nan value", "negative scale", "infinite zero point", "bitmap", "checksum"],
)
def test_chunks_refuse_what_the_whole_refuses(small_chunks, damage):
    rng = np.random.default_rng(3)
    if damage == "nan value":
        quant, filt = {"scheme": "float", "bits": 32}, "byteplane"
    elif damage == "bitmap":
        quant, filt = (
            {"scheme": "sparse", "bits": 8, "index": "bitmap", "values": dict(SPARSE_VALUES[1])},
            "none",
        )
    else:
        quant, filt = (
            {"scheme": "linear", "bits": 8, **AFFINE, "granularity": "group", "group_size": 1},
            "none",
        )
    payload = _payload(quant, SHAPE, filt, rng)
    numel = math.prod(SHAPE)
    if damage == "nan value":
        payload[3 * numel + 200] = 0x7F
        payload[2 * numel + 200] = 0xC0
    elif damage == "negative scale":
        payload[4 * 300 + 3] = 0xBF
    elif damage == "infinite zero point":
        payload[4 * numel + 4 * 300 : 4 * numel + 4 * 301] = np.float32(np.inf).tobytes()
    elif damage == "bitmap":
        payload[20] ^= 0x01
    info, blob = _info(quant, SHAPE, filt, payload, "zstd")
    if damage == "checksum":
        blob = blob[:-1] + bytes([blob[-1] ^ 1])
    else:
        with pytest.raises(IntegrityError) as whole:
            check_payload(payload, info, "case.rws")
        message = str(whole.value).split(": ", 1)[1].split("\n")[0]
    for run in (
        lambda: chunked.decode(PayloadReader(blob, info, "case.rws"), info, chunked.Numpy()),
        lambda: chunked.check(PayloadReader(blob, info, "case.rws"), info),
    ):
        with pytest.raises(IntegrityError) as refused:
            run()
        assert refused.value.fix
        if damage == "checksum":
            assert "zstd" in str(refused.value)
        else:
            assert message in str(refused.value)


@pytest.mark.parametrize(
    "config",
    [
        dict(bits=32),
        dict(bits=16, symmetric=False),
        dict(bits=8),
        dict(bits=8, symmetric=False, granularity="group", group_size=7),
        dict(bits=4, granularity="tensor"),
        dict(bits=4, symmetric=False, granularity="group", group_size=1),
        dict(bits=8, granularity="group", group_size=1000),  # one partial group
        dict(bits=1),
        dict(bits=1, granularity="group", group_size=7),
        dict(bits=1, granularity="tensor", fit="direction"),
        dict(bits=2),
        dict(bits=2, symmetric=False, granularity="group", group_size=7),
        dict(bits=2, granularity="tensor"),
        dict(bits=2, fit="direction"),
        dict(bits=2, symmetric=False, granularity="group", group_size=7, fit="direction"),
        dict(bits=1, granularity="group", group_size=7, fit="direction"),
    ],
    ids=str,
)
@pytest.mark.parametrize("shape", [(6, 5, 13), (390,), (3, 1000)])
@pytest.mark.parametrize("serial", [4, grouped.SERIAL], ids=["serial4", "serial"])
def test_chunked_encoding_writes_the_payload_of_the_whole(monkeypatch, config, shape, serial):
    """A large tensor is encoded by blocks of rows or columns (`quant._encode_chunked`):
    the same payload bytes as at once, and the same error up to float32 rounding; the
    scales' float64 sums (`row_sums`) taken in pieces of `serial` elements or not."""
    from rwsfmt.quant import QuantConfig, encode

    monkeypatch.setattr(grouped, "SERIAL", serial)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 0.01
    x.view(-1)[5] = 0.5  # an outlier, so scales differ per group
    x.view(-1)[7] = -0.3
    whole = encode(x, QuantConfig(**config))
    monkeypatch.setattr(chunked, "WHOLE", 0)
    monkeypatch.setattr(chunked, "CHUNK", 16)
    parts = encode(x, QuantConfig(**config))
    assert (parts.quant, parts.filter) == (whole.quant, whole.filter)
    assert bytes(parts.payload) == bytes(whole.payload)
    assert parts.rel_error == pytest.approx(whole.rel_error, rel=1e-5, abs=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_chunks_decode_on_the_gpu_to_the_bits_of_the_cpu(small_chunks):
    rng = np.random.default_rng(7)
    for quant, filt in _cases():
        payload = _payload(quant, SHAPE, filt, rng)
        info, blob = _info(quant, SHAPE, filt, payload, "zstd")
        cpu = chunked.decode(PayloadReader(blob, info, "case.rws"), info, chunked.Torch("cpu"))
        gpu = chunked.decode(PayloadReader(blob, info, "case.rws"), info, chunked.Torch("cuda"))
        assert torch.equal(gpu.cpu().view(torch.int32), cpu.view(torch.int32)), (quant, filt)
