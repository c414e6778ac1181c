"""A plain-data description of a `.rws` file, for `inspect` (never imports torch)."""

from __future__ import annotations

import os
from typing import Any

from .container import Header, RwsReader, TensorInfo


def describe(path: str | os.PathLike, max_tensors: int | None = None) -> dict[str, Any]:
    """Read only the header of `path` and describe the file and its tensors as JSON-ready
    data: every tensor, or the first `max_tensors` (the totals always cover all of them)."""
    with RwsReader(path) as reader:
        h = reader.header
        size = os.path.getsize(reader.path)
    return describe_header(h, os.fspath(path), size, max_tensors)


def describe_header(
    h: Header, path: str, file_size: int, max_tensors: int | None = None
) -> dict[str, Any]:
    numel = sum(t.numel for t in h.tensors)
    shown = h.tensors if max_tensors is None else h.tensors[:max_tensors]
    return {
        "path": path,
        "format_version": f"{h.version[0]}.{h.version[1]}",
        "label": h.label,
        "fingerprint": h.fingerprint,
        "signature": h.signature.to_json() if h.signature else None,
        "provenance": h.provenance,
        "file_bytes": file_size,
        "float32_bytes": 4 * numel,
        "ratio_to_float32": file_size / (4 * numel) if numel else None,
        "parameters": numel,
        "tensor_count": len(h.tensors),
        "tensors": [describe_tensor(t) for t in shown],
    }


def describe_tensor(t: TensorInfo) -> dict[str, Any]:
    q = t.quant
    return {
        "name": t.name,
        "kind": t.kind,
        "shape": list(t.shape),
        "dtype": t.dtype,
        "numel": t.numel,
        "bits": t.bits,
        "scheme": q["scheme"],
        "symmetric": q.get("symmetric"),
        "granularity": t.granularity,
        "axis": q.get("axis") if t.granularity == "channel" else None,
        "group_size": q.get("group_size") if t.granularity == "group" else None,
        "codec": t.codec,
        "filter": t.filter,
        "stored_bytes": t.length,
        "float32_bytes": 4 * t.numel,
        "ratio_to_float32": t.length / (4 * t.numel) if t.numel else None,
        "stats": t.stats,
    }
