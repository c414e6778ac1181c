"""Checking a file's signature against a public key the caller trusts (spec section 14.4)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import SignatureError
from .block import SignatureBlock, key_fingerprint, signed_message
from .keys import PublicKeyLike, load_public_key, raw_public_key

if TYPE_CHECKING:
    from ..container import Header


def check_signature(header: Header, key: PublicKeyLike, path: str) -> SignatureBlock:
    """The signature block of a file whose `header` was read from `path`, once it is shown
    to be signed by `key` with a valid signature; `SignatureError` otherwise.

    The signature covers the header digest, and the header every blob's SHA-256: a reader
    that checks each blob on reading (as rwsfmt's does) reads only signed bytes.
    """
    from cryptography.exceptions import InvalidSignature

    public = load_public_key(key)
    raw = raw_public_key(public)
    block = header.signature
    if block is None:
        raise SignatureError(
            "not signed, and a signature by the given key is required",
            path=path,
            fix="ask its publisher for a signed file (rwsfmt sign), or use it without a key "
            "if you trust it as it is",
        )
    if block.public_key != raw:
        raise SignatureError(
            f"signed by key {block.fingerprint}, not by the given key {key_fingerprint(raw)}",
            path=path,
            fix="check that the public key is its publisher's; a key you do not trust proves "
            "nothing",
        )
    try:
        public.verify(block.signature, signed_message(header.digest))
    except InvalidSignature:
        raise SignatureError(
            "the signature does not verify: the file was changed after it was signed, or the "
            "signature is forged",
            path=path,
            fix="get the file again from its publisher",
        ) from None
    return block
