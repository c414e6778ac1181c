"""rwsfmt: Robust Weight Signatures as a file format and a toolkit.

    import rwsfmt
    sig = rwsfmt.extract(std, robust, init, layers=5, bits=8)
    rwsfmt.save(sig, "fog.rws"); sig = rwsfmt.load("fog.rws")
    new_state = rwsfmt.apply(state_dict, [(sig, 0.8)])
    with rwsfmt.patched(model, [(sig, 0.8)]): ...

Names are imported lazily so that `import rwsfmt` does not import torch.
"""

from __future__ import annotations

from .errors import IntegrityError, RwsError, RwsNote, RwsWarning, SignatureError
from .lazy import lazy_exports

__version__ = "0.1.0"

_LAZY = {
    "Signature": "signature",
    "SignatureBuilder": "signature",
    "from_tensors": "signature",
    "load": "signature",
    "save": "signature",
    "QuantConfig": "quant",
    "verify": "container",
    "sign": "signing.signer",
    "generate_key": "signing.keys",
    "merge": "merging",
    "WeightedSum": "merging.weighted",
    "compare": "comparison",
    "Comparison": "comparison",
    "architecture_fingerprint": "fingerprint",
    "apply": "patching",
    "apply_checkpoint": "patching",
    "patch": "patching",
    "patched": "patching",
    "PatchHandle": "patching",
    "StatsRule": "statsrule",
    "extract": "extraction",
    "convert": "conversion",
    "export_safetensors": "interchange",
    "import_safetensors": "interchange",
    "Checkpoint": "io",
    "open_checkpoint": "io",
    "write_checkpoint": "io",
}

__all__ = [
    "IntegrityError", "RwsError", "RwsNote", "RwsWarning", "SignatureError", "__version__", *_LAZY
]  # fmt: skip


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, __all__)
