"""Writing outputs safely: destination rules, atomic replacement, locking, temporaries.

Every file rwsfmt writes goes through `atomic_write` or `atomic_path`, every new folder
through `atomic_folder`:

- the destination is checked first (`check_destination`): a regular file or a new path;
  a symbolic link is written through (its target is replaced, the link stays), as `cp` does;
  named pipes, sockets and devices are refused;
- writers of one target take turns (`target_lock`), so an in-place update that reads its
  input under the lock never loses another's update;
- the data goes to `.NAME.rwsfmt-tmp.PID.RANDOM` beside the target, is fsynced and renamed
  over it; a replaced file keeps its permission bits, owner and group; a new one follows
  the umask;
- a failed write removes its temporary and, when the disk or the folder is at fault (full,
  read-only, no permission), raises an `RwsError` naming the file, the problem and the fix;
  the temporaries of writers killed outright are removed by the next write of their target.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import re
import secrets
import shutil
import stat
import threading
from collections.abc import Iterable, Iterator
from typing import BinaryIO

from .errors import RwsError, as_path

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; writes are still atomic
    fcntl = None  # type: ignore[assignment]

TEMPORARY_MARK = ".rwsfmt-tmp."
LOCK_MARK = ".rwsfmt-lock"
_TEMPORARY_TAIL = re.compile(r"(\d{1,9})\.[0-9a-f]{8}")  # PID.RANDOM after `.NAME` + the mark
_SPECIAL_FILES = (
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)
# errno values only a write can raise: such an error is the output's, whatever raised it
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}
_FIXES = {
    errno.ENOSPC: "free space on the disk holding {folder} (df -h shows it), or write the "
    "output to another disk",
    errno.EDQUOT: "your disk quota there is used up: free space, or write the output elsewhere",
    errno.EFBIG: "the file system or a limit (ulimit -f) caps the file size: raise the limit, "
    "or write the output to another file system",
    errno.EROFS: "{folder} is on a read-only file system: write the output elsewhere",
    errno.EACCES: "you may not create files in {folder}: write the output elsewhere",
    errno.EPERM: "you may not create files in {folder}: write the output elsewhere",
    errno.ENAMETOOLONG: "use a shorter file name: rwsfmt's temporary file adds 30 characters",
}
_held = threading.local()  # the targets whose lock this thread holds


def check_destination(path: str | os.PathLike, *, allow_folder: bool = False) -> str:
    """Refuse, before any work, an output path that cannot be replaced by a regular file (or,
    with `allow_folder`, a folder); return the path to replace, through symbolic links."""
    path = os.fspath(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):  # cp refuses to write through a dangling link, and so do we
            raise RwsError(
                f"is a symbolic link to {os.readlink(path)}, which does not exist",
                path=path,
                fix="remove the link, or give the path the file should have",
            ) from None
        st = None
    except OSError as exc:  # a symlink loop, a name too long, a folder we may not enter
        raise RwsError(
            f"cannot be written: {_reason(exc)}", path=path, fix="check the path"
        ) from None
    if st is not None and stat.S_ISDIR(st.st_mode) and not allow_folder:
        raise RwsError("is a folder", path=path, fix="give a file path for the output")
    special = [kind for is_kind, kind in _SPECIAL_FILES if st is not None and is_kind(st.st_mode)]
    if special:
        raise RwsError(
            f"is {special[0]}, not a regular file (writing would replace it with one)",
            path=path,
            fix="give the path of a regular file, or of a new one",
        )
    target = os.path.realpath(path)
    folder = os.path.dirname(target)
    if not os.path.isdir(folder):
        raise RwsError("the output folder does not exist", path=folder, fix="create it first")
    if not os.access(folder, os.W_OK | os.X_OK):
        code = errno.EROFS if _read_only(folder) else errno.EACCES
        raise RwsError(
            f"cannot be written: {_reason(OSError(code, os.strerror(code)))}",
            path=path,
            fix=_FIXES[code].format(folder=folder),
        )
    return target


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary file path beside `path`; once the block succeeds it replaces `path`.

    A failure leaves `path` as it was and removes the temporary file; the disk's and the
    folder's faults (full, read-only, no permission) become an `RwsError`.
    """
    with _replacing(path, folder=False) as tmp:
        yield tmp.path


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, *, readable: bool = False) -> Iterator[BinaryIO]:
    """Open a binary file that appears at `path` only once the block succeeds (see
    `atomic_path`); a write error is reported even when the caller turned it into another
    exception, as `torch.save` does. `readable` opens it for reading too."""
    with _replacing(path, folder=False) as tmp, tmp.open(readable) as f:
        yield f


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[str]:
    """Yield a new temporary folder beside `path`, renamed to `path` once the block
    succeeds and removed with its contents if it fails."""
    with _replacing(path, folder=True) as tmp:
        yield tmp.path


@contextlib.contextmanager
def target_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold the exclusive lock on writing `path`, waiting while another writer holds it.

    Hold it across read-modify-write (apply --in-place) so that a concurrent update is read,
    not lost. The lock is a flock on `.NAME.rwsfmt-lock` beside the target (a rename gives the
    target a new inode, so its own cannot carry the lock), removed again by whoever releases
    it. A thread may take a lock it holds again; where flock is missing the lock is a no-op.
    """
    target = os.path.realpath(path)
    held: set[str] = _held.__dict__.setdefault("targets", set())
    if fcntl is None or target in held:
        yield
        return
    lock = _sidecar(target, LOCK_MARK)
    fd = _acquire(lock)
    held.add(target)
    try:
        yield
    finally:
        held.discard(target)
        if fd is not None:
            with contextlib.suppress(OSError):  # e.g. another user's file in a sticky folder
                os.unlink(lock)  # while still locked: a waiter sees the name gone and retries
            os.close(fd)


def remove_stale_temporaries(path: str | os.PathLike) -> None:
    """Remove the temporary files and folders that writers of `path` killed outright left
    beside it; those whose process still runs are kept."""
    if os.name != "posix":  # no safe test of a process (os.kill would end it on Windows)
        return
    target = os.path.realpath(path)
    folder, name = os.path.split(target)
    prefix = f".{name}{TEMPORARY_MARK}"
    try:
        with os.scandir(folder) as entries:
            stale = [
                entry
                for entry in entries
                if entry.name.startswith(prefix)
                and (tail := _TEMPORARY_TAIL.fullmatch(entry.name[len(prefix) :]))
                and not _running(int(tail[1]))
            ]
    except OSError:  # a folder we may write to but not list: nothing to sweep
        return
    for entry in stale:
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.unlink(entry.path)


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


class _Temporary:
    """A new file or folder beside `target`, named `.NAME.rwsfmt-tmp.PID.RANDOM` so that the
    next writer of `target` can tell a killed writer's leftover from a running one's."""

    def __init__(self, target: str, folder: bool) -> None:
        self.target, self.folder = target, folder
        self.error: OSError | None = None  # the first write error, however the caller saw it
        try:
            self._replaced = None if folder else os.stat(target)
        except FileNotFoundError:
            self._replaced = None
        # A replacement stays private until it gets the replaced file's mode; a new file gets
        # the umask's mode from the start, as any new file would.
        mode = 0o600 if self._replaced else 0o666
        head, name = os.path.split(target)
        while True:
            self.path = os.path.join(
                head, f".{name}{TEMPORARY_MARK}{os.getpid()}.{secrets.token_hex(4)}"
            )
            try:
                if folder:
                    os.mkdir(self.path, 0o777)
                else:
                    os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode))
                return
            except FileExistsError:
                continue

    def open(self, readable: bool = False) -> BinaryIO:
        """The temporary file, opened for writing (and reading); its write errors are kept
        in `error`."""
        access = os.O_RDWR if readable else os.O_WRONLY
        fd = os.open(self.path, access | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0))
        raw = _RecordingFile(fd, self, "r+b" if readable else "wb")
        return io.BufferedRandom(raw) if readable else io.BufferedWriter(raw)

    def commit(self) -> None:
        """Make the data durable, give it the replaced file's owner and mode, rename it."""
        try:
            if not self.folder:
                _fsync_file(self.path)
            if self._replaced:
                _keep_owner_and_mode(self.path, self._replaced)
            os.replace(self.path, self.target)
        except OSError as exc:
            self.error = self.error or exc
            raise

    def discard(self) -> None:
        """Remove the temporary (best effort: the next write of the target retries)."""
        if self.folder:
            shutil.rmtree(self.path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.unlink(self.path)


class _RecordingFile(io.FileIO):
    """A raw file that keeps its first write error on its `_Temporary`: torch.save reports a
    full disk as a RuntimeError that has lost the cause."""

    def __init__(self, fd: int, owner: _Temporary, mode: str = "wb") -> None:
        super().__init__(fd, mode)
        self._owner = owner

    def write(self, data) -> int | None:  # type: ignore[override]
        try:
            return super().write(data)
        except OSError as exc:
            self._owner.error = self._owner.error or exc
            raise


@contextlib.contextmanager
def _replacing(path: str | os.PathLike, *, folder: bool) -> Iterator[_Temporary]:
    """The shared frame of the atomic writers: check, lock, sweep, write, commit or clean."""
    shown = as_path(path, "the path of the output")
    target = check_destination(shown, allow_folder=folder)
    tmp: _Temporary | None = None
    try:
        with target_lock(target):
            remove_stale_temporaries(target)
            tmp = _Temporary(target, folder)
            try:
                yield tmp
                tmp.commit()
            except BaseException:
                tmp.discard()
                raise
    except Exception as exc:
        failure = _write_failure(exc, shown, target, tmp)
        if failure is None:
            raise
        raise failure from exc
    _fsync_folder(os.path.dirname(target))


def _write_failure(
    exc: Exception, path: str, target: str, tmp: _Temporary | None
) -> RwsError | None:
    """The `RwsError` for an output the disk or the folder failed, or None when `exc` is
    another problem (an input that cannot be read, a bug), which stays as it is."""
    cause: OSError | None = tmp.error if tmp is not None else None
    if isinstance(exc, OSError) and cause is None:
        ours = {target, _sidecar(target, LOCK_MARK), *([tmp.path] if tmp else [])}
        if exc.errno in _WRITE_ERRNOS or ours & {exc.filename, exc.filename2}:
            cause = exc
    if cause is None or isinstance(exc, RwsError):
        return None
    fix = _FIXES.get(cause.errno or 0, "check the disk holding {folder}, then try again")
    return RwsError(
        f"cannot be written: {_reason(cause)}",
        path=path,
        fix=fix.format(folder=os.path.dirname(target)),
    )


def _reason(exc: OSError) -> str:
    """`No space left on device` as it reads in a sentence: `no space left on device`."""
    text = exc.strerror or str(exc)
    return text[:1].lower() + text[1:]


def _sidecar(target: str, mark: str) -> str:
    folder, name = os.path.split(target)
    return os.path.join(folder, f".{name}{mark}")


def _acquire(lock: str) -> int | None:
    """Lock the file `lock` (created if missing), waiting for its holder; its descriptor, or
    None where there can be no lock: the file system has none (some network mounts), or the
    folder takes no new file (a model folder updated in place inside a read-only one)."""
    while True:
        try:
            fd = os.open(lock, os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW, 0o666)
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EROFS):
                return None
            raise
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if os.path.samestat(os.fstat(fd), os.stat(lock)):
                return fd
        except FileNotFoundError:
            pass  # the holder removed it on release: lock the next one
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP):
                return None
            raise
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)


def _running(pid: int) -> bool:
    """Whether process `pid` exists (a process of another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _keep_owner_and_mode(path: str, old: os.stat_result) -> None:
    """Give a replacement the replaced file's owner and group where allowed (the owner needs
    root, the group membership), then its permission bits."""
    if hasattr(os, "chown"):
        mine = os.stat(path)
        if (mine.st_uid, mine.st_gid) != (old.st_uid, old.st_gid):
            for uid in (old.st_uid, -1):  # the group alone when the owner cannot be given away
                with contextlib.suppress(PermissionError):
                    os.chown(path, uid, old.st_gid)
                    break
    os.chmod(path, stat.S_IMODE(old.st_mode))


def _read_only(folder: str) -> bool:
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except (AttributeError, OSError):  # no statvfs (Windows)
        return False


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_folder(folder: str) -> None:
    """Persist a rename (POSIX); a no-op where folders cannot be opened or synced."""
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
