"""Check a `torch.save` zip file's storages against its zip records before it is memory-mapped.

`torch.load(..., mmap=True)` slices each storage out of a map of the whole file at its
record's offset, for as many bytes as the pickle declares, without the record-size check
its other path makes: a storage declared longer than its record reads the records after it
(wrong weights, silently). So the pickle is read once more here, with no tensor data: every
storage it declares must have a record `data/KEY` of exactly its size, every tensor must lie
within its storage, and no two records may overlap.
"""

from __future__ import annotations

import io
import itertools
import pickle
import struct
import warnings
import zipfile
from collections.abc import Callable
from typing import Any, BinaryIO

import torch

from ..errors import RwsError
from .layouts import RESAVE

LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, ..., file name length, extra length
LOCAL_MAGIC = b"PK\x03\x04"


def check_storages(path: str, f: BinaryIO, trust_pickle: bool) -> None:
    """Refuse a `torch.save` zip (open in `f`) whose pickle declares a storage that its
    records do not hold exactly, or a tensor reaching past its storage, or whose records
    overlap. Reads the pickle (no tensor data); `trust_pickle` as `torch.load`'s. Call it
    where torch.load would run: within `safe_globals(SAFE_GLOBALS)` (which does not nest)."""
    with zipfile.ZipFile(f) as z:
        records = _records(path, f, z)
        folder = next(iter(records)).split("/", 1)[0]
        pickled = records.get(f"{folder}/data.pkl")
        if pickled is None:
            return  # not a torch.save file: torch.load says what it is
        declared, tensors = _declared(z.read(pickled), trust_pickle)
    for key, nbytes in declared.items():
        info = records.get(f"{folder}/data/{key}")
        if info is None:
            _lie(path, f"its pickle declares storage {key!r}, which has no record data/{key}")
        if info.compress_type != zipfile.ZIP_STORED:
            _lie(path, f"its record data/{key} is compressed, which torch cannot map")
        if info.file_size != nbytes:
            _lie(
                path,
                f"its pickle declares storage {key!r} as {nbytes:,} bytes, but its record "
                f"data/{key} holds {info.file_size:,}",
            )
    for key, t in tensors:
        end = _extent(t)
        if end > declared[key]:
            _lie(
                path,
                f"a tensor of shape {tuple(t.shape)} reaches byte {end:,} of storage {key!r}, "
                f"which holds {declared[key]:,}",
            )


def _records(path: str, f: BinaryIO, z: zipfile.ZipFile) -> dict[str, zipfile.ZipInfo]:
    """The zip's records by name, once each checked to lie within the file, apart from
    every other record."""
    size = f.seek(0, io.SEEK_END)
    spans, records = [], {}
    for info in z.infolist():
        if info.filename in records:
            _lie(path, f"it holds two records named {info.filename!r}")
        records[info.filename] = info
        f.seek(info.header_offset)
        head = f.read(LOCAL_HEADER.size)
        if len(head) < LOCAL_HEADER.size or head[:4] != LOCAL_MAGIC:
            _lie(path, f"record {info.filename!r} has no local header where its entry says")
        _, name_length, extra_length = LOCAL_HEADER.unpack(head)
        start = info.header_offset + LOCAL_HEADER.size + name_length + extra_length
        spans.append((info.header_offset, start + info.compress_size, info.filename))
        if start + info.compress_size > size:
            _lie(path, f"record {info.filename!r} reaches past the end of the file")
    spans.sort()
    for (_, end, name), (begin, _, other) in itertools.pairwise(spans):
        if begin < end:
            _lie(path, f"records {name!r} and {other!r} overlap")
    if not records:
        _lie(path, "it is an empty zip file")
    return records


def _declared(
    pickled: bytes, trust_pickle: bool
) -> tuple[dict[str, int], list[tuple[str, torch.Tensor]]]:
    """(storage key -> bytes its pickle declares, [(key, tensor on the meta device)]): the
    pickle read as `torch.load` reads it, every storage on the meta device (no data)."""
    declared: dict[str, int] = {}
    by_storage: dict[int, str] = {}

    def persistent_load(saved_id: Any) -> torch.storage.TypedStorage:
        if not (isinstance(saved_id, tuple) and len(saved_id) == 5):
            raise pickle.UnpicklingError(f"unknown persistent id {saved_id!r}")
        _, storage_type, key, _, numel = saved_id
        key = key.decode("ascii") if isinstance(key, bytes) else str(key)
        dtype = torch.uint8 if storage_type is torch.UntypedStorage else storage_type.dtype
        # as in torch.load, a storage named again is the one first declared, at its size
        nbytes = declared.setdefault(key, numel * dtype.itemsize)
        storage = torch.UntypedStorage(nbytes, device="meta")
        by_storage[storage._cdata] = key
        return torch.storage.TypedStorage(wrap_storage=storage, dtype=dtype, _internal=True)

    unpickler = _unpickler(trust_pickle)(io.BytesIO(pickled), encoding="utf-8")
    unpickler.persistent_load = persistent_load
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch's: typed storages are deprecated
        obj = unpickler.load()
    tensors = []
    for t in _tensors(obj):
        key = by_storage.get(t.untyped_storage()._cdata)
        if key is not None:  # (a tensor the pickle made without a storage holds no data)
            tensors.append((key, t))
    return declared, tensors


def _unpickler(trust_pickle: bool) -> Callable[..., Any]:
    """The unpickler `torch.load` uses with `weights_only`, or (trusted) one that builds
    tensors, storages and dicts and nothing else: a trusted pickle's code runs once, in
    torch.load, not twice."""
    if not trust_pickle:
        from torch._weights_only_unpickler import Unpickler

        return Unpickler

    class TensorsOnly(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            rebuild = module == "torch._utils" and name.startswith("_rebuild_")
            storage = module == "torch" and name.endswith("Storage")
            if rebuild or storage or (module, name) in _PLAIN:
                return super().find_class(module, name)
            return _Stub

    return TensorsOnly


# what torch.save pickles beside tensors and storages, none of which runs code
_PLAIN = {
    ("collections", "OrderedDict"),
    ("torch", "Size"),
    ("torch", "device"),
    ("torch._tensor", "_rebuild_from_type_v2"),
    ("torch.nn.parameter", "Parameter"),
}


class _Stub:
    """Stands in for every other class or function of a trusted pickle, doing nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __call__(self, *args: Any, **kwargs: Any) -> _Stub:
        return _Stub()

    def __setstate__(self, state: Any) -> None:
        pass


def _tensors(obj: Any) -> list[torch.Tensor]:
    """Every tensor in `obj`: in its dicts, lists, tuples and attributes (argparse
    namespaces), however deeply nested."""
    found, stack, seen = [], [obj], set()
    while stack:
        item = stack.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, torch.Tensor):
            found.append(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple, set, frozenset)):
            stack.extend(item)
        elif hasattr(item, "__dict__"):
            stack.extend(vars(item).values())
    return found


def _extent(t: torch.Tensor) -> int:
    """The end, in bytes from its storage's start, of the memory tensor `t` reads."""
    if t.numel() == 0:
        return 0
    last = t.storage_offset() + sum((n - 1) * s for n, s in zip(t.shape, t.stride(), strict=True))
    return (last + 1) * t.element_size()


def _lie(path: str, problem: str) -> None:
    raise RwsError(
        f"is a PyTorch file whose storages disagree with its contents: {problem}",
        path=path,
        fix=f"the file is damaged or forged; re-download it, or {RESAVE}",
    )
