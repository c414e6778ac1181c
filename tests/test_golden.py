"""The frozen golden files in spec/vectors: a v1.x file must stay readable, to the same bits,
forever. These tests read the committed files; they never regenerate them (except
`test_files_without_new_schemes_are_written_as_before`, which writes into a temporary
folder)."""

from __future__ import annotations

import hashlib
import json
import math
import struct

import jsonschema
import numpy as np
import pytest
import reference_reader
from conftest import SPEC, VECTORS

import rwsfmt

NAMES_1_0 = [
    "sym8_channel",
    "sym16_byteplane",
    "float32_exact",
    "affine4_group",
    "mixed",
    "legacy_negzero_scale",
]
# format 1.2 (spec section 3.7): int2, sign and sparse entries; these files have minor 2
NAMES_1_2 = [
    "int2_sym_channel",
    "int2_affine_group",
    "sign_channel",
    "sign_group",
    "sparse_sign_channel",
    "sparse_int8_tensor",
    "sparse_float32",
    "sparse_empty",
    "mixed_1_2",
]
NAMES = NAMES_1_0 + NAMES_1_2


def _expected(name: str) -> dict:
    return json.loads((VECTORS / f"{name}.expected.json").read_text(encoding="utf-8"))


def _bits(values: list[float]) -> np.ndarray:
    """The float32 bit patterns of the exact values written in an expected.json file."""
    return np.array(values, dtype=np.float64).astype(np.float32).view(np.uint32)


def test_golden_files_are_unchanged():
    lines = (VECTORS / "SHA256SUMS").read_text(encoding="utf-8").splitlines()
    listed = {}
    for line in lines:
        digest, name = line.split()
        listed[name] = digest
        assert hashlib.sha256((VECTORS / name).read_bytes()).hexdigest() == digest, name
    assert {f"{n}.rws" for n in NAMES} | {f"{n}.expected.json" for n in NAMES} == set(listed)


@pytest.mark.parametrize("name", NAMES)
def test_rwsfmt_decodes_golden_values_bit_exactly(name):
    expected = _expected(name)
    with rwsfmt.load(VECTORS / f"{name}.rws") as sig:
        assert set(sig.names) == set(expected)
        for tensor, want in expected.items():
            got = sig.tensor(tensor)
            assert list(got.shape) == want["shape"]
            assert np.array_equal(got.numpy().reshape(-1).view(np.uint32), _bits(want["values"]))


@pytest.mark.parametrize("name", NAMES)
def test_reference_reader_decodes_golden_values_bit_exactly(name):
    expected = _expected(name)
    _, tensors = reference_reader.read(str(VECTORS / f"{name}.rws"))
    assert set(tensors) == set(expected)
    for tensor, want in expected.items():
        assert list(tensors[tensor].shape) == want["shape"]
        assert np.array_equal(tensors[tensor].reshape(-1).view(np.uint32), _bits(want["values"]))


@pytest.mark.parametrize("name", NAMES)
def test_golden_headers_match_the_schema_and_verify(name):
    schema = json.loads((SPEC / "header.schema.json").read_text(encoding="utf-8"))
    header, _ = reference_reader.read(str(VECTORS / f"{name}.rws"))
    jsonschema.Draft202012Validator(schema).validate(header)
    report = rwsfmt.verify(VECTORS / f"{name}.rws")
    version = "1.2" if name in NAMES_1_2 else "1.0"
    assert report.ok and report.version == version and not report.problems


@pytest.mark.parametrize("name", NAMES)
def test_golden_files_have_the_lowest_minor_they_need(name):
    """Spec 1.1 and 10: minor 2 exactly when an entry uses a scheme of section 3.7."""
    data = (VECTORS / f"{name}.rws").read_bytes()
    major, minor, flags = struct.unpack_from("<HHI", data, 8)
    header, _ = reference_reader.read(str(VECTORS / f"{name}.rws"))
    new = {"int2", "sign", "sparse"}
    uses_1_2 = any(e["quant"]["scheme"] in new for e in header["tensors"])
    assert (major, minor, flags) == (1, 2 if name in NAMES_1_2 else 0, 0)
    assert uses_1_2 == (name in NAMES_1_2)


@pytest.mark.parametrize("name", NAMES)
def test_resaving_a_golden_file_gives_the_same_bytes(tmp_path, name):
    """Blobs are copied, the header is canonical: load + save is the identity."""
    source = VECTORS / f"{name}.rws"
    with rwsfmt.load(source) as sig:
        rwsfmt.save(sig, tmp_path / "copy.rws")
    assert (tmp_path / "copy.rws").read_bytes() == source.read_bytes()


def test_golden_files_cover_the_format():
    seen = set()
    for name in NAMES:
        header, _ = reference_reader.read(str(VECTORS / f"{name}.rws"))
        for e in header["tensors"]:
            q = e["quant"]
            seen.add(("bits", q["bits"]))
            seen.update({("kind", e["kind"]), ("codec", e["codec"]), ("filter", e["filter"])})
            seen.add(("granularity", q.get("granularity", "none")))
            seen.add(("symmetric", q.get("symmetric", True)))
            seen.add(("dtype", e["dtype"]))
    for item in [("bits", 4), ("bits", 8), ("bits", 16), ("bits", 32), ("kind", "target")]:
        assert item in seen
    for item in [("codec", "zstd"), ("codec", "raw"), ("filter", "byteplane")]:
        assert item in seen
    for item in [("granularity", "group"), ("granularity", "channel"), ("symmetric", False)]:
        assert item in seen
    assert ("dtype", "float16") in seen and ("dtype", "bfloat16") in seen


def test_golden_files_cover_the_1_2_schemes():
    """Every scheme of section 3.7 in every granularity, raw and zstd; sparse values in each
    inner scheme, per tensor, channel and group, with nnz 0 and zero-element tensors."""
    seen = set()
    for name in NAMES_1_2:
        header, _ = reference_reader.read(str(VECTORS / f"{name}.rws"))
        for e in header["tensors"]:
            q, n = e["quant"], math.prod(e["shape"])
            if q["scheme"] == "sparse":
                v = q["values"]
                seen.add(("sparse", v["scheme"], v.get("granularity"), v.get("symmetric")))
                seen.add(("sparse filter", e["filter"]))
                seen.add(("sparse nnz", "0" if q["nnz"] == 0 else "some"))
                seen.add(("sparse n", "0" if n == 0 else "some"))
                q = v
            seen.add((q["scheme"], q.get("granularity"), q.get("symmetric")))
            seen.add((q["scheme"], e["codec"]))
    for scheme, symmetric in [("int2", True), ("int2", False), ("sign", None)]:
        for granularity in ("tensor", "channel", "group"):
            assert (scheme, granularity, symmetric) in seen
    for scheme in ("int2", "sign"):
        assert (scheme, "raw") in seen and (scheme, "zstd") in seen
    assert ("sparse", "float", None, None) in seen and ("sparse filter", "byteplane") in seen
    for granularity in ("tensor", "channel", "group"):
        assert ("sparse", "linear", granularity, True) in seen
    assert ("sparse", "sign", "channel", None) in seen
    assert ("sparse", "int2", "channel", False) in seen
    assert {("sparse nnz", "0"), ("sparse n", "0"), ("sparse nnz", "some")} <= seen


def test_golden_mixed_file_metadata():
    with rwsfmt.load(VECTORS / "mixed.rws") as sig:
        assert sig.label == "fog"
        assert sig.info("bn1.running_var").kind == "target"
        assert sig.provenance["created"] == "2023-11-14T22:13:20Z"
        assert sig.provenance["corruption"] == "fog" and sig.provenance["severity"] == 5
        assert [i["role"] for i in sig.provenance["inputs"]] == ["std", "robust", "init"]
        shapes = [(i.name, i.shape) for i in sig.infos]
        assert sig.fingerprint["signature"] == rwsfmt.architecture_fingerprint(shapes)


def test_fingerprint_example_from_the_spec():
    fp = rwsfmt.architecture_fingerprint([("b", [2]), ("a", [3, 4])])
    assert fp == "sha256:" + hashlib.sha256(b'[["a",[3,4]],["b",[2]]]').hexdigest()
    assert fp in (SPEC / "rws-format.md").read_text(encoding="utf-8")


def test_legacy_negative_zero_scales_decode_as_positive_zero():
    """rwsfmt 0.1.0 wrote -0.0 scales for all-zero groups (spec 3.6): the golden file holds
    them in three layouts, and both readers decode those groups to +0.0, never -0.0."""
    path = VECTORS / "legacy_negzero_scale.rws"
    _, reference = reference_reader.read(str(path))
    with rwsfmt.load(path) as sig:
        negative_zero_scales = 0
        for info in sig.infos:
            scales = np.frombuffer(sig.payload(info.name), dtype="<u4", count=info.n_scales)
            negative_zero_scales += int((scales == 0x80000000).sum())
            decoded = sig.tensor(info.name).numpy()
            assert (decoded == 0).any() and not np.signbit(decoded[decoded == 0]).any()
            assert decoded.tobytes() == reference[info.name].tobytes()
    assert negative_zero_scales == 4 + 3 + 3
