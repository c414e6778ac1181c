"""safetensors files: a validated header, tensors read one at a time, streaming writes.

The layout (https://github.com/huggingface/safetensors): an 8-byte little-endian header
length N, N bytes of JSON `{name: {"dtype", "shape", "data_offsets": [begin, end]},
"__metadata__": {str: str}}` padded with spaces, then the data section.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import cached_property
from typing import Any, BinaryIO

import torch

from ..applied import METADATA_KEY, decode, encode
from ..atomic import atomic_write
from ..errors import RwsError
from ..inputs import open_input, strict_json
from ..names import natural_sorted, normalize_keys
from .base import Checkpoint, Format, Layout, refuse_unsupported

MAX_HEADER = 100 << 20
MAX_RANK = 64  # far beyond any real tensor; bounds the work a hostile shape can cause
_MAX_BYTES = (1 << 63) - 1  # what torch can address
_COPY_CHUNK = 16 << 20
REDOWNLOAD = "the file is damaged; re-download or re-save it"

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _code, _attr in [
    ("U16", "uint16"),
    ("U32", "uint32"),
    ("U64", "uint64"),
    ("F8_E4M3", "float8_e4m3fn"),
    ("F8_E5M2", "float8_e5m2"),
]:
    if hasattr(torch, _attr):
        DTYPES[_code] = getattr(torch, _attr)
CODES = {dtype: code for code, dtype in DTYPES.items()}

Entry = tuple[torch.dtype, tuple[int, ...], tuple[int, int]]


class SafetensorsCheckpoint(Checkpoint):
    """A safetensors file: the header is parsed and validated on opening; tensors are read
    into fresh memory one at a time (not memory-mapped, so resident memory stays small).
    `metadata` holds the header's `__metadata__` strings; the record of applied signatures
    is the string under `rwsfmt.applied`."""

    owns_tensors = True
    streams_writes = True

    def __init__(self, path: str) -> None:
        self._file = open_input(path, "a safetensors file")
        try:
            self._header_len, self._entries, self.metadata = read_header(self._file, path)
            for key, (dtype, _, _) in self._entries.items():
                refuse_unsupported(path, key, dtype)
        except BaseException:
            self._file.close()
            raise
        prefix, self._raw = normalize_keys(self._entries)
        self._normal = {k: n for n, k in self._raw.items()}
        names = natural_sorted(self._raw)
        super().__init__(path, Format.SAFETENSORS, names, ordered=False, files=[path])
        self.layout = Layout(prefix=prefix)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[self._raw[self.resolve(name)]][1]

    def dtype(self, name: str) -> torch.dtype:
        return self._entries[self._raw[self.resolve(name)]][0]

    def tensor(self, name: str, buffer: torch.Tensor | None = None) -> torch.Tensor:
        """One tensor read into fresh memory, or into `buffer` (a uint8 CPU tensor of at
        least its byte size, reused across calls to spare the allocation; the result
        aliases it)."""
        dtype, shape, (begin, end) = self._entries[self._raw[self.resolve(name)]]
        if buffer is not None and buffer.numel() >= end - begin:
            out = buffer[: end - begin].view(dtype).view(shape)
        else:
            out = torch.empty(shape, dtype=dtype)
        buf = memoryview(out.view(-1).view(torch.uint8).numpy()) if end > begin else b""
        self._file.seek(8 + self._header_len + begin)
        if end > begin and self._file.readinto(buf) != end - begin:
            raise RwsError(f"tensor {name!r} is truncated", path=self.path, fix=REDOWNLOAD)
        return out

    @property
    def write_order(self) -> list[str]:
        return [self._normal[raw] for raw, _ in self._by_offset()]

    @cached_property
    def applied(self) -> list[dict[str, Any]]:
        return decode(self.metadata.get(METADATA_KEY), self.path)

    def write(
        self,
        out_path: str | os.PathLike,
        replacements: Mapping[str, torch.Tensor],
        applied: Sequence[Mapping[str, Any]] | None = None,
    ) -> None:
        for name in replacements:  # names only: values are fetched as they are written
            self.resolve(name)
        header = None if applied is None else self._header_with(applied)
        with atomic_write(out_path) as out:
            self._file.seek(0)
            if header is None:
                copy_bytes(self._file, out, 8 + self._header_len)  # the header, verbatim
            else:
                out.write(struct.pack("<Q", len(header)) + header)
            for raw, (_, _, (begin, end)) in self._by_offset():
                self._file.seek(8 + self._header_len + begin)
                name = self._normal[raw]
                if name in replacements:
                    value = self._checked(name, replacements[name])
                    out.write(value.view(-1).view(torch.uint8).numpy().data)
                else:
                    copy_bytes(self._file, out, end - begin)

    def _header_with(self, applied: Sequence[Mapping[str, Any]]) -> bytes:
        """This file's header with `applied` as its record (none when empty). Everything else
        keeps its place: compact JSON in the file's own key order, padded with spaces to 8
        bytes, as the safetensors library writes it, so that a header gets back its very
        bytes when the record returns to what it was."""
        self._file.seek(8)
        doc = strict_json(self._file.read(self._header_len).decode("utf-8"))
        metadata = dict(doc.get("__metadata__") or {})
        if applied:
            metadata[METADATA_KEY] = encode(applied)
        else:
            metadata.pop(METADATA_KEY, None)
        if "__metadata__" in doc and metadata:
            doc["__metadata__"] = metadata  # in its place
        elif metadata:
            doc = {"__metadata__": metadata, **doc}  # first, where safetensors puts it
        else:
            doc.pop("__metadata__", None)
        body = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        return body + b" " * (-len(body) % 8)

    def _by_offset(self) -> list[tuple[str, Entry]]:
        return sorted(self._entries.items(), key=lambda kv: kv[1][2][0])

    def close(self) -> None:
        self._file.close()


def read_header(f: BinaryIO, path: str) -> tuple[int, dict[str, Entry], dict[str, str]]:
    """Parse and validate a safetensors header: (its length, the tensor entries, the
    `__metadata__` strings).

    As strict as the safetensors library, and stricter where it is lenient: whole
    non-negative numbers only, no key given twice, and the tensors, sorted by offset, must
    cover the data section exactly (no gap, overlap or trailing bytes), so that a file we
    accept is one every reader accepts, and a copy we write is one too.
    """
    size = os.fstat(f.fileno()).st_size

    def bad(problem: str) -> RwsError:
        return RwsError(f"is not a valid safetensors file: {problem}", path=path, fix=REDOWNLOAD)

    if size < 8:
        raise bad(f"{size} bytes is too short")
    (n,) = struct.unpack("<Q", f.read(8))
    if n > MAX_HEADER or 8 + n > size:
        raise bad(f"header length {n} does not fit the file ({size} bytes)")
    try:
        doc = strict_json(f.read(n).decode("utf-8"))
    except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise bad(f"header is not valid JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise bad("header is not a JSON object")
    metadata = doc.pop("__metadata__", None)
    if metadata is not None and not (
        isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())
    ):
        raise bad("__metadata__ is not an object of strings")
    entries = {}
    for name, e in doc.items():
        try:
            entries[name] = _entry(e)
        except ValueError as exc:
            raise bad(f"tensor {name!r}: {exc}") from None
    end = 0
    for name, (_, _, (begin, stop)) in sorted(entries.items(), key=lambda kv: kv[1][2]):
        if begin != end:
            gap = "overlaps the tensor before it" if begin < end else f"leaves a gap at {end}"
            raise bad(f"tensor {name!r} starts at byte {begin} of the data and {gap}")
        end = stop
    if end != size - 8 - n:
        raise bad(f"the tensors cover {end} bytes, but the data section holds {size - 8 - n}")
    return n, entries, metadata or {}


def _entry(e: Any) -> Entry:
    """One header entry as (dtype, shape, offsets); ValueError saying what is wrong."""
    if not isinstance(e, dict) or not {"dtype", "shape", "data_offsets"} <= e.keys():
        raise ValueError("expected an object with dtype, shape and data_offsets")
    code, shape, offsets = e["dtype"], e["shape"], e["data_offsets"]
    if not isinstance(code, str) or code not in DTYPES:
        raise ValueError(f"unknown dtype {json.dumps(code)}")
    dtype = DTYPES[code]
    if not _counts(shape) or len(shape) > MAX_RANK:
        raise ValueError(
            f"shape {json.dumps(shape)} is not a list of at most {MAX_RANK} whole numbers >= 0"
        )
    if not _counts(offsets) or len(offsets) != 2 or offsets[0] > offsets[1]:
        raise ValueError(f"data_offsets {json.dumps(offsets)} is not [begin, end], begin <= end")
    # torch lays out strides as products of the dimensions: bound them, even past a zero
    if math.prod(max(d, 1) for d in shape) * dtype.itemsize > _MAX_BYTES:
        raise ValueError(f"shape {shape} is too large")
    nbytes = math.prod(shape) * dtype.itemsize
    if offsets[1] - offsets[0] != nbytes:
        raise ValueError(
            f"{code} {shape} takes {nbytes} bytes, but data_offsets {offsets} span "
            f"{offsets[1] - offsets[0]}"
        )
    return dtype, tuple(shape), (offsets[0], offsets[1])


def _counts(value: Any) -> bool:
    """A list of whole numbers >= 0 (JSON true and 2.0 are not)."""
    return isinstance(value, list) and all(type(x) is int and x >= 0 for x in value)


def write_file(
    path: str | os.PathLike,
    specs: Iterable[tuple[str, torch.dtype, tuple[int, ...]]],
    fetch: Callable[[str], torch.Tensor],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write a safetensors file atomically from `(key, dtype, shape)` specs, fetching each
    tensor's values (on any device, contiguous or not) only when its bytes are written.

    Data follows the specs' order; the header is compact JSON with sorted keys, padded with
    spaces to 8 bytes, so the same tensors give the same bytes.
    """
    specs = list(specs)
    header: dict[str, Any] = {}
    offset = 0
    for key, dtype, shape in specs:
        if dtype not in CODES:
            raise RwsError(
                f"tensor {key!r} has dtype {dtype}, which safetensors cannot store",
                fix="write a PyTorch file (.pt) instead, or cast the tensor",
            )
        nbytes = math.prod(shape) * dtype.itemsize
        header[key] = {
            "dtype": CODES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    if metadata:
        header["__metadata__"] = dict(metadata)
    body = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
    body += b" " * (-len(body) % 8)
    with atomic_write(path) as out:
        out.write(struct.pack("<Q", len(body)))
        out.write(body)
        for key, dtype, shape in specs:
            value = fetch(key)
            if value.dtype != dtype or tuple(value.shape) != tuple(shape):
                raise RwsError(
                    f"tensor {key!r} changed dtype or shape while being written",
                    fix="do not change the model while it is written; try again",
                )
            value = value.detach().to("cpu").contiguous()
            if value.numel():
                out.write(value.view(-1).view(torch.uint8).numpy().data)


def copy_bytes(src: Any, dst: Any, n: int) -> None:
    """Copy `n` bytes from the current position of `src` to `dst`: inside the kernel where
    the platform allows it (`os.copy_file_range`), else in bounded chunks."""
    pos = src.tell()
    if hasattr(os, "copy_file_range"):
        dst.flush()  # the kernel appends at the descriptor's offset
        try:
            while n > 0:
                got = os.copy_file_range(src.fileno(), dst.fileno(), n, pos)
                if not got:
                    break
                pos, n = pos + got, n - got
        except OSError:  # e.g. not supported between these file systems: copy the rest below
            pass
        src.seek(pos)
    while n > 0:
        chunk = src.read(min(n, _COPY_CHUNK))
        if not chunk:
            raise RwsError("file is shorter than its header says", path=src.name, fix=REDOWNLOAD)
        dst.write(chunk)
        n -= len(chunk)
