"""Signing a `.rws` file in place (spec section 14.3)."""

from __future__ import annotations

import os

from ..atomic import atomic_write, target_lock
from ..container import DIGESTED_PREAMBLE, FLAG_TRAILER, PREAMBLE, RwsReader, header_digest
from ..errors import IntegrityError, RwsError
from .block import SIGNED_MINOR, SignatureBlock, signed_message
from .keys import Passphrase, PrivateKeyLike, load_private_key, raw_public_key


def sign(
    path: str | os.PathLike,
    key: PrivateKeyLike,
    *,
    replace: bool = False,
    passphrase: Passphrase = None,
) -> SignatureBlock:
    """Sign the `.rws` file at `path` with the Ed25519 private `key` (or its file), in place
    and atomically; return the new signature block.

    Every byte is checked first (a signature never vouches for damage). A file signed by the
    same key is signed again (the same bytes: Ed25519 is deterministic); one signed by
    another key is refused unless `replace`.
    """
    private = load_private_key(key, passphrase)
    public = raw_public_key(private.public_key())
    with target_lock(path), RwsReader(path) as reader:
        _, problems = reader.verify_tensors()
        if problems:
            raise IntegrityError(
                f"is damaged, and a signature must not vouch for damage: {problems[0].problem}",
                path=reader.path,
                fix="sign an intact copy (rwsfmt verify lists every problem)",
            )
        old = reader.header.signature
        if old is not None and old.public_key != public and not replace:
            raise RwsError(
                f"is already signed by another key, {old.fingerprint}",
                path=reader.path,
                fix="pass --replace (replace=True) to replace that signature with yours",
            )
        preamble, header = reader.read_head()
        preamble = _signed_preamble(preamble, header)
        block = SignatureBlock(public, private.sign(signed_message(preamble[DIGESTED_PREAMBLE:])))
        with atomic_write(path) as out:
            out.write(preamble)
            out.write(header)
            for info in reader.header.tensors:
                out.write(reader.read_stored(info))  # checked against the signed header
            out.write(block.to_bytes())
    return block


def _signed_preamble(preamble: bytes, header: bytes) -> bytes:
    """The preamble of the signed file: minor at least 1, the TRAILER flag, a new digest."""
    fields = list(PREAMBLE.unpack(preamble))
    fields[2] = max(fields[2], SIGNED_MINOR)
    fields[3] |= FLAG_TRAILER
    head = PREAMBLE.pack(*fields[:-1], b"\0" * 32)
    return head[:DIGESTED_PREAMBLE] + header_digest(head, header)
