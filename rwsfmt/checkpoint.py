"""Model checkpoints read one tensor at a time and written back in the format they came in.

ckpt = open_checkpoint("model.safetensors")    # or a .pt/.pth/.bin file, a sharded HF folder,
ckpt.names                                     # a state dict or an nn.Module
ckpt.tensor("features.0.weight")
ckpt.write("patched.safetensors", {"features.0.weight": new})

Names are normalized: wrappers such as `{"state_dict": ...}` and a `module.` prefix
(DataParallel/DDP) are removed on reading and put back on writing.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import struct
import tempfile
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch

from .atomic import atomic_path, atomic_write, current_umask
from .errors import RwsError

SAFETENSORS_INDEX = "model.safetensors.index.json"
PYTORCH_INDEX = "pytorch_model.bin.index.json"
_SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")
WRAPPER_KEYS = ("state_dict", "model", "model_state_dict")
DDP_PREFIX = "module."
MAX_SAFETENSORS_HEADER = 100 << 20
_COPY_CHUNK = 16 << 20

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
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
        SAFETENSORS_DTYPES[_code] = getattr(torch, _attr)

_RESAVE = "re-save it with torch.save(model.state_dict(), ...) or safetensors"


class Checkpoint:
    """A lazily read model checkpoint: a PyTorch file, a safetensors file, or a sharded HF folder.

    `names` lists every tensor (floating and not) under its normalized name, in depth order:
    the checkpoint's own order for PyTorch files ("checkpoint"), a numeric-aware sort for
    safetensors, whose files store names sorted ("natural-sort").
    """

    path: str
    format: str  # "pytorch", "safetensors" or "state_dict" (in memory)
    names: list[str]
    depth_order: str  # "checkpoint" or "natural-sort"
    sharded: bool = False
    owns_tensors: bool = False  # tensor() returns fresh memory that callers may modify
    # write() fetches replacement values one at a time, in `write_order`, and is done with
    # each before fetching the next: a lazy Mapping may compute them on demand and reuse memory
    streams_writes: bool = False

    def __init__(self, path: str, format: str, depth_order: str, names: list[str]) -> None:
        self.path, self.format, self.depth_order, self.names = path, format, depth_order, names
        self._known = set(names)

    def shape(self, name: str) -> tuple[int, ...]:
        """The tensor's shape, without reading its data."""
        raise NotImplementedError

    def dtype(self, name: str) -> torch.dtype:
        """The tensor's dtype, without reading its data."""
        raise NotImplementedError

    def tensor(self, name: str) -> torch.Tensor:
        """One tensor on the CPU (read from disk now for safetensors, memory-mapped for .pt)."""
        raise NotImplementedError

    @property
    def write_order(self) -> list[str]:
        """Names in the order `write()` stores them (and fetches their replacements)."""
        return self.names

    def write(self, out_path: str | os.PathLike, replacements: Mapping[str, torch.Tensor]) -> None:
        """Write this checkpoint in its own format with the named tensors replaced.

        Every other tensor, wrapper entry, `module.` prefix and metadata is kept as it was;
        each file is written atomically, and `out_path` may be this checkpoint's own path.
        """
        raise NotImplementedError

    def close(self) -> None:
        """Release open files and memory maps."""

    def __contains__(self, name: object) -> bool:
        return name in self._known

    def __len__(self) -> int:
        return len(self.names)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __repr__(self) -> str:
        return f"<Checkpoint {self.format} {self.path!r}: {len(self.names)} tensors>"

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check(self, name: str) -> None:
        if name not in self._known:
            raise RwsError(f"no tensor named {name!r} in this checkpoint", path=self.path)

    def _checked_replacements(
        self, replacements: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Replacements on the CPU, contiguous, after checking names, shapes and dtypes."""
        return {name: self._checked(name, value) for name, value in replacements.items()}

    def _checked(self, name: str, value: torch.Tensor) -> torch.Tensor:
        """One replacement on the CPU, contiguous, after checking its name, shape and dtype."""
        self._check(name)
        if tuple(value.shape) != self.shape(name) or value.dtype != self.dtype(name):
            raise RwsError(
                f"replacement for {name!r} is {value.dtype} {tuple(value.shape)}, but the "
                f"checkpoint holds {self.dtype(name)} {self.shape(name)}",
                path=self.path,
                fix="cast and reshape the new tensor to the original dtype and shape",
            )
        return value.detach().to("cpu").contiguous()


def open_checkpoint(
    source: str | os.PathLike | Mapping[str, Any] | torch.nn.Module, *, trust_pickle: bool = False
) -> Checkpoint:
    """Open a checkpoint file or folder lazily, or wrap an in-memory state dict or module.

    PyTorch files are read with `weights_only=True` (no code from the file runs) unless
    `trust_pickle=True`; files holding other Python objects are refused.
    """
    if isinstance(source, torch.nn.Module):
        return _StateDictCheckpoint("<module>", source.state_dict(), "state_dict")
    if isinstance(source, Mapping):
        return _StateDictCheckpoint("<state dict>", source, "state_dict")
    path = os.fspath(source)
    if os.path.isdir(path):
        return _open_folder(path, trust_pickle)
    if not os.path.exists(path):
        raise RwsError("no such file or folder", path=path, fix="check the path")
    kind = _sniff(path)
    if kind == "safetensors":
        return _SafetensorsCheckpoint(path)
    if kind == "pytorch":
        obj = _torch_load(path, trust_pickle)
        return _StateDictCheckpoint(path, obj, "pytorch")
    raise RwsError(
        "is not a PyTorch or safetensors checkpoint",
        path=path,
        fix="pass a .pt/.pth/.bin file saved with torch.save, a .safetensors file, "
        "or a folder with model.safetensors.index.json / pytorch_model.bin.index.json",
    )


# ---------------------------------------------------------------- format detection


def _sniff(path: str) -> str:
    """'safetensors', 'pytorch' or 'unknown', from the first bytes (extensions lie)."""
    with open(path, "rb") as f:
        head = f.read(9)
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":  # torch zip, or legacy pickle
        return "pytorch"
    if len(head) == 9 and head[8:9] == b"{" or path.endswith(".safetensors"):
        return "safetensors"
    return "unknown"


# ---------------------------------------------------------------- PyTorch files / state dicts


def _torch_load(path: str, trust_pickle: bool) -> Any:
    """torch.load on the CPU: memory-mapped for zip files, never unpickling code unless trusted."""
    mmap = zipfile.is_zipfile(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle, mmap=mmap)
    except Exception as exc:  # torch raises many types for damaged files
        message = str(exc)
        if "Weights only load failed" in message:
            detail = message.split("WeightsUnpickler error:", 1)[-1].strip().split(". ")[0]
            raise RwsError(
                "refused to unpickle: the file holds Python objects beyond tensors, and loading "
                f"it would run code from the file ({detail}); it may also be damaged",
                path=path,
                fix="if you trust its source, pass --trust-pickle (trust_pickle=True in Python); "
                f"better, {_RESAVE}",
            ) from None
        raise RwsError(
            f"cannot be read as a PyTorch checkpoint ({type(exc).__name__}: "
            f"{message.splitlines()[0] if message else 'no detail'})",
            path=path,
            fix="the file is damaged or not a checkpoint; re-download or re-save it",
        ) from None


def _unwrap(obj: Any, path: str) -> tuple[list[str], Mapping[str, Any]]:
    """The wrapper keys leading to the state dict inside `obj`, and the state dict itself."""
    keys: list[str] = []
    while isinstance(obj, Mapping):
        tensors = any(isinstance(v, torch.Tensor) for v in obj.values())
        wrapper = next((k for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if wrapper is not None and not tensors:
            keys.append(wrapper)
            obj = obj[wrapper]
            continue
        if tensors and all(isinstance(k, str) for k in obj):
            return keys, obj
        break
    where = f" under {'/'.join(keys)}" if keys else ""
    fix = _RESAVE
    if isinstance(obj, torch.nn.Module):
        fix = "save model.state_dict() rather than the whole model"
    raise RwsError(f"holds no state dict (found {type(obj).__name__}{where})", path=path, fix=fix)


def ddp_prefix(keys: Iterable[str]) -> str:
    """'module.' when every key carries it (DataParallel/DDP), else ''."""
    keys = list(keys)
    if keys and all(k.startswith(DDP_PREFIX) for k in keys):
        return DDP_PREFIX
    return ""


class _StateDictCheckpoint(Checkpoint):
    """A PyTorch file (memory-mapped when it is a zip file) or an in-memory state dict."""

    def __init__(self, path: str, obj: Any, format: str) -> None:
        self._obj = obj
        self._wrappers, self._state = _unwrap(obj, path)
        raw = [k for k, v in self._state.items() if isinstance(v, torch.Tensor)]
        self._prefix = ddp_prefix(raw)
        cut = len(self._prefix)
        self._raw = {k[cut:]: k for k in raw}
        super().__init__(path, format, "checkpoint", list(self._raw))

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensor(name).shape)

    def dtype(self, name: str) -> torch.dtype:
        return self.tensor(name).dtype

    def tensor(self, name: str) -> torch.Tensor:
        self._check(name)
        return self._state[self._raw[name]]

    def state_dict(self) -> dict[str, Any]:
        """The unwrapped state dict (original keys, with any `module.` prefix), as a new dict."""
        return dict(self._state)

    def write(self, out_path: str | os.PathLike, replacements: Mapping[str, torch.Tensor]) -> None:
        new = {self._raw[n]: t for n, t in self._checked_replacements(replacements).items()}
        state = type(self._state)() if isinstance(self._state, dict) else {}
        for key, value in self._state.items():
            state[key] = new.get(key, value)
        if hasattr(self._state, "_metadata"):  # module versions, read by load_state_dict
            state._metadata = self._state._metadata  # type: ignore[attr-defined]
        obj: Any = state
        for depth in reversed(range(len(self._wrappers))):
            outer = self._obj
            for k in self._wrappers[:depth]:
                outer = outer[k]
            outer = type(outer)(outer) if isinstance(outer, dict) else dict(outer)
            outer[self._wrappers[depth]] = obj
            obj = outer
        with atomic_path(out_path) as tmp:
            torch.save(obj, tmp)

    def close(self) -> None:
        self._obj = self._state = None  # type: ignore[assignment]


# ---------------------------------------------------------------- safetensors files


class _SafetensorsCheckpoint(Checkpoint):
    """A safetensors file: the header is parsed and validated on opening; tensors are read
    into fresh memory one at a time (not memory-mapped, so resident memory stays small)."""

    owns_tensors = True
    streams_writes = True

    def __init__(self, path: str) -> None:
        self._file = open(path, "rb")  # noqa: SIM115 - closed by close()
        try:
            self._header_len, self.metadata, self._entries = _read_safetensors_header(
                self._file, path
            )
        except BaseException:
            self._file.close()
            raise
        cut = len(ddp_prefix(list(self._entries)))
        self._raw = {k[cut:]: k for k in self._entries}
        self._normal = {k: n for n, k in self._raw.items()}
        super().__init__(path, "safetensors", "natural-sort", natural_sorted(self._raw))

    def shape(self, name: str) -> tuple[int, ...]:
        self._check(name)
        return self._entries[self._raw[name]][1]

    def dtype(self, name: str) -> torch.dtype:
        self._check(name)
        return self._entries[self._raw[name]][0]

    def tensor(self, name: str, buffer: torch.Tensor | None = None) -> torch.Tensor:
        """One tensor read into fresh memory, or into `buffer` (a uint8 CPU tensor of at
        least its byte size, reused across calls to spare the allocation; the result
        aliases it)."""
        self._check(name)
        dtype, shape, (begin, end) = self._entries[self._raw[name]]
        if buffer is not None and buffer.numel() >= end - begin:
            out = buffer[: end - begin].view(dtype).view(shape)
        else:
            out = torch.empty(shape, dtype=dtype)
        buf = memoryview(out.view(-1).view(torch.uint8).numpy()) if end > begin else b""
        self._file.seek(8 + self._header_len + begin)
        if end > begin and self._file.readinto(buf) != end - begin:
            raise RwsError(f"tensor {name!r} is truncated", path=self.path, fix=_REDOWNLOAD)
        return out

    @property
    def write_order(self) -> list[str]:
        return [self._normal[raw] for raw, _ in self._by_offset()]

    def write(self, out_path: str | os.PathLike, replacements: Mapping[str, torch.Tensor]) -> None:
        for name in replacements:  # names only: values are fetched as they are written
            self._check(name)
        with atomic_write(out_path) as out:
            self._file.seek(0)
            _copy(self._file, out, 8 + self._header_len)  # the header, verbatim
            for raw, (_, _, (begin, end)) in self._by_offset():
                self._file.seek(8 + self._header_len + begin)
                name = self._normal[raw]
                if name in replacements:
                    value = self._checked(name, replacements[name])
                    out.write(value.view(-1).view(torch.uint8).numpy().data)
                else:
                    _copy(self._file, out, end - begin)

    def _by_offset(self) -> list[tuple[str, Any]]:
        return sorted(self._entries.items(), key=lambda kv: kv[1][2][0])

    def close(self) -> None:
        self._file.close()


_REDOWNLOAD = "the file is damaged; re-download or re-save it"


def _read_safetensors_header(
    f: Any, path: str
) -> tuple[int, dict[str, str] | None, dict[str, tuple[torch.dtype, tuple[int, ...], tuple]]]:
    """Parse and validate a safetensors header: (its length, __metadata__, entries)."""
    size = os.fstat(f.fileno()).st_size

    def bad(problem: str) -> RwsError:
        return RwsError(f"is not a valid safetensors file: {problem}", path=path, fix=_REDOWNLOAD)

    if size < 8:
        raise bad(f"{size} bytes is too short")
    (n,) = struct.unpack("<Q", f.read(8))
    if n > MAX_SAFETENSORS_HEADER or 8 + n > size:
        raise bad(f"header length {n} does not fit the file ({size} bytes)")
    try:
        doc = json.loads(f.read(n).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise bad(f"header is not JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise bad("header is not a JSON object")
    metadata = doc.pop("__metadata__", None)
    if metadata is not None and not isinstance(metadata, dict):
        raise bad("__metadata__ is not an object")
    data_len = size - 8 - n
    entries = {}
    for name, e in doc.items():
        try:
            dtype = SAFETENSORS_DTYPES[e["dtype"]]
            shape = tuple(int(d) for d in e["shape"])
            begin, end = (int(x) for x in e["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise bad(f"entry {name!r} is malformed or has an unsupported dtype") from None
        nbytes = math.prod(shape) * dtype.itemsize
        if min(shape, default=0) < 0 or not 0 <= begin <= end <= data_len or end - begin != nbytes:
            raise bad(f"entry {name!r} has inconsistent shape, dtype and offsets")
        entries[name] = (dtype, shape, (begin, end))
    spans = sorted(e[2] for e in entries.values())
    if any(a[1] > b[0] for a, b in zip(spans, spans[1:], strict=False)):
        raise bad("tensor data overlap")
    return n, metadata, entries


def _copy(src: Any, dst: Any, n: int) -> None:
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
            raise RwsError("file is shorter than its header says", path=src.name, fix=_REDOWNLOAD)
        dst.write(chunk)
        n -= len(chunk)


_NUMBER = re.compile(r"(\d+)")


def natural_sorted(names: Any) -> list[str]:
    """Names in numeric-aware order: `layers.2` before `layers.10`."""
    return sorted(names, key=lambda s: [int(p) if p.isdigit() else p for p in _NUMBER.split(s)])


# ---------------------------------------------------------------- sharded folders


def _open_folder(path: str, trust_pickle: bool) -> Checkpoint:
    for index in (SAFETENSORS_INDEX, PYTORCH_INDEX):
        if os.path.isfile(os.path.join(path, index)):
            return _ShardedCheckpoint(path, index, trust_pickle)
    for single in _SINGLE_FILES:
        if os.path.isfile(os.path.join(path, single)):
            ckpt = open_checkpoint(os.path.join(path, single), trust_pickle=trust_pickle)
            return ckpt
    raise RwsError(
        "folder holds no checkpoint",
        path=path,
        fix=f"expected {SAFETENSORS_INDEX}, {PYTORCH_INDEX}, or one of {', '.join(_SINGLE_FILES)}",
    )


class _ShardedCheckpoint(Checkpoint):
    """A Hugging Face sharded folder: an index JSON mapping tensor names to shard files."""

    sharded = True

    def __init__(self, path: str, index: str, trust_pickle: bool) -> None:
        index_path = os.path.join(path, index)
        try:
            with open(index_path, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError
        except (OSError, ValueError, KeyError, TypeError):
            raise RwsError(
                "is not a valid index: expected a JSON object with a 'weight_map' object",
                path=index_path,
                fix="re-download the folder or re-save it with save_pretrained",
            ) from None
        shard_files = sorted(set(weight_map.values()))
        for shard in shard_files:
            if os.path.basename(shard) != shard or not os.path.isfile(os.path.join(path, shard)):
                raise RwsError(
                    f"the index names shard {shard!r}, which is not in the folder",
                    path=index_path,
                    fix="download the missing shard",
                )
        self._shards: dict[str, Checkpoint] = {}
        try:
            for shard in shard_files:
                self._shards[shard] = open_checkpoint(
                    os.path.join(path, shard), trust_pickle=trust_pickle
                )
        except BaseException:
            self.close()
            raise
        self._where: dict[str, str] = {}
        ordered: list[str] = []
        for shard, ckpt in self._shards.items():  # shards in file order, each in its own order
            for name in ckpt.names:
                if name in self._where:
                    raise RwsError(f"tensor {name!r} is in two shards", path=path)
                self._where[name] = shard
                ordered.append(name)
        self.owns_tensors = all(c.owns_tensors for c in self._shards.values())
        fmt = "safetensors" if index == SAFETENSORS_INDEX else "pytorch"
        depth = "natural-sort" if fmt == "safetensors" else "checkpoint"
        names = natural_sorted(ordered) if fmt == "safetensors" else ordered
        super().__init__(path, fmt, depth, names)

    def _shard(self, name: str) -> Checkpoint:
        self._check(name)
        return self._shards[self._where[name]]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shard(name).shape(name)

    def dtype(self, name: str) -> torch.dtype:
        return self._shard(name).dtype(name)

    def tensor(self, name: str) -> torch.Tensor:
        return self._shard(name).tensor(name)

    def write(self, out_path: str | os.PathLike, replacements: Mapping[str, torch.Tensor]) -> None:
        """Write the folder: touched shards rewritten, others copied, the index and any other
        files (config, tokenizer) kept. A new folder appears only once complete; in an
        existing folder each file is replaced atomically."""
        out = os.fspath(out_path)
        new = self._checked_replacements(replacements)
        if os.path.exists(out) and not os.path.isdir(out):
            raise RwsError(
                "is a file, but the checkpoint is a sharded folder",
                path=out,
                fix="give a folder path for the output",
            )
        in_place = os.path.isdir(out) and os.path.samefile(out, self.path)
        target = out if os.path.isdir(out) else _new_folder(out)
        try:
            for shard, ckpt in self._shards.items():
                mine = {n: t for n, t in new.items() if self._where[n] == shard}
                dest = os.path.join(target, shard)
                if mine or not in_place:
                    if mine:
                        ckpt.write(dest, mine)
                    else:
                        _copy_file(ckpt.path, dest)
            if not in_place:
                for entry in sorted(os.listdir(self.path)):
                    src = os.path.join(self.path, entry)
                    if entry not in self._shards and os.path.isfile(src):
                        _copy_file(src, os.path.join(target, entry))
            if target != out:
                os.replace(target, out)
        except BaseException:
            if target != out:
                shutil.rmtree(target, ignore_errors=True)
            raise

    def close(self) -> None:
        for ckpt in self._shards.values():
            ckpt.close()


def _new_folder(out: str) -> str:
    """A temporary folder beside `out` (renamed to it once complete), with normal permissions."""
    tmp = tempfile.mkdtemp(
        prefix=f".{os.path.basename(out)}.", dir=os.path.dirname(os.path.abspath(out))
    )
    os.chmod(tmp, 0o777 & ~current_umask())
    return tmp


def _copy_file(src: str, dst: str) -> None:
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)
