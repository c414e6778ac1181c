"""Entry point: the `rwsfmt` click group and its error handling."""

from __future__ import annotations

import os
import sys

import click

from rwsfmt import __version__
from rwsfmt.errors import RwsError

from .console import EXIT_OK, EXIT_USAGE, printable


class RwsGroup(click.Group):
    """Turns library errors into a clear message and exit code 2, never a traceback.

    Commands are listed in workflow order (extract, apply, inspect, ...), not alphabetically.
    """

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.commands)

    def invoke(self, ctx: click.Context):
        try:
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
            click.echo("interrupted; nothing was written", err=True)
            sys.exit(130)


def _fail(message: str) -> None:
    click.echo(f"error: {printable(message, newlines=True)}", err=True)
    sys.exit(EXIT_USAGE)


@click.group(cls=RwsGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="rwsfmt")
def main() -> None:
    """Robust Weight Signatures: extract, inspect, verify, merge, compare, convert and apply
    .rws patches, exchange them with safetensors files, and sign them."""


def _register() -> None:
    from .apply import apply
    from .compare import compare
    from .convert import convert
    from .extract import extract
    from .inspect import inspect
    from .interchange import export, import_
    from .merge import merge
    from .signing import keygen, sign
    from .verify import verify

    commands = (extract, apply, inspect, verify, merge, compare, convert, export, import_)
    for command in (*commands, keygen, sign):
        main.add_command(command)


_register()
