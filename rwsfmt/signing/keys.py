"""Ed25519 keys: generating a pair, and reading key files in the usual formats.

Private keys: PEM PKCS #8 (what `rwsfmt keygen` and `openssl genpkey -algorithm ed25519`
write, optionally encrypted) or OpenSSH (`ssh-keygen -t ed25519`). Public keys: one OpenSSH
line (`ssh-ed25519 AAAA... comment`, what `rwsfmt keygen` writes) or PEM. The `cryptography`
package is imported on first use, with an error naming the extra to install when missing.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from types import ModuleType
from typing import TYPE_CHECKING, TypeAlias

from ..atomic import atomic_path, atomic_write, check_destination
from ..errors import RwsError
from ..inputs import open_input
from .block import key_fingerprint

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PrivateKey,
        Ed25519PublicKey,
    )

PrivateKeyLike: TypeAlias = "str | os.PathLike | Ed25519PrivateKey"
PublicKeyLike: TypeAlias = "str | os.PathLike | Ed25519PublicKey"
Passphrase: TypeAlias = "bytes | Callable[[], bytes] | None"

MAX_KEY_FILE = 1 << 16  # key files are a few hundred bytes
PUBLIC_SUFFIX = ".pub"
_PUBLIC_FIX = "pass the public key file (KEY.pub, written by `rwsfmt keygen -o KEY`)"
_PRIVATE_FIX = "pass the private key file (KEY, written by `rwsfmt keygen -o KEY`)"


def ed25519() -> ModuleType:
    """`cryptography`'s Ed25519 module, or an `RwsError` saying how to install it."""
    try:
        from cryptography.hazmat.primitives.asymmetric import ed25519 as module
    except ImportError:
        raise RwsError(
            "signing and checking signatures need the `cryptography` package, which is not "
            "installed",
            fix="pip install 'rwsfmt[sign]'",
        ) from None
    return module


def _serialization() -> ModuleType:
    ed25519()  # the same clear error when cryptography is missing
    from cryptography.hazmat.primitives import serialization

    return serialization


def generate_key(
    path: str | os.PathLike, *, force: bool = False, passphrase: bytes | None = None
) -> str:
    """Write a new Ed25519 private key to `path` (PEM PKCS #8, mode 0600, encrypted when a
    `passphrase` is given) and its public key to `path.pub` (OpenSSH); return the key's
    fingerprint. Existing files are refused unless `force`."""
    path = os.fspath(path)
    public_path = path + PUBLIC_SUFFIX
    if not force:
        for existing in (path, public_path):
            if os.path.lexists(existing):
                raise RwsError(
                    "already exists: a new key would make the old one unusable",
                    path=existing,
                    fix="choose another -o path, or pass --force (force=True) to replace it",
                )
    for destination in (path, public_path):  # both, before either is written
        check_destination(destination)
    serialization = _serialization()
    private = ed25519().Ed25519PrivateKey.generate()
    encryption = (
        serialization.BestAvailableEncryption(passphrase)
        if passphrase
        else serialization.NoEncryption()
    )
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )
    public = private.public_key()
    line = public.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    fingerprint = key_fingerprint(raw_public_key(public))
    if os.path.isfile(path):
        os.chmod(path, 0o600)  # a replaced file keeps its mode: make it private first
    with atomic_path(path) as tmp:
        os.chmod(tmp, 0o600)  # before the key is written into it
        with open(tmp, "wb") as f:
            f.write(pem)
    with atomic_write(public_path) as f:
        f.write(line + b" rwsfmt " + fingerprint.encode() + b"\n")
    return fingerprint


def raw_public_key(key: Ed25519PublicKey) -> bytes:
    """The 32 bytes of an Ed25519 public key, as a signature block stores them."""
    serialization = _serialization()
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def load_public_key(key: PublicKeyLike) -> Ed25519PublicKey:
    """An Ed25519 public key: `key` itself, or read from the file at path `key`."""
    module = ed25519()
    if isinstance(key, module.Ed25519PublicKey):
        return key
    if isinstance(key, module.Ed25519PrivateKey):
        raise RwsError("a private key was given where a public key is needed", fix=_PUBLIC_FIX)
    path, data = _read_key_file(key)
    if _is_private(data):
        raise RwsError(
            "is a private key, where a public key is needed (and a private key is never shared)",
            path=path,
            fix=_PUBLIC_FIX,
        )
    serialization = _serialization()
    pem = data.startswith(b"-----BEGIN")
    loader = serialization.load_pem_public_key if pem else serialization.load_ssh_public_key
    try:
        public = loader(data)
    except _load_errors() as exc:
        raise RwsError(
            f"is not a public key in PEM or OpenSSH format ({_reason(exc)})",
            path=path,
            fix=_PUBLIC_FIX,
        ) from None
    return _ed25519_only(public, module.Ed25519PublicKey, path, _PUBLIC_FIX)


def load_private_key(key: PrivateKeyLike, passphrase: Passphrase = None) -> Ed25519PrivateKey:
    """An Ed25519 private key: `key` itself, or read from the file at path `key`; an
    encrypted file is opened with `passphrase` (bytes, or a function asked only then)."""
    module = ed25519()
    if isinstance(key, module.Ed25519PrivateKey):
        return key
    if isinstance(key, module.Ed25519PublicKey):
        raise RwsError("a public key was given where the private key is needed", fix=_PRIVATE_FIX)
    path, data = _read_key_file(key)
    if not _is_private(data):
        public = data.startswith((b"ssh-", b"-----BEGIN PUBLIC KEY-----"))
        problem = "is a public key, which signs nothing" if public else "is not a private key"
        raise RwsError(f"{problem}: the private key is needed", path=path, fix=_PRIVATE_FIX)
    serialization = _serialization()
    ssh = data.startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
    loader = serialization.load_ssh_private_key if ssh else serialization.load_pem_private_key
    try:
        try:
            private = loader(data, None)
        except TypeError:  # encrypted: only now is a passphrase needed
            secret = passphrase() if callable(passphrase) else passphrase
            if not secret:
                raise RwsError(
                    "is encrypted and no passphrase was given",
                    path=path,
                    fix="set RWSFMT_KEY_PASSPHRASE, or run on a terminal to be asked for it",
                ) from None
            private = loader(data, secret)
    except _load_errors() as exc:
        fix = "check the passphrase, or convert the key to PEM: ssh-keygen -p -m PKCS8 -f KEY"
        raise RwsError(
            f"cannot be read as a private key ({_reason(exc)})", path=path, fix=fix
        ) from None
    return _ed25519_only(private, module.Ed25519PrivateKey, path, _PRIVATE_FIX)


def _load_errors() -> tuple[type[Exception], ...]:
    """What cryptography's key loaders raise for a file they cannot read (UnsupportedAlgorithm:
    an unknown key type, or an OpenSSH key encrypted with bcrypt, which is not installed)."""
    from cryptography.exceptions import UnsupportedAlgorithm

    return ValueError, TypeError, UnsupportedAlgorithm


def _read_key_file(key: object) -> tuple[str, bytes]:
    if not isinstance(key, (str, os.PathLike)):
        raise RwsError(
            f"expected a key file path or an Ed25519 key, got {type(key).__name__}",
            fix="pass a path, or a key from cryptography.hazmat.primitives.asymmetric.ed25519",
        )
    path = os.fspath(key)
    with open_input(path, "a key file") as f:
        data = f.read(MAX_KEY_FILE + 1).strip()
    if len(data) > MAX_KEY_FILE:
        raise RwsError(
            f"is over {MAX_KEY_FILE:,} bytes: not a key file", path=path, fix=_PUBLIC_FIX
        )
    return path, data


def _is_private(data: bytes) -> bool:
    first = data[:64]
    return first.startswith(b"-----BEGIN") and b"PRIVATE KEY-----" in first


def _ed25519_only(key: object, wanted: type, path: str, fix: str):
    if not isinstance(key, wanted):
        kind = (
            type(key).__name__.removeprefix("_").replace("PublicKey", "").replace("PrivateKey", "")
        )
        raise RwsError(f"is a {kind or 'different'} key, not an Ed25519 key", path=path, fix=fix)
    return key


def _reason(exc: Exception) -> str:
    """The first sentence of a cryptography error, without its links."""
    return str(exc).split(". See ")[0].rstrip(".") or type(exc).__name__
