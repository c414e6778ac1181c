"""Provenance records: who wrote a file, when, and from which inputs."""

from __future__ import annotations

import datetime as _dt
import hashlib
import os
from typing import Any

from .errors import RwsError
from .inputs import open_input

TOOL = "rwsfmt"
_CHUNK = 8 << 20


def created_at() -> str:
    """UTC creation time (ISO 8601, seconds), from `SOURCE_DATE_EPOCH` when it is set."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if epoch is not None:
        try:
            when = _dt.datetime.fromtimestamp(int(epoch), tz=_dt.timezone.utc)
        except (ValueError, OverflowError, OSError):
            raise RwsError(
                f"SOURCE_DATE_EPOCH={epoch!r} is not a Unix timestamp",
                fix="set it to whole seconds since 1970, or unset it",
            ) from None
    else:
        when = _dt.datetime.now(tz=_dt.timezone.utc)
    return when.replace(microsecond=0).isoformat().replace("+00:00", "Z")


def base_provenance() -> dict[str, Any]:
    from . import __version__

    return {"tool": TOOL, "tool_version": __version__, "created": created_at()}


def as_text(name: str) -> str:
    """A file name as valid UTF-8 text for a header: bytes that are not UTF-8, which Python
    keeps in `str` paths as lone surrogates (PEP 383), become U+FFFD."""
    return os.fsencode(name).decode("utf-8", "replace")


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file, streamed in 8 MiB chunks."""
    h = hashlib.sha256()
    with open_input(path) as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def input_record(role: str, path: str | os.PathLike) -> dict[str, Any]:
    """Describe one input file: its role, base name, size in bytes and SHA-256.

    For a folder (a sharded checkpoint) the size and digest cover its files in name order.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        h, size = hashlib.sha256(), 0
        for name in sorted(os.listdir(path)):
            full = os.path.join(path, name)
            if os.path.isfile(full):
                size += os.path.getsize(full)
                h.update(os.fsencode(name) + f"\0{file_sha256(full)}\n".encode())
        digest = h.hexdigest()
    else:
        size, digest = os.path.getsize(path), file_sha256(path)
    return {
        "role": role,
        "name": as_text(os.path.basename(os.path.normpath(path))),
        "size": size,
        "sha256": digest,
    }
