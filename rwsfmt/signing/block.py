"""The signature block of a signed `.rws` file (spec section 14), as bytes.

Parsing a block, computing a key's fingerprint and the signed message need no cryptography
library, so `inspect` and `verify` without a key stay as light as before.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from typing import Any

from ..errors import IntegrityError, RwsError

MAGIC = b"RWSSIG\0\0"
FIXED = struct.Struct("<8sHHI")  # magic, block version, algorithm, block length
BLOCK_VERSION = 1
ED25519 = 1
KEY_BYTES = 32
SIGNATURE_BYTES = 64
DIGEST_BYTES = 32
BLOCK_BYTES = FIXED.size + KEY_BYTES + SIGNATURE_BYTES + DIGEST_BYTES  # 144
MAX_BLOCK_BYTES = 1 << 16  # any block version
SIGNED_MINOR = 1  # the format minor version of a signed file
CONTEXT = b"rwsfmt-signature-v1\0"  # domain separation: what the signature is for

_DAMAGED_FIX = "the file was damaged or appended to; copy or download it again"


@dataclass(frozen=True)
class SignatureBlock:
    """The signer's Ed25519 public key and its signature of the file's header digest."""

    public_key: bytes
    signature: bytes

    @property
    def fingerprint(self) -> str:
        return key_fingerprint(self.public_key)

    def to_bytes(self) -> bytes:
        """The block as the file stores it, its checksum included."""
        body = FIXED.pack(MAGIC, BLOCK_VERSION, ED25519, BLOCK_BYTES)
        body += self.public_key + self.signature
        return body + hashlib.sha256(body).digest()

    def to_json(self) -> dict[str, Any]:
        return {"algorithm": "ed25519", "fingerprint": self.fingerprint}


def key_fingerprint(public_key: bytes) -> str:
    """`sha256:` and the hex SHA-256 of a raw 32-byte Ed25519 public key."""
    return "sha256:" + hashlib.sha256(public_key).hexdigest()


def signed_message(header_sha256: bytes) -> bytes:
    """The bytes a signature covers: the domain prefix and the file's header digest."""
    return CONTEXT + header_sha256


def parse_block(data: bytes, path: str) -> SignatureBlock:
    """The block in `data`, every byte after the data section (up to `MAX_BLOCK_BYTES` + 1):
    `IntegrityError` when it is damaged, `RwsError` when a newer rwsfmt wrote it."""
    if len(data) < FIXED.size or not data.startswith(MAGIC):
        raise IntegrityError(
            f"{len(data):,} bytes after the data section are not a signature block",
            path=path,
            fix=_DAMAGED_FIX,
        )
    _, version, algorithm, length = FIXED.unpack_from(data)
    if length != len(data) or length > MAX_BLOCK_BYTES:
        follow = f"{len(data):,}" if len(data) <= MAX_BLOCK_BYTES else "more"
        raise IntegrityError(
            f"the signature block says it is {length:,} bytes long, but {follow} bytes follow "
            "the data section",
            path=path,
            fix=_DAMAGED_FIX,
        )
    if length < FIXED.size + DIGEST_BYTES or (
        hashlib.sha256(data[:-DIGEST_BYTES]).digest() != data[-DIGEST_BYTES:]
    ):
        raise IntegrityError(
            "signature block checksum mismatch: the signature block is damaged",
            path=path,
            fix="copy or download the file again",
        )
    if (version, algorithm) != (BLOCK_VERSION, ED25519):
        raise RwsError(
            f"signature block version {version}, algorithm {algorithm} is not supported",
            path=path,
            fix="upgrade rwsfmt (pip install -U rwsfmt) to read it",
        )
    if length != BLOCK_BYTES:
        raise IntegrityError(
            f"an Ed25519 signature block is {BLOCK_BYTES} bytes, this one {length:,}",
            path=path,
            fix="copy or download the file again, or sign it again with rwsfmt sign",
        )
    key_end = FIXED.size + KEY_BYTES
    return SignatureBlock(data[FIXED.size : key_end], data[key_end : key_end + SIGNATURE_BYTES])
