"""Where the state dict sits inside a PyTorch training checkpoint.

Training scripts wrap the weights with their own bookkeeping; the common layouts are

    plain state dict                  {"features.0.weight": tensor, ...}
    PyTorch ImageNet example          {"epoch", "arch", "state_dict", "best_acc1" (a tensor),
                                       "optimizer", "scheduler"}   (keys "module.*")
    torchvision reference scripts     {"model", "optimizer", "lr_scheduler", "epoch",
                                       "args" (argparse.Namespace), "model_ema"?}
    PyTorch Lightning                 {"epoch", "global_step", "pytorch-lightning_version",
                                       "state_dict" (keys "model.*"), "optimizer_states", ...}
    timm train.py                     {"epoch", "arch", "state_dict", "optimizer", "version",
                                       "args", "metric", "state_dict_ema"?}

A wrapper key that holds a mapping of tensors wins over stray tensors beside it (such as
`best_acc1`), and an explicit key (`state_key`) picks another one (`state_dict_ema`).
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import RwsError

# Searched in this order at every level of nesting.
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "network")
# Other weights a training checkpoint may carry beside the main ones (EMA copies).
ALTERNATIVE_KEYS = ("state_dict_ema", "model_ema", "ema_state_dict", "ema")

# Harmless classes that training scripts pickle next to the weights, allowed while unpickling
# with weights_only=True: argparse.Namespace only stores attributes and runs no code.
SAFE_GLOBALS: list[Any] = [argparse.Namespace]

RESAVE = "re-save it with torch.save(model.state_dict(), ...) or safetensors"


@dataclass(frozen=True)
class Located:
    """The state dict found inside a loaded object, and the wrapper keys leading to it."""

    keys: tuple[str, ...]
    state: Mapping[str, Any]
    alternatives: tuple[str, ...] = ()  # other keys holding weights (e.g. state_dict_ema)


def locate_state_dict(obj: Any, path: str, state_key: str | None = None) -> Located:
    """Find the state dict inside `obj` (see the module docstring for the layouts)."""
    keys: list[str] = []
    alternatives: tuple[str, ...] = ()
    if state_key is not None:
        if not isinstance(obj, Mapping) or not _holds_weights(obj.get(state_key)):
            found = ", ".join(repr(k) for k in _weight_keys(obj)) or "none"
            raise RwsError(
                f"has no state dict under the key {state_key!r} (keys holding weights: {found})",
                path=path,
                fix="choose one of those keys, or leave the key out to let rwsfmt find it",
            )
        keys.append(state_key)
        obj = obj[state_key]
    while isinstance(obj, Mapping):
        wrapper = next((k for k in STATE_DICT_KEYS if _holds_weights(obj.get(k))), None)
        if wrapper is not None:
            if not keys:
                alternatives = tuple(k for k in ALTERNATIVE_KEYS if _holds_weights(obj.get(k)))
            keys.append(wrapper)
            obj = obj[wrapper]
            continue
        if _is_state_dict(obj):
            return Located(tuple(keys), obj, alternatives)
        break
    where = f" under {'/'.join(keys)}" if keys else ""
    fix = RESAVE
    if isinstance(obj, torch.nn.Module):
        fix = "save model.state_dict() rather than the whole model"
    elif isinstance(obj, Mapping) and _weight_keys(obj):
        fix = f"name the key holding the weights ({', '.join(map(repr, _weight_keys(obj)))})"
    found = type(obj).__name__
    if isinstance(obj, Mapping):
        shown = ", ".join(repr(k) for k in list(obj)[:8])
        found += f" with keys {shown}" + (", ..." if len(obj) > 8 else "")
    raise RwsError(f"holds no state dict (found {found}{where})", path=path, fix=fix)


def _is_state_dict(obj: Mapping) -> bool:
    """String keys and at least one tensor value."""
    return all(isinstance(k, str) for k in obj) and any(
        isinstance(v, torch.Tensor) for v in obj.values()
    )


def _holds_weights(value: Any) -> bool:
    """A state dict, or a wrapper around one."""
    if not isinstance(value, Mapping):
        return False
    if _is_state_dict(value):
        return True
    return any(_holds_weights(value.get(k)) for k in STATE_DICT_KEYS)


def _weight_keys(obj: Any) -> list[str]:
    """Keys of a mapping whose values hold weights."""
    if not isinstance(obj, Mapping):
        return []
    return [k for k, v in obj.items() if isinstance(k, str) and _holds_weights(v)]
