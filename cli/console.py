"""Shared command-line plumbing: consoles, progress bars, number formatting."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

import click

T = TypeVar("T")

# exit codes of every command
EXIT_OK, EXIT_VERIFY_FAILED, EXIT_USAGE = 0, 1, 2
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT), as shells report it


# C0 and C1 control characters and the bidirectional overrides (U+202A-E, U+2066-9)
_CONTROL = [*range(0x20), *range(0x7F, 0xA0), *range(0x202A, 0x202F), *range(0x2066, 0x206A)]
_ESCAPES = {c: f"\\u{c:04x}" for c in _CONTROL}
_ESCAPES_BUT_NEWLINE = {c: e for c, e in _ESCAPES.items() if c != ord("\n")}


def printable(value: object, newlines: bool = False) -> str:
    """Text from files and users made safe for a terminal: control characters escaped (an
    ESC in a label must not drive the terminal, a newline not break a row or a line)."""
    return str(value).translate(_ESCAPES_BUT_NEWLINE if newlines else _ESCAPES)


def plain(value: object):
    """`printable` text as a rich `Text`, which rich never reads as markup (a tensor named
    `a[/x]` must print as it is, not crash the command)."""
    from rich.text import Text

    return Text(printable(value))


def say(line: str, err: bool = False) -> None:
    """Print one line that may hold names, labels or paths from files and users."""
    click.echo(printable(line), err=err)


def report(summary: dict, line: str, *, quiet: bool, as_json: bool) -> None:
    """What a command that wrote a file prints at the end: `summary` as JSON with --json
    (ASCII, so no character from a file reaches the terminal raw), else `line` unless
    --quiet."""
    if as_json:
        click.echo(json.dumps(summary, indent=2, sort_keys=True))
    elif not quiet:
        say(line)


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
