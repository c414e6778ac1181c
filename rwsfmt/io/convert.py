"""Writing a checkpoint in the format its output path names, converting when it differs."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..applied import METADATA_KEY, encode
from ..errors import RwsError
from ..names import natural_sorted
from . import safetensors
from .base import Checkpoint, Format
from .pytorch import torch_save

SUFFIXES = {
    ".safetensors": Format.SAFETENSORS,
    ".pt": Format.PYTORCH,
    ".pth": Format.PYTORCH,
    ".bin": Format.PYTORCH,
    ".ckpt": Format.PYTORCH,
}
_NAME_IT = "end the output name in .safetensors, or .pt/.pth/.bin for a PyTorch file"


@dataclass(frozen=True)
class Target:
    """What an output path asks for: a file of `format`, or a folder like the input."""

    path: str
    format: Format
    folder: bool


@dataclass
class Written:
    """What `write_checkpoint` wrote: the target, and what a conversion left behind."""

    target: Target
    notes: list[str] = field(default_factory=list)


def output_format(ckpt: Checkpoint, out: str | os.PathLike) -> Target:
    """The format to write at `out`: named by its suffix, or a folder for a folder input."""
    out = os.fspath(out)
    suffix = os.path.splitext(out.rstrip(os.sep))[1].lower()
    if suffix in SUFFIXES:
        if os.path.isdir(out):
            raise RwsError("is a folder", path=out, fix="give a file path for the output")
        return Target(out, SUFFIXES[suffix], folder=False)
    if ckpt.folder:
        if os.path.exists(out) and not os.path.isdir(out):
            raise RwsError(
                "is a file, but the model is a folder",
                path=out,
                fix=f"give a folder path for the output, or {_NAME_IT} to convert",
            )
        return Target(out, ckpt.format, folder=True)
    if os.path.isdir(out):
        raise RwsError("is a folder", path=out, fix=f"give a file path: {_NAME_IT}")
    raise RwsError(
        f"cannot tell which checkpoint format to write from the suffix {suffix or '(none)'!r}",
        path=out,
        fix=_NAME_IT,
    )


def write_checkpoint(
    ckpt: Checkpoint,
    out: str | os.PathLike,
    replacements: Mapping[str, torch.Tensor],
    applied: Sequence[Mapping[str, Any]] | None = None,
) -> Written:
    """Write `ckpt` with `replacements` at `out`, in the format `out` names.

    In the checkpoint's own format everything else is kept as it was (wrappers, prefixes,
    metadata, other files of a folder). Converting keeps every tensor, under its normalized
    name, and the record of applied signatures; the notes say what else was left behind.
    `applied` replaces that record (an empty one removes it); None keeps the input's.
    """
    target = output_format(ckpt, out)
    own = ckpt.format if ckpt.format != Format.STATE_DICT else Format.PYTORCH
    if target.folder or (target.format == own and not ckpt.folder):
        ckpt.write(target.path, replacements, applied)
        return Written(target)
    record = ckpt.applied if applied is None else applied
    notes = []
    if not ckpt.layout.plain:
        notes.append(f"the input's layout ({ckpt.layout}) is not kept: tensors only, plain names")
    if ckpt.folder:
        notes.append("the folder's other files (config, tokenizer, ...) are not copied")
    if ckpt.aliases:
        tied = ", ".join(f"{a} = {c}" for a, c in sorted(ckpt.aliases.items()))
        notes.append(f"tied tensors stored as separate copies: {tied}")
    if target.format == Format.SAFETENSORS:
        _write_safetensors(ckpt, target.path, replacements, record)
    else:
        _write_pytorch(ckpt, target.path, replacements, record)
        if ckpt.format == Format.SAFETENSORS:
            notes.append("safetensors metadata is not carried into a PyTorch file")
    return Written(target, notes)


def _all_names(ckpt: Checkpoint) -> list[str]:
    return [*ckpt.names, *ckpt.aliases]


def _value(ckpt: Checkpoint, replacements: Mapping[str, torch.Tensor], name: str) -> torch.Tensor:
    canonical = ckpt.resolve(name)
    return replacements[canonical] if canonical in replacements else ckpt.tensor(canonical)


def _write_safetensors(
    ckpt: Checkpoint,
    out: str,
    replacements: Mapping[str, torch.Tensor],
    applied: Sequence[Mapping[str, Any]],
) -> None:
    names = natural_sorted(_all_names(ckpt))
    specs = [(n, ckpt.dtype(n), ckpt.shape(n)) for n in names]
    metadata = {"format": "pt"}
    if applied:
        metadata[METADATA_KEY] = encode(applied)
    safetensors.write_file(out, specs, lambda n: _value(ckpt, replacements, n), metadata)


def _write_pytorch(
    ckpt: Checkpoint,
    out: str,
    replacements: Mapping[str, torch.Tensor],
    applied: Sequence[Mapping[str, Any]],
) -> None:
    state: dict[str, torch.Tensor] = {}
    for name in ckpt.names:  # replacements may share one reused buffer: keep copies
        state[name] = replacements[name].clone() if name in replacements else ckpt.tensor(name)
    for alias, canonical in ckpt.aliases.items():
        state[alias] = state[canonical]
    torch_save(state, out, applied)
