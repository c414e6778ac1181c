"""Entry point: the `rwsfmt` click group and its error handling."""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from collections.abc import Iterator

import click

from rwsfmt import __version__
from rwsfmt.errors import RwsError, RwsNote, RwsWarning, cli_spelling

from .console import EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, print_error, printable


class RwsGroup(click.Group):
    """Turns library errors into a clear message and exit code 2, never a traceback.

    Commands are listed in workflow order (extract, apply, inspect, ...), not alphabetically.
    """

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.commands)

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        """Click's main, with usage errors in rwsfmt's style: `error: ...` and `fix: ...`."""
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except click.exceptions.NoArgsIsHelpError as exc:  # `rwsfmt` alone: the help
            exc.show()
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            command = exc.ctx.command_path if getattr(exc, "ctx", None) else "rwsfmt"
            print_error(exc.format_message())
            fix = getattr(exc, "fix", None) or f"see {command} --help"
            click.echo(f"  fix: {printable(fix)}", err=True)
            sys.exit(exc.exit_code)
        except click.exceptions.Abort:  # Ctrl-C while click reads a prompt or a file
            _interrupted()
        sys.exit(code if isinstance(code, int) else EXIT_OK)

    def invoke(self, ctx: click.Context):
        try:
            with cli_spelling(), _printed_warnings():
                return super().invoke(ctx)
        except RwsError as exc:
            _fail(str(exc))
        except BrokenPipeError:  # e.g. `rwsfmt inspect f.rws | head`: the reader has enough
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())  # no second error when Python flushes
            sys.exit(EXIT_OK)
        except OSError as exc:
            where = f"{exc.filename}: " if exc.filename else ""
            _fail(f"{where}{exc.strerror or exc}")
        except KeyboardInterrupt:
            _interrupted()


@contextlib.contextmanager
def _printed_warnings() -> Iterator[None]:
    """Print every `RwsWarning` (each time it occurs) as `warning: ...` (an `RwsNote` as
    `note: ...`) on stderr; the exit
    code stays what it would be without."""

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        if issubclass(category, RwsWarning):
            kind = "note" if issubclass(category, RwsNote) else "warning"
            click.echo(f"{kind}: {printable(message, newlines=True)}", err=True)
        else:
            original(message, category, filename, lineno, file, line)

    with warnings.catch_warnings():
        warnings.simplefilter("always", RwsWarning)
        original = warnings.showwarning
        warnings.showwarning = show
        yield


def _interrupted() -> None:
    click.echo("interrupted; nothing was written", err=True)
    sys.exit(EXIT_INTERRUPTED)


def _fail(message: str) -> None:
    print_error(message)
    sys.exit(EXIT_USAGE)


@click.group(cls=RwsGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="rwsfmt")
def main() -> None:
    """Robust Weight Signatures: extract, inspect, verify, merge, compare, convert and apply
    .rws patches (and undo them), exchange them with safetensors files, and sign them."""


def _register() -> None:
    from .apply import apply
    from .compare import compare
    from .convert import convert
    from .extract import extract
    from .inspect import inspect
    from .interchange import export, import_
    from .merge import merge
    from .signing import keygen, sign
    from .undo import undo
    from .verify import verify

    commands = (extract, apply, undo, inspect, verify, merge, compare, convert, export, import_)
    for command in (*commands, keygen, sign):
        main.add_command(command)


_register()
