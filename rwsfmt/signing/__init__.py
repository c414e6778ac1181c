"""Signed `.rws` files: Ed25519 keys, signing, and checking signatures (spec section 14).

    rwsfmt.signing.generate_key("release")            # release (private), release.pub
    rwsfmt.sign("fog.rws", "release")                 # in place, atomically
    rwsfmt.verify("fog.rws", key="release.pub").ok    # every byte, and the signature
    sig = rwsfmt.load("fog.rws", key="release.pub")   # refused unless signed by that key

Needs the `cryptography` package (`pip install 'rwsfmt[sign]'`), imported on first use; the
block's layout (`block`) needs none, so reading a signed file without a key never does.
"""

from __future__ import annotations

from ..lazy import lazy_exports

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


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, __all__)
