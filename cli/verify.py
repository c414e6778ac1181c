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
from .signing import public_key_option


@click.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
@click.option(
    "--quiet", "-q", is_flag=True, help="Print nothing and show no progress: the exit code only."
)
@public_key_option("Also require each FILE to be signed by this public key (rwsfmt keygen).")
def verify(files: tuple[str, ...], as_json: bool, quiet: bool, key: str | None) -> None:
    """Check that every byte of each FILE is intact (and, with --key, signed by KEY.pub).

    Exit code 0 when all files pass, 1 when any is damaged (or, with --key, unsigned or
    not validly signed by that key), 2 when any is not a .rws file at all (or cannot be
    read). Without --key, a signed file's signature is shown, not checked.
    """
    public = None
    if key is not None:
        from rwsfmt.signing import load_public_key

        public = load_public_key(key)  # a bad key file: exit 2 before any FILE
    results, worst = [], EXIT_OK
    for path in progress(files, len(files), "verifying", quiet or as_json or len(files) == 1):
        try:
            report = verify_file(path, key=public).to_json()
            worst = max(worst, EXIT_OK if report["ok"] else EXIT_VERIFY_FAILED)
        except RwsError as exc:
            report = {"path": path, "ok": False, "problems": [exc.problem], "error": str(exc)}
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
                if r["signed_by"]:
                    checked = r["signature_verified"]
                    note = "signature verified" if checked else "not checked: pass --key KEY.pub"
                    line = plain(f"      signed by key {r['signed_by']} ({note})")
                    out.print(line, soft_wrap=True)
            else:
                out.print(Text.assemble(("FAIL", "red"), plain(f"  {r['path']}")))
                for problem in r["problems"]:  # one line each: fingerprints are never cut
                    out.print(plain(f"      - {problem}"), soft_wrap=True)
                if "fix" in r:
                    out.print(plain(f"      fix: {r['fix']}"))
    sys.exit(worst)
