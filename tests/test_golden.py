"""The frozen golden files in spec/vectors: a v1.x file must stay readable, to the same bits,
forever. These tests read the committed files; they never regenerate them (except
`test_files_without_new_schemes_are_written_as_before`, which writes into a temporary
folder)."""

from __future__ import annotations

import copy
import hashlib
import importlib.util
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


# ---------------------------------------------------------------------------- 1.0 writers

# What rwsfmt wrote for each 1.0 generator before format 1.2 (commit 7a43ad4), as SHA-256 of
# (the header without what zstd's output, the float32 error norm or the release decide:
# the blob fields `codec`, `length`, `offset`, `sha256`, `stats.quant_rel_error` and
# `provenance.tool_version`; the decoded payloads of every tensor, concatenated)
BEFORE_1_2 = {
    "sym8_channel": (
        "581a19f68a03f24489deb8a740fe7e0ff336bfee8b75f760f33a27c88fba6646",
        "ef448779d81b5b94ce977b0a389f84fbb966f148f2766c44a38682ed5e4fc551",
    ),
    "sym16_byteplane": (
        "f2d184308661792f0e9eac8ab2ce12c7152e93a872fcd5f60da1e8ab2cf8c599",
        "f3c0dedab214f99d939dc01c4ede6ecfbdd23eb0a608bf47e280d92fe36d217c",
    ),
    "float32_exact": (
        "45f6c9ce7bc6de79a69a8169f4d3bc1c7bcf3755f361d7521b8f00dc3c94ae36",
        "7d91df5048b747a5423d576b0da826f2ba8bf705d5066696dc8462e8c242764b",
    ),
    "affine4_group": (
        "2264a723c83c152e116d6772fc00d9ccb978ed136cb79f3e31eb908358a614a7",
        "6c1547654afb4b8a95ead0f34d1396e388607e21c42b888a58835e0beb28b778",
    ),
    "mixed": (
        "bb2afe987461c178d4469dfe6a49259cd3d5664519be9a1e79af9cb4998958b9",
        "c32e4511bf9b54e7c3f4657aff16b33823bea102fd8b26bcced554177b9d15ba",
    ),
    "legacy_negzero_scale": (
        "469bace18e6622b364c3c799dda704c1624e00db873f20199d1af5737bd97e19",
        "90cc55d92cdeaf244203f5360b4c29e1788e825bd9320ce062e8ed8bc4b9d10f",
    ),
}
# and the `stats.quant_rel_error` it recorded for each tensor (the float32 error norm)
QUANT_REL_ERROR_BEFORE_1_2 = {
    "sym8_channel": {
        "features.0.weight": 0.005494897671194415,
        "features.0.bias": 0.0033142448552375076,
    },
    "sym16_byteplane": {
        "layer.weight": 1.9543327347817837e-05,
        "layer.bias": 1.960526505419053e-05,
    },
    "float32_exact": {
        "w": 0.0,
        "b": 0.0,
    },
    "affine4_group": {
        "conv.weight": 0.06651854084797801,
        "positive": 0.025967720780829158,
    },
    "mixed": {
        "conv1.weight": 0.004339997085440472,
        "bn1.weight": 0.0021335199766406333,
        "bn1.bias": 0.0029507505646010047,
        "bn1.running_mean": 0.0,
        "bn1.running_var": 0.0,
        "fc.weight": 0.004612879103685495,
        "fc.bias": 0.0015360937044559524,
        "scale": 0.0,
        "empty": 0.0,
    },
    "legacy_negzero_scale": {
        "conv.weight": 0.0052378541880224675,
        "fc.weight": 0.08659426546973208,
        "proj.weight": 1.4571535307988342e-05,
    },
}
# the golden files these generators made are the writer's output today, byte for byte (the
# others were made before revision 2 changed how the writer rounds scales: their values
# differ from today's writer's, and readers must still decode them to the frozen values)
UNCHANGED_SINCE_FROZEN = ("float32_exact", "legacy_negzero_scale")


def _generate_module(monkeypatch):
    """spec/vectors/generate.py as a module (it sets SOURCE_DATE_EPOCH: undone afterwards)."""
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    spec = importlib.util.spec_from_file_location("rws_generate", VECTORS / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _normalized(data: bytes) -> tuple[str, str, dict]:
    """(digest of the header without blob fields, digest of the payloads, header)."""
    doc, data_offset = reference_reader.parse(data)
    payloads = hashlib.sha256()
    for e in doc["tensors"]:
        start = data_offset + e["offset"]
        blob = data[start : start + e["length"]]
        raw = blob if e["codec"] == "raw" else reference_reader._unzstd(blob, e["decoded_length"])
        payloads.update(raw)
    header = copy.deepcopy(doc)
    for e in header["tensors"]:
        for key in ("codec", "length", "offset", "sha256"):
            del e[key]
        e["stats"].pop("quant_rel_error", None)
    header["provenance"].pop("tool_version", None)
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest(), payloads.hexdigest(), doc


@pytest.mark.parametrize("name", NAMES_1_0)
def test_files_without_new_schemes_are_written_as_before(tmp_path, monkeypatch, name):
    """Spec 10 and 13: a file that uses no scheme of 1.2 is still a 1.0 file (minor 0), with
    the header and payloads rwsfmt wrote before 1.2; both readers decode it alike."""
    generate = _generate_module(monkeypatch)
    path = tmp_path / f"{name}.rws"
    rwsfmt.save(getattr(generate, name)(), path)
    data = path.read_bytes()
    assert struct.unpack_from("<HHI", data, 8) == (1, 0, 0)
    header_digest, payload_digest, doc = _normalized(data)
    assert (header_digest, payload_digest) == BEFORE_1_2[name]
    errors = {e["name"]: e["stats"].get("quant_rel_error") for e in doc["tensors"]}
    assert errors == QUANT_REL_ERROR_BEFORE_1_2[name]
    assert not {e["quant"]["scheme"] for e in doc["tensors"]} & {"int2", "sign", "sparse"}
    _, reference = reference_reader.read(str(path))
    with rwsfmt.load(path) as sig:
        for tensor in sig.names:
            assert sig.tensor(tensor).numpy().tobytes() == reference[tensor].tobytes()
    frozen = (VECTORS / f"{name}.rws").read_bytes()
    if name in UNCHANGED_SINCE_FROZEN:
        expected = _expected(name)
        for tensor, want in expected.items():
            assert np.array_equal(
                reference[tensor].reshape(-1).view(np.uint32), _bits(want["values"])
            )
        if _normalized(frozen)[2]["tensors"] == doc["tensors"]:  # same zstd output: same bytes
            assert data == frozen
