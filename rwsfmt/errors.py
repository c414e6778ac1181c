"""The one exception type rwsfmt raises for bad input, and its integrity subclass."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

DAMAGED = "the file is damaged: copy or download it again, or re-create it with rwsfmt"


class RwsError(ValueError):
    """A problem with an input file, a checkpoint or an argument.

    The message names the file (when there is one), what is wrong and how to fix it, so the
    command line can print it as it is: `fix` is required, and never empty.
    """

    def __init__(self, problem: str, *, path: str | os.PathLike | None = None, fix: str) -> None:
        if not fix:
            raise TypeError(f"{type(self).__name__}({problem!r}) was raised without a fix")
        self.path = None if path is None else os.fspath(path)
        self.problem = problem
        self.fix = fix
        super().__init__(_message(problem, path, fix))


class IntegrityError(RwsError):
    """The bytes of a `.rws` file disagree with its checksums or its declared layout.

    Raised for damaged or truncated files; `rwsfmt verify` reports these with exit code 1.
    The fix, unless one more precise is given: get the file again (`DAMAGED`).
    """

    def __init__(
        self, problem: str, *, path: str | os.PathLike | None = None, fix: str = DAMAGED
    ) -> None:
        super().__init__(problem, path=path, fix=fix)


class SignatureError(IntegrityError):
    """A file checked against a public key is unsigned, signed by another key, or its
    signature does not verify; `rwsfmt verify --key` reports these with exit code 1."""


class RwsWarning(UserWarning):
    """A likely mistake that does not stop the work: the same file given twice, a signature
    that is all zero, an option that has no effect, an unusual strength.

    Issued with `warnings.warn`; the command line prints each as `warning: ...` on stderr.
    Turn them into errors with `warnings.simplefilter("error", rwsfmt.RwsWarning)`.
    """


class RwsNote(RwsWarning):
    """What rwsfmt did on its own in a normal case that needs no fix (inputs of mixed float
    dtypes computed in float32, tensors outside the selection that differ between library
    versions); the command line prints each as one `note: ...` line on stderr."""


def as_path(value: object, what: str = "a path") -> str:
    """`value` (str, bytes or os.PathLike) as a path string; `RwsError` naming what was
    given instead (`what` says what was wanted, e.g. 'the path of a .rws file')."""
    try:
        path = os.fspath(value)  # type: ignore[call-overload]
    except TypeError:
        raise RwsError(
            f"expected {what}, got {described(value)}", fix="pass a str or a pathlib.Path"
        ) from None
    return os.fsdecode(path)


def described(value: object, limit: int = 60) -> str:
    """A value given where another was expected, for a message: its type and its repr,
    cut to `limit` characters."""
    shown = repr(value)
    shown = shown if len(shown) <= limit else shown[: limit - 3] + "..."
    return f"{type(value).__name__} {shown}"


def warn(problem: str, *, path: str | os.PathLike | None = None, fix: str) -> None:
    """Issue an `RwsWarning` worded as an `RwsError` is (file, problem, fix)."""
    import warnings

    warnings.warn(_message(problem, path, fix), RwsWarning, stacklevel=3)


def note(what: str, *, path: str | os.PathLike | None = None) -> None:
    """Issue an `RwsNote`: one line saying what was done in a normal case (no fix needed)."""
    import warnings

    warnings.warn(_message(what, path, None), RwsNote, stacklevel=3)


def _message(problem: str, path: str | os.PathLike | None, fix: str | None) -> str:
    """`PATH: problem` and an indented `fix: ...` line."""
    message = problem if path is None else f"{os.fspath(path)}: {problem}"
    return message + (f"\n  fix: {fix}" if fix else "")


_spelling = {"cli": False}  # True in the command line: messages name its flags


def spell(cli: str, python: str) -> str:
    """An option as a message names it: `cli` (`--layers 5`) in the command line, `python`
    (`layers=5`) everywhere else."""
    return cli if _spelling["cli"] else python


@contextlib.contextmanager
def cli_spelling() -> Iterator[None]:
    """Within the block, messages name command-line flags and arguments (the command line
    runs its commands so)."""
    before, _spelling["cli"] = _spelling["cli"], True
    try:
        yield
    finally:
        _spelling["cli"] = before
