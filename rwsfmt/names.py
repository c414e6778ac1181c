"""Tensor names as training code leaves them: wrapper prefixes and numeric-aware sorting."""

from __future__ import annotations

import re
from collections.abc import Iterable

# Prefixes that wrappers add in front of every key: DataParallel / DistributedDataParallel
# ("module.") and torch.compile ("_orig_mod."), alone or stacked in either order.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")

_NUMBER = re.compile(r"(\d+)")


def wrapper_prefix(keys: Iterable[str]) -> str:
    """The run of wrapper prefixes (e.g. 'module._orig_mod.') that every dotted key carries.

    Keys without a dot are left out of the test: they belong to the wrapper itself, like the
    `n_averaged` counter of an EMA model (`torch.optim.swa_utils.AveragedModel`).
    """
    keys = list(keys)
    dotted = [k for k in keys if "." in k] or keys
    prefix = ""
    while dotted:
        for p in WRAPPER_PREFIXES:
            head = prefix + p
            if all(k.startswith(head) and len(k) > len(head) for k in dotted):
                prefix = head
                break
        else:
            break
    return prefix


def strip_wrappers(name: str) -> str:
    """`name` without the wrapper prefixes at its start."""
    while True:
        for p in WRAPPER_PREFIXES:
            if name.startswith(p) and len(name) > len(p):
                name = name[len(p) :]
                break
        else:
            return name


def normalize_keys(keys: Iterable[str]) -> tuple[str, dict[str, str]]:
    """(the prefix removed, normalized name -> original key), by `wrapper_prefix`.

    Keys that do not carry the prefix keep their name; if that would make two keys collide,
    nothing is removed.
    """
    keys = list(keys)
    prefix = wrapper_prefix(keys)
    index = {k.removeprefix(prefix): k for k in keys}
    if len(index) != len(keys):
        return "", {k: k for k in keys}
    return prefix, index


def natural_key(name: str) -> list:
    """Sort key that compares runs of digits as numbers: `layers.2` before `layers.10`."""
    # split() alternates text and digit runs, so equal positions always hold equal types
    return [int(p) if p.isdigit() else p for p in _NUMBER.split(name)]


def natural_sorted(names: Iterable[str]) -> list[str]:
    """Names in numeric-aware order: `layers.2` before `layers.10`."""
    return sorted(names, key=natural_key)
