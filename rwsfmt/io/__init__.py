"""Model checkpoints in, model checkpoints out.

    ckpt = open_checkpoint("model.safetensors")   # a .pt/.pth/.bin/.ckpt file, a Hugging Face
    ckpt.names                                    # folder, a state dict or an nn.Module
    ckpt.tensor("features.0.weight")
    write_checkpoint(ckpt, "patched.pt", {"features.0.weight": new})   # format from the suffix

Names are normalized: training-checkpoint wrappers (`{"state_dict": ...}` and friends, see
`layouts`) and wrapper prefixes (`module.`, `_orig_mod.`) are removed on reading and put
back on writing.
"""

from __future__ import annotations

from .base import Checkpoint, Format
from .convert import output_format, write_checkpoint
from .open import open_checkpoint

__all__ = [
    "Checkpoint",
    "Format",
    "open_checkpoint",
    "output_format",
    "write_checkpoint",
]
