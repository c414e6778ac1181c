"""The `Checkpoint` interface: a model's tensors, read lazily, written back in its own format."""

from __future__ import annotations

import enum
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import RwsError
from ..fingerprint import architecture_fingerprint


class Format(str, enum.Enum):
    """Where a checkpoint's tensors live."""

    PYTORCH = "pytorch"  # a torch.save file (.pt, .pth, .bin, .ckpt)
    SAFETENSORS = "safetensors"
    STATE_DICT = "state_dict"  # an in-memory state dict or module

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Layout:
    """Where the tensors sit in a file: the wrapper keys leading to the state dict (e.g.
    `('state_dict',)`) and the wrapper prefix removed from every name (e.g. 'module.')."""

    keys: tuple[str, ...] = ()
    prefix: str = ""

    @property
    def plain(self) -> bool:
        return not self.keys and not self.prefix

    def __str__(self) -> str:
        parts = []
        if self.keys:
            parts.append("under " + "/".join(repr(k) for k in self.keys))
        if self.prefix:
            parts.append(f"prefix {self.prefix!r} removed")
        return ", ".join(parts) or "plain"


def refuse_unsupported(path: str, name: str, value: torch.Tensor | torch.dtype) -> None:
    """Raise `RwsError` for a tensor (or a dtype, where the file gives only that) whose
    values rwsfmt cannot read as plain numbers, or cannot patch without losing the patch."""
    reason = _unsupported(value)
    if reason:
        problem, fix = reason
        raise RwsError(f"tensor {name!r} {problem}; rwsfmt does not read it", path=path, fix=fix)


def _unsupported(value: torch.Tensor | torch.dtype) -> tuple[str, str] | None:
    """(what is wrong, the fix) for an unsupported tensor or dtype, else None."""
    dtype = value if isinstance(value, torch.dtype) else value.dtype
    if isinstance(value, torch.Tensor):
        if value.is_nested or value.layout != torch.strided:
            if value.is_nested:
                return "is a nested tensor", "save its members as separate, ordinary tensors"
            kind = str(value.layout).removeprefix("torch.")
            return f"is a {kind} tensor", "save it dense (tensor.to_dense())"
        if value.is_meta:
            return "has no data (a meta tensor)", (
                "save the model once its weights are loaded, not as built on the meta device"
            )
        if value.is_quantized:
            return f"is quantized ({_show(dtype)})", (
                "save the float model, or tensor.dequantize() and save that"
            )
    if dtype.is_floating_point and dtype.itemsize == 1:
        return (
            f"is {_show(dtype)}, a float of 8 bits or fewer: such weights come with scales "
            "kept elsewhere, and a patch of a few per cent rounds away in them",
            "extract from and patch the model in bfloat16, float16 or float32",
        )
    return None


def _show(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether `tensor` holds no NaN and no infinity. One min/max pass (NaN propagates
    through both): 40x faster than `isfinite(t).all()`, which writes a mask of t's size."""
    if tensor.numel() == 0:
        return True
    return bool(torch.isfinite(torch.stack(torch.aminmax(tensor))).all())


def refuse_nonfinite(tensor: torch.Tensor, name: str, path: str, what: str, fix: str) -> None:
    """Raise `RwsError` when `tensor` holds NaN or an infinity: arithmetic would carry it into
    every result, or (in a dot product) silently drop the tensor's direction."""
    if not all_finite(tensor):
        raise RwsError(
            f"tensor {name!r} of the {what} holds NaN or infinite values", path=path, fix=fix
        )


class Checkpoint:
    """A lazily read model checkpoint.

    `names` lists every tensor (floating and not) under its normalized name (wrapper
    prefixes such as `module.` removed), in the order the file stores them: module
    registration order for PyTorch files (`ordered` is True), sorted by name for safetensors.
    Tied tensors (one storage under several keys) are listed once; `aliases` maps each
    other key to the listed name, and writing keeps them tied.
    """

    path: str
    format: Format
    names: list[str]
    ordered: bool  # names follow the model's registration order
    aliases: dict[str, str]
    files: list[str]  # the files this checkpoint reads (for refusing to overwrite them)
    folder: bool = False  # a Hugging Face style folder (config and other files travel along)
    sharded: bool = False
    layout: Layout = Layout()
    alternatives: tuple[str, ...] = ()  # other entries holding weights (e.g. state_dict_ema)
    owns_tensors: bool = False  # tensor() returns fresh memory that callers may modify
    # write() fetches replacement values one at a time, in `write_order`, and is done with
    # each before fetching the next: a lazy Mapping may compute them on demand and reuse memory
    streams_writes: bool = False

    def __init__(
        self,
        path: str,
        format: Format,
        names: list[str],
        *,
        ordered: bool,
        files: list[str],
        aliases: Mapping[str, str] | None = None,
    ) -> None:
        self.path, self.format, self.names, self.ordered = path, format, names, ordered
        self.files = files
        self.aliases = dict(aliases or {})
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

    def fingerprint(self) -> str:
        """The architecture fingerprint over this checkpoint's floating tensors."""
        return architecture_fingerprint(
            (n, self.shape(n)) for n in self.names if self.dtype(n).is_floating_point
        )

    @property
    def applied(self) -> list[dict[str, Any]]:
        """The record of signatures applied to this checkpoint (`rwsfmt.applied`), [] if none."""
        return []

    def write(
        self,
        out_path: str | os.PathLike,
        replacements: Mapping[str, torch.Tensor],
        applied: Sequence[Mapping[str, Any]] | None = None,
    ) -> None:
        """Write this checkpoint in its own format with the named tensors replaced.

        Every other tensor, wrapper entry, prefix and metadata is kept as it was; each file is
        written atomically, and `out_path` may be this checkpoint's own path. `applied`
        replaces the record of applied signatures (an empty one removes it); None keeps it.
        """
        raise NotImplementedError

    def check_write(self, in_place: bool) -> None:
        """Refuse, before any work, a write that would read a file from outside the checkpoint
        into the output or write through to one (a folder's symbolic links); a single file
        has nothing to check."""

    def close(self) -> None:
        """Release open files and memory maps."""

    def resolve(self, name: str) -> str:
        """The listed name for `name` or for a tied alias of it; RwsError if unknown."""
        if name in self._known:
            return name
        if name in self.aliases:
            return self.aliases[name]
        raise RwsError(
            f"no tensor named {name!r} in this checkpoint",
            path=self.path,
            fix="check the name against `rwsfmt inspect` of the checkpoint",
        )

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

    def _checked(self, name: str, value: torch.Tensor) -> torch.Tensor:
        """One replacement on the CPU, contiguous, after checking its name, shape and dtype."""
        name = self.resolve(name)
        if tuple(value.shape) != self.shape(name) or value.dtype != self.dtype(name):
            raise RwsError(
                f"replacement for {name!r} is {value.dtype} {tuple(value.shape)}, but the "
                f"checkpoint holds {self.dtype(name)} {self.shape(name)}",
                path=self.path,
                fix="cast and reshape the new tensor to the original dtype and shape",
            )
        return value.detach().to("cpu").contiguous()

    def _checked_replacements(
        self, replacements: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Replacements on the CPU, contiguous, after checking names, shapes and dtypes."""
        return {self.resolve(n): self._checked(n, v) for n, v in replacements.items()}
