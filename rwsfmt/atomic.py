"""Atomic file replacement: write a temporary file beside the target, fsync, rename."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterable, Iterator
from typing import BinaryIO

from .errors import RwsError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path in the target's folder; on success it replaces `path`.

    A crash or exception leaves the target untouched and removes the temporary file.
    """
    path = os.fspath(path)
    check_destination(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; follow the umask instead
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_folder(folder)


def check_destination(path: str | os.PathLike) -> None:
    """Refuse, before any work, a file path that is a folder or whose folder is missing."""
    if os.path.isdir(path):
        raise RwsError("is a folder", path=path, fix="give a file path for the output")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise RwsError("the output folder does not exist", path=folder, fix="create it first")


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Open a binary file that appears at `path` only once the block succeeds."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        yield f


def current_umask() -> int:
    """The process umask (read by setting it and restoring it at once)."""
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _fsync_folder(folder: str) -> None:
    """Persist the rename itself (POSIX); a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths name the same file or folder, however spelled (symlinks, hard
    links, `./`); for paths that do not exist yet, whether they resolve to the same place."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def refuse_overwriting_inputs(
    output: str | os.PathLike, inputs: Iterable[tuple[str, str | os.PathLike]], fix: str
) -> None:
    """Raise `RwsError` when `output` is one of `inputs`, given as (what, path) pairs such as
    ("input model", "std.pt"): nothing may be written over a file a command reads."""
    for what, path in inputs:
        if same_file(output, path):
            raise RwsError(
                f"the output would overwrite the {what} ({os.fspath(path)})", path=output, fix=fix
            )
