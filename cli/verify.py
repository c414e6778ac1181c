"""`rwsfmt verify`: check every checksum, frame and layout rule of one or more files."""

from __future__ import annotations

import json
import sys

import click

from rwsfmt.container import verify as verify_file
from rwsfmt.errors import RwsError

from .console import (
    EXIT_OK,
    EXIT_USAGE,
    EXIT_VERIFY_FAILED,
    console,
    human_bytes,
    plain,
    progress,
)


@click.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
@click.option(
    "--quiet", "-q", is_flag=True, help="Print nothing and show no progress: the exit code only."
)
def verify(files: tuple[str, ...], as_json: bool, quiet: bool) -> None:
    """Check that every byte of each FILE is intact.

    Exit code 0 when all files pass, 1 when any is damaged, 2 when any is not a .rws
    file at all (or cannot be read).
    """
    results, worst = [], EXIT_OK
    for path in progress(files, len(files), "verifying", quiet or len(files) == 1):
        try:
            report = verify_file(path).to_json()
            worst = max(worst, EXIT_OK if report["ok"] else EXIT_VERIFY_FAILED)
        except RwsError as exc:
            report = {"path": path, "ok": False, "problems": [exc.problem], "error": str(exc)}
            if exc.fix:
                report["fix"] = exc.fix
            worst = EXIT_USAGE
        results.append(report)
    if as_json:
        click.echo(json.dumps({"ok": worst == EXIT_OK, "files": results}, indent=2, sort_keys=True))
    elif not quiet:
        from rich.text import Text

        out = console()
        for r in results:  # paths and problems come from users and files: never markup
            if r["ok"]:
                plural = "" if r["tensors"] == 1 else "s"
                detail = (
                    f"    {r['path']}: {r['tensors']} tensor{plural}, "
                    f"{human_bytes(r['bytes_checked'])} checked, format {r['version']}"
                )
                out.print(Text.assemble(("OK", "green"), plain(detail)))
            else:
                out.print(Text.assemble(("FAIL", "red"), plain(f"  {r['path']}")))
                for problem in r["problems"]:
                    out.print(plain(f"      - {problem}"))
                if "fix" in r:
                    out.print(plain(f"      fix: {r['fix']}"))
    sys.exit(worst)
