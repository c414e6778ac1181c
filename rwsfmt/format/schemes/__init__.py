"""The registry of storage schemes: `quant.scheme` names to the `Scheme` that implements it.

Adding a scheme is one module with a `Scheme` subclass, registered here; the container
validates, checks and decodes every entry through `scheme_of(quant)`.
"""

from __future__ import annotations

from .base import Quant, Scheme
from .float32 import Float32
from .grouped import GRANULARITIES, MAX_GROUP_SIZE, NEGATIVE_ZERO, decodes_finite
from .linear import Int2, Linear
from .sign import Sign
from .sparse import Sparse

SCHEMES: dict[str, Scheme] = {}


def register(scheme: Scheme) -> None:
    """Make `scheme` readable and writable under its name."""
    SCHEMES[scheme.name] = scheme


for _scheme in (Float32(), Linear(), Int2(), Sign(), Sparse(SCHEMES)):
    register(_scheme)


def scheme_of(q: Quant) -> Scheme:
    """The scheme of a validated `quant` object."""
    return SCHEMES[q["scheme"]]


__all__ = [
    "GRANULARITIES",
    "MAX_GROUP_SIZE",
    "NEGATIVE_ZERO",
    "SCHEMES",
    "Quant",
    "Scheme",
    "decodes_finite",
    "register",
    "scheme_of",
]
