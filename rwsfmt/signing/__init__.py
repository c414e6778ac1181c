"""Signed `.rws` files: Ed25519 keys, signing, and checking signatures (spec section 14).

    rwsfmt.signing.generate_key("release")            # release (private), release.pub
    rwsfmt.sign("fog.rws", "release")                 # in place, atomically
    rwsfmt.verify("fog.rws", key="release.pub").ok    # every byte, and the signature
    sig = rwsfmt.load("fog.rws", key="release.pub")   # refused unless signed by that key

Needs the `cryptography` package (`pip install 'rwsfmt[sign]'`), imported on first use; the
block's layout (`block`) needs none, so reading a signed file without a key never does.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "sign": "signer",
    "check_signature": "verify",
    "generate_key": "keys",
    "load_private_key": "keys",
    "load_public_key": "keys",
    "SignatureBlock": "block",
    "key_fingerprint": "block",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'rwsfmt.signing' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
