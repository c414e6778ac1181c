"""`rwsfmt keygen` and `rwsfmt sign`, and the signature check of `apply --key`."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import click

from .console import say

PASSPHRASE_VARIABLE = "RWSFMT_KEY_PASSPHRASE"


def public_key_option(help: str) -> Callable:
    """The `--key KEY.pub` option of the commands that check signatures."""
    return click.option("--key", type=click.Path(dir_okay=False), metavar="KEY.pub", help=help)


@click.command()
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(dir_okay=False),
    metavar="KEY",
    help="Private key file to write (mode 0600); the public key goes to KEY.pub.",
)
@click.option(
    "--force", is_flag=True, help="Replace existing key files (the old key is lost for good)."
)
@click.option(
    "--encrypt",
    is_flag=True,
    help=f"Protect the private key with a passphrase (asked for, or ${PASSPHRASE_VARIABLE}).",
)
def keygen(output: str, force: bool, encrypt: bool) -> None:
    """Create an Ed25519 key pair to sign .rws files with: KEY and KEY.pub.

    Keep KEY private; give KEY.pub (or its fingerprint) to those who will check your files,
    through a channel they already trust.
    """
    from rwsfmt.signing import generate_key

    passphrase = _new_passphrase() if encrypt else None
    fingerprint = generate_key(output, force=force, passphrase=passphrase)
    say(f"wrote {output} (private key: keep it secret) and {output}.pub (public key)")
    say(f"key fingerprint: {fingerprint}")


@click.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option(
    "--key",
    required=True,
    type=click.Path(dir_okay=False),
    metavar="KEY",
    help="Private key file (rwsfmt keygen, or an OpenSSH ed25519 key).",
)
@click.option("--replace", is_flag=True, help="Replace a signature made with another key.")
@click.option("--quiet", "-q", is_flag=True, help="No summary line.")
def sign(files: tuple[str, ...], key: str, replace: bool, quiet: bool) -> None:
    """Sign each FILE (a .rws file) in place with the Ed25519 private KEY.

    Every byte is checked first: a damaged file is refused. The signature covers the whole
    file (the header holds every tensor's checksum); `rwsfmt verify --key KEY.pub` checks it.
    An encrypted KEY's passphrase is asked for, or read from $RWSFMT_KEY_PASSPHRASE.
    """
    from rwsfmt.signing import load_private_key, sign

    private = load_private_key(key, _passphrase())
    for path in files:
        block = sign(path, private, replace=replace)
        if not quiet:
            say(f"signed {path} with key {block.fingerprint}")


def signed_pairs(
    pairs: Sequence[tuple[str, float]], key: str | None, required: bool
) -> Sequence[tuple[Any, float]]:
    """The (signature, alpha) pairs `apply` patches with: with `key`, each file is opened and
    its signature checked, before any work (an unsigned one passes with a warning, unless
    `required`); without, the paths as they are."""
    if key is None:
        if required:
            raise click.UsageError("--require-signature needs --key KEY.pub, the key to check")
        return pairs
    from rwsfmt.signature import load
    from rwsfmt.signing import load_public_key

    public = load_public_key(key)
    checked = []
    for path, alpha in pairs:
        sig = load(path, key=public, allow_unsigned=not required)
        if sig.signed_by is None:
            say(f"warning: {path} is not signed; applied unchecked", err=True)
        checked.append((sig, alpha))
    return checked


def _passphrase() -> bytes | Callable[[], bytes] | None:
    """An encrypted key's passphrase: $RWSFMT_KEY_PASSPHRASE, else asked on a terminal."""
    given = os.environ.get(PASSPHRASE_VARIABLE)
    if given is not None:
        return given.encode()
    if not sys.stdin.isatty():
        return None
    return lambda: click.prompt("key passphrase", hide_input=True, err=True).encode()


def _new_passphrase() -> bytes:
    """The passphrase of a new key: $RWSFMT_KEY_PASSPHRASE, else asked twice on a terminal."""
    given = _passphrase()
    if callable(given):
        given = click.prompt(
            "passphrase for the new key", hide_input=True, confirmation_prompt=True, err=True
        ).encode()
    if not given:
        raise click.UsageError(
            f"--encrypt needs a passphrase: set ${PASSPHRASE_VARIABLE}, or run on a terminal"
        )
    return given
