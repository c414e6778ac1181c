"""The container: layout, header rules, versioning, determinism, atomic writes, limits."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
import time
import tracemalloc

import jsonschema
import numpy as np
import pytest
import reference_reader
import torch
import zstandard
from conftest import SPEC, assemble, small_tensors, split, write_small

import rwsfmt
from rwsfmt.container import MAGIC, RwsReader, write_file
from rwsfmt.errors import IntegrityError, RwsError
from rwsfmt.quant import QuantConfig
from rwsfmt.summary import describe


def _rewrite(path, mutate, **preamble):
    """Re-assemble `path` after `mutate(doc)`, with a valid digest."""
    fields, doc, data = split(path.read_bytes())
    mutate(doc)
    path.write_bytes(assemble(doc, data, **{**fields, **preamble}))


def test_layout_follows_the_spec(small_rws):
    data = small_rws.read_bytes()
    assert data[:8] == MAGIC == b"\x89RWS\r\n\x1a\n"
    major, minor, flags, header_len, data_len = struct.unpack_from("<HHIQQ", data, 8)
    assert (major, minor, flags) == (1, 0, 0)
    assert (64 + header_len) % 64 == 0 and len(data) == 64 + header_len + data_len
    header = data[64 : 64 + header_len]
    assert (
        header.rstrip(b" ")
        == json.dumps(
            json.loads(header), sort_keys=True, separators=(",", ":"), ensure_ascii=False
        ).encode()
    )
    assert len(header) - len(header.rstrip(b" ")) < 64
    offset = 0
    for e in json.loads(header)["tensors"]:
        assert e["offset"] == offset
        offset += e["length"]
    assert offset == data_len


def test_written_headers_match_the_schema(tmp_path):
    schema = json.loads((SPEC / "header.schema.json").read_text(encoding="utf-8"))
    validator = jsonschema.Draft202012Validator(schema)
    for i, quant in enumerate(
        [{}, {"bits": 16}, {"bits": 32}, {"bits": 4, "symmetric": False, "granularity": "group"}]
    ):
        header, _ = reference_reader.read(str(write_small(tmp_path / f"{i}.rws", **quant)))
        validator.validate(header)


def test_same_input_gives_identical_bytes(tmp_path):
    a = write_small(tmp_path / "a.rws")
    b = write_small(tmp_path / "b.rws")
    assert a.read_bytes() == b.read_bytes()


def test_header_only_reads_survive_damaged_data(small_rws):
    data = bytearray(small_rws.read_bytes())
    data[-10:] = bytes(10)  # zero the end of the last blob
    small_rws.write_bytes(data)
    info = describe(small_rws)
    assert [t["name"] for t in info["tensors"]][0] == "features.0.weight"
    with rwsfmt.load(small_rws) as sig:
        assert sig.label == "fog"
        sig.tensor("features.0.weight")  # an intact blob still reads
        with pytest.raises(IntegrityError, match="checksum mismatch in tensor 'bn.running_var'"):
            sig.tensor("bn.running_var")
    assert not rwsfmt.verify(small_rws).ok


def test_newer_major_version_is_refused_with_upgrade_advice(small_rws):
    small_rws.write_bytes(assemble({"tensors": [], "new_layout": True}, b"", major=2))
    with pytest.raises(RwsError) as err:
        rwsfmt.load(small_rws)
    assert not isinstance(err.value, IntegrityError)
    assert "format version 2.0 is not supported" in str(err.value)
    assert "upgrade rwsfmt" in str(err.value)


def test_a_damaged_version_field_is_reported_as_damage(small_rws):
    data = bytearray(small_rws.read_bytes())
    data[8] ^= 0x04  # major 1 -> 5, digest unchanged
    small_rws.write_bytes(data)
    with pytest.raises(IntegrityError, match="version field is damaged"):
        rwsfmt.load(small_rws)


def test_newer_minor_version_with_unknown_fields_is_read(small_rws):
    before = {n: t for n, t in rwsfmt.load(small_rws)._blobs.header.raw.items() if n != "tensors"}

    def add_fields(doc):
        doc["future_top_level"] = {"x": 1}
        for e in doc["tensors"]:
            e["future_field"] = [1, 2]
            e["quant"]["future_quant_key"] = True
            e["stats"]["future_stat"] = 0.5

    _rewrite(small_rws, add_fields, minor=7)
    with rwsfmt.load(small_rws) as sig:
        assert sig.label == before["label"]
        got = sig.tensor("features.0.weight")
    want = rwsfmt.from_tensors(small_tensors(), label="x").tensor("features.0.weight")
    assert torch.equal(got, want)
    assert rwsfmt.verify(small_rws).ok and rwsfmt.verify(small_rws).version == "1.7"
    reference_reader.read(str(small_rws))


def test_unknown_flag_is_refused_and_trailer_flag_needs_a_signature_block(small_rws):
    fields, doc, data = split(small_rws.read_bytes())
    small_rws.write_bytes(assemble(doc, data, flags=2))
    with pytest.raises(RwsError, match="(?s)unknown flags.*upgrade"):
        rwsfmt.load(small_rws)
    small_rws.write_bytes(assemble(doc, data, flags=1) + b"not a signature block")
    reference_reader.read(str(small_rws))  # a 1.0 reader ignores the bytes (spec 1.5) ...
    with pytest.raises(IntegrityError, match="not a signature block"):  # ... 1.1 checks them
        rwsfmt.load(small_rws)
    assert not rwsfmt.verify(small_rws).ok
    small_rws.write_bytes(assemble(doc, data, flags=0) + b"appended")
    with pytest.raises(IntegrityError, match="appended"):
        rwsfmt.load(small_rws)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda e: e.update(shape=[2**40, 2**10]), "more than"),
        (lambda e: e.update(shape=[0, 2**60]), "more than"),
        (lambda e: e.update(shape=[1] * 9), "rank 9"),
        (lambda e: e.update(length=2**62, decoded_length=2**62), "decoded_length"),
        (lambda e: e.update(offset=2**63), "out of range"),
        (lambda e: e.update(decoded_length=2**40), "decoded_length"),
        (lambda e: e.update(name="x" * 1025), "name must be"),
        (lambda e: e["quant"].update(group_size=2**40, granularity="group"), "group_size"),
    ],
)
def test_absurd_sizes_are_refused_before_allocating(small_rws, mutate, message):
    _rewrite(small_rws, lambda doc: mutate(doc["tensors"][0]))
    tracemalloc.start()
    try:
        with pytest.raises(IntegrityError, match=message):
            rwsfmt.load(small_rws)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 10 << 20


def test_decompression_bomb_is_refused_by_the_header_rules(tmp_path):
    # 64 Ki zeros compress to a few bytes; a header claiming 64 G elements for that frame
    # is beyond what any zstd frame of its size can hold
    path = tmp_path / "bomb.rws"
    rwsfmt.save(rwsfmt.from_tensors({"z": torch.zeros(1 << 16)}, label="z"), path)
    _rewrite(
        path, lambda doc: doc["tensors"][0].update(shape=[1 << 36], decoded_length=4 + (1 << 36))
    )
    with pytest.raises(IntegrityError, match="more than a .*zstd frame can hold"):
        rwsfmt.load(path)


def test_unknown_codec_gives_a_clear_error(small_rws):
    _rewrite(small_rws, lambda doc: doc["tensors"][0].update(codec="lz4"))
    with pytest.raises(RwsError, match=r"(?s)unknown codec 'lz4' \(known: zstd, raw\).*upgrade"):
        rwsfmt.load(small_rws)


def _raw_file(path, sig, name, payload: bytes) -> None:
    """`path` holding tensor `name` of `sig` with this payload, raw, with valid checksums."""
    entry = {**sig.info(name).to_json(), "codec": "raw", "length": len(payload)}
    entry["sha256"] = hashlib.sha256(payload).hexdigest()
    path.write_bytes(assemble({"label": "t", "tensors": [entry]}, payload))


@pytest.mark.parametrize(
    ("scale_bits", "accepted"),
    [
        (0x8000_0000, True),  # -0.0, as rwsfmt 0.1.0 wrote zero groups: read as +0.0
        (0x8000_0001, False),  # the smallest negative subnormal
        (0xBF80_0000, False),  # -1.0
        (0x7F80_0000, False),  # +inf
        (0x7FC0_0000, False),  # NaN
        (0x7B80_0000, True),  # 2**120: code 0 decodes to -128 * 2**120 = -2**127, finite
        (0x7C00_0000, False),  # 2**121: code 0 would decode to -2**128 = -inf
    ],
)
def test_scale_rules_with_valid_checksums(tmp_path, scale_bits, accepted):
    """Spec 3.6, in both readers: which scales a payload may hold, and how -0.0 decodes."""
    path = tmp_path / "scale.rws"
    sig = rwsfmt.from_tensors({"x": torch.randn(4, 4)}, label="t")
    payload = bytearray(sig.payload("x"))
    payload[0:4] = struct.pack("<I", scale_bits)  # the scale of row 0
    _raw_file(path, sig, "x", bytes(payload))
    assert rwsfmt.verify(path).ok is accepted
    if not accepted:
        with pytest.raises(IntegrityError, match="scale"):
            rwsfmt.load(path).tensor("x")
        with pytest.raises(reference_reader.Invalid):
            reference_reader.read(str(path))
        return
    got = rwsfmt.load(path).tensor("x").numpy()
    _, reference = reference_reader.read(str(path))
    assert got.tobytes() == reference["x"].tobytes()
    assert np.isfinite(got).all()
    if scale_bits == 0x8000_0000:  # (u - zp) * +0.0: +0.0 for u >= zp, -0.0 below
        codes = np.frombuffer(bytes(payload), np.uint8)[16:20]
        want = np.where(codes < 128, np.float32(-0.0), np.float32(0.0))
        assert got[0].view(np.uint32).tolist() == want.view(np.uint32).tolist()


def test_affine_zero_points_that_decode_past_float32_are_refused(tmp_path):
    path = tmp_path / "zp.rws"
    affine = QuantConfig(symmetric=False)
    sig = rwsfmt.from_tensors({"x": torch.randn(2, 8)}, label="t", quant=affine)
    payload = bytearray(sig.payload("x"))
    payload[0:4] = struct.pack("<f", 1e36)  # scale of row 0
    payload[8:12] = struct.pack("<f", 1e3)  # its zero point: code 0 decodes to -1e39
    _raw_file(path, sig, "x", bytes(payload))
    assert not rwsfmt.verify(path).ok
    with pytest.raises(IntegrityError, match="beyond the float32 range"):
        rwsfmt.load(path).tensor("x")
    with pytest.raises(reference_reader.Invalid):
        reference_reader.read(str(path))


@pytest.mark.parametrize(
    ("number", "accepted"),
    [
        (10**308, True),
        (int(sys.float_info.max), True),
        (int(sys.float_info.max) + 2**969, True),  # rounds down to the largest binary64
        (2**1024 - 2**970, False),  # halfway: rounds to even, which is infinity
        (-(10**400), False),
        (10**5000, False),  # past Python's 4,300-digit int() limit too
    ],
    ids=["1e308", "max", "max+", "halfway", "-1e400", "1e5000"],
)
def test_header_integers_must_fit_binary64(small_rws, number, accepted):
    """Spec section 9, rule 9: an integer that rounds to infinity is refused like 1e999, by
    both readers, wherever it sits (here in the provenance)."""
    limit = sys.get_int_max_str_digits()
    sys.set_int_max_str_digits(0)  # to write 10**5000; the readers run with the usual limit
    try:
        _rewrite(small_rws, lambda doc: doc["provenance"].update(size=number))
    finally:
        sys.set_int_max_str_digits(limit)
    assert _verdicts(small_rws) == (accepted, accepted)
    if not accepted:
        with pytest.raises(IntegrityError, match="overflows binary64"):
            rwsfmt.load(small_rws)


def _verdicts(path) -> tuple[bool, bool]:
    """(rwsfmt accepts, reference reader accepts) for the whole file."""
    try:
        reference_reader.read(str(path))
        theirs = True
    except reference_reader.Invalid:
        theirs = False
    return rwsfmt.verify(path).ok, theirs


@pytest.mark.parametrize("damage", ["checksum", "block"])
def test_empty_tensor_in_a_damaged_zstd_frame_is_refused(tmp_path, damage):
    """A frame declaring 0 bytes must still be decoded to its end (blocks and checksum)."""
    frame = bytearray(zstandard.ZstdCompressor(write_checksum=True).compress(b""))
    frame[-1 if damage == "checksum" else -5] ^= 0x10
    path = tmp_path / "empty.rws"
    sig = rwsfmt.from_tensors({"e": torch.zeros(0, 3)}, label="t")
    entry = {**sig.info("e").to_json(), "codec": "zstd", "length": len(frame)}
    entry["sha256"] = hashlib.sha256(frame).hexdigest()
    path.write_bytes(assemble({"label": "t", "tensors": [entry]}, bytes(frame)))
    assert _verdicts(path) == (False, False)
    frame[-1 if damage == "checksum" else -5] ^= 0x10  # undamaged: both accept
    entry["sha256"] = hashlib.sha256(frame).hexdigest()
    path.write_bytes(assemble({"label": "t", "tensors": [entry]}, bytes(frame)))
    assert _verdicts(path) == (True, True)


def test_missing_tensors_and_devices_are_rws_errors(small_rws):
    with rwsfmt.load(small_rws) as sig:
        assert "fc.weight" in sig and "nope" not in sig
        with pytest.raises(RwsError, match=r"(?s)no tensor 'nope' in signature 'fog'.*fix:"):
            sig.tensor("nope")
        with pytest.raises(RwsError, match="no tensor 'nope'") as err:
            sig.info("nope")
        assert err.value.path == str(small_rws)
        with pytest.raises(RwsError, match="unknown device"):
            sig.tensor("fc.weight", device="tpu")
        if not torch.cuda.is_available():
            with pytest.raises(RwsError, match="(?s)CUDA is not available.*fix:"):
                sig.tensor("fc.weight", device="cuda")


def test_interrupted_write_leaves_no_file_and_keeps_the_old_one(tmp_path, small_rws):
    sig = rwsfmt.load(small_rws)
    calls = []

    def failing(info):
        calls.append(info.name)
        if len(calls) == 2:
            raise RuntimeError("disk on fire")
        return sig.stored(info.name)

    target = tmp_path / "new.rws"
    with pytest.raises(RuntimeError):
        write_file(target, sig.meta, sig.infos, failing)
    assert not target.exists()
    before = small_rws.read_bytes()
    calls.clear()
    with pytest.raises(RuntimeError):
        write_file(small_rws, sig.meta, sig.infos, failing)
    assert small_rws.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["small.rws"]  # no temporary file left


def test_killed_writer_never_damages_the_target(tmp_path, small_rws):
    """A writer process killed mid-write (SIGKILL: no cleanup at all) leaves the old file."""
    before = small_rws.read_bytes()
    started = tmp_path / "started"
    script = textwrap.dedent(
        f"""
        import pathlib, time
        import rwsfmt
        from rwsfmt.container import write_file
        sig = rwsfmt.load({str(small_rws)!r})
        def slow(info):
            pathlib.Path({str(started)!r}).touch()
            time.sleep(60)
            return sig.stored(info.name)
        write_file({str(small_rws)!r}, sig.meta, sig.infos, slow)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 60
        while not started.exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert small_rws.read_bytes() == before
    assert rwsfmt.verify(small_rws).ok


def test_reader_reports_missing_and_wrong_files(tmp_path):
    with pytest.raises(RwsError, match="no such file"):
        RwsReader(tmp_path / "missing.rws")
    with pytest.raises(RwsError, match="is a folder"):
        RwsReader(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", 2) + b"{}")
    with pytest.raises(RwsError, match="looks like a safetensors file"):
        RwsReader(tmp_path / "model.safetensors")
    crlf = tmp_path / "crlf.rws"
    crlf.write_bytes(b"\x89RWS\n\x1a\n" + bytes(100))
    with pytest.raises(IntegrityError, match="text-mode transfer"):
        RwsReader(crlf)
