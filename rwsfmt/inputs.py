"""Opening input files safely: regular files only, and strict JSON.

Every file a command reads (checkpoints, shards, indexes, `.rws` files, order references)
is opened through `open_input`, which refuses FIFOs, sockets and devices without blocking
on them: opening a FIFO for reading waits for a writer forever, and a device never ends.
This module imports neither torch nor anything heavy, so `inspect` and `verify` stay fast.
"""

from __future__ import annotations

import json
import math
import os
import stat
from typing import Any, BinaryIO

from .errors import RwsError, as_path

_NONBLOCK = getattr(os, "O_NONBLOCK", 0)  # a FIFO opens at once instead of waiting
_BINARY = getattr(os, "O_BINARY", 0)
_KINDS = [
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
]


def open_input(path: str | os.PathLike, expected: str = "a file") -> BinaryIO:
    """Open `path` for binary reading if it is a regular file (symlinks followed); raise
    `RwsError` naming what it is instead (`expected` says what was wanted, e.g. 'a .rws
    file'). The check runs on the opened descriptor, so nothing can swap the file in between."""
    path = as_path(path, f"the path of {expected}")
    try:
        fd = os.open(path, os.O_RDONLY | _NONBLOCK | _BINARY)
    except FileNotFoundError:
        raise RwsError("no such file", path=path, fix="check the path") from None
    except OSError as exc:  # e.g. a socket (ENXIO) or no permission
        _refuse_special(path, _mode(path), expected)
        raise RwsError(
            f"cannot be read ({exc.strerror})",
            path=path,
            fix="check the file's permissions, or that it is a regular file",
        ) from None
    try:
        mode = os.fstat(fd).st_mode
        _refuse_special(path, mode, expected)
        if _NONBLOCK:
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _mode(path: str) -> int:
    try:
        return os.stat(path).st_mode
    except OSError:
        return stat.S_IFREG  # nothing more to say than the open error


def _refuse_special(path: str, mode: int, expected: str) -> None:
    """Raise `RwsError` unless `mode` is a regular file's."""
    if stat.S_ISREG(mode):
        return
    what = next((name for test, name in _KINDS if test(mode)), "not a regular file")
    raise RwsError(
        f"is {what}, not {expected}",
        path=path,
        fix="give the path of a regular file (rwsfmt reads its inputs more than once, so "
        "it cannot read a pipe or a device; save the stream to a file first)",
    )


def strict_json(text: str | bytes) -> Any:
    """Parse JSON as strictly as the formats we read require: no NaN or Infinity and no
    number that overflows binary64 (`1e999`, or an integer of 309 digits), no key given
    twice in one object (two readers could pick different values), nesting bounded by the
    interpreter's recursion limit. Raises `ValueError` saying what is wrong."""
    try:
        return json.loads(
            text,
            parse_constant=_no_constant,
            parse_float=_bounded_float,
            parse_int=_bounded_int,
            object_pairs_hook=_unique_keys,
        )
    except RecursionError:
        raise ValueError("nested too deeply") from None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _bounded_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"number {text[:12]}... overflows binary64")
    return value


def _bounded_int(text: str) -> int:
    # float() first also spares int() thousands of digits
    if len(text) > 308 and math.isinf(float(text)):
        raise ValueError(f"integer {text[:12]}... ({len(text)} digits) overflows binary64")
    return int(text)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):  # rare: find the key to name it
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise ValueError(f"key {key!r} appears twice in one object")
            seen.add(key)
    return out


def sniff(path: str | os.PathLike) -> str | None:
    """'safetensors' or 'pytorch' for a checkpoint file at `path`, from its first bytes
    (extensions lie), or None.

    safetensors is checked first: its 8-byte header length can start with 0x80, the first
    byte of a pickle, but only a safetensors file has '{' at byte 8 and a length that fits.
    """
    path = as_path(path, "the path of a checkpoint file")
    with open_input(path, "a checkpoint file") as f:
        head = f.read(9)
        size = os.fstat(f.fileno()).st_size
    if len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") <= size - 8:
        return "safetensors"
    if head[:4] == b"PK\x03\x04":  # torch.save's zip format
        return "pytorch"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):  # legacy pickle
        return "pytorch"
    if path.endswith(".safetensors"):  # damaged: let the safetensors reader say what is wrong
        return "safetensors"
    return None
