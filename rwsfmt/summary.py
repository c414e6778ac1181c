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
    """The file-level fields, and bits per parameter counting every byte of the file
    (spec section 3.8): the tensors' blobs, the preamble and header, any signature block."""
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
        "header_bytes": h.data_offset,  # the preamble and the header, padding included
        "data_bytes": h.data_length,
        "signature_block_bytes": file_size - h.data_offset - h.data_length,
        "float32_bytes": 4 * numel,
        "ratio_to_float32": file_size / (4 * numel) if numel else None,
        "bits_per_parameter": 8 * file_size / numel if numel else None,
        "header_bits_per_parameter": 8 * h.data_offset / numel if numel else None,
        "parameters": numel,
        "tensor_count": len(h.tensors),
        "tensors": [describe_tensor(t) for t in shown],
    }


def describe_tensor(t: TensorInfo) -> dict[str, Any]:
    """One tensor: how it is stored (`scheme`; a sparse tensor's kept values are in
    `values_scheme`, and `symmetric`, `granularity`, `axis` and `group_size` describe them),
    how many values it keeps (`nnz`, `density`), and its bits per parameter (its blob:
    codes, scales, zero points and positions, after the codec).

    The keys are in sorted order, so that `inspect --json` can write the rows of 65,536
    tensors without sorting each (tests/test_cli_inspect_verify.py checks it)."""
    q = t.quant
    sparse = q["scheme"] == "sparse"
    v = q["values"] if sparse else q
    granularity = v.get("granularity", "none")
    numel = t.numel
    nnz = q["nnz"] if sparse else numel
    length = t.length
    return {
        "axis": v.get("axis") if granularity == "channel" else None,
        "bits": int(q["bits"]),
        "bits_per_parameter": 8 * length / numel if numel else None,
        "codec": t.codec,
        "density": nnz / numel if numel else None,
        "dtype": t.dtype,
        "filter": t.filter,
        "float32_bytes": 4 * numel,
        "granularity": granularity,
        "group_size": v.get("group_size") if granularity == "group" else None,
        "kind": t.kind,
        "name": t.name,
        "nnz": nnz,
        "numel": numel,
        "ratio_to_float32": length / (4 * numel) if numel else None,
        "scheme": q["scheme"],
        "shape": list(t.shape),
        "stats": t.stats,
        "stored_bytes": length,
        "symmetric": v.get("symmetric"),
        "values_scheme": v["scheme"],
    }
