"""Opening a checkpoint: recognising its format from its bytes, not its name."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch

from ..container import MAGIC
from ..errors import RwsError, as_path, spell
from ..hub import resolve
from ..inputs import sniff as sniff_kind
from .base import Checkpoint, Format
from .folder import FolderCheckpoint
from .pytorch import PyTorchCheckpoint, torch_load
from .safetensors import SafetensorsCheckpoint

Source = str | os.PathLike | Mapping[str, Any] | torch.nn.Module


def open_checkpoint(
    source: Source,
    *,
    trust_pickle: bool = False,
    state_key: str | None = None,
    revision: str | None = None,
    download: bool = False,
) -> Checkpoint:
    """Open a checkpoint file or folder lazily, or wrap an in-memory state dict or module.

    A string `org/name[@revision]` that is not a local path is a Hugging Face model id, read
    from the local Hugging Face cache (`rwsfmt.hub`; `revision` for ids without `@`;
    `download=True` fetches a model missing from the cache).

    PyTorch files are read with `weights_only=True` (no code from the file runs) unless
    `trust_pickle=True`; files holding other Python objects are refused. `state_key` names
    the entry holding the weights in a training checkpoint (e.g. 'state_dict_ema'); by
    default the usual layouts are recognised.
    """
    if isinstance(source, torch.nn.Module):
        return PyTorchCheckpoint("<module>", source.state_dict(), Format.STATE_DICT)
    if isinstance(source, Mapping):
        return PyTorchCheckpoint("<state dict>", source, Format.STATE_DICT, state_key=state_key)
    path = as_path(
        resolve(source, revision=revision, download=download),
        "a checkpoint: a path, a state dict or a torch.nn.Module",
    )

    def open_file(file: str) -> Checkpoint:
        return _open_file(file, trust_pickle, state_key)

    if os.path.isdir(path):
        return FolderCheckpoint(path, open_file)
    if not os.path.exists(path):
        raise RwsError("no such file or folder", path=path, fix="check the path")
    return open_file(path)


def _open_file(path: str, trust_pickle: bool, state_key: str | None) -> Checkpoint:
    kind = sniff(path)
    if kind == Format.SAFETENSORS:
        if state_key is not None:
            raise RwsError(
                f"a safetensors file has no keys to choose from (state key {state_key!r})",
                path=path,
                fix="leave the state key out",
            )
        return SafetensorsCheckpoint(path)
    if kind == Format.PYTORCH:
        obj = torch_load(path, trust_pickle)
        return PyTorchCheckpoint(path, obj, Format.PYTORCH, state_key=state_key)
    refuse_signature(path)
    raise RwsError(
        "is not a PyTorch or safetensors checkpoint",
        path=path,
        fix="pass a .pt/.pth/.bin file saved with torch.save, a .safetensors file, "
        "or a folder with model.safetensors.index.json / pytorch_model.bin.index.json",
    )


def sniff(path: str) -> Format | None:
    """The format of the file at `path` from its first bytes (extensions lie), or None."""
    kind = sniff_kind(path)
    return Format(kind) if kind else None


def refuse_signature(path: str) -> None:
    """`RwsError` when `path` is a .rws signature given where a model checkpoint goes (the
    arguments of apply or extract in the wrong order)."""
    if not os.path.isfile(path):
        return
    with open(path, "rb") as f:
        if f.read(len(MAGIC)) != MAGIC:
            return
    raise RwsError(
        "is a .rws signature, where a model checkpoint goes",
        path=path,
        fix=spell(
            "give the model first, then the signatures: rwsfmt apply MODEL SIG.rws --alpha A "
            "(extract reads checkpoints only: STD ROBUST INIT)",
            "pass a model checkpoint here, and .rws files only as signatures",
        ),
    )
