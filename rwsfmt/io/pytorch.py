"""PyTorch checkpoints: `torch.save` files (memory-mapped) and in-memory state dicts."""

from __future__ import annotations

import os
import zipfile
from collections.abc import Mapping, Sequence
from functools import cached_property
from typing import Any, BinaryIO

import torch

from ..applied import append_zip_record, read_zip_record
from ..atomic import atomic_write
from ..errors import RwsError, spell
from ..inputs import open_input
from ..names import normalize_keys
from .base import Checkpoint, Format, Layout, refuse_unsupported
from .layouts import RESAVE, SAFE_GLOBALS, locate_state_dict
from .storages import check_storages

SAFE_TORCH = (2, 6)  # weights_only=True could be bypassed before 2.6 (CVE-2025-32434)


def require_safe_torch(version: str = torch.__version__) -> None:
    """Refuse to unpickle on a torch whose `weights_only=True` is not a safety boundary (the
    package requires torch>=2.6, but an environment can hold an older one anyway)."""
    major, minor = (
        int("".join(c for c in part if c.isdigit()) or 0) for part in version.split(".")[:2]
    )
    if (major, minor) < SAFE_TORCH:
        raise RwsError(
            f"torch {version} can run code hidden in a PyTorch file even with "
            "weights_only=True (CVE-2025-32434), so rwsfmt does not read .pt files with it",
            fix="upgrade torch (pip install -U 'torch>=2.6'), or convert the checkpoint to "
            "safetensors on a machine with a current torch",
        )


def torch_load(path: str, trust_pickle: bool) -> Any:
    """torch.load on the CPU: memory-mapped for zip files, never unpickling code unless trusted.

    A PyTorch file named `.safetensors` (rwsfmt 0.1.0 could write one) is read through a file
    object, since torch.load hands such names to the safetensors reader.
    """
    if not trust_pickle:
        require_safe_torch()
    misnamed = path.endswith(".safetensors")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS), open_input(path) as f:
            checked = zipfile.is_zipfile(f) and _checked(path, f, trust_pickle)
            f.seek(0)
            source = f if misnamed else _utf8_name(path, f)
            # memory-mapped only once every storage is checked against its record: unchecked,
            # torch.load reads the records, checking their sizes itself
            mmap = checked and isinstance(source, str)
            return torch.load(source, map_location="cpu", weights_only=not trust_pickle, mmap=mmap)
    except RwsError:
        raise
    except Exception as exc:  # torch raises many types for damaged files
        message = str(exc)
        if "Weights only load failed" in message:
            detail = message.split("WeightsUnpickler error:", 1)[-1].strip().split(". ")[0]
            raise RwsError(
                "refused to unpickle: the file holds Python objects beyond tensors, and loading "
                f"it would run code from the file ({detail}); it may also be damaged",
                path=path,
                fix="if you trust its source, pass "
                + spell("--trust-pickle", "trust_pickle=True")
                + f"; better, {RESAVE}",
            ) from None
        raise RwsError(
            f"cannot be read as a PyTorch checkpoint ({type(exc).__name__}: "
            f"{message.splitlines()[0] if message else 'no detail'})",
            path=path,
            fix="the file is damaged or not a checkpoint; re-download or re-save it",
        ) from None


def _utf8_name(path: str, f: BinaryIO) -> str | BinaryIO:
    """A name for the file open in `f` that torch can open (its C++ reader takes UTF-8
    only): `path`, else /proc/self/fd/N (Linux), else `f` itself (then read, not mapped)."""
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:  # bytes a file system allows, UTF-8 does not
        fd = f"/proc/self/fd/{f.fileno()}"
        return fd if os.path.exists(fd) else f


def _checked(path: str, f: BinaryIO, trust_pickle: bool) -> bool:
    """Whether `check_storages` passed the zip file open in `f`; False when it could not
    read the pickle (torch.load says why, or it holds objects only running it builds)."""
    try:
        check_storages(path, f, trust_pickle)
        return True
    except RwsError:
        raise
    except Exception:
        return False


def torch_save(
    obj: Any, path: str | os.PathLike, applied: Sequence[Mapping[str, Any]] = ()
) -> None:
    """torch.save, atomically and deterministically: through a file object, so the zip's
    inner folder is always named `archive` rather than after a temporary file. A record of
    applied signatures becomes an extra zip entry, which torch.load ignores."""
    with atomic_write(path, readable=bool(applied)) as f:
        torch.save(obj, f)
        if applied:
            append_zip_record(f, applied)


def tied_aliases(state: Mapping[str, Any], keys: list[str]) -> dict[str, str]:
    """Key -> first key (in `keys` order) that views the very same memory, for tied weights
    such as GPT-2's `lm_head.weight` and `transformer.wte.weight`."""
    first: dict[tuple, str] = {}
    aliases: dict[str, str] = {}
    for key in keys:
        t = state[key]
        if t.numel() == 0 or t.device.type == "meta":
            continue
        ident = (t.data_ptr(), t.dtype, tuple(t.shape), t.stride())
        if ident in first:
            aliases[key] = first[ident]
        else:
            first[ident] = key
    return aliases


class PyTorchCheckpoint(Checkpoint):
    """A PyTorch file (memory-mapped when it is a zip file) or an in-memory state dict."""

    def __init__(
        self, path: str, obj: Any, format: Format, *, state_key: str | None = None
    ) -> None:
        self._obj = obj
        found = locate_state_dict(obj, path, state_key)
        self._wrappers, self._state = found.keys, found.state
        self.alternatives = found.alternatives
        keys = [k for k, v in self._state.items() if isinstance(v, torch.Tensor)]
        for key in keys:
            refuse_unsupported(path, key, self._state[key])
        prefix, self._raw = normalize_keys(keys)  # normalized name -> key in the file
        by_key = {key: name for name, key in self._raw.items()}
        aliases = {by_key[a]: by_key[c] for a, c in tied_aliases(self._state, list(by_key)).items()}
        names = [name for name in self._raw if name not in aliases]
        files = [path] if format == Format.PYTORCH else []
        super().__init__(path, format, names, ordered=True, files=files, aliases=aliases)
        self.layout = Layout(self._wrappers, prefix)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensor(name).shape)

    def dtype(self, name: str) -> torch.dtype:
        return self.tensor(name).dtype

    def tensor(self, name: str) -> torch.Tensor:
        return self._state[self._raw[self.resolve(name)]]

    def key(self, name: str) -> str:
        """The key of `name` in the state dict (with its wrapper prefix)."""
        return self._raw[self.resolve(name)]

    def keys_of(self, name: str) -> list[str]:
        """The keys holding `name`: its own and those of the tensors tied to it."""
        name = self.resolve(name)
        return [self._raw[name]] + [self._raw[a] for a, c in self.aliases.items() if c == name]

    @cached_property
    def applied(self) -> list[dict[str, Any]]:
        return read_zip_record(self.path) if self.format == Format.PYTORCH else []

    def write(
        self,
        out_path: str | os.PathLike,
        replacements: Mapping[str, torch.Tensor],
        applied: Sequence[Mapping[str, Any]] | None = None,
    ) -> None:
        new = {self._raw[n]: t for n, t in self._checked_replacements(replacements).items()}
        for alias, canonical in self.aliases.items():  # tied keys stay one tensor
            if self._raw[canonical] in new:
                new[self._raw[alias]] = new[self._raw[canonical]]
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
        torch_save(obj, out_path, self.applied if applied is None else applied)

    def close(self) -> None:
        self._obj = self._state = None  # type: ignore[assignment]
