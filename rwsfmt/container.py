"""The `.rws` v1 container: byte layout, header validation, reading and writing.

This module knows bytes, JSON and checksums only; it never imports torch or numpy, so
`inspect` and `verify` stay fast. The layout is specified in `spec/rws-format.md`:

    [preamble: 64 bytes][header: canonical JSON, space-padded][data: zstd/raw blobs][signature]

The optional signature block is parsed here (`signing.block`, no cryptography); checking it
against a key is `signing.verify`'s job.
"""

from __future__ import annotations

import array
import hashlib
import itertools
import json
import math
import os
import re
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, BinaryIO

from .atomic import atomic_write
from .errors import IntegrityError, RwsError, as_path
from .format.schemes import SCHEMES, scheme_of
from .inputs import open_input, strict_json
from .limits import check_decoded_size
from .signing.block import MAX_BLOCK_BYTES, SignatureBlock, parse_block

MAGIC = b"\x89RWS\r\n\x1a\n"
VERSION = (1, 2)  # the newest version this module reads; files say the lowest they need
PREAMBLE = struct.Struct("<8sHHIQQ32s")  # magic, major, minor, flags, header/data length, digest
PREAMBLE_SIZE = PREAMBLE.size  # 64
DIGESTED_PREAMBLE = 32  # the header digest covers preamble bytes [0, 32) and the header
ALIGNMENT = 64  # the data section starts at a multiple of this
FLAG_TRAILER = 1  # a signature block follows the data section (spec 1.5 and 14)

MAX_HEADER_BYTES = 16 << 20
MAX_TENSORS = 65_536
MAX_RANK = 8
MAX_NAME_BYTES = 1_024
MAX_ELEMENTS = 1 << 48
MAX_ZSTD_RATIO = 32_768  # a zstd block of <= 128 KiB costs >= 4 bytes: no frame expands more
MAX_ZSTD_WINDOW = 8 << 20  # zstd levels 1-19 stay within it; a decoder buffers a window
ZSTD_WINDOW_LOG = 21  # what rwsfmt writes: 2 MiB, level 3's own for large payloads
MAX_DEPTH = 64  # arrays and objects nested in the header, the header object counting 1

KINDS = ("delta", "target")
CODECS = ("zstd", "raw")
FILTERS = ("none", "byteplane")
SOURCE_DTYPES = ("float64", "float32", "float16", "bfloat16")

_UPGRADE = "upgrade rwsfmt (pip install -U rwsfmt) to read it"
# the fix for a file whose checksums match but whose contents break the format: it was
# written so (by a broken or hostile writer), and copying it again gives the same bytes
_MALFORMED = (
    "the file was written this way (its checksums match): re-create it with rwsfmt "
    "(extract, merge or convert), or report the problem to the tool that wrote it"
)
_SHA256_HEX = re.compile("[0-9a-f]{64}")


@dataclass(slots=True)
class TensorInfo:
    """One tensor's header entry: what it is, how it is quantized and where its bytes live.

    `offset`/`length` locate the stored blob inside the data section; `decoded_length` is
    the payload size after the codec (scales, zero points, then packed values). Treat it as
    read-only (make changed copies with `dataclasses.replace`); it is not frozen because a
    frozen dataclass takes 5x longer to build, and a header can hold 65,536 of them.
    """

    name: str
    kind: str
    shape: tuple[int, ...]
    dtype: str
    quant: dict[str, Any]
    filter: str
    codec: str
    offset: int
    length: int
    decoded_length: int
    sha256: str
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def bits(self) -> int:
        """Bits per stored value (of the kept values, for a sparse tensor)."""
        return int(self.quant["bits"])

    @property
    def scheme(self) -> str:
        return self.quant["scheme"]

    @property
    def values_quant(self) -> dict[str, Any]:
        """How the stored values are coded: `quant` itself, or a sparse tensor's `values`."""
        return self.quant["values"] if self.quant["scheme"] == "sparse" else self.quant

    @property
    def nnz(self) -> int:
        """Number of values stored: every element, or the kept ones of a sparse tensor."""
        return self.quant["nnz"] if self.quant["scheme"] == "sparse" else self.numel

    @property
    def granularity(self) -> str:
        """'tensor', 'channel' or 'group' for values with scales, 'none' for exact floats."""
        return self.values_quant.get("granularity", "none")

    @property
    def n_scales(self) -> int:
        """Number of (scale, zero point) groups in the payload."""
        return scheme_of(self.quant).scale_groups(self.quant, self.shape, self.numel)

    @property
    def affine(self) -> bool:
        return scheme_of(self.quant).affine(self.quant)

    @property
    def values_offset(self) -> int:
        """Byte offset of the packed values inside the decoded payload."""
        return scheme_of(self.quant).values_offset(self.quant, self.shape, self.numel)

    @property
    def minor(self) -> int:
        """The lowest format minor version that can hold this entry."""
        return scheme_of(self.quant).entry_minor(self.quant)

    def expected_decoded_length(self) -> int:
        return scheme_of(self.quant).payload_length(self.quant, self.shape, self.numel)

    def to_json(self) -> dict[str, Any]:
        out = {
            "name": self.name,
            "kind": self.kind,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "quant": self.quant,
            "filter": self.filter,
            "codec": self.codec,
            "offset": self.offset,
            "length": self.length,
            "decoded_length": self.decoded_length,
            "sha256": self.sha256,
        }
        if self.stats:
            out["stats"] = self.stats
        return out


@dataclass(frozen=True)
class Header:
    """A parsed, validated header: the tensors plus the file-level metadata, the header
    digest from the preamble and the signature block, if the file has one."""

    version: tuple[int, int]
    tensors: list[TensorInfo]
    label: str
    fingerprint: dict[str, Any]
    provenance: dict[str, Any]
    data_offset: int
    data_length: int
    raw: dict[str, Any]
    digest: bytes = b""
    signature: SignatureBlock | None = None

    def info(self, name: str) -> TensorInfo:
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(name)


# --------------------------------------------------------------------------- writing


def canonical_json(obj: Any) -> bytes:
    """Canonical header bytes: sorted keys, no spaces, UTF-8, no NaN/Infinity."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def build_header(
    meta: dict[str, Any], entries: list[TensorInfo]
) -> tuple[bytes, bytes, list[TensorInfo]]:
    """Lay out `entries` contiguously and return (preamble, padded header, placed entries).

    `meta` holds the file-level fields (label, fingerprint, provenance, ...); entries'
    offsets are recomputed here so blobs follow each other in list order with no gaps.
    """
    placed, offset = [], 0
    for e in entries:
        placed.append(replace(e, offset=offset))
        offset += e.length
    doc = dict(meta)
    doc["tensors"] = [e.to_json() for e in placed]
    body = canonical_json(doc)
    pad = -(PREAMBLE_SIZE + len(body)) % ALIGNMENT
    header = body + b" " * pad
    if len(header) > MAX_HEADER_BYTES:
        raise RwsError(
            f"header would be {len(header):,} bytes, over the {MAX_HEADER_BYTES:,}-byte limit",
            fix="store fewer tensors or shorter metadata in one file",
        )
    minor = max((e.minor for e in placed), default=0)
    head = PREAMBLE.pack(MAGIC, VERSION[0], minor, 0, len(header), offset, b"\0" * 32)
    digest = hashlib.sha256(head[:DIGESTED_PREAMBLE] + header).digest()
    return head[:DIGESTED_PREAMBLE] + digest, header, placed


def write_file(
    path: str | os.PathLike,
    meta: dict[str, Any],
    entries: list[TensorInfo],
    stored: Callable[[TensorInfo], bytes | bytearray],
) -> None:
    """Write a complete `.rws` file atomically: it appears whole at `path`, or not at all.

    Blobs are fetched one at a time from `stored(entry)`, so they need not all be in memory.
    """
    preamble, header, placed = build_header(meta, entries)
    with atomic_write(path) as f:
        f.write(preamble)
        f.write(header)
        for entry in placed:
            blob = stored(entry)
            if len(blob) != entry.length:
                raise RwsError(
                    f"blob of tensor {entry.name!r} is {len(blob)} bytes, expected {entry.length}",
                    path=path,
                    fix="do not change the source file while it is copied; try again",
                )
            f.write(blob)


ZSTD_LEVEL = 3


def encode_blob(payload: bytes) -> tuple[str, bytes]:
    """Compress a payload into one independent zstd frame (content size and checksum on, a
    window of at most 2 MiB), or keep it raw when compression would not make it smaller.
    Returns (codec, blob)."""
    import zstandard

    params = zstandard.ZstdCompressionParameters.from_level(
        ZSTD_LEVEL,
        source_size=len(payload),
        window_log=ZSTD_WINDOW_LOG,
        write_checksum=1,
        write_content_size=1,
    )
    frame = zstandard.ZstdCompressor(compression_params=params).compress(payload)
    if len(frame) < len(payload):
        return "zstd", frame
    return "raw", bytes(payload)


# --------------------------------------------------------------------------- reading


class RwsReader:
    """An open `.rws` file: the header is parsed and validated on open, blobs on demand.

    Every blob read is checked against its SHA-256 before it is decoded, and the first
    decode checks that the whole file stays within `limits.decode_limit` (`max_decoded_bytes`
    overrides it; None uses `RWSFMT_MAX_DECODED` or the default ratio).
    """

    def __init__(self, path: str | os.PathLike, *, max_decoded_bytes: float | None = None) -> None:
        self.path = as_path(path, "the path of a .rws file")
        self.max_decoded_bytes = max_decoded_bytes
        self._size_checked = False
        self._lock = threading.Lock()
        self._file: BinaryIO = open_input(self.path, "a .rws file")
        try:
            self.header = read_header(self._file, self.path)
        except BaseException:
            self._file.close()
            raise

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> RwsReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def read_head(self) -> tuple[bytes, bytes]:
        """The preamble and header bytes as stored, checked against the digest read on open."""
        with self._lock:
            self._file.seek(0)
            head = self._file.read(self.header.data_offset)
        preamble, body = head[:PREAMBLE_SIZE], head[PREAMBLE_SIZE:]
        if preamble[DIGESTED_PREAMBLE:] != self.header.digest or header_digest(preamble, body) != (
            self.header.digest
        ):
            raise IntegrityError(
                "the preamble or header changed while the file was read",
                path=self.path,
                fix="try again once nothing else writes the file",
            )
        return preamble, body

    def verify_tensors(self) -> tuple[int, list[IntegrityError]]:
        """Read, check and decode every tensor: (bytes checked, problems found)."""
        checked, problems = 0, []
        for info in self.header.tensors:
            try:
                self.check_decoded_size()
                check_blob(self.read_stored(info), info, self.path)
                checked += info.length
            except IntegrityError as exc:
                problems.append(exc)
        return checked, problems

    def read_stored(self, info: TensorInfo) -> bytearray:
        """The blob exactly as stored (still compressed), after its checksum is verified."""
        buf = bytearray(info.length)
        with self._lock:  # seek + read must not interleave between threads
            self._file.seek(self.header.data_offset + info.offset)
            got = self._file.readinto(buf)
        if got != info.length:
            raise IntegrityError(
                f"tensor {info.name!r} is cut short ({got} of {info.length} bytes)",
                path=self.path,
                fix="the file was truncated; copy or download it again",
            )
        if hashlib.sha256(buf).hexdigest() != info.sha256:
            raise IntegrityError(
                f"checksum mismatch in tensor {info.name!r}: its bytes are damaged",
                path=self.path,
                fix="copy or download the file again",
            )
        return buf

    def read_decodable(self, info: TensorInfo) -> bytearray:
        """`read_stored`, once the file is known to stay within the decode limit."""
        self.check_decoded_size()
        return self.read_stored(info)

    def read_payload(self, info: TensorInfo) -> bytearray:
        """The verified, decompressed payload of one tensor (a fresh, writable buffer)."""
        self.check_decoded_size()
        return decode_blob(self.read_stored(info), info, self.path)

    def check_decoded_size(self) -> None:
        """Refuse, before any tensor is decoded, a file whose tensors would take more float32
        memory than its size justifies (see `limits`)."""
        if self._size_checked:
            return
        float32_bytes = 4 * sum(t.numel for t in self.header.tensors)
        file_size = os.fstat(self._file.fileno()).st_size
        check_decoded_size(float32_bytes, file_size, self.path, self.max_decoded_bytes)
        self._size_checked = True


def decode_blob(stored: bytearray, info: TensorInfo, path: str) -> bytearray:
    """Undo the codec, bounded by the declared decoded length (no decompression bombs),
    and check the payload's numbers (see `check_payload`)."""
    payload = stored if info.codec == "raw" else _unzstd(stored, info, path)
    check_payload(payload, info, path)
    return payload


def check_blob(stored: bytes | bytearray, info: TensorInfo, path: str) -> None:
    """`decode_blob`'s checks, a chunk at a time for a large tensor (see `format.chunked`),
    so that checking allocates no more than decoding."""
    from .format import chunked

    if chunked.chunked(info):
        chunked.check(PayloadReader(stored, info, path), info)
    else:
        decode_blob(bytearray(stored), info, path)


def check_payload(payload: bytes | bytearray, info: TensorInfo, path: str) -> None:
    """Refuse payloads whose numbers no writer produces (spec section 3.6): exact float32
    values that are not finite; scales that are negative or not finite; zero points that are
    not finite; groups whose scale and zero point could decode a code to infinity; a sparse
    bitmap that does not hold `nnz` positions.

    A scale of exactly -0.0 is accepted: rwsfmt 0.1.0 wrote it for all-zero groups, and
    it reads as +0.0.
    """
    import numpy as np

    raw = np.frombuffer(payload, dtype=np.uint8)
    problem = scheme_of(info.quant).check(raw, info.quant, info.shape, info.numel, info.filter)
    if problem:
        raise IntegrityError(f"tensor {info.name!r} {problem}", path=path, fix=_MALFORMED)


def _unzstd(stored: bytearray, info: TensorInfo, path: str) -> bytearray:
    """Decompress a blob that must be exactly one zstd frame declaring its content size
    (equal to `decoded_length`) and a content checksum, with no dictionary."""
    payload = PayloadReader(stored, info, path)
    out = payload.read("all", 0, info.decoded_length)
    payload.finish()
    return out


class PayloadReader:
    """A tensor's decoded payload read by byte ranges, without holding it whole: a raw blob
    is sliced; a zstd frame (checked as `_unzstd` requires) is decompressed by one
    sequential reader per `key`, each buffering at most the frame's window (<= 8 MiB).

    Reading a range before a key's position starts that key's reader over. `finish` reads
    the frame to its end, which checks every block and the content checksum: call it before
    trusting what was read.
    """

    def __init__(self, stored: bytes | bytearray, info: TensorInfo, path: str) -> None:
        self.stored, self.info, self.path = stored, info, path
        self._readers: dict[str, Any] = {}
        self._at: dict[str, int] = {}
        if info.codec == "zstd":
            self._check_frame()

    def _damaged(self, problem: str = "") -> IntegrityError:
        what = f"tensor {self.info.name!r} does not decode as one zstd frame"
        return IntegrityError(f"{what}{problem}", path=self.path, fix=_MALFORMED)

    def _check_frame(self) -> None:
        import zstandard

        stored, info = self.stored, self.info
        try:
            params = zstandard.get_frame_parameters(bytes(stored[:18]))
            length = _zstd_frame_length(stored, zstandard.frame_header_size(bytes(stored[:18])))
        except zstandard.ZstdError:
            raise self._damaged() from None
        if params.content_size != info.decoded_length:
            raise IntegrityError(
                f"tensor {info.name!r}: zstd frame declares {params.content_size} bytes, header "
                f"says {info.decoded_length}",
                path=self.path,
                fix=_MALFORMED,
            )
        if not params.has_checksum or params.dict_id or length != len(stored):
            raise self._damaged(" with a checksum, no dictionary and nothing after it")
        if params.window_size > MAX_ZSTD_WINDOW:
            raise IntegrityError(
                f"tensor {info.name!r} is a zstd frame with a {params.window_size:,}-byte "
                f"window, over the format's {MAX_ZSTD_WINDOW >> 20} MiB",
                path=self.path,
                fix="re-compress it within the limit (zstd levels 1 to 19, without --long or "
                "--ultra); rwsfmt's own files always are",
            )

    def read(self, key: str, start: int, n: int) -> bytearray:
        """Payload bytes `[start, start + n)`, read by the reader named `key`."""
        if self.info.codec == "raw":
            return bytearray(memoryview(self.stored)[start : start + n])
        import zstandard

        out = bytearray(n)
        try:
            reader = self._reader(key, start)
            got = 0
            while got < n:
                m = reader.readinto(memoryview(out)[got:])
                if not m:
                    raise self._damaged(" of the declared length")
                got += m
        except zstandard.ZstdError as exc:
            raise self._damaged(f" ({exc})") from None
        self._at[key] = start + n
        return out

    def _reader(self, key: str, start: int) -> Any:
        """The reader `key`, positioned at payload byte `start`."""
        import zstandard

        if self._at.get(key, math.inf) > start:
            self._readers[key] = zstandard.ZstdDecompressor().stream_reader(self.stored)
            self._at[key] = 0
        reader, skip = self._readers[key], start - self._at[key]
        scratch = memoryview(bytearray(min(skip, 1 << 20)))
        while skip:
            m = reader.readinto(scratch[: min(skip, len(scratch))])
            if not m:
                raise self._damaged(" of the declared length")
            skip -= m
        return reader

    def finish(self) -> None:
        """Read the frame to its end (blocks and content checksum verified) and refuse it
        when it holds more or fewer bytes than declared."""
        if self.info.codec == "raw":
            return
        import zstandard

        key = max(self._at, key=self._at.__getitem__, default="end")
        end = self.info.decoded_length
        try:
            reader = self._reader(key, end)
            extra = reader.read(1)
        except zstandard.ZstdError as exc:
            raise self._damaged(f" ({exc})") from None
        if extra:
            raise self._damaged(" of the declared length")
        self._readers.clear()
        self._at.clear()


def _zstd_frame_length(blob: bytearray, pos: int) -> int:
    """Bytes taken by the zstd frame at the start of `blob`: header, blocks, 4-byte checksum.

    Walks the 3-byte block headers (RFC 8878 section 3.1.1.2) without decompressing.
    """
    import zstandard

    while True:
        if pos + 3 > len(blob):
            raise zstandard.ZstdError("frame is cut short")
        block = int.from_bytes(blob[pos : pos + 3], "little")
        kind, size = (block >> 1) & 3, block >> 3
        if kind == 3:
            raise zstandard.ZstdError("reserved block type")
        pos += 3 + (1 if kind == 1 else size)
        if block & 1:
            return pos + 4


def read_header(f: BinaryIO, path: str) -> Header:
    """Read and validate the preamble and header of an open file, touching no tensor data."""
    size = os.fstat(f.fileno()).st_size
    f.seek(0)
    head = f.read(PREAMBLE_SIZE)
    if len(head) < len(MAGIC) or not head.startswith(MAGIC):
        raise _not_rws(head, path, size)
    if len(head) < PREAMBLE_SIZE:
        raise IntegrityError(
            f"file is {size} bytes, shorter than the {PREAMBLE_SIZE}-byte preamble",
            path=path,
            fix="the file was truncated; copy or download it again",
        )
    _, major, minor, flags, header_len, data_len, digest = PREAMBLE.unpack(head)
    data_offset = PREAMBLE_SIZE + header_len
    body = f.read(header_len) if header_len <= min(MAX_HEADER_BYTES, size) else None
    if major != VERSION[0]:
        if body is not None and header_digest(head, body, major=VERSION[0]) == digest:
            raise IntegrityError(
                f"the version field is damaged (reads {major}.{minor} in a {VERSION[0]}.x file)",
                path=path,
                fix="copy or download the file again",
            )
        newer = major > VERSION[0]
        raise RwsError(
            f"format version {major}.{minor} is not supported (this rwsfmt reads {VERSION[0]}.x)",
            path=path,
            fix=_UPGRADE if newer else "convert it with the rwsfmt release that wrote it",
        )
    if header_len > MAX_HEADER_BYTES:
        raise IntegrityError(
            f"header length {header_len:,} exceeds the {MAX_HEADER_BYTES:,}-byte limit",
            path=path,
            fix="the preamble is damaged, or the file was not written by a conforming writer: "
            "copy or download it again, or re-create it with rwsfmt",
        )
    if body is None or data_offset > size:
        raise IntegrityError(
            f"header needs {data_offset:,} bytes but the file has {size:,}",
            path=path,
            fix="the file was truncated; copy or download it again",
        )
    if header_digest(head, body) != digest:
        raise IntegrityError(
            "header checksum mismatch: the preamble or header is damaged",
            path=path,
            fix="copy or download the file again",
        )
    if flags & ~FLAG_TRAILER:
        raise RwsError(f"unknown flags 0x{flags:08x} in the preamble", path=path, fix=_UPGRADE)
    if data_offset % ALIGNMENT:
        raise IntegrityError(
            f"data section offset {data_offset} is not 64-byte aligned", path=path, fix=_MALFORMED
        )
    end = data_offset + data_len
    if end > size or (end < size and not flags & FLAG_TRAILER):
        raise IntegrityError(
            f"data section should end at byte {end:,} but the file has {size:,} bytes",
            path=path,
            fix="the file was truncated or appended to; copy or download it again",
        )
    signature = None
    if flags & FLAG_TRAILER:
        f.seek(end)
        signature = parse_block(f.read(MAX_BLOCK_BYTES + 1), path)
    doc = _parse_json(body, path)
    tensors = _validate_tensors(doc, data_len, path)
    return Header(
        version=(major, minor),
        tensors=tensors,
        label=_field(doc, "label", str, path, ""),
        fingerprint=_field(doc, "fingerprint", dict, path, {}),
        provenance=_field(doc, "provenance", dict, path, {}),
        data_offset=data_offset,
        data_length=data_len,
        raw=doc,
        digest=digest,
        signature=signature,
    )


def header_digest(head: bytes, body: bytes, major: int | None = None) -> bytes:
    """SHA-256 over preamble[0:32] + header; `major` substitutes the version field."""
    digested = head[:DIGESTED_PREAMBLE]
    if major is not None:
        digested = digested[:8] + struct.pack("<H", major) + digested[10:]
    return hashlib.sha256(digested + body).digest()


def _not_rws(head: bytes, path: str, size: int) -> RwsError:
    if size == 0:
        return RwsError(
            "file is empty, not a .rws file",
            path=path,
            fix="the copy or download was cut off: get the file again",
        )
    if len(head) < len(MAGIC) and MAGIC.startswith(head):
        return IntegrityError(
            f"file is {size} bytes, shorter than the {PREAMBLE_SIZE}-byte preamble",
            path=path,
            fix="the file was truncated; copy or download it again",
        )
    near = (
        len(head) >= len(MAGIC) and sum(a != b for a, b in zip(head[:8], MAGIC, strict=True)) <= 2
    )
    if near or head.startswith(MAGIC.replace(b"\r\n", b"\n")[:6]) or head[1:4] == b"RWS":
        return IntegrityError(
            "the .rws magic is damaged (line endings changed by a text-mode transfer?)",
            path=path,
            fix="transfer the file in binary mode",
        )
    kind = _sniff(head)
    return RwsError(
        f"not a .rws file{kind}",
        path=path,
        fix="pass a file written by `rwsfmt extract` or `rwsfmt merge`",
    )


def _sniff(head: bytes) -> str:
    """A hint of what the file is instead, for a friendlier error."""
    if head[:4] == b"PK\x03\x04":
        return " (it looks like a PyTorch checkpoint)"
    if len(head) >= 9 and head[8:9] == b"{":
        return " (it looks like a safetensors file)"
    if head[:1] == b"\x80":
        return " (it looks like a pickle file)"
    return ""


def _parse_json(body: bytes, path: str) -> dict[str, Any]:
    """The header as JSON, refusing what spec section 9, rule 9 forbids: duplicate keys,
    NaN/Infinity, numbers that overflow binary64, unpaired surrogate escapes and nesting
    deeper than `MAX_DEPTH`."""
    try:
        text = body.decode("utf-8")
        deep = nested_deeper(text, MAX_DEPTH)  # before parsing, which could recurse that deep
        doc = None if deep else strict_json(text)
        if _SURROGATE_ESCAPE.search(text) and not deep:  # rare: check the pairs by encoding
            canonical_json(doc)
    except ValueError as exc:  # (UnicodeError is one)
        problem = f"header is not valid JSON ({exc})"
        raise IntegrityError(problem, path=path, fix=_MALFORMED) from None
    if deep:
        raise IntegrityError(
            f"header nests arrays and objects more than {MAX_DEPTH} deep", path=path, fix=_MALFORMED
        )
    if not isinstance(doc, dict):
        raise IntegrityError("header is not a JSON object", path=path, fix=_MALFORMED)
    return doc


_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_DEPTH_STEP = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")  # +1 and -1 as signed bytes


def nested_deeper(text: str, limit: int) -> bool:
    """Whether valid JSON `text` nests arrays and objects more than `limit` deep: the
    running count of its brackets outside strings (linear, in C)."""
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text)).encode("ascii")
    steps = array.array("b", brackets.translate(_DEPTH_STEP))
    return max(itertools.accumulate(steps), default=0) > limit


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _field(doc: dict[str, Any], key: str, typ: type, path: str, default: Any) -> Any:
    value = doc.get(key, default)
    if not isinstance(value, typ):
        raise IntegrityError(
            f"header field {key!r} must be a {typ.__name__}", path=path, fix=_MALFORMED
        )
    return value


def _validate_tensors(doc: dict[str, Any], data_len: int, path: str) -> list[TensorInfo]:
    entries = doc.get("tensors")
    if not isinstance(entries, list):
        raise IntegrityError("header has no 'tensors' list", path=path, fix=_MALFORMED)
    if len(entries) > MAX_TENSORS:
        raise IntegrityError(
            f"{len(entries):,} tensors exceed the limit of {MAX_TENSORS:,}",
            path=path,
            fix=_MALFORMED,
        )
    out, names, offset = [], set(), 0
    for i, e in enumerate(entries):
        info = _validate_entry(e, i, path)
        if info.name in names:
            raise IntegrityError(
                f"tensor name {info.name!r} appears twice", path=path, fix=_MALFORMED
            )
        names.add(info.name)
        if info.offset != offset:
            raise IntegrityError(
                f"tensor {info.name!r} starts at {info.offset}, expected {offset} "
                "(blobs must be contiguous, in header order)",
                path=path,
                fix=_MALFORMED,
            )
        offset += info.length
        out.append(info)
    if offset != data_len:
        raise IntegrityError(
            f"tensors cover {offset:,} bytes but the data section has {data_len:,}",
            path=path,
            fix=_MALFORMED,
        )
    return out


# The fields of a tensor entry and their JSON types. JSON gives exact types, so the check is
# `type(value) is t`: fast (it runs once per tensor on every open), and a bool is never an int.
_ENTRY_FIELDS = (
    ("name", str),
    ("kind", str),
    ("shape", list),
    ("dtype", str),
    ("quant", dict),
    ("filter", str),
    ("codec", str),
    ("offset", int),
    ("length", int),
    ("decoded_length", int),
    ("sha256", str),
)
_ENTRY_KEYS = tuple(key for key, _ in _ENTRY_FIELDS)
_ENTRY_TYPES = tuple(typ for _, typ in _ENTRY_FIELDS)
MAX_OFFSET = 1 << 62


def _validate_entry(e: Any, i: int, path: str) -> TensorInfo:
    """One tensor entry checked against spec sections 2.2, 3.1 and 4."""
    where = f"tensor #{i}"

    def bad(problem: str, newer: bool = False) -> RwsError:
        """The error for a damaged entry, or (`newer`) one only a newer reader understands."""
        if newer:
            return RwsError(f"{where}: {problem}", path=path, fix=_UPGRADE)
        return IntegrityError(f"{where}: {problem}", path=path, fix=_MALFORMED)

    if not isinstance(e, dict):
        raise bad("entry is not a JSON object")
    values = tuple(map(e.get, _ENTRY_KEYS))
    if tuple(map(type, values)) != _ENTRY_TYPES:
        for key, typ in _ENTRY_FIELDS:
            if key not in e:
                raise bad(f"missing field {key!r}")
            if type(e[key]) is not typ:
                raise bad(f"field {key!r} has the wrong type")
    name, kind, shape, dtype, quant, filt, codec, offset, length, decoded_length, sha = values
    if not name or (len(name) > MAX_NAME_BYTES // 4 and len(name.encode("utf-8")) > MAX_NAME_BYTES):
        raise bad(f"name must be 1 to {MAX_NAME_BYTES} bytes")
    where = f"tensor {name!r}"
    if kind not in KINDS:
        raise bad(f"unknown kind {kind!r} (known: {', '.join(KINDS)})")
    if len(shape) > MAX_RANK:
        raise bad(f"rank {len(shape)} exceeds {MAX_RANK}")
    numel, extent = 1, 1  # extent counts 0 as 1, so [0, 2**60] is refused too
    for d in shape:
        if type(d) is not int or d < 0:
            raise bad(f"shape {shape} has a dimension that is not a natural number")
        numel *= d
        extent *= d or 1
        if extent > MAX_ELEMENTS:
            raise bad(f"shape {shape} has more than {MAX_ELEMENTS:,} elements")
    if dtype not in SOURCE_DTYPES:
        raise bad(f"unknown dtype {dtype!r}")
    _validate_quant(quant, shape, bad)
    if filt not in FILTERS:
        raise bad(f"unknown filter {filt!r}", newer=True)
    if filt == "byteplane" and quant["bits"] not in (16, 32):
        raise bad("the byteplane filter applies to 16- and 32-bit values only")
    if codec not in CODECS:
        raise bad(f"unknown codec {codec!r} (known: {', '.join(CODECS)})", newer=True)
    if not _SHA256_HEX.fullmatch(sha):
        raise bad("sha256 must be 64 lowercase hex digits")
    if not (0 <= offset <= MAX_OFFSET and 0 <= length <= MAX_OFFSET >= decoded_length >= 0):
        for key in ("offset", "length", "decoded_length"):
            if not 0 <= e[key] <= MAX_OFFSET:
                raise bad(f"field {key!r} = {e[key]} is out of range")
    stats = e.get("stats", {})
    if type(stats) is not dict:
        raise bad("field 'stats' must be an object")
    info = TensorInfo(
        name=name,
        kind=kind,
        shape=tuple(shape),
        dtype=dtype,
        quant=quant,
        filter=filt,
        codec=codec,
        offset=offset,
        length=length,
        decoded_length=decoded_length,
        sha256=sha,
        stats=stats,
    )
    expected = scheme_of(quant).payload_length(quant, shape, numel)
    if decoded_length != expected:
        raise bad(f"decoded_length {decoded_length} should be {expected} for its shape")
    if codec == "raw" and length != decoded_length:
        raise bad("a raw blob's length must equal its decoded_length")
    if codec == "zstd" and decoded_length > MAX_ZSTD_RATIO * length:
        raise bad(
            f"decoded_length {decoded_length:,} is more than a {length:,}-byte zstd frame can hold"
        )
    return info


def _validate_quant(q: dict[str, Any], shape: list[int], bad: Any) -> None:
    """Spec 3.1: `bits` an integer, a known `scheme`, and that scheme's own rules."""
    bits = q.get("bits")
    if not isinstance(bits, int) or isinstance(bits, bool):
        raise bad(f"quant.bits {bits!r} is not an integer")
    name = q.get("scheme")
    if type(name) is not str or name not in SCHEMES:
        raise bad(f"unknown quantization scheme {name!r}", newer=True)
    SCHEMES[name].validate(q, tuple(shape), bad)


# --------------------------------------------------------------------------- verifying


@dataclass
class VerifyReport:
    """What `verify` found in one file: `problems` is empty when every check passed, and
    `fixes` says how to fix them (each fix once)."""

    path: str
    ok: bool
    tensors: int = 0
    bytes_checked: int = 0
    problems: list[str] = field(default_factory=list)
    fixes: list[str] = field(default_factory=list)
    version: str | None = None
    signed_by: str | None = None  # the signing key's fingerprint, for a signed file
    signature_verified: bool | None = None  # None when no key was given

    def failed(self, problems: list[IntegrityError]) -> VerifyReport:
        """The report with `problems` (none: every check passed) and their fixes."""
        self.problems = [exc.problem for exc in problems]
        self.fixes = list(dict.fromkeys(exc.fix for exc in problems))
        self.ok = not problems
        return self

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "ok": self.ok,
            "version": self.version,
            "tensors": self.tensors,
            "bytes_checked": self.bytes_checked,
            "problems": self.problems,
            **({"fix": "; ".join(self.fixes)} if self.fixes else {}),
            "signed_by": self.signed_by,
            "signature_verified": self.signature_verified,
        }


def verify(
    path: str | os.PathLike, *, max_decoded_bytes: float | None = None, key: Any = None
) -> VerifyReport:
    """Check every byte of a file: preamble, header digest, layout, every blob and frame,
    and the signature block's checksum; with `key` (an Ed25519 public key or the path of its
    file), also that the file is signed by that key and the signature verifies.

    Input errors that mean "not a .rws file at all", a file over the decode limit, or a
    key that cannot be read, still raise `RwsError`; damage and signature failures are
    collected into the report so one problem does not hide another.
    """
    path = as_path(path, "the path of a .rws file")
    report = VerifyReport(path=path, ok=False)
    if key is not None:
        from .signing.keys import load_public_key

        key = load_public_key(key)  # a bad key is the caller's error, before any file
        report.signature_verified = False
    try:
        reader = RwsReader(path, max_decoded_bytes=max_decoded_bytes)
    except IntegrityError as exc:
        return report.failed([exc])
    with reader:
        h = reader.header
        report.version = f"{h.version[0]}.{h.version[1]}"
        report.tensors = len(h.tensors)
        report.signed_by = h.signature.fingerprint if h.signature else None
        report.bytes_checked, problems = reader.verify_tensors()
    if key is not None:
        from .signing.verify import check_signature

        try:
            check_signature(h, key, path)
            report.signature_verified = True
        except IntegrityError as exc:
            problems.append(exc)
    return report.failed(problems)
