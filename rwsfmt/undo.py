"""Undo files: what restores a patched checkpoint to its input, bit for bit.

`apply_checkpoint(..., save_undo="undo.rws")` keeps, for every tensor it patches, the
tensor's original values as exact float32 (`target` entries at 32 bits: float32, float16 and
bfloat16 values are all exactly float32 values) and the SHA-256 of the patched tensor's
bytes. Its provenance says `method: "undo"`, with

    "undo": {"applied": [the record entries that apply added],
             "patched_sha256": {tensor name: SHA-256 of the patched tensor's bytes}}

Applying an undo file (alone, at alpha 1) writes those values back verbatim, cast to the
model's dtype, with no arithmetic, after checking that every tensor it restores still holds
exactly the patched bytes (a model changed since is refused), and removes its entries from
the record of applied signatures. Normalization statistics are tensors like any other, so
they come back exactly too.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .errors import RwsError, spell
from .provenance import as_text
from .quant import QuantConfig
from .signature import Signature, SignatureBuilder, save

METHOD = "undo"
_EXACT = QuantConfig(bits=32)
_STORABLE = (torch.float32, torch.float16, torch.bfloat16)  # exactly float32 values


def is_undo(sig: Signature) -> bool:
    """Whether `sig` is an undo file (provenance `method: "undo"`)."""
    return sig.provenance.get("method") == METHOD


def tensor_sha256(tensor: torch.Tensor) -> str:
    """SHA-256 of a tensor's bytes as stored (row-major, native byte order)."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return hashlib.sha256(flat.view(torch.uint8).numpy().data if flat.numel() else b"").hexdigest()


def check_undoable(names: Sequence[str], dtype_of: Any, model: str) -> None:
    """Refuse, before any work, to keep an undo for tensors whose dtype float32 cannot hold
    exactly (float64)."""
    inexact = [n for n in names if dtype_of(n) not in _STORABLE]
    if inexact:
        shown = ", ".join(f"{n} ({str(dtype_of(n)).removeprefix('torch.')})" for n in inexact[:5])
        raise RwsError(
            f"an undo file stores exact float32 values, which cannot hold {shown}"
            + (f" and {len(inexact) - 5} more" if len(inexact) > 5 else ""),
            path=model,
            fix="keep a copy of the model instead of --save-undo, or convert it to float32",
        )


class UndoRecorder:
    """Collects, while a checkpoint is patched, what restores it; `save()` writes the file
    once every patched tensor has been seen (before the patched output is committed)."""

    def __init__(
        self,
        path: str,
        output: str,
        names: Sequence[str],
        applied: Sequence[Mapping[str, Any]],
        model_fingerprint: str,
    ) -> None:
        self.path, self._output, self._fingerprint = path, output, model_fingerprint
        self.saved = False
        self._pending = set(names)
        self._applied = [dict(e) for e in applied]
        labels = ", ".join(str(e.get("label") or e.get("file") or "?") for e in applied)
        self._builder = SignatureBuilder(f"undo {labels}", _EXACT)
        self._patched: dict[str, str] = {}

    def keep(self, name: str, original: torch.Tensor) -> None:
        """Store tensor `name`'s values before the patch (a second call for it is ignored)."""
        if name in self._patched or name not in self._pending:
            return
        self._builder.add(name, original, kind="target", dtype=original.dtype)

    def patched(self, name: str, new: torch.Tensor) -> None:
        """Note the patched tensor's digest; the last one writes the undo file."""
        if name not in self._pending:
            return
        self._pending.discard(name)
        self._patched[name] = tensor_sha256(new)
        if not self._pending:
            self.save()

    def save(self) -> None:
        """Write the undo file atomically (once)."""
        if self.saved:
            return
        provenance = {
            "method": METHOD,
            "undo": {
                "model": as_text(os.path.basename(os.path.normpath(self._output))),
                "applied": self._applied,
                "patched_sha256": self._patched,
            },
        }
        save(self._builder.build(provenance, self._fingerprint), self.path)
        self.saved = True

    def discard(self) -> None:
        """Remove the undo file written for an output that then failed."""
        if self.saved:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            self.saved = False


def undo_plan(sig: Signature, alpha: float, count: int) -> tuple[list[dict], dict[str, str]]:
    """(the record entries an undo file removes, tensor name -> expected patched SHA-256),
    after checking it is applied alone, at alpha 1, and stores exact values."""
    where = sig.path or sig.label
    if count != 1:
        raise RwsError(
            "an undo file restores the exact input of one apply, so it is applied alone",
            path=where,
            fix="apply the undo file by itself, then the other signatures",
        )
    if alpha != 1:
        raise RwsError(
            f"an undo file writes back the exact original values; alpha {alpha:g} does not "
            "scale them",
            path=where,
            fix=spell("run `rwsfmt undo MODEL UNDO.rws` (or apply it without --alpha)", "alpha=1"),
        )
    info = sig.provenance.get("undo")
    applied = info.get("applied") if isinstance(info, dict) else None
    digests = info.get("patched_sha256") if isinstance(info, dict) else None
    valid = (
        isinstance(applied, list)
        and all(isinstance(e, dict) for e in applied)
        and isinstance(digests, dict)
        and all(isinstance(v, str) for v in digests.values())
        and set(digests) == set(sig.names)
        and all(i.quant.get("scheme") == "float" for i in sig.infos)
    )
    if not valid:
        raise RwsError(
            "is marked as an undo file but does not hold exact values with their digests "
            "(converted or edited since it was written?)",
            path=where,
            fix="use the undo file as apply --save-undo wrote it",
        )
    return applied, digests  # type: ignore[return-value]


def restored(
    base: torch.Tensor,
    values: torch.Tensor,
    expected_sha256: str,
    name: str,
    path: str | None = None,
) -> torch.Tensor:
    """The original tensor that `values` (exact float32) stand for, in base's dtype, after
    checking that `base` (of the model at `path`) still holds the patched bytes the undo
    file was written for."""
    if tensor_sha256(base) != expected_sha256:
        raise RwsError(
            f"tensor {name} is not the one this undo file was written for: the model was "
            "changed since that patch (another patch applied on top, or edited)",
            path=path,
            fix="apply undo files in reverse order of the patches, each to the file its "
            "patch wrote",
        )
    out = values.to(device=base.device, dtype=base.dtype)
    if not torch.equal(out.to(torch.float32), values.to(out.device)):
        raise RwsError(
            f"the values stored for {name} are not {str(base.dtype).removeprefix('torch.')} "
            "values, so they cannot be restored exactly",
            fix="use the undo file as apply --save-undo wrote it",
        )
    return out
