"""Damaged and malformed files: every flipped bit and every truncation is caught, and random
edits or hostile-but-checksummed headers raise only RwsError, never hang, never crash."""

from __future__ import annotations

import hashlib
import struct

import pytest
import reference_reader
from conftest import assemble, split, write_small
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rwsfmt
from rwsfmt.errors import IntegrityError, RwsError
from rwsfmt.summary import describe
from rwsfmt_cli.inspect import render


def _read_everything(path) -> None:
    """Everything a user can do with a file: inspect it, load it, decode every tensor."""
    render(describe(path))
    with rwsfmt.load(path) as sig:
        for name in sig.names:
            sig.tensor(name)


def _accepted(path) -> bool:
    """rwsfmt's verdict; anything but RwsError propagates and fails the test."""
    try:
        _read_everything(path)
    except RwsError:
        return False
    return True


def _reference_accepts(path) -> bool:
    try:
        reference_reader.read(str(path))
    except reference_reader.Invalid:
        return False
    return True


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    path = write_small(tmp_path_factory.mktemp("pristine") / "small.rws")
    data = path.read_bytes()
    assert 1000 <= len(data) <= 2500, len(data)
    return data


def test_every_single_bit_flip_is_caught(tmp_path, pristine, capsys):
    path = tmp_path / "flipped.rws"
    missed = []
    for bit in range(8 * len(pristine)):
        data = bytearray(pristine)
        data[bit // 8] ^= 1 << (bit % 8)
        path.write_bytes(data)
        report = rwsfmt.verify(path)  # raises nothing: damage is reported
        if report.ok:
            missed.append(("verify", bit))
        with pytest.raises(RwsError):
            with rwsfmt.load(path) as sig:
                for name in sig.names:
                    sig.tensor(name)
        if _reference_accepts(path):
            missed.append(("reference", bit))
    assert not missed


def test_every_truncation_is_rejected(tmp_path, pristine):
    path = tmp_path / "cut.rws"
    for size in range(len(pristine)):
        path.write_bytes(pristine[:size])
        if size:  # an empty file is "not a .rws file" (exit 2), the rest is damage (exit 1)
            assert not rwsfmt.verify(path).ok
        with pytest.raises(RwsError):
            _read_everything(path)
        assert not _reference_accepts(path)


@settings(max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    edits=st.lists(
        st.tuples(
            st.sampled_from(["set", "insert", "delete"]),
            st.integers(0, 4095),
            st.integers(0, 255),
        ),
        min_size=1,
        max_size=6,
    )
)
def test_random_byte_edits_raise_only_rws_errors(tmp_path, pristine, edits):
    data = bytearray(pristine)
    for op, where, value in edits:
        where %= len(data) + 1
        if op == "insert":
            data[where:where] = bytes([value])
        elif where < len(data):
            if op == "set":
                data[where] = value
            else:
                del data[where]
    path = tmp_path / "edited.rws"
    path.write_bytes(data)
    ok = _accepted(path)
    assert ok == _reference_accepts(path)
    try:
        report = rwsfmt.verify(path)
    except RwsError:
        return
    assert report.ok == ok


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8)
    | st.sampled_from([0, 1, 4, 8, 16, 32, -1, 2**48, 2**62, "linear", "float", "zstd", "raw"]),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=8,
)


def _paths(doc, prefix=()):
    """Every (container, key) location in a JSON document."""
    out = []
    items = (
        doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else []
    )
    for key, value in items:
        out.append((prefix, key))
        out.extend(_paths(value, (*prefix, key)))
    return out


def _at(doc, prefix):
    for key in prefix:
        doc = doc[key]
    return doc


@settings(max_examples=250, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_checksummed_header_mutations_raise_only_rws_errors(tmp_path, pristine, data):
    """Headers that pass the digest but break the rules: validation must catch them, with
    the same verdict as the reference reader written from the spec."""
    fields, doc, blobs = split(pristine)
    for _ in range(data.draw(st.integers(1, 3))):
        locations = _paths(doc)
        prefix, key = data.draw(st.sampled_from(locations))
        parent = _at(doc, prefix)
        action = data.draw(st.sampled_from(["replace", "delete", "add", "tweak"]))
        if action == "delete":
            del parent[key]
        elif action == "add" and isinstance(parent, dict):
            parent[data.draw(st.text(max_size=10))] = data.draw(JSON_VALUES)
        elif (
            action == "tweak" and isinstance(parent[key], int) and not isinstance(parent[key], bool)
        ):
            parent[key] += data.draw(st.sampled_from([-1, 1, -8, 8, 2**32]))
        else:
            parent[key] = data.draw(JSON_VALUES)
    path = tmp_path / "mutated.rws"
    path.write_bytes(assemble(doc, blobs, **fields))
    assert _accepted(path) == _reference_accepts(path)
    try:
        rwsfmt.verify(path)
    except RwsError:
        pass


@settings(max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=40) | st.binary(max_size=40).map(lambda b: b.decode("latin-1")))
def test_arbitrary_header_text_is_an_integrity_error(tmp_path, pristine, text):
    """Any header text with a valid digest but no valid tensor list is damage, not a crash."""
    _, _, blobs = split(pristine)
    body = text.encode("utf-8", "surrogatepass")
    header = body + b" " * (-(64 + len(body)) % 64)
    head = b"\x89RWS\r\n\x1a\n" + struct.pack("<HHIQQ", 1, 0, 0, len(header), len(blobs))
    path = tmp_path / "text.rws"
    path.write_bytes(head + hashlib.sha256(head + header).digest() + header + blobs)
    with pytest.raises(IntegrityError, match="header|tensors"):
        rwsfmt.load(path)
    assert not _reference_accepts(path)
