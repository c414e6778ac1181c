"""The one exception type rwsfmt raises for bad input, and its integrity subclass."""

from __future__ import annotations

import os


class RwsError(ValueError):
    """A problem with an input file, a checkpoint or an argument.

    The message names the file (when there is one), what is wrong and, where there
    is one, how to fix it, so the command line can print it as it is.
    """

    def __init__(
        self, problem: str, *, path: str | os.PathLike | None = None, fix: str | None = None
    ) -> None:
        self.path = None if path is None else os.fspath(path)
        self.problem = problem
        self.fix = fix
        message = problem if self.path is None else f"{self.path}: {problem}"
        if fix:
            message += f"\n  fix: {fix}"
        super().__init__(message)


class IntegrityError(RwsError):
    """The bytes of a `.rws` file disagree with its checksums or its declared layout.

    Raised for damaged or truncated files; `rwsfmt verify` reports these with exit code 1.
    """


class SignatureError(IntegrityError):
    """A file checked against a public key is unsigned, signed by another key, or its
    signature does not verify; `rwsfmt verify --key` reports these with exit code 1."""
