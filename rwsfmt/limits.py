"""How much memory a `.rws` file may make rwsfmt allocate: the decompression-bomb guard.

A valid file can be tiny and still decode to gigabytes (zstd turns 33 KB of a repeated byte
into 1 GiB), so before decoding any tensor a reader compares the float32 size of all the
file's tensors with what the file can justify:

    limit = max(DECODE_RATIO * file size, DECODE_FLOOR)

Real signatures stay below it: measured on 3x3 convolutions of 256 channels, 8-bit codes
decode to 4.4x their file size (9x with half the channels dead, 43x with 90% dead), 4-bit
codes to 10x (21x, 101x). The user raises or lifts the limit for a file they trust, with
`max_decoded_bytes=` in Python or `RWSFMT_MAX_DECODED` anywhere.
"""

from __future__ import annotations

import math
import os
import re

from .errors import RwsError

DECODE_RATIO = 128  # float32 bytes a file may decode to, per byte of file
DECODE_FLOOR = 256 << 20  # any file may decode to 256 MiB
ENV_VAR = "RWSFMT_MAX_DECODED"

_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
_UNITS.update({"ki": 1 << 10, "mi": 1 << 20, "gi": 1 << 30, "ti": 1 << 40})
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]i?)?b?\s*", re.IGNORECASE)


def parse_size(text: str) -> float:
    """Bytes in a size such as `8GiB`, `500MB` or `1000000`; `none` means no limit."""
    if text.strip().lower() in ("none", "unlimited", "inf"):
        return math.inf
    match = _SIZE.fullmatch(text)
    if not match:
        raise RwsError(
            f"{ENV_VAR}={text!r} is not a size",
            fix=f"set {ENV_VAR} to a size such as 8GiB or 500MB, or to 'none' for no limit",
        )
    number, unit = match.groups()
    return float(number) * _UNITS[(unit or "").lower()]


def decode_limit(file_size: int, max_decoded_bytes: float | None = None) -> float:
    """Float32 bytes a file of `file_size` bytes may decode to: `max_decoded_bytes` when
    given, else `RWSFMT_MAX_DECODED` when set, else the ratio rule above."""
    if max_decoded_bytes is not None:
        return max_decoded_bytes
    override = os.environ.get(ENV_VAR)
    if override:
        return parse_size(override)
    return max(DECODE_RATIO * file_size, DECODE_FLOOR)


def check_decoded_size(
    decoded_bytes: int, file_size: int, path: str, max_decoded_bytes: float | None = None
) -> None:
    """Raise `RwsError` before anything is allocated when a file would decode to more
    float32 bytes than `decode_limit` allows."""
    limit = decode_limit(file_size, max_decoded_bytes)
    if decoded_bytes <= limit:
        return
    ratio = decoded_bytes / max(file_size, 1)
    raise RwsError(
        f"its tensors decode to {_human(decoded_bytes)} of float32, {ratio:,.0f}x the file's "
        f"{file_size:,} bytes, over the limit of {_human(limit)}; rwsfmt refuses this to "
        "guard against decompression bombs",
        path=path,
        fix=(
            "if you trust this file, raise the limit: set the environment variable "
            f"{ENV_VAR}={_suggest(decoded_bytes)} (or pass max_decoded_bytes= in Python)"
        ),
    )


def _human(n: float) -> str:
    if n >= 1 << 30:
        return f"{n / (1 << 30):,.2f} GiB"
    return f"{n / (1 << 20):,.1f} MiB"


def _suggest(n: int) -> str:
    """A limit just above `n`, in whole MiB or GiB."""
    if n >= 1 << 30:
        return f"{-(-n // (1 << 30))}GiB"
    return f"{-(-n // (1 << 20))}MiB"
