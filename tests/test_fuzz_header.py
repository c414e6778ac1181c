"""Re-signed header mutations (issue #8, item 7): edit the header JSON of small valid files,
recompute the header digest (and, for the `frames` and `payload` families, the blob's
SHA-256) so the edit gets past the checksums, and require for every case:

- rwsfmt (load + decode every tensor, verify, and `rwsfmt inspect`, which runs
  `rwsfmt.summary.describe`) raises nothing but `RwsError`, and the CLI exits 0 or 2 with no
  traceback (0 exactly when the header can be read);
- the reference reader written from the spec raises nothing but `Invalid`, and it and rwsfmt
  agree: both refuse, or both accept with identical float32 bits for every tensor;
- accepted tensors hold finite values only;
- every case ends in bounded time, and a sample of them in bounded memory.

The campaign is deterministic (one seeded `random.Random`), so the case count is fixed. The
bases include every scheme of format 1.2 (int2, sign, sparse), which the `new_quant` and
`payload` families edit, and `test_targeted_1_2_mutations` applies every edit of a fixed
table of the 1.2 fields and payload numbers to them.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import random
import signal
import struct
import time
import tracemalloc
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import reference_reader
import torch
import zstandard
from click.testing import CliRunner
from conftest import assemble, split

import rwsfmt
from rwsfmt.container import VerifyReport
from rwsfmt.quant import QuantConfig
from rwsfmt.signature import SignatureBuilder
from rwsfmt_cli.main import main as cli

CASES = 10_000
SEED = 20_240_807
TABLE_EVERY = 10  # `inspect --json` runs on every case, `inspect` (tables) on every 10th
MEMORY_EVERY = 40  # tracemalloc watches every 40th case (it slows allocation down)
CASE_LIMIT_S = 5.0  # a case running this long is a hang
MAX_CASE_S = 2.0  # measured: at most 0.2 s on a loaded 2-core machine (first table render)
# Python-level allocations while reading one file of a few KB, all readers together: about
# 3.5 MiB measured, mostly the frames declaring 1.7 MiB (the spec's ratio bound lets a blob
# of n bytes claim 32,768 n); a reader trusting a header's sizes would show gigabytes
MAX_PEAK_BYTES = 16 << 20

LINEAR = [
    {"bits": b, "symmetric": s, "granularity": g, "group_size": 8}
    for b in (4, 8, 16)
    for s in (True, False)
    for g in ("tensor", "channel", "group")
]
# format 1.2 (spec 3.7): int2, sign, and sparse entries with values in every inner scheme
NEW_SETTINGS = [
    {"bits": 2, "symmetric": True, "granularity": "channel"},
    {"bits": 2, "symmetric": False, "granularity": "group", "group_size": 8},
    {"bits": 1, "granularity": "channel"},
    {"bits": 1, "granularity": "group", "group_size": 8},
    {"bits": 1, "density": 0.1, "sparsity": "channel"},
    {"bits": 2, "symmetric": False, "granularity": "tensor", "density": 0.3},
    {"bits": 8, "granularity": "group", "group_size": 8, "density": 0.2},
    {"bits": 32, "density": 0.3},
    {"bits": 16, "symmetric": False, "density": 0.5, "sparsity": "channel"},
]
SETTINGS = [{"bits": 32}, *LINEAR, *NEW_SETTINGS]
NEW_SCHEMES = ("int2", "sign", "sparse")
FLT_MAX = float(np.finfo(np.float32).max)

# JSON values no writer produces: huge, negative, fractional and boolean numbers, wrong types,
# rich markup, control and bidi characters, long strings, deep nesting
HUGE = 10**400
WEIRD: list = [
    HUGE, -HUGE, 10**308, 2**64, 2**62 + 1, 2**62, 2**48 + 1, 2**31 + 1, 2**31, -1, 0, 1, 3, 7,
    8.0, 0.5, -0.0, 1e308, -1e308, 5e-324, 1e-40, True, False, None, "", "8", "[/x]",
    "[bold red]x[/]", "\u202e\x00\x1b[31m", "x" * 3000, [], [1], [[2, 3]], {}, {"[/x]": HUGE},
    json.loads("[" * 200 + "]" * 200),
]  # fmt: skip
DELTAS = [-1, 1, -4, 4, -64, 64, 2**32, -(2**32), HUGE]


# --------------------------------------------------------------------------- base files


PROVENANCE = {
    "method": "project",
    "layers": 2,
    "include": ["conv"],
    "exclude": [],
    "selection": {"depth_order": "checkpoint"},
    "inputs": [
        {"role": "std", "name": "std.pt", "size": 1234, "sha256": "ab" * 32},
        {"role": "robust", "name": "fog.pt", "size": 99, "sha256": "cd" * 32},
    ],
    "components": [{"label": "fog", "weight": 0.5, "sha256": "ef" * 32}],
    "merge": {"method": "mean"},
    "corruption": "fog",
    "severity": 5,
    "dataset": "digits-32",
    "meta": {"note": "fuzz base"},
}


def _base_signature(setting: dict, seed: int) -> rwsfmt.Signature:
    """Several tensors of every shape class, stored with `setting`, with stats and provenance:
    random (raw blobs), smooth and zero (zstd frames), a dead channel, a scalar, an empty
    tensor and a target."""
    g = torch.Generator().manual_seed(seed)
    builder = SignatureBuilder(f"base{seed}", QuantConfig(**setting))
    conv = 0.05 * torch.randn(8, 3, 3, 3, generator=g)
    conv[3] = 0
    builder.add("conv.weight", conv, stats={"rel_norm": 0.1, "cos_base": 0.5})
    builder.add("fc.weight", torch.randn(5, 7, generator=g), dtype=torch.float16)
    builder.add("smooth", torch.linspace(-1, 1, 64).repeat(6, 1))
    builder.add("zeros", torch.zeros(4, 33))
    builder.add("bias", 0.01 * torch.randn(8, generator=g))
    builder.add("scale", torch.tensor(0.75))
    builder.add("empty", torch.zeros(0, 5))
    builder.add("bn.running_var", torch.rand(8, generator=g) + 0.5, kind="target")
    return builder.build(provenance=PROVENANCE, model_fingerprint="sha256:" + "0" * 64)


def _blobs(data: bytes) -> tuple[dict, dict, list[bytes]]:
    """(preamble fields, header, one blob per entry) of a valid file."""
    fields, doc, section = split(data)
    return fields, doc, [section[e["offset"] : e["offset"] + e["length"]] for e in doc["tensors"]]


def _relayout(doc: dict, blobs: list[bytes]) -> None:
    """Make entries describe `blobs` again: lengths, checksums and contiguous offsets."""
    offset = 0
    for entry, blob in zip(doc["tensors"], blobs, strict=True):
        entry.update(offset=offset, length=len(blob), sha256=hashlib.sha256(blob).hexdigest())
        offset += len(blob)


def _empty_as_zstd(data: bytes) -> bytes:
    """A valid variant a writer may produce: the empty tensor stored as a zstd frame."""
    fields, doc, blobs = _blobs(data)
    index = [e["name"] for e in doc["tensors"]].index("empty")
    blobs[index] = zstandard.ZstdCompressor(write_checksum=True).compress(blobs[index])
    doc["tensors"][index]["codec"] = "zstd"
    _relayout(doc, blobs)
    return assemble(doc, b"".join(blobs), **fields)


def _negative_zero_scales(data: bytes) -> bytes:
    """A file as rwsfmt 0.1.0 wrote it on big tensors: zero-group scales stored as -0.0
    (for the 1.2 schemes, which 0.1.0 never wrote, a valid file all the same: spec 3.6)."""
    fields, doc, blobs = _blobs(data)
    patched = 0
    for i, entry in enumerate(doc["tensors"]):
        start, groups, _ = _numbers(entry)
        payload = np.frombuffer(_payload_of(entry, blobs[i]), np.uint8).copy()
        scales = payload[start : start + 4 * groups].view("<u4")
        patched += int((scales == 0).sum())
        scales[scales == 0] = 0x8000_0000
        blobs[i] = _stored(entry, payload.tobytes())
    assert patched
    _relayout(doc, blobs)
    return assemble(doc, b"".join(blobs), **fields)


def _payload_of(entry: dict, blob: bytes) -> bytes:
    """The payload of a blob (zstd frames decompressed)."""
    return zstandard.ZstdDecompressor().decompress(blob) if entry["codec"] == "zstd" else blob


def _stored(entry: dict, payload: bytes) -> bytes:
    """The blob holding `payload` with the entry's codec (a new frame with a checksum)."""
    if entry["codec"] == "zstd":
        return zstandard.ZstdCompressor(write_checksum=True).compress(payload)
    return payload


def _numbers(entry: dict) -> tuple[int, int, bool]:
    """(byte offset of the scales in the payload, number of scales, zero points stored) of a
    valid entry: after the bitmap for a sparse entry (spec 3.1, 3.7). Raises Invalid."""
    shape, q = entry["shape"], entry["quant"]
    n, start = math.prod(shape), 0
    if isinstance(q, dict) and q.get("scheme") == "sparse":
        n, q = reference_reader._sparse(q, shape, n)[0], q["values"]
        start = (math.prod(shape) + 7) // 8
    groups, _, symmetric = reference_reader._quant(q, shape, n)
    return start, groups, not symmetric


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> list[bytes]:
    folder = tmp_path_factory.mktemp("bases")
    out = []
    for seed, setting in enumerate(SETTINGS):
        path = folder / f"{seed}.rws"
        rwsfmt.save(_base_signature(setting, seed), path)
        out.append(path.read_bytes())
    out.append(_negative_zero_scales(out[SETTINGS.index(NEW_SETTINGS[2])]))  # sign, channel
    out.append(_negative_zero_scales(out[SETTINGS.index(NEW_SETTINGS[4])]))  # sparse sign
    out.append(_empty_as_zstd(out[1]))
    out.append(_negative_zero_scales(out[SETTINGS.index(LINEAR[4])]))  # 4 bits, affine, channel
    out.append(_negative_zero_scales(out[SETTINGS.index(LINEAR[7])]))  # 8 bits, sym., channel
    for i, data in enumerate(out):  # valid, and every codec present
        _, doc, _ = _blobs(data)
        assert {e["codec"] for e in doc["tensors"]} == {"raw", "zstd"}
        assert 1000 < len(data) < 6000
        path = folder / f"check{i}.rws"
        path.write_bytes(data)
        assert rwsfmt.verify(path).ok
        reference_reader.read(str(path))
    return out


# --------------------------------------------------------------------------- mutations


def _weird(rng: random.Random) -> object:
    return copy.deepcopy(rng.choice(WEIRD))


def _set(rng: random.Random, target: dict, key: str, choices: list) -> str:
    """Set, delete or weirdly replace `target[key]`; returns a description."""
    roll = rng.random()
    if roll < 0.15:
        target.pop(key, None)
        return f"del {key}"
    value = _weird(rng) if roll < 0.55 else copy.deepcopy(rng.choice(choices))
    target[key] = value
    return f"{key}={_short(value)}"


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _decoded_length(shape: list, quant: dict) -> int | None:
    """The spec's decoded_length for a shape and quant (None when either is invalid)."""
    if not all(type(d) is int and d >= 0 for d in shape):
        return None
    try:
        return reference_reader._payload_length(quant, shape, math.prod(shape))
    except reference_reader.Invalid:
        return None


def _pick(rng: random.Random, doc: dict) -> dict:
    """A random entry that is still an object (a stand-in when earlier edits left none)."""
    entries = [e for e in doc["tensors"] if isinstance(e, dict)]
    return rng.choice(entries) if entries else {}


def _parallel(doc: dict, blobs: list[bytes]) -> bool:
    """Whether entries and blobs still pair up, so blobs can be moved with their entries."""
    entries = doc["tensors"]
    return len(entries) == len(blobs) and all(
        isinstance(e, dict) and isinstance(e.get("name"), str) for e in entries
    )


def _maybe_resize(rng: random.Random, entry: dict) -> str:
    """Half the time, recompute decoded_length so that only the edited field is wrong."""
    if rng.random() < 0.5 and isinstance(entry.get("shape"), list):
        length = _decoded_length(entry["shape"], entry.get("quant"))
        if length is not None:
            entry["decoded_length"] = length
            return f" +decoded_length={length}"
    return ""


def _random_quant(rng: random.Random) -> dict:
    if rng.random() < 0.2:
        return {"scheme": "float", "bits": 32}
    scheme = rng.choice(["linear", "linear", "int2", "sign"])
    bits = {"int2": 2, "sign": 1}.get(scheme) or rng.choice([4, 8, 16])
    q = {"scheme": scheme, "bits": bits}
    if scheme != "sign":
        q["symmetric"] = rng.random() < 0.5
    q["granularity"] = rng.choice(["tensor", "channel", "group"])
    if q["granularity"] == "channel":
        q["axis"] = rng.choice([0, 1])
    if q["granularity"] == "group":
        q["group_size"] = rng.choice([1, 2, 3, 8, 13, 64, 2**31])
    return q


def _solve(size: Callable[[int], int | None], target: int) -> int | None:
    """The n with size(n) == target, for a size that does not decrease with n."""
    lo, hi = 0, 8 * target + 8
    while lo < hi:
        mid = (lo + hi) // 2
        value = size(mid)
        if value is not None and value >= target:
            hi = mid
        else:
            lo = mid + 1
    return lo if size(lo) == target else None


def _reinterpret(rng: random.Random, entry: dict) -> str:
    """A new quant and shape with the same decoded_length: the blob stays valid and its bytes
    are read another way (scales from values, floats from codes, ...)."""
    target = entry["decoded_length"]
    for _ in range(8):
        quant = _random_quant(rng)
        rows = rng.choice([1, 2, 3, 4, 8]) if quant.get("axis") is not None else None
        if quant.get("axis") == 1:
            n = _solve(lambda n, q=quant, r=rows: _decoded_length([n, r], q), target)
            shape = None if n is None else [n, rows]
        elif rows is not None:
            n = _solve(lambda n, q=quant, r=rows: _decoded_length([r, n], q), target)
            shape = None if n is None else [rows, n]
        else:
            n = _solve(lambda n, q=quant: _decoded_length([n], q), target)
            shape = None if n is None else [n]
        if shape is not None:
            bits = quant["bits"]
            byteplane = bits in (16, 32) and rng.random() < 0.7
            entry.update(shape=shape, quant=quant, filter="byteplane" if byteplane else "none")
            return f"reinterpret as {quant} {shape}"
    return "reinterpret (no fit)"


def mutate_layout(rng: random.Random, doc: dict, blobs: list[bytes]) -> str:
    """Offsets and lengths: weird values, shifts, swaps, deleted/duplicated/reordered entries."""
    entries = doc["tensors"]
    i = rng.randrange(len(entries))
    entry = _pick(rng, doc)
    key = rng.choice(["offset", "length"])
    op = rng.randrange(6)
    if op == 1 and isinstance(entry.get(key), int):
        delta = rng.choice(DELTAS)
        entry[key] += delta
        return f"{key}+={_short(delta)}"
    if op == 2:
        other = _pick(rng, doc)
        for k in ("offset", "length"):
            entry[k], other[k] = other.get(k), entry.get(k)
        return "swap offsets and lengths of two entries"
    if op == 4:
        del entries[i]
        if len(blobs) > len(entries) and _parallel(doc, blobs[:i] + blobs[i + 1 :]):
            del blobs[i]  # valid: the blob goes too
            _relayout(doc, blobs)
            return f"delete entry {i} with its blob"
        return f"delete entry {i}"
    if op in (3, 5) and _parallel(doc, blobs):  # valid files
        if op == 3:
            order = list(range(len(entries)))
            rng.shuffle(order)
            entries[:] = [entries[k] for k in order]
            blobs[:] = [blobs[k] for k in order]
            what = "reorder entries with their blobs"
        else:
            twin = copy.deepcopy(entries[i])
            twin["name"] += ".twin" if rng.random() < 0.7 else ""
            entries.insert(i, twin)
            blobs.insert(i, blobs[i])
            what = f"duplicate entry {i} as {twin['name']!r}"
        _relayout(doc, blobs)
        return what
    return _set(rng, entry, key, [0, 1, 64, 2**62])


def mutate_shape(rng: random.Random, doc: dict, blobs: list[bytes]) -> str:
    """Shapes and element counts: dimensions, ranks, decoded_length, reinterpretations."""
    entry = _pick(rng, doc)
    shape = entry.get("shape")
    op = rng.randrange(7)
    if op == 0 and isinstance(shape, list) and shape:
        k = rng.randrange(len(shape))
        shape[k] = _weird(rng) if rng.random() < 0.5 else rng.choice([0, 1, 2, 3, 9])
        return f"shape[{k}]={_short(shape[k])}" + _maybe_resize(rng, entry)
    if op == 1 and isinstance(shape, list):
        if shape and rng.random() < 0.5:
            shape.pop(rng.randrange(len(shape)))
        else:
            shape.insert(rng.randrange(len(shape) + 1), rng.choice([0, 1, 1, 1, 2, 2**48]))
        return f"shape={_short(shape)}" + _maybe_resize(rng, entry)
    if op == 2:
        return _set(rng, entry, "shape", [[], [1] * 9, [2**24, 2**24, 2], [0, 2**60]])
    if op == 3:
        return _set(rng, entry, "decoded_length", [0, 1, 2**40, 2**62])
    if op == 4 and isinstance(entry.get("decoded_length"), int):
        delta = rng.choice(DELTAS)
        entry["decoded_length"] += delta
        return f"decoded_length+={_short(delta)}"
    if op == 5:  # no elements, but a huge extent: nothing may be sized by the other dimensions
        big = rng.choice([2**20, 2**31, 2**40, 2**47])
        entry["shape"] = rng.choice([[0, big], [big, 0], [1, 0, big], [big, 1, 0]])
        return f"shape={entry['shape']}" + _maybe_resize(rng, entry)
    if isinstance(entry.get("decoded_length"), int):
        return _reinterpret(rng, entry)
    return "no decoded_length to keep"


def mutate_quant(rng: random.Random, doc: dict, blobs: list[bytes]) -> str:
    """Quant fields swapped between valid values, weird values, deleted, extra keys."""
    entry = _pick(rng, doc)
    quant = entry.get("quant")
    if rng.random() < 0.08 or not isinstance(quant, dict):
        return _set(rng, entry, "quant", [{}, {"scheme": "float", "bits": 32}, _random_quant(rng)])
    choices = {
        "scheme": ["float", "linear", "log", "Linear", "int2", "sign", "sparse"],
        "bits": [4, 8, 16, 32, 2, 1, 64],
        "symmetric": [True, False, 1, 0, "true"],
        "granularity": ["tensor", "channel", "group", "row"],
        "axis": [0, 1, 2, 3, 8, -1],
        "group_size": [1, 7, 8, 9, 1000, 2**31, 2**31 + 1, 0],
        "future_key": [1, "x"],
    }
    key = rng.choice(list(choices))
    return _set(rng, quant, key, choices[key]) + _maybe_resize(rng, entry)


def mutate_codec(rng: random.Random, doc: dict, blobs: list[bytes]) -> str:
    """Codec and filter swapped, unknown or ill-typed."""
    entry = _pick(rng, doc)
    if rng.random() < 0.5:
        return _set(rng, entry, "codec", ["zstd", "raw", "lz4", "ZSTD"])
    return _set(rng, entry, "filter", ["none", "byteplane", "shuffle"]) + _maybe_resize(rng, entry)


def mutate_frames(rng: random.Random, doc: dict, blobs: list[bytes]) -> str:
    """Blobs replaced (checksums recomputed): damaged zstd frames, and frames a writer may
    or must not produce (no checksum, no content size, two frames, trailing bytes)."""
    if not _parallel(doc, blobs):
        return mutate_codec(rng, doc, blobs)
    i = rng.randrange(len(blobs))
    entry = doc["tensors"][i]
    payload = blobs[i]
    if entry.get("codec") == "zstd":
        try:
            payload = zstandard.ZstdDecompressor().decompress(blobs[i])
        except zstandard.ZstdError:  # an earlier edit damaged it: compress the bytes as they are
            pass
    frame = zstandard.ZstdCompressor(write_checksum=True).compress(payload)
    op = rng.choice([0, 0, 0, 1, 2, 3, 4, 5, 6])
    if op == 0:  # damage one byte: frame header, first block header, checksum, anywhere
        damaged = bytearray(frame)
        k = rng.choice([4, 5, 6, 7, len(frame) - rng.randrange(1, 5), rng.randrange(len(frame))])
        damaged[k] ^= 1 << rng.randrange(8)
        blob, what = bytes(damaged), f"frame byte {k} damaged"
    elif op == 1:
        blob, what = frame, "recompressed (valid)"
    elif op == 2:
        blob = zstandard.ZstdCompressor(write_checksum=False).compress(payload)
        what = "frame without checksum"
    elif op == 3:
        no_size = zstandard.ZstdCompressor(write_checksum=True, write_content_size=False)
        blob, what = no_size.compress(payload), "frame without content size"
    elif op == 4:
        tail = rng.choice([b"\0", frame, b"\x50\x2a\x4d\x18\0\0\0\0"])
        blob, what = frame + tail, "bytes after the frame"
    elif op == 5:
        blob, what = frame[: rng.randrange(len(frame))], "frame cut short"
    else:
        blob, what = _lying_frame(entry), "frame declaring more than it holds"
    entry["codec"] = "zstd"
    blobs[i] = blob
    _relayout(doc, blobs)
    return f"{entry['name']}: {what}"


def _lying_frame(entry: dict) -> bytes:
    """A frame of 1 MiB of zeros whose header declares as much as the spec's ratio bound
    lets its length claim (about 1.7 MiB), described as a float32 tensor of that size."""
    frame = bytearray(zstandard.ZstdCompressor(write_checksum=True).compress(bytes(1 << 20)))
    descriptor = frame[4]
    assert descriptor >> 6 == 2 and not descriptor & 3  # a 4-byte content size, no dictionary
    at = 5 if descriptor & 0x20 else 6  # after the window byte, absent in single-segment frames
    declared = 32_768 * len(frame) // 4 * 4
    frame[at : at + 4] = declared.to_bytes(4, "little")
    quant = {"scheme": "float", "bits": 32}
    entry.update(quant=quant, shape=[declared // 4], filter="none", decoded_length=declared)
    return bytes(frame)


def mutate_entry(rng: random.Random, doc: dict, blobs: list[bytes]) -> str:
    """Names, kinds, dtypes, checksums, extra keys, entries that are not objects."""
    entries = doc["tensors"]
    if rng.random() < 0.05:
        i = rng.randrange(len(entries))
        entries[i] = _weird(rng)
        return f"entry {i} = {_short(entries[i])}"
    entry = _pick(rng, doc)
    sha = str(entry.get("sha256"))
    choices = {
        "name": [_pick(rng, doc).get("name"), "", "é" * 600, "[/x]", "\0", "x" * 1024],
        "kind": ["delta", "target", "Delta", "mask"],
        "dtype": ["float32", "float64", "bfloat16", "int8", "float8"],
        "sha256": [sha.upper(), sha[:63], "0" * 64],
        "future_field": [[1, 2]],
    }
    key = rng.choice(list(choices))
    return _set(rng, entry, key, choices[key])


def mutate_stats(rng: random.Random, doc: dict, blobs: list[bytes]) -> str:
    """Per-tensor statistics: odd types, huge and tiny numbers, markup keys."""
    entry = _pick(rng, doc)
    stats = entry.get("stats")
    if rng.random() < 0.1 or not isinstance(stats, dict):
        return _set(rng, entry, "stats", [{}, {"quant_rel_error": 0.0}])
    key = rng.choice(["quant_rel_error", "rel_norm", "cos_base", "[/x]", "future"])
    return _set(rng, stats, key, [0.0, 1.0, -1.0, 1e308, 5e-324, 10**300, 123456789])


def mutate_provenance(rng: random.Random, doc: dict, blobs: list[bytes]) -> str:
    """Known provenance keys, and the objects inside inputs/components/meta/quantization."""
    prov = doc.get("provenance")
    if rng.random() < 0.05 or not isinstance(prov, dict):
        return _set(rng, doc, "provenance", [{}, PROVENANCE])
    scalar = ["created", "tool", "tool_version", "method", "layers", "corruption", "severity"]
    scalar += ["dataset", "include", "exclude", "selection", "merge"]
    nested = {"inputs": ["role", "name", "size", "sha256"], "components": ["label", "weight"]}
    roll = rng.random()
    if roll < 0.3:
        key = rng.choice(scalar)
        return _set(rng, prov, key, ["2023-11-14T22:13:20Z", "fog", 5, ["x"], {"a": 1}])
    if roll < 0.6:
        key = rng.choice(list(nested))
        items = prov.get(key)
        if not isinstance(items, list) or not items or not isinstance(items[0], dict):
            return _set(rng, prov, key, [[{}], [1, "x"], [{"size": HUGE}]])
        field = rng.choice(nested[key])
        return f"{key}[0]." + _set(rng, items[0], field, [10**300, -5, 0.5, "[/x]", 2**70])
    if roll < 0.8:
        meta = prov.get("meta")
        if not isinstance(meta, dict):
            return _set(rng, prov, "meta", [{"k": "v"}])
        return "meta." + _set(rng, meta, rng.choice(["note", "[/x]", "k"]), ["v", 10**300])
    quant = prov.get("quantization")
    if not isinstance(quant, dict):
        return _set(rng, prov, "quantization", [{"bits": 8}])
    key = rng.choice(["bits", "symmetric", "granularity", "group_size"])
    return "quantization." + _set(rng, quant, key, [32, 4, "group", 10**300, False])


def mutate_top(rng: random.Random, doc: dict, blobs: list[bytes]) -> str:
    """Label, fingerprints, the tensor list itself, unknown top-level keys."""
    roll = rng.random()
    if roll < 0.4:
        return _set(rng, doc, "label", ["fog", "[/x]", "x" * 5000])
    if roll < 0.7:
        fp = doc.get("fingerprint")
        if not isinstance(fp, dict):
            return _set(rng, doc, "fingerprint", [{}])
        key = rng.choice(["model", "signature"])
        return "fingerprint." + _set(rng, fp, key, [None, "sha256:" + "1" * 64, "[/x]"])
    if roll < 0.75:  # a valid file: `rwsfmt.save` writes one for a signature of no tensors
        doc["tensors"] = []
        blobs.clear()
        return "no tensors at all"
    if roll < 0.8:
        return _set(rng, doc, "tensors", [[], {}])
    return _set(rng, doc, rng.choice(["future", "[/x]"]), [{"x": 1}, HUGE])


# ---- format 1.2 fields (spec 3.7): targeted edits of int2, sign and sparse entries


def _new_entries(doc: dict) -> list[int]:
    """Indexes of the entries in a scheme of version 1.2 (still objects with a quant)."""
    return [
        i
        for i, e in enumerate(doc["tensors"])
        if isinstance(e, dict)
        and isinstance(e.get("quant"), dict)
        and e["quant"].get("scheme") in NEW_SCHEMES
    ]


def _random_values(rng: random.Random, bits: int | None = None) -> dict:
    """A `values` object a sparse entry may hold (channels along axis 0 only)."""
    q = _random_quant(rng)
    if bits in (1, 2, 4, 8, 16, 32) and rng.random() < 0.7:  # keep the width: more are valid
        while q["bits"] != bits:
            q = _random_quant(rng)
    if q.get("axis") is not None:
        q["axis"] = 0
    return q


def mutate_new_quant(rng: random.Random, doc: dict, blobs: list[bytes]) -> str:
    """The 1.2 quant fields: `nnz`, `index`, `values` (replaced, nested sparse, wrong types,
    unhashable values where strings are expected) and the scheme, bits, granularity, axis,
    group_size and symmetric keys of `values` or of an int2/sign entry. Half the time
    decoded_length follows, so that only the edited field is wrong."""
    candidates = _new_entries(doc)
    if not candidates:
        return mutate_quant(rng, doc, blobs)
    entry = doc["tensors"][rng.choice(candidates)]
    quant = entry["quant"]
    sparse = quant.get("scheme") == "sparse"
    values = quant.get("values")
    n = math.prod(entry["shape"]) if isinstance(entry.get("shape"), list) else 0
    if sparse and rng.random() < 0.45:
        nnz = quant.get("nnz") if isinstance(quant.get("nnz"), int) else 0
        choices = {
            "nnz": [nnz - 1, nnz + 1, 0, n, n + 1, -1, 2**48, float(nnz), True, str(nnz), [nnz]],
            "index": ["bitmap", "rle", "Bitmap", "", ["bitmap"], {"bitmap": 1}, None],
            "values": [
                copy.deepcopy(quant),  # nested sparse
                {**copy.deepcopy(values), "scheme": "sparse"} if isinstance(values, dict) else {},
                _random_values(rng, quant.get("bits")),
                {"scheme": "float", "bits": 32},
                {},
                [],
                "sign",
                [copy.deepcopy(values)],
            ],
            "bits": [1, 2, 4, 8, 16, 32, 3, True, 2.0, "1", [1]],
        }
        key = rng.choice(list(choices))
        what = _set(rng, quant, key, choices[key])
        if key == "values" and isinstance(quant.get("values"), dict) and rng.random() < 0.5:
            quant["bits"] = quant["values"].get("bits")  # the width follows the new values
            what += " +bits"
        return what + _maybe_resize(rng, entry)
    target = values if sparse and isinstance(values, dict) else quant
    where = "values." if target is not quant else ""
    choices = {
        "scheme": ["float", "linear", "int2", "sign", "sparse", "int3", "Sign", ["sign"], {"s": 1}],
        "bits": [1, 2, 4, 8, 16, 32, 3, True, 2.0, "1", [1]],
        "symmetric": [True, False, 1, "true", None, [True]],
        "granularity": ["tensor", "channel", "group", "row", ["channel"], {"g": 1}],
        "axis": [0, 1, 2, 3, -1, True, 0.0, "0", [0]],
        "group_size": [1, 2, 3, 8, 2**31, 2**31 + 1, 0, -1, 8.0, "8", [8]],
        "future_key": [1, "x", [1], {"k": "v"}],
    }
    key = rng.choice(list(choices))
    what = where + _set(rng, target, key, choices[key])
    if key == "bits" and sparse and target is values and rng.random() < 0.5:
        quant["bits"] = copy.deepcopy(values.get("bits"))  # keep values.bits == bits
        what += " +bits"
    return what + _maybe_resize(rng, entry)


def mutate_payload(rng: random.Random, doc: dict, blobs: list[bytes]) -> str:
    """Payload numbers of int2, sign and sparse entries, blob checksums (and zstd frames)
    recomputed, so that the payload checks of spec 3.6 and 3.7.4 must decide: bitmap bits
    flipped (popcount != nnz), moved (valid) or set in the padding (valid); scales and zero
    points negative, NaN, infinite, -0.0 (valid) or huge; codes changed (valid); or the
    values re-described with another quant and the payload cut or padded to fit."""
    if not _parallel(doc, blobs):
        return mutate_new_quant(rng, doc, blobs)
    candidates = _new_entries(doc)
    if not candidates:
        return mutate_frames(rng, doc, blobs)
    i = rng.choice(candidates)
    entry = doc["tensors"][i]
    try:
        start, groups, affine = _numbers(entry)
        payload = bytearray(_payload_of(entry, blobs[i]))
    except (reference_reader.Invalid, zstandard.ZstdError, TypeError, KeyError, ValueError):
        return mutate_new_quant(rng, doc, blobs)  # an earlier edit broke the entry
    if len(payload) != entry.get("decoded_length"):
        return mutate_new_quant(rng, doc, blobs)
    n = math.prod(entry["shape"])
    sparse = entry["quant"]["scheme"] == "sparse"
    op = rng.choice(["bitmap", "bitmap", "scale", "scale", "scale", "zero point", "codes"])
    if op == "bitmap" and sparse and n:
        bits = np.unpackbits(np.frombuffer(bytes(payload[:start]), np.uint8), bitorder="little")
        kind = rng.choice(["flip", "flip", "move", "padding"])
        if kind == "padding" and n % 8:
            bits[rng.randrange(n, len(bits))] ^= 1
        elif kind == "move" and 0 < bits[:n].sum() < n:
            bits[rng.choice(np.flatnonzero(bits[:n]))] = 0
            bits[rng.choice(np.flatnonzero(bits[:n] == 0))] = 1
        else:
            kind = "flip"
            bits[rng.randrange(n)] ^= 1
        payload[:start] = np.packbits(bits, bitorder="little").tobytes()
        what = f"bitmap bit {kind}"
    elif op in ("scale", "zero point") and groups and (op == "scale" or affine):
        k = rng.randrange(groups)
        at = start + 4 * (k + (groups if op == "zero point" else 0))
        special = [-1.0, math.nan, -math.nan, math.inf, -math.inf, -0.0, 0.0, FLT_MAX]
        special += [FLT_MAX / 2, FLT_MAX / 4, 1e38, 5e-45, 2.5, -3.0, 1e-30]
        value = rng.choice(special)
        payload[at : at + 4] = struct.pack("<f", value)
        what = f"{op} {k} = {value!r}"
    elif op == "codes" and len(payload) > start + 4 * groups * (2 if affine else 1):
        at = rng.randrange(start + 4 * groups * (2 if affine else 1), len(payload))
        payload[at] = rng.randrange(256)
        what = f"code byte {at} changed"
    else:
        return _requant(rng, doc, blobs, i, payload, start)
    blobs[i] = _stored(entry, bytes(payload))
    _relayout(doc, blobs)
    return f"{entry['name']}: {what}"


def _requant(
    rng: random.Random, doc: dict, blobs: list[bytes], i: int, payload: bytearray, start: int
) -> str:
    """Re-describe an entry's values (a sparse entry's values object, or a dense int2/sign
    quant) with another quant, and cut or zero-pad the payload to its decoded_length: the
    same bytes read another way, which both readers must take or refuse alike."""
    entry = doc["tensors"][i]
    if entry["quant"]["scheme"] == "sparse":
        values = _random_values(rng)
        entry["quant"] = {**entry["quant"], "bits": values["bits"], "values": values}
    else:
        entry["quant"] = _random_quant(rng)
        if entry["quant"].get("axis") is not None:
            entry["quant"]["axis"] = rng.randrange(max(len(entry["shape"]), 1))
    length = _decoded_length(entry["shape"], entry["quant"])
    if length is None or length > 1 << 26:  # (a huge mutated shape: nothing to pad to)
        return f"{entry['name']}: requant to {_short(entry['quant'])} (invalid)"
    entry["decoded_length"] = length
    bits = entry["quant"]["bits"]
    entry["filter"] = "byteplane" if bits in (16, 32) and rng.random() < 0.7 else "none"
    payload = payload[:length] + bytes(max(0, length - len(payload)))
    blobs[i] = _stored(entry, bytes(payload))
    _relayout(doc, blobs)
    return f"{entry['name']}: requant to {_short(entry['quant'])}, payload fitted"


FAMILIES: dict[str, Callable[[random.Random, dict, list[bytes]], str]] = {
    "layout": mutate_layout,
    "shape": mutate_shape,
    "quant": mutate_quant,
    "codec": mutate_codec,
    "frames": mutate_frames,
    "entry": mutate_entry,
    "stats": mutate_stats,
    "provenance": mutate_provenance,
    "top": mutate_top,
    "new_quant": mutate_new_quant,
    "payload": mutate_payload,
}


def make_case(rng: random.Random, bases: list[bytes]) -> tuple[bytes, list[str], list[str]]:
    """One mutated, re-signed file: (bytes, families used, what was done)."""
    fields, doc, blobs = _blobs(rng.choice(bases))
    families, done = [], []
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        if not isinstance(doc.get("tensors"), list) or not doc["tensors"]:
            break
        name = rng.choice(list(FAMILIES))
        families.append(name)
        done.append(f"{name}: {FAMILIES[name](rng, doc, blobs)}")
    return assemble(doc, b"".join(blobs), **fields), families, done


# --------------------------------------------------------------------------- checks


class CaseTimeout(Exception):
    """Raised by the alarm when one case runs past CASE_LIMIT_S."""


def _alarm(signum: int, frame: object) -> None:
    raise CaseTimeout


class Findings:
    """Everything the campaign found, by kind, with the first few cases of each."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = defaultdict(list)

    def add(self, kind: str, detail: str) -> None:
        self.counts[kind] += 1
        if len(self.examples[kind]) < 3:
            self.examples[kind].append(detail)

    def report(self) -> str:
        return "\n".join(
            f"{kind}: {count}\n    " + "\n    ".join(self.examples[kind])
            for kind, count in sorted(self.counts.items())
        )


def _guarded(findings: Findings, what: str, call: Callable[[], object], done: str) -> object:
    """Run `call`; an RwsError/Invalid is a verdict (returned), anything else is a finding."""
    try:
        return call()
    except (rwsfmt.RwsError, reference_reader.Invalid) as exc:
        return exc
    except CaseTimeout:
        raise
    except Exception as exc:  # the finding this campaign exists for
        findings.add(f"{what} raised {type(exc).__name__}", f"{exc!s:.120} <- {done}")
        return exc


def _overwrite(path: Path, data: bytes) -> None:
    """Replace the file's bytes in place. (Opening with O_TRUNC, as `write_bytes` does, makes
    ext4 flush the file on close: 50x slower, and the campaign writes 10,000 files.)"""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, data, 0)
        os.ftruncate(fd, len(data))
    finally:
        os.close(fd)


def _rwsfmt_tensors(path: Path) -> dict[str, np.ndarray]:
    with rwsfmt.load(path) as sig:
        return {name: sig.tensor(name).numpy() for name in sig.names}


def check_case(path: Path, done: str, findings: Findings, runner: CliRunner, table: bool) -> bool:
    """Every reader of `path` ends in a verdict, and the verdicts and values agree; the
    inspect CLI prints JSON (and, if `table`, its tables) or exits 2. Returns whether the
    file was accepted."""
    ours = _guarded(findings, "rwsfmt.load", lambda: _rwsfmt_tensors(path), done)
    report = _guarded(findings, "rwsfmt.verify", lambda: rwsfmt.verify(path), done)
    theirs = _guarded(findings, "reference_reader", lambda: reference_reader.read(str(path)), done)
    accepted = isinstance(ours, dict)
    if isinstance(theirs, tuple) != accepted:
        findings.add(f"readers disagree (rwsfmt accepts: {accepted})", done)
    elif accepted:
        for name, values in ours.items():
            other = theirs[1].get(name)
            if other is None or values.shape != other.shape or values.tobytes() != other.tobytes():
                findings.add("readers decode different values", f"{name} <- {done}")
            if not np.isfinite(values).all():
                findings.add("non-finite values accepted", f"{name} <- {done}")
    header_read = isinstance(report, VerifyReport) and report.version is not None
    if isinstance(report, VerifyReport) and report.ok != accepted:
        findings.add(f"verify.ok={report.ok} but load+decode accepted={accepted}", done)
    if isinstance(report, VerifyReport) and not report.ok and not report.fixes:
        findings.add("verify found problems but says no fix", f"{report.problems} <- {done}")
    for verdict in (ours, report):  # (RwsError requires a fix: this keeps it so)
        if isinstance(verdict, rwsfmt.RwsError) and not verdict.fix:
            findings.add("an error without a fix", f"{verdict.problem:.80} <- {done}")
    # inspect (rwsfmt.summary.describe) reads the header only: it shows what verify could open
    commands = [["inspect", "--json", str(path)]] + [["inspect", str(path)]] * table
    for args in commands:
        result = runner.invoke(cli, args)
        crashed = not isinstance(result.exception, (SystemExit, type(None)))
        if result.exit_code != (0 if header_read else 2) or crashed:
            what = f"{' '.join(args[:-1])} exit {result.exit_code} (header read: {header_read})"
            findings.add(what, f"{result.exception!r:.80} <- {done}")
        elif result.exit_code and "\n  fix: " not in result.output:  # every error says its fix
            findings.add(f"{' '.join(args[:-1])} error without a fix", f"{result.output:.120}")
    if table:  # `verify` on the command line: exit 0 exactly when accepted, else a fix
        result = runner.invoke(cli, ["verify", str(path)])
        crashed = not isinstance(result.exception, (SystemExit, type(None)))
        if crashed or (result.exit_code == 0) != accepted:
            findings.add(f"verify exit {result.exit_code}", f"{result.exception!r:.80} <- {done}")
        elif result.exit_code and "  fix: " not in result.output:
            findings.add("verify error without a fix", f"{result.output:.120}")
    return accepted


def test_resigned_header_mutations(tmp_path, bases, capsys):
    rng = random.Random(SEED)
    runner = CliRunner()
    findings = Findings()
    accepted = 0
    through_table: set[str] = set()
    family_counts: Counter[str] = Counter()
    slowest, peak_memory = 0.0, 0
    path = tmp_path / "case.rws"
    previous = signal.signal(signal.SIGALRM, _alarm)
    started = time.perf_counter()
    try:
        for case in range(CASES):
            data, families, done = make_case(rng, bases)
            family_counts.update(families)
            _overwrite(path, data)
            table, watch = case % TABLE_EVERY == 0, case % MEMORY_EVERY == 1
            if table:
                through_table.update(families)
            if watch:
                tracemalloc.start()
            t0 = time.perf_counter()
            signal.setitimer(signal.ITIMER_REAL, CASE_LIMIT_S)
            try:
                accepted += check_case(path, "; ".join(done), findings, runner, table)
            except CaseTimeout:
                findings.add("hang", "; ".join(done))
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            slowest = max(slowest, time.perf_counter() - t0)
            if watch:
                peak_memory = max(peak_memory, tracemalloc.get_traced_memory()[1])
                tracemalloc.stop()
    finally:
        signal.signal(signal.SIGALRM, previous)
    elapsed = time.perf_counter() - started
    with capsys.disabled():
        print(
            f"\n{CASES} re-signed header mutations in {elapsed:.1f} s ({accepted} accepted); "
            f"slowest case {1000 * slowest:.0f} ms; peak traced memory {peak_memory >> 10} KiB; "
            f"per family {dict(sorted(family_counts.items()))}"
        )
        if findings.counts:
            print(findings.report())
    assert not findings.counts, findings.report()
    assert through_table == set(FAMILIES)
    assert slowest < MAX_CASE_S
    assert peak_memory < MAX_PEAK_BYTES
    assert min(family_counts.values()) > CASES // 20
    assert accepted > CASES // 20  # the campaign reaches the decoders


# --------------------------------------------------------------------------- 1.2 fields, targeted

DELETE = object()  # an edit that removes the key
SPARSE_EDITS = [  # (where, key, value): `nnz` values are offsets from the entry's own
    *(("quant", "nnz", v) for v in ("-1", "nnz-1", "nnz+1", "0", "n", "n+1", "2**48")),
    *(("quant", "nnz", v) for v in (1.0, True, "1", [1], None, DELETE)),
    *(("quant", "index", v) for v in ("rle", "Bitmap", ["bitmap"], {"bitmap": 1}, None, DELETE)),
    *(("quant", "values", v) for v in ("nested", "as sparse", {}, [], "sign", "list", DELETE)),
    *(("values", "scheme", v) for v in ("float", "linear", "int2", "sign", "int3", ["sign"])),
    *(("values", "scheme", v) for v in ({"s": 1}, None, DELETE)),
    *(("values", "bits", v) for v in (1, 2, 4, 8, 16, 32, True, 2.0, "1")),
    *(("both", "bits", v) for v in (1, 2, 4, 8, 16, 32, True, 2.0, "1", [1])),
    *(("values", "granularity", v) for v in ("tensor", "channel", "group", "row", ["channel"])),
    *(("values", "granularity", v) for v in ({"g": 1}, DELETE)),
    *(("values", "axis", v) for v in (0, 1, -1, True, 0.0, "0", [0], DELETE)),
    *(("values", "group_size", v) for v in (1, 3, 2**31, 2**31 + 1, 0, 8.0, [8], DELETE)),
    *(("values", "symmetric", v) for v in (True, False, "true", [True], DELETE)),
]
DENSE_EDITS = [  # int2 and sign entries
    *(("quant", "scheme", v) for v in ("linear", "int2", "sign", "sparse", "float", ["int2"])),
    *(("quant", "bits", v) for v in (1, 2, 4, True, 2.0, [2])),
    *(("quant", "symmetric", v) for v in (True, False, "false", [False], DELETE)),
    *(("quant", "granularity", v) for v in ("tensor", "channel", "group", ["group"], DELETE)),
    *(("quant", "axis", v) for v in (0, 1, 3, True, [0], DELETE)),
    *(("quant", "group_size", v) for v in (1, 5, 2**31 + 1, 0, [8], DELETE)),
]
PAYLOAD_EDITS = [
    *(("bitmap", kind, None) for kind in ("flip", "move", "padding")),
    *(("scale", "", v) for v in (-1.0, math.nan, math.inf, -math.inf, -0.0, 0.0, FLT_MAX)),
    *(("scale", "", v) for v in (FLT_MAX / 2, FLT_MAX / 1.5, 5e-45)),
    ("scale bits", "", 0x8000_0001),
    *(("zero point", "", v) for v in (math.nan, -math.inf, 1e38, 2.5, -3.0)),
]


def _edit_header(entry: dict, where: str, key: str, value: object) -> str:
    """Apply one header edit to a 1.2 entry, then make decoded_length follow when it can."""
    quant = entry["quant"]
    n = math.prod(entry["shape"])
    target = quant["values"] if where == "values" else quant
    if isinstance(value, str) and key == "nnz" and value != "1":
        value = eval(value, {"nnz": quant["nnz"], "n": n})  # noqa: S307 (the table above)
    elif value == "nested":
        value = copy.deepcopy(quant)
    elif value == "as sparse":
        value = {**copy.deepcopy(quant["values"]), "scheme": "sparse"}
    elif value == "list":
        value = [copy.deepcopy(quant["values"])]
    if value is DELETE:
        target.pop(key, None)
    else:
        target[key] = copy.deepcopy(value)
        if where == "both":
            quant["values"][key] = copy.deepcopy(value)
    length = _decoded_length(entry["shape"], quant)
    if length is not None:
        entry["decoded_length"] = length
    shown = "del" if value is DELETE else _short(value)
    return f"{entry['name']}: {where}.{key} = {shown} (decoded_length {length})"


def _edit_payload(entry: dict, blob: bytes, kind: str, detail: str, value: object) -> bytes:
    """Apply one payload edit (the first scale / zero point of the payload, or the bitmap)
    and return the new blob, stored with the entry's codec."""
    start, groups, affine = _numbers(entry)
    payload = bytearray(_payload_of(entry, blob))
    n = math.prod(entry["shape"])
    if kind == "bitmap":
        bits = np.unpackbits(np.frombuffer(bytes(payload[:start]), np.uint8), bitorder="little")
        kept = np.flatnonzero(bits[:n])
        if detail == "flip":
            bits[n // 2] ^= 1
        elif detail == "move":
            bits[kept[0]] = 0
            bits[np.flatnonzero(bits[:n] == 0)[-1]] = 1
        else:
            bits[n] ^= 1
        payload[:start] = np.packbits(bits, bitorder="little").tobytes()
    else:
        at = start + (4 * groups if kind == "zero point" else 0)
        packed = struct.pack("<I" if kind == "scale bits" else "<f", value)
        payload[at : at + 4] = packed
    return _stored(entry, bytes(payload))


def _applies(entry: dict, kind: str, detail: str) -> bool:
    """Whether a payload edit means something for an entry of this layout."""
    q, n = entry["quant"], math.prod(entry["shape"])
    start, groups, affine = _numbers(entry)
    if kind == "bitmap":
        nnz = q.get("nnz", 0)
        return (
            q["scheme"] == "sparse"
            and {
                "flip": n > 0,
                "move": 0 < nnz < n,
                "padding": n % 8 != 0,
            }[detail]
        )
    return groups > 0 and (kind != "zero point" or affine)


def targeted_cases(bases: list[bytes]):
    """Every edit of the tables above on the 1.2 entries of every base holding some: each
    header edit on one entry per base (in turn), each payload edit on one entry of each
    payload layout it applies to. Yields (file bytes, description)."""
    for b, data in enumerate(bases):
        fields, doc, blobs = _blobs(data)
        new = _new_entries(doc)
        if not new:
            continue
        sparse = [i for i in new if doc["tensors"][i]["quant"]["scheme"] == "sparse"]
        dense = [i for i in new if i not in sparse]
        for table, pool in ((SPARSE_EDITS, sparse), (DENSE_EDITS, dense)):
            for k, (where, key, value) in enumerate(table):
                if not pool:
                    break
                case = copy.deepcopy(doc)
                what = _edit_header(case["tensors"][pool[k % len(pool)]], where, key, value)
                yield assemble(case, b"".join(blobs), **fields), f"base {b}: {what}"
        layouts = set()
        for i in new:
            e = doc["tensors"][i]
            values = e["quant"].get("values", e["quant"])
            layout = (e["quant"]["scheme"], e["codec"], math.prod(e["shape"]) == 0)
            layout += (values["scheme"], values.get("granularity"), values.get("symmetric"))
            if layout in layouts:  # one entry of each layout per base
                continue
            layouts.add(layout)
            for kind, detail, value in PAYLOAD_EDITS:
                if not _applies(doc["tensors"][i], kind, detail):
                    continue
                case, edited = copy.deepcopy(doc), list(blobs)
                edited[i] = _edit_payload(case["tensors"][i], blobs[i], kind, detail, value)
                _relayout(case, edited)
                what = f"{kind} {detail} {value!r}".strip()
                name = case["tensors"][i]["name"]
                yield assemble(case, b"".join(edited), **fields), f"base {b}: {name}: {what}"


def test_targeted_1_2_mutations(tmp_path, bases, capsys):
    """Each edit of the 1.2 fields (nnz, index, values and its keys, the int2 and sign keys)
    and of their payload numbers (bitmaps, scales, zero points), checksums recomputed: both
    readers give the same verdict, accepted files decode to the same bits, rwsfmt raises
    only RwsError and the CLI never crashes."""
    runner = CliRunner()
    findings = Findings()
    path = tmp_path / "case.rws"
    cases = accepted = 0
    started = time.perf_counter()
    for data, done in targeted_cases(bases):
        _overwrite(path, data)
        accepted += check_case(path, done, findings, runner, table=cases % TABLE_EVERY == 0)
        cases += 1
    elapsed = time.perf_counter() - started
    with capsys.disabled():
        print(f"\n{cases} targeted 1.2 mutations in {elapsed:.1f} s ({accepted} accepted)")
    assert not findings.counts, findings.report()
    assert cases > 900 and cases // 5 < accepted < cases // 2


# --------------------------------------------------------------------------- metadata display

PROVENANCE_KEYS = [*PROVENANCE, "created", "tool", "tool_version", "quantization"]


def _fill_metadata(doc: dict, value: object, nested: bool) -> None:
    """Put `value` in every metadata slot inspect shows: provenance keys (or, if `nested`,
    the fields inside inputs/components/meta/quantization), stats, fingerprints, label."""
    v = lambda: copy.deepcopy(value)  # noqa: E731
    prov = {key: v() for key in PROVENANCE_KEYS}
    if nested:
        prov["inputs"] = [{"role": v(), "name": v(), "size": v(), "sha256": v()}, v()]
        prov["components"] = [{"label": v(), "weight": v()}, v()]
        prov["meta"] = {"k": v(), _short(value): "x"}
        prov["quantization"] = {"bits": v(), "symmetric": v(), "granularity": v()}
        prov["quantization"]["group_size"] = v()
    doc["provenance"] = prov
    doc["fingerprint"] = {"model": v(), "signature": v()}
    if isinstance(value, str):
        doc["label"] = value
    for entry in doc["tensors"]:
        entry["stats"] = {key: v() for key in ("quant_rel_error", "rel_norm", "cos_base", "[/x]")}


def test_inspect_shows_any_metadata_value(tmp_path, bases):
    """Each weird value in every metadata slot at once: `inspect` prints its tables and its
    JSON (exit 0), or refuses the file (exit 2) when the header breaks a rule; never a
    traceback, and never a raw control character on the terminal."""
    fields, doc, blobs = _blobs(bases[-1])
    runner = CliRunner()
    path = tmp_path / "meta.rws"
    for value in WEIRD:
        for nested in (False, True):
            case = copy.deepcopy(doc)
            _fill_metadata(case, value, nested)
            path.write_bytes(assemble(case, b"".join(blobs), **fields))
            dumped = json.dumps(value)  # integers past binary64, nesting past 64 (spec 9)
            refused = str(HUGE) in dumped or "[" * 64 in dumped
            for args in (["inspect", str(path)], ["inspect", "--json", str(path)]):
                result = runner.invoke(cli, args)
                assert isinstance(result.exception, (SystemExit, type(None))), (value, args)
                assert result.exit_code == (2 if refused else 0), (_short(value), result.output)
                assert not refused or "\n  fix: " in result.output, result.output
                if args[1] != "--json":  # (JSON escapes control characters itself)
                    assert "\x1b" not in result.output and "\u202e" not in result.output


def _model_for(data: bytes) -> dict[str, torch.Tensor]:
    """A state dict that a base signature fits: every tensor by name and shape, seeded."""
    g = torch.Generator().manual_seed(0)
    _, doc, _ = _blobs(data)
    model = {e["name"]: torch.randn(e["shape"], generator=g) for e in doc["tensors"]}
    model["bn.running_var"] = model["bn.running_var"].abs() + 0.5
    return model


def test_commands_take_any_metadata_value(tmp_path, bases):
    """The commands that act on a signature's metadata (merge copies labels, fingerprints and
    quantization settings; apply compares fingerprints; convert and export carry provenance
    over) take each weird value in every slot:
    exit 0 with an output that verifies, or exit 2 with a message, never a traceback."""
    from safetensors.torch import save_file

    fields, doc, blobs = _blobs(bases[-1])
    model = tmp_path / "model.safetensors"
    save_file(_model_for(bases[-1]), model)
    other = tmp_path / "other.rws"
    other.write_bytes(bases[-1])
    runner = CliRunner()
    path = tmp_path / "meta.rws"
    outputs = {
        "merge": tmp_path / "m.rws",
        "apply": tmp_path / "p.safetensors",
        "convert": tmp_path / "c.rws",
        "export": tmp_path / "e.safetensors",
    }
    outcomes: Counter[tuple[str, int]] = Counter()
    for value in WEIRD:
        for nested in (False, True):
            case = copy.deepcopy(doc)
            _fill_metadata(case, value, nested)
            path.write_bytes(assemble(case, b"".join(blobs), **fields))
            refused = str(HUGE) in json.dumps(value) or "[" * 64 in json.dumps(value)
            commands = {
                "merge": ["merge", str(path), str(other), "--mean"],
                "apply": ["apply", str(model), str(path), "-a", "0.5"],
                "convert": ["convert", str(path), "--bits", "4"],
                "export": ["export", str(path)],
            }
            for what, args in commands.items():
                output = outputs[what]
                args = [*args, "-o", str(output)]
                output.unlink(missing_ok=True)
                result = runner.invoke(cli, args)
                assert isinstance(result.exception, (SystemExit, type(None))), (
                    _short(value),
                    what,
                    result.exception,
                )
                assert result.exit_code == (2 if refused else 0), (_short(value), result.output)
                assert output.exists() == (result.exit_code == 0)
                assert result.exit_code == 0 or "\n  fix: " in result.output, result.output
                outcomes[what, result.exit_code] += 1
                if "\x1b" in json.dumps(value, ensure_ascii=False):
                    assert "\x1b" not in result.output
            if not refused:
                assert rwsfmt.verify(outputs["merge"]).ok and rwsfmt.verify(outputs["convert"]).ok
    assert outcomes["merge", 0] > len(WEIRD)  # most values are taken, not refused
