"""The format's limits that two readers must agree on (spec sections 4 and 9): how deep a
header may nest, and the largest zstd window a frame may ask a decoder to buffer."""

from __future__ import annotations

import hashlib
import struct

import pytest
import reference_reader
import torch
import zstandard

import rwsfmt
from rwsfmt.container import (
    ALIGNMENT,
    MAGIC,
    MAX_DEPTH,
    MAX_ZSTD_WINDOW,
    PREAMBLE,
    PREAMBLE_SIZE,
    TensorInfo,
    build_header,
    canonical_json,
)
from rwsfmt.errors import IntegrityError
from rwsfmt.quant import QuantConfig
from rwsfmt.signature import SignatureBuilder

MiB = 1 << 20


def _file_with_header(path, body: bytes) -> None:
    """A file of no tensors whose header is `body` (JSON), padded, with a valid digest."""
    header = body + b" " * (-(PREAMBLE_SIZE + len(body)) % ALIGNMENT)
    head = PREAMBLE.pack(MAGIC, 1, 0, 0, len(header), 0, b"\0" * 32)[:32]
    path.write_bytes(head + hashlib.sha256(head + header).digest() + header)


def _nested(path, depth: int) -> None:
    """A valid header whose deepest value sits `depth` arrays and objects down (the header
    object and `provenance` are the first two)."""
    lists = depth - 2
    doc = canonical_json({"label": "deep", "provenance": {"n": "X"}, "tensors": []})
    _file_with_header(path, doc.replace(b'"X"', b"[" * lists + b"]" * lists))


@pytest.mark.parametrize("depth", [MAX_DEPTH, MAX_DEPTH + 1, 980])
def test_both_readers_agree_on_the_nesting_limit(tmp_path, depth):
    path = tmp_path / "deep.rws"
    _nested(path, depth)
    if depth <= MAX_DEPTH:
        reference_reader.read(str(path))
        assert rwsfmt.verify(path).ok
        return
    with pytest.raises(reference_reader.Invalid, match="more than 64 deep|recursion"):
        reference_reader.read(str(path))
    with pytest.raises(IntegrityError, match="more than 64 deep") as refused:
        rwsfmt.load(path)
    assert refused.value.fix
    assert not rwsfmt.verify(path).ok


def test_nesting_inside_strings_does_not_count(tmp_path):
    path = tmp_path / "brackets.rws"
    _file_with_header(
        path, canonical_json({"label": '[{"\\[' * 100, "provenance": {}, "tensors": []})
    )
    reference_reader.read(str(path))
    assert rwsfmt.verify(path).ok


def test_frames_over_128_mib_decode_with_a_streaming_decoder(tmp_path):
    """An all-zero tensor just over 128 MiB (libzstd's default streaming window limit):
    rwsfmt writes a frame with a small window, which zstandard's stream_reader decodes."""
    numel = (128 * MiB + 64) // 4
    builder = SignatureBuilder("zeros", QuantConfig(bits=32))
    builder.add("w", torch.zeros(numel))
    path = tmp_path / "zeros.rws"
    rwsfmt.save(builder.build(), path)
    with rwsfmt.load(path) as sig:
        frame = bytes(sig.stored("w"))
        assert sig.info("w").codec == "zstd"
    assert zstandard.get_frame_parameters(frame).window_size <= 2 * MiB
    with zstandard.ZstdDecompressor().stream_reader(frame) as reader:
        total = 0
        while chunk := reader.read(16 * MiB):
            assert not any(chunk)
            total += len(chunk)
    assert total == 4 * numel


def _frame_file(path, frame: bytes, length: int) -> None:
    info = TensorInfo(
        name="w",
        kind="delta",
        shape=(length // 4,),
        dtype="float32",
        quant={"scheme": "float", "bits": 32},
        filter="none",
        codec="zstd",
        offset=0,
        length=len(frame),
        decoded_length=length,
        sha256=hashlib.sha256(frame).hexdigest(),
    )
    preamble, header, _ = build_header({"label": "w", "provenance": {}}, [info])
    path.write_bytes(preamble + header + frame)  # not write_file: the tests' hook verifies it


@pytest.mark.parametrize("window_log", [23, 24])
def test_both_readers_agree_on_the_window_limit(tmp_path, window_log):
    """A frame whose window is the limit (8 MiB) is read; one twice as large is refused by
    both readers, with a fix."""
    length = 16 * MiB
    params = zstandard.ZstdCompressionParameters.from_level(
        19, window_log=window_log, write_checksum=1, write_content_size=1
    )
    frame = zstandard.ZstdCompressor(compression_params=params).compress(bytes(length))
    assert zstandard.get_frame_parameters(frame).window_size == 1 << window_log
    path = tmp_path / "window.rws"
    _frame_file(path, frame, length)
    if 1 << window_log <= MAX_ZSTD_WINDOW:
        reference_reader.read(str(path))
        with rwsfmt.load(path) as sig:
            assert not sig.tensor("w").any()
        return
    with pytest.raises(reference_reader.Invalid, match="window"):
        reference_reader.read(str(path))
    with pytest.raises(IntegrityError, match="16,777,216-byte window, over the format's 8 MiB"):
        with rwsfmt.load(path) as sig:
            sig.tensor("w")
    assert not rwsfmt.verify(path).ok


def test_a_single_segment_frame_over_the_window_is_refused(tmp_path):
    """A single-segment frame's window is its content size: 9 MiB of content is over."""
    length = 9 * MiB
    frame = zstandard.ZstdCompressor(write_checksum=True, write_content_size=True).compress(
        bytes(length)
    )
    descriptor = frame[4]
    if not descriptor & 0x20:  # rewrite as single-segment: drop the window descriptor byte
        fcs = frame[6:10] if descriptor >> 6 == 2 else None
        assert fcs is not None
        frame = frame[:4] + bytes([descriptor | 0x20]) + frame[6:]
    assert zstandard.get_frame_parameters(frame).window_size in (0, length)
    path = tmp_path / "single.rws"
    _frame_file(path, frame, length)
    with pytest.raises(reference_reader.Invalid, match="window"):
        reference_reader.read(str(path))
    with pytest.raises(IntegrityError, match="window"):
        with rwsfmt.load(path) as sig:
            sig.tensor("w")


def test_small_frames_are_unchanged_by_the_window_setting():
    """The pinned window changes nothing for payloads up to 2 MiB (the golden files'
    frames stay byte-identical): the frame is the one level 3 wrote before."""
    from rwsfmt.container import encode_blob

    for payload in (bytes(100), struct.pack("<f", 1.5) * 5000, bytes(range(256)) * 8192):
        old = zstandard.ZstdCompressor(
            level=3, write_checksum=True, write_content_size=True
        ).compress(payload)
        assert encode_blob(payload) == ("zstd", old)
