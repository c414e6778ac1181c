"""Lying PyTorch files, made by rewriting real `torch.save` zips: a storage record shorter or
longer than its pickle declares, a pickle declaring more elements than its record holds, a
tensor reaching past its storage, records that overlap. Each is a real zip that torch's own
writer laid out; only the named part lies."""

from __future__ import annotations

import pickletools
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch

CENTRAL = b"PK\x01\x02"


def records(path: Path) -> tuple[str, dict[str, bytes]]:
    """(the archive folder, record name within it -> bytes) of a `torch.save` zip."""
    with zipfile.ZipFile(path) as z:
        folder = z.namelist()[0].split("/", 1)[0]
        return folder, {i.filename.split("/", 1)[1]: z.read(i) for i in z.infolist()}


def rewrite(src: Path, dst: Path, edit: Callable[[dict[str, bytes]], None]) -> Path:
    """Write `src`'s records, changed in place by `edit`, with torch's own zip writer (so
    records stay aligned for memory-mapping, as torch.save lays them out)."""
    _, found = records(src)
    edit(found)
    writer = torch._C.PyTorchFileWriter(str(dst))
    for name, data in found.items():
        if name != ".data/serialization_id":  # the writer adds its own
            writer.write_record(name, data, len(data))
    writer.write_end_of_file()
    return dst


def declare(pickled: bytes, key: str, numel: int) -> bytes:
    """`pickled` (a data.pkl) with storage `key` declared as `numel` elements: in its
    persistent id ('storage', type, key, location, numel), the int becomes LONG1 `numel`."""
    ops = [o for o in pickletools.genops(pickled) if not o[0].name.endswith(("PUT", "MEMOIZE"))]
    for i, (op, arg, _) in enumerate(ops):
        if "UNICODE" in op.name and arg == key and ops[i + 3][0].name == "TUPLE":
            start, end = ops[i + 2][2], ops[i + 3][2]
            raw = numel.to_bytes((numel.bit_length() + 8) // 8, "little", signed=True)
            return pickled[:start] + b"\x8a" + bytes([len(raw)]) + raw + pickled[end:]
    raise AssertionError(f"no storage {key!r} in the pickle")


def patch_central(data: bytes, name: str, *, grow: int = 0) -> bytes:
    """`data` (a zip) with the central directory entry of record `name` declaring `grow`
    bytes more than it holds (compressed and uncompressed size alike)."""
    at = 0
    target = name.encode()
    while (at := data.find(CENTRAL, at + 1)) != -1:
        (length,) = struct.unpack_from("<H", data, at + 28)
        if data[at + 46 : at + 46 + length].endswith(target):
            csize, usize = struct.unpack_from("<II", data, at + 20)
            entry = bytearray(data)
            struct.pack_into("<II", entry, at + 20, csize + grow, usize + grow)
            return bytes(entry)
    raise AssertionError(f"no record {name!r}")


def lying_files(model_pt: Path, folder: Path) -> dict[str, Path]:
    """Every lie, made from `model_pt` (a torch.save state dict of at least three tensors,
    the first of 16 or more elements): name -> the lying file."""
    folder.mkdir(parents=True, exist_ok=True)
    _, found = records(model_pt)
    first = found["data/0"]
    numel = len(first) // 4

    def cut(recs: dict[str, bytes]) -> None:  # a short record: torch reads the next ones
        recs["data/0"] = first[: len(first) // 2]

    def longer(recs: dict[str, bytes]) -> None:
        recs["data/0"] = first + bytes(256)

    def declared_more(recs: dict[str, bytes]) -> None:  # 10x the elements, same record
        recs["data.pkl"] = declare(recs["data.pkl"], "0", 10 * numel)

    def declared_huge(recs: dict[str, bytes]) -> None:
        recs["data.pkl"] = declare(recs["data.pkl"], "0", 1 << 40)

    def view_past(recs: dict[str, bytes]) -> None:  # record and storage agree: the view lies
        recs["data.pkl"] = declare(recs["data.pkl"], "0", numel // 2)
        recs["data/0"] = first[: 4 * (numel // 2)]

    out = {
        name: rewrite(model_pt, folder / f"{name}.pt", edit)
        for name, edit in [
            ("short", cut),
            ("long", longer),
            ("declared_more", declared_more),
            ("declared_huge", declared_huge),
            ("view_past", view_past),
        ]
    }
    overlap = folder / "overlap.pt"
    overlap.write_bytes(patch_central(model_pt.read_bytes(), "/data/0", grow=200))
    out["overlap"] = overlap
    return out
