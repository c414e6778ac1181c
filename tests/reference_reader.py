"""A second `.rws` v1 reader, written from `spec/rws-format.md` alone (numpy, zstandard and
the standard library; nothing from rwsfmt). The tests decode the golden files and random
files with it and with rwsfmt, and require identical float32 bits and identical verdicts.
It reads every scheme of version 1.2: `float`, `linear`, `int2`, `sign` and `sparse`.

    header, tensors = read("fog.rws")   # raises Invalid on any rule of the spec's section 9
"""

from __future__ import annotations

import hashlib
import json
import math
import struct

import numpy as np
import zstandard


class Invalid(Exception):
    """The file breaks a rule of the spec."""


MAGIC = bytes([0x89, 0x52, 0x57, 0x53, 0x0D, 0x0A, 0x1A, 0x0A])
SOURCE_DTYPES = {"float64", "float32", "float16", "bfloat16"}
MAX_DEPTH = 64  # section 9, rule 9
MAX_ZSTD_WINDOW = 8 << 20  # section 4


def read(path: str) -> tuple[dict, dict[str, np.ndarray]]:
    """Validate and decode a whole file: (header object, {name: float32 array})."""
    with open(path, "rb") as f:
        data = f.read()
    doc, data_offset = parse(data)
    return doc, {e["name"]: decode(data, e, data_offset) for e in doc["tensors"]}


def parse(data: bytes) -> tuple[dict, int]:
    """Check the preamble, digest, layout and every header rule; return (header, data offset)."""
    if len(data) < 8 or data[:8] != MAGIC:
        raise Invalid("bad magic")
    if len(data) < 64:
        raise Invalid("shorter than the preamble")
    major, minor, flags, header_length, data_length = struct.unpack_from("<HHIQQ", data, 8)
    if major != 1:
        raise Invalid(f"unsupported major version {major}")
    if header_length > 16 * 1024 * 1024 or 64 + header_length > len(data):
        raise Invalid("bad header length")
    header = data[64 : 64 + header_length]
    if hashlib.sha256(data[:32] + header).digest() != data[32:64]:
        raise Invalid("header digest")
    if flags & ~1:
        raise Invalid("unknown flags")
    data_offset = 64 + header_length
    if data_offset % 64:
        raise Invalid("data section not aligned")
    end = data_offset + data_length
    if end > len(data) or (end < len(data) and not flags & 1):
        raise Invalid("file size")
    doc = _json(header)
    for key, typ in (("label", str), ("fingerprint", dict), ("provenance", dict)):
        if key in doc and not isinstance(doc[key], typ):
            raise Invalid(f"top-level {key}")
    tensors = doc.get("tensors")
    if not isinstance(tensors, list) or len(tensors) > 65536:
        raise Invalid("tensors")
    names, expected_offset = set(), 0
    for e in tensors:
        _entry(e)
        if e["name"] in names:
            raise Invalid("duplicate name")
        names.add(e["name"])
        if e["offset"] != expected_offset:
            raise Invalid("blobs not contiguous")
        expected_offset += e["length"]
    if expected_offset != data_length:
        raise Invalid("data length")
    return doc, data_offset


def _json(header: bytes) -> dict:
    def pairs(items):
        if len({k for k, _ in items}) != len(items):
            raise Invalid("duplicate key")
        return dict(items)

    def constant(name):
        raise Invalid(f"JSON constant {name}")

    def number(text):
        value = float(text)
        if math.isinf(value):
            raise Invalid("number overflows binary64")
        return value

    def integer(text):
        if math.isinf(float(text)):  # float() of a long digit string is fast and exact enough
            raise Invalid("integer overflows binary64")
        return int(text)

    try:
        doc = json.loads(
            header.decode("utf-8"),
            object_pairs_hook=pairs,
            parse_constant=constant,
            parse_float=number,
            parse_int=integer,
        )
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError, ValueError) as exc:
        raise Invalid(f"header JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise Invalid("header is not an object")
    if _depth(doc) > MAX_DEPTH:
        raise Invalid(f"header nests arrays and objects more than {MAX_DEPTH} deep")
    _no_lone_surrogates(doc)
    return doc


def _depth(doc) -> int:
    """Section 9, rule 9: the header object has depth 1, an array or object inside it 2..."""
    deepest, stack = 0, [(doc, 1)]
    while stack:
        value, depth = stack.pop()
        deepest = max(deepest, depth)
        children = value.values() if isinstance(value, dict) else value
        stack.extend((v, depth + 1) for v in children if isinstance(v, (dict, list)))
    return deepest


def _no_lone_surrogates(value, depth: int = 0) -> None:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise Invalid("unpaired surrogate") from None
    elif isinstance(value, dict):
        for k, v in value.items():
            _no_lone_surrogates(k, depth + 1)
            _no_lone_surrogates(v, depth + 1)
    elif isinstance(value, list):
        for v in value:
            _no_lone_surrogates(v, depth + 1)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _entry(e) -> None:
    """Section 2.2 and 3.1 rules for one tensor entry."""
    if not isinstance(e, dict):
        raise Invalid("entry is not an object")
    required = ("name", "kind", "shape", "dtype", "quant", "filter", "codec")
    for key in (*required, "offset", "length", "decoded_length", "sha256"):
        if key not in e:
            raise Invalid(f"missing {key}")
    name = e["name"]
    if not isinstance(name, str) or not 1 <= len(name.encode("utf-8")) <= 1024:
        raise Invalid("name")
    if e["kind"] not in ("delta", "target"):
        raise Invalid("kind")
    shape = e["shape"]
    if not isinstance(shape, list) or len(shape) > 8:
        raise Invalid("shape")
    extent = 1
    for d in shape:
        if not _is_int(d) or d < 0:
            raise Invalid("dimension")
        extent *= max(d, 1)
        if extent > 2**48:
            raise Invalid("too many elements")
    if not isinstance(e["dtype"], str) or e["dtype"] not in SOURCE_DTYPES:
        raise Invalid("dtype")
    for key in ("offset", "length", "decoded_length"):
        if not _is_int(e[key]) or not 0 <= e[key] <= 2**62:
            raise Invalid(key)
    sha = e["sha256"]
    if not isinstance(sha, str) or len(sha) != 64 or set(sha) - set("0123456789abcdef"):
        raise Invalid("sha256")
    if not isinstance(e.get("stats", {}), dict):
        raise Invalid("stats")
    if e["filter"] not in ("none", "byteplane") or e["codec"] not in ("zstd", "raw"):
        raise Invalid("filter or codec")
    n = math.prod(shape)
    expected_length = _payload_length(e["quant"], shape, n)
    if e["filter"] == "byteplane" and e["quant"]["bits"] not in (16, 32):
        raise Invalid("byteplane on a width other than 16 or 32 bits")
    if e["decoded_length"] != expected_length:
        raise Invalid("decoded_length")
    if e["codec"] == "raw" and e["length"] != e["decoded_length"]:
        raise Invalid("raw length")
    if e["codec"] == "zstd" and e["decoded_length"] > 32768 * e["length"]:
        raise Invalid("zstd ratio bound")


# bits allowed per scheme with scale groups (sections 3.1 and 3.7); `float` is 32 bits only
GROUPED_BITS = {"linear": (4, 8, 16), "int2": (2,), "sign": (1,)}


def _quant(q, shape: list, n: int) -> tuple[int, int, bool]:
    """(number of scale groups, bits, symmetric) of a valid quant object of a dense scheme
    coding `n` values (the tensor's elements, or a sparse entry's `nnz` kept values).
    `symmetric` is True when no zero points are stored (`float` and `sign` too)."""
    if not isinstance(q, dict):
        raise Invalid("quant")
    bits = q.get("bits")
    if not _is_int(bits):
        raise Invalid("bits")
    scheme = q.get("scheme")
    if scheme == "float":
        if bits != 32:
            raise Invalid("float bits")
        return 0, 32, True
    allowed = next((b for s, b in GROUPED_BITS.items() if scheme == s), None)
    if allowed is None:  # `==` only: a scheme of the wrong type (a list) is just unknown
        raise Invalid("unknown scheme: upgrade")
    if bits not in allowed:
        raise Invalid("scheme or bits")
    if scheme != "sign" and not isinstance(q.get("symmetric"), bool):
        raise Invalid("symmetric")
    granularity = q.get("granularity")
    if granularity == "tensor":
        groups = 1
    elif granularity == "channel":
        axis = q.get("axis")
        if not _is_int(axis) or not 0 <= axis < len(shape):
            raise Invalid("axis")
        groups = shape[axis]
    elif granularity == "group":
        size = q.get("group_size")
        if not _is_int(size) or not 1 <= size <= 2**31:
            raise Invalid("group_size")
        groups = -(-n // size)
    else:
        raise Invalid("granularity")
    return groups, bits, scheme == "sign" or q["symmetric"]


def _sparse(q: dict, shape: list, n: int) -> tuple[int, dict]:
    """(nnz, values quant) of a valid `sparse` quant object (section 3.7.4)."""
    if q.get("index") != "bitmap":
        raise Invalid("unknown sparse index: upgrade")
    nnz = q.get("nnz")
    if not _is_int(nnz) or not 0 <= nnz <= n:
        raise Invalid("nnz")
    values = q.get("values")
    if not isinstance(values, dict):
        raise Invalid("sparse values")
    if values.get("scheme") == "sparse":
        raise Invalid("sparse values stored sparse")
    _quant(values, shape, nnz)  # float, linear, int2 or sign, valid for the entry's shape
    if values["bits"] != q["bits"]:
        raise Invalid("sparse values.bits differs from bits")
    if values["scheme"] != "float" and values["granularity"] == "channel" and values["axis"] != 0:
        raise Invalid("sparse values with channels along an axis other than 0")
    return nnz, values


def _payload_length(q, shape: list, n: int) -> int:
    """decoded_length of a valid quant object for `n` elements of `shape` (3.1, 3.7)."""
    if isinstance(q, dict) and q.get("scheme") == "sparse":
        if not _is_int(q.get("bits")):
            raise Invalid("bits")
        nnz, values = _sparse(q, shape, n)
        return (n + 7) // 8 + _payload_length(values, shape, nnz)
    groups, bits, symmetric = _quant(q, shape, n)
    return 4 * groups * (1 if symmetric else 2) + (n * bits + 7) // 8


def decode(data: bytes, e: dict, data_offset: int) -> np.ndarray:
    """Check one tensor's blob and decode it to float32 (sections 3.3 and 3.7)."""
    start = data_offset + e["offset"]
    blob = data[start : start + e["length"]]
    if len(blob) != e["length"] or hashlib.sha256(blob).hexdigest() != e["sha256"]:
        raise Invalid(f"blob of {e['name']}")
    payload = blob if e["codec"] == "raw" else _unzstd(blob, e["decoded_length"])
    shape, q = e["shape"], e["quant"]
    n = math.prod(shape)
    body = np.frombuffer(payload, dtype=np.uint8)
    if q["scheme"] != "sparse":
        return _values(body, q, shape, n, e["filter"], _group_index(q, shape, n)).reshape(shape)
    nnz, values = _sparse(q, shape, n)
    bitmap = (n + 7) // 8
    kept = np.unpackbits(body[:bitmap], bitorder="little")[:n].astype(bool)  # padding dropped
    if int(kept.sum()) != nnz:
        raise Invalid("bitmap does not hold nnz positions")
    positions = np.flatnonzero(kept)  # row-major, so the i-th kept element takes value i
    if values["scheme"] == "float":
        group_of = None
    elif values["granularity"] == "tensor":
        group_of = np.zeros(nnz, dtype=np.int64)
    elif values["granularity"] == "group":
        group_of = np.arange(nnz, dtype=np.int64) // values["group_size"]
    else:  # channel, axis 0: the kept element's index along axis 0
        group_of = positions // math.prod(shape[1:])
    out = np.zeros(n, dtype=np.float32)  # elements not kept decode to +0.0
    out[positions] = _values(body[bitmap:], values, shape, nnz, e["filter"], group_of)
    return out.reshape(shape)


def _values(
    body: np.ndarray, q: dict, shape: list, n: int, filt: str, group_of: np.ndarray | None
) -> np.ndarray:
    """Check and decode the `n` values of a dense payload (3.1-3.3, 3.6, 3.7.1, 3.7.2), flat;
    `group_of` gives each value's scale group."""
    groups, bits, symmetric = _quant(q, shape, n)
    values = body[4 * groups * (1 if symmetric else 2) :]
    if bits == 32:
        items = values.reshape(4, n).T if filt == "byteplane" else values.reshape(n, 4)
        out = np.ascontiguousarray(items).view("<f4").reshape(n)
        if not np.isfinite(out).all():
            raise Invalid("non-finite value")
        return out.astype(np.float32)
    scales = body[: 4 * groups].view("<f4")
    legacy_zero = scales.view("<u4") == 0x80000000  # -0.0: read as +0.0 (section 3.6)
    if (np.signbit(scales) & ~legacy_zero).any() or not np.isfinite(scales).all():
        raise Invalid("scale")
    scales = np.where(legacy_zero, np.float32(0), scales)
    if q["scheme"] == "sign":  # levels -1 and +1: finite exactly when the scale is (3.6)
        u = _codes(values, bits, n)
        return np.where(u == 1, scales[group_of], -scales[group_of]).astype(np.float32)
    if symmetric:
        zero_points = np.full(groups, 2 ** (bits - 1), dtype=np.float32)
    else:
        zero_points = body[4 * groups : 8 * groups].view("<f4")
        if not np.isfinite(zero_points).all():
            raise Invalid("zero point")
    with np.errstate(over="ignore"):  # the codes 0 and 2^B - 1 bound every decoded value
        extremes = [(np.float32(u) - zero_points) * scales for u in (0, 2**bits - 1)]
    if not all(np.isfinite(e).all() for e in extremes):
        raise Invalid("a code decodes to a non-finite value")
    if bits == 16:
        lo_hi = values.reshape(2, n) if filt == "byteplane" else values.reshape(n, 2).T
        u = lo_hi[0].astype(np.uint32) + 256 * lo_hi[1].astype(np.uint32)
    else:
        u = _codes(values, bits, n)
    u = u.astype(np.float32)
    return ((u - zero_points[group_of]) * scales[group_of]).astype(np.float32)


def _codes(values: np.ndarray, bits: int, n: int) -> np.ndarray:
    """The first `n` codes of `bits` <= 8 bits (3.2): element `k * (8 / B) + j` is
    `(byte_k >> (B * j)) & (2^B - 1)`; bits past the last element are ignored."""
    if bits == 8:
        return values[:n]
    per_byte = 8 // bits
    shifts = np.arange(per_byte, dtype=np.uint8) * bits
    codes = (values[: -(-n // per_byte), None] >> shifts) & (2**bits - 1)
    return codes.reshape(-1)[:n]


def _group_index(q: dict, shape: list, n: int) -> np.ndarray | None:
    """The scale group of every element of a dense tensor, in row-major order."""
    if q["scheme"] == "float":
        return None
    if q["granularity"] == "tensor":
        return np.zeros(n, dtype=np.int64)
    if q["granularity"] == "group":
        return np.arange(n, dtype=np.int64) // q["group_size"]
    inner = math.prod(shape[q["axis"] + 1 :])  # elements per step along the axis
    return np.arange(n, dtype=np.int64) // inner % shape[q["axis"]]


def _unzstd(blob: bytes, decoded_length: int) -> bytes:
    """Section 4: exactly one frame with content size = decoded_length, checksum, no dict."""
    if len(blob) < 6 or blob[:4] != b"\x28\xb5\x2f\xfd":
        raise Invalid("not a zstd frame")
    descriptor = blob[4]
    fcs_flag, single_segment = descriptor >> 6, (descriptor >> 5) & 1
    has_checksum, dict_flag = (descriptor >> 2) & 1, descriptor & 3
    if descriptor & 0x08:
        raise Invalid("reserved frame header bit")
    pos = 5 + (0 if single_segment else 1)
    dict_size = (0, 1, 2, 4)[dict_flag]
    dict_id = int.from_bytes(blob[pos : pos + dict_size], "little")
    pos += dict_size
    fcs_size = (1 if single_segment else 0, 2, 4, 8)[fcs_flag]
    if fcs_size == 0:
        raise Invalid("frame without content size")
    content_size = int.from_bytes(blob[pos : pos + fcs_size], "little")
    content_size += 256 if fcs_size == 2 else 0
    pos += fcs_size
    if content_size != decoded_length or not has_checksum or dict_id:
        raise Invalid("frame parameters")
    if single_segment:
        window = content_size
    else:  # Window_Descriptor (RFC 8878 3.1.1.1.2)
        base = 1 << (10 + (blob[5] >> 3))
        window = base + (base // 8) * (blob[5] & 7)
    if window > MAX_ZSTD_WINDOW:
        raise Invalid("frame window over 8 MiB")
    while True:  # walk the blocks: 3-byte header, then 1 byte (RLE) or block_size bytes
        if pos + 3 > len(blob):
            raise Invalid("frame cut short")
        header = int.from_bytes(blob[pos : pos + 3], "little")
        block_type, block_size = (header >> 1) & 3, header >> 3
        if block_type == 3:
            raise Invalid("reserved block type")
        pos += 3 + (1 if block_type == 1 else block_size)
        if header & 1:
            break
    if pos + 4 != len(blob):
        raise Invalid("bytes after the frame")
    # decode to the end of the frame, which checks every block and the content checksum
    # (ZstdDecompressor.decompress skips both for a frame declaring 0 bytes)
    out = bytearray()
    try:
        with zstandard.ZstdDecompressor().stream_reader(blob) as reader:
            while chunk := reader.read(1 << 16):
                out += chunk
                if len(out) > decoded_length:
                    raise Invalid("frame decodes to more than decoded_length")
    except zstandard.ZstdError as exc:
        raise Invalid(f"zstd: {exc}") from None
    if len(out) != decoded_length:
        raise Invalid("frame decodes to the wrong length")
    return bytes(out)
