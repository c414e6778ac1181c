"""Shared command-line plumbing: consoles, progress bars, number formatting."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")

# exit codes of every command
EXIT_OK, EXIT_VERIFY_FAILED, EXIT_USAGE = 0, 1, 2


def console(stderr: bool = False):
    """A rich console (imported lazily: rich costs time at start-up)."""
    from rich.console import Console

    return Console(stderr=stderr, highlight=False)


def progress(items: Iterable[T], total: int, description: str, quiet: bool) -> Iterator[T]:
    """Iterate with a progress bar on a terminal; silently in pipes or with --quiet."""
    if quiet or not sys.stderr.isatty():
        yield from items
        return
    from rich.progress import track

    yield from track(
        items, total=total, description=description, console=console(stderr=True), transient=True
    )


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def short_hash(fp: str | None) -> str:
    if not fp:
        return "-"
    return fp if len(fp) <= 23 else fp[:23] + "…"
