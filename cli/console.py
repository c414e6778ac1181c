"""Shared command-line plumbing: consoles, progress bars, number formatting."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, TypeVar

import click

if TYPE_CHECKING:
    from rich.console import Console

T = TypeVar("T")

# exit codes of every command
EXIT_OK, EXIT_VERIFY_FAILED, EXIT_USAGE = 0, 1, 2
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT), as shells report it

PIPE_WIDTH = 1 << 12  # the width of a console in a pipe: as wide as the lines
MIN_NAME_WIDTH = 12  # a name column narrower than this is not worth the folding
_EDGES = 2  # a table's left and right edge (a space each)


# C0 and C1 control characters and the bidirectional overrides (U+202A-E, U+2066-9)
_CONTROL = [*range(0x20), *range(0x7F, 0xA0), *range(0x202A, 0x202F), *range(0x2066, 0x206A)]
_ESCAPES = {c: f"\\u{c:04x}" for c in _CONTROL}
# lone surrogates, which a strict UTF-8 stream refuses: a file name's undecodable byte N
# (os.fsdecode makes it U+DC00+N) printed as \xNN, any other surrogate as \uNNNN
_SURROGATES = range(0xD800, 0xE000)
_BYTES = range(0xDC80, 0xDD00)
_ESCAPES.update({c: f"\\x{c - 0xDC00:02x}" if c in _BYTES else f"\\u{c:04x}" for c in _SURROGATES})
_ESCAPES_BUT_NEWLINE = {c: e for c, e in _ESCAPES.items() if c != ord("\n")}
_JSON_ESCAPES = {c: f"\\u{c:04x}" for c in _SURROGATES}


class UsageError(click.UsageError):
    """A usage error (exit 2) that says how to fix it: printed as `error: MESSAGE` and
    `fix: FIX` (a plain `click.UsageError` gets `fix: see COMMAND --help`)."""

    def __init__(self, message: str, fix: str, ctx: click.Context | None = None) -> None:
        super().__init__(message, ctx or click.get_current_context(silent=True))
        self.fix = fix


def printable(value: object, newlines: bool = False) -> str:
    """Text from files and users made safe for a terminal: control characters escaped (an
    ESC in a label must not drive the terminal, a newline not break a row or a line)."""
    return str(value).translate(_ESCAPES_BUT_NEWLINE if newlines else _ESCAPES)


def json_text(text: str) -> str:
    """JSON text (from json.dumps with ensure_ascii=False) that a strict UTF-8 stream takes:
    lone surrogates (an undecodable file name's bytes) written as JSON escapes, which
    json.loads reads back to the very same string (os.fsencode gives back the name)."""
    return text.translate(_JSON_ESCAPES)


def print_error(message: str) -> None:
    """`error: MESSAGE` on stderr (a message's `fix:` line keeps its own line)."""
    click.echo(f"error: {printable(message, newlines=True)}", err=True)


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


def console(stderr: bool = False) -> Console:
    """A rich console (imported lazily: rich costs time at start-up). On a terminal, or
    where COLUMNS is set, it is as wide as they say; in a pipe it is as wide as the lines
    (PIPE_WIDTH), so that every table row stays on one line for grep and awk."""
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    wide = not stream.isatty() and not os.environ.get("COLUMNS")
    return Console(stderr=stderr, highlight=False, width=PIPE_WIDTH if wide else None)


def print_table(
    out: Console,
    title: str,
    header: Sequence[str],
    rows: Iterable[Sequence[str]],
    right: Sequence[str] = (),
) -> None:
    """Print a table whose first column (names) folds onto more lines rather than being cut,
    after a '.' only (`fold_name`: a name is never split inside a word; a part wider than
    the column widens it), and whose other columns (numbers, short words) never wrap: where
    they do not fit the console's width side by side, they are split into several tables,
    each repeating the names. Nothing is ever cut short. `right`: the columns aligned right
    (numbers)."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    rows = [[printable(cell) for cell in row] for row in rows]
    longest = max((len(row[0]) for row in rows), default=0)
    key = max(len(header[0]), longest)
    # each other column takes its text, a space either side and the space dividing columns;
    # the table's two edges are a space each
    widths = [max([len(h), *(len(row[j]) for row in rows)]) + 3 for j, h in enumerate(header)]
    widths = widths[1:]
    if key + _EDGES + sum(widths) <= out.width:
        chunks, least = [range(len(widths))], key
    else:  # the names take a third of the width (or their longest part), the columns the rest
        part = max((len(p) for row in rows for p in fold_name(row[0], 0)), default=0)
        least = min(key, max(MIN_NAME_WIDTH, out.width // 3, part))
        chunks = _chunks(widths, out.width - _EDGES - least)
    for n, chunk in enumerate(chunks):
        name_width = max(least, out.width - _EDGES - sum(widths[j] for j in chunk))
        names = [fold_name(row[0], min(key, name_width)) for row in rows]
        width = max((len(line) for name in names for line in name), default=0)
        out.print(plain(title + (f" ({n + 1}/{len(chunks)})" if len(chunks) > 1 else "")))
        table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
        table.add_column(plain(header[0]), no_wrap=True, min_width=width)
        for j in chunk:
            justify = "right" if header[j + 1] in right else "left"
            table.add_column(plain(header[j + 1]), justify=justify, no_wrap=True)
        for name, row in zip(names, rows, strict=True):  # (rows are printable already)
            table.add_row(Text("\n".join(name)), *(plain(row[j + 1]) for j in chunk))
        out.print(table)


def fold_name(name: str, width: int) -> list[str]:
    """`name` in lines of at most `width` characters, broken only after a '.' (a tensor
    name's parts stay whole; a part longer than `width` gets a line of its own)."""
    lines: list[str] = []
    for part in name.split(".")[:-1]:
        piece = part + "."
        if lines and len(lines[-1]) + len(piece) <= width:
            lines[-1] += piece
        else:
            lines.append(piece)
    last = name.rpartition(".")[2] if "." in name else name
    if lines and len(lines[-1]) + len(last) <= width:
        lines[-1] += last
    else:
        lines.append(last)
    return lines


def _chunks(widths: Sequence[int], room: int) -> list[range]:
    """Consecutive runs of columns whose `widths` add up to at most `room` (a column wider
    than `room` stands alone)."""
    runs, start, used = [], 0, 0
    for j, w in enumerate(widths):
        if used + w > room and j > start:
            runs.append(range(start, j))
            start, used = j, 0
        used += w
    runs.append(range(start, len(widths)))
    return runs


def progress(items: Iterable[T], total: int, description: str, quiet: bool) -> Iterator[T]:
    """Iterate with a progress bar on a terminal; silently in pipes or with --quiet."""
    if quiet or not sys.stderr.isatty():
        yield from items
        return
    from rich.progress import track

    yield from track(
        items, total=total, description=description, console=console(stderr=True), transient=True
    )


def progress_bar(quiet: bool) -> Callable[[Iterable[T], int, str], Iterator[T]]:
    """The `progress=` callable the library takes: `progress`, silenced by `quiet` (pass
    `quiet or as_json`: a JSON report is for programs, which want no bar on stderr)."""
    return lambda items, total, what: progress(items, total, what, quiet)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def bits_per_parameter(size: int, sig) -> float | None:
    """Bits per parameter of a written file of `size` bytes holding signature `sig`'s
    tensors (spec section 3.8: every byte counts, the header's too); None without any."""
    parameters = sum(info.numel for info in sig.infos)
    return 8 * size / parameters if parameters else None


def describe_bits(bits: float | None) -> str:
    """`bits_per_parameter` in a summary line: `0.482 bits/parameter`."""
    return "-" if bits is None else f"{bits:.3g} bits/parameter"


def short_hash(fp: str | None) -> str:
    if not fp:
        return "-"
    return fp if len(fp) <= 23 else fp[:23] + "…"
