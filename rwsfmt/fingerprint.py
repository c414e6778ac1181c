"""Architecture fingerprints: a SHA-256 over a canonical (name, shape) list."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence


def architecture_fingerprint(shapes: Iterable[tuple[str, Sequence[int]]]) -> str:
    """`sha256:<hex>` of the name-sorted JSON list `[[name, [dims...]], ...]`.

    Sorting makes the fingerprint independent of storage order, so the same model saved
    as a PyTorch file or as safetensors fingerprints the same.
    """
    canonical = sorted([name, [int(d) for d in shape]] for name, shape in shapes)
    text = json.dumps(canonical, separators=(",", ":"), ensure_ascii=False)
    return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()
