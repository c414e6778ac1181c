"""Matching a signature's tensor names and shapes against a model's.

A signature applies to a model when every one of its tensors exists there (after the
`module.` prefix of DataParallel/DDP is stripped and `--map OLD=NEW` prefixes are applied)
with the same shape. Whether the *whole* architecture matches too (the signature's
`fingerprint.model`) is reported, not required: a signature transfers to the same backbone
with another classifier head.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from .checkpoint import DDP_PREFIX, ddp_prefix
from .errors import RwsError
from .fingerprint import architecture_fingerprint
from .signature import Signature

PrefixMap = Sequence[tuple[str, str]]
MapLike = Mapping[str, str] | Iterable[tuple[str, str]] | Iterable[str] | None


def normalize_name(name: str) -> str:
    """`name` without the `module.` prefix that DataParallel/DDP wrappers add."""
    return name.removeprefix(DDP_PREFIX)


def parse_map(spec: MapLike) -> list[tuple[str, str]]:
    """Prefix renames as `(old, new)` pairs, from a mapping, pairs or `OLD=NEW` strings."""
    if spec is None:
        return []
    items = spec.items() if isinstance(spec, Mapping) else spec
    pairs = []
    for item in items:
        if isinstance(item, str):
            old, sep, new = item.partition("=")
            if not sep or not old:
                raise RwsError(
                    f"--map {item!r} is not OLD_PREFIX=NEW_PREFIX",
                    fix="write e.g. --map features.=backbone.features.",
                )
            item = (old, new)
        old, new = item
        pairs.append((str(old), str(new)))
    return pairs


def rename(name: str, prefix_map: PrefixMap) -> str:
    """Apply the first `(old, new)` prefix rule that matches `name`."""
    for old, new in prefix_map:
        if name.startswith(old):
            return new + name[len(old) :]
    return name


@dataclass
class Match:
    """How one signature lines up with a model.

    `targets` maps each signature name to the model's key; `architecture` is 'same',
    'different' or 'unknown' (the signature records no model fingerprint).
    """

    label: str
    source: str
    targets: dict[str, str] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    architecture: str = "unknown"

    @property
    def ok(self) -> bool:
        return not self.missing and not self.mismatched


def model_index(keys: Iterable[str]) -> dict[str, str]:
    """Normalized name -> original key: `module.` is dropped when every key carries it
    (a DataParallel/DDP wrapper), as checkpoints are read."""
    keys = list(keys)
    cut = len(ddp_prefix(keys))
    return {key[cut:]: key for key in keys}


def match(
    sig: Signature,
    shapes: Mapping[str, tuple[int, ...] | None],
    prefix_map: PrefixMap = (),
) -> Match:
    """Line `sig` up with a model given as normalized name -> shape (None: not floating).

    The model fingerprint is computed over its floating tensors with names mapped back
    through `prefix_map`, so a renamed but otherwise identical model still counts as 'same'.
    """
    result = Match(label=sig.label, source=sig.path or sig.label or "<signature>")
    for info in sig.infos:
        target = rename(normalize_name(info.name), prefix_map)
        if target not in shapes:
            result.missing.append(info.name if target == info.name else f"{info.name} -> {target}")
            continue
        shape = shapes[target]
        if shape is None:
            result.mismatched.append(f"{target}: not a floating-point tensor in the model")
        elif tuple(shape) != tuple(info.shape):
            result.mismatched.append(
                f"{target}: signature {_shape(info.shape)}, model {_shape(shape)}"
            )
        else:
            result.targets[info.name] = target
    expected = sig.fingerprint.get("model")
    if expected:
        inverse = [(new, old) for old, new in prefix_map]
        actual = architecture_fingerprint(
            (rename(name, inverse), shape) for name, shape in shapes.items() if shape is not None
        )
        result.architecture = "same" if actual == expected else "different"
    return result


def require(matches: Sequence[Match], *, strict: bool, model: str) -> None:
    """Raise one `RwsError` listing every missing or mismatched tensor (and, if `strict`,
    every signature whose source architecture differs from the model's)."""
    lines = []
    for m in matches:
        for name in m.missing:
            lines.append(f"{m.source}: {name} is missing from the model")
        for what in m.mismatched:
            lines.append(f"{m.source}: shape mismatch for {what}")
        if strict and m.architecture != "same":
            why = "was made on a different architecture"
            if m.architecture == "unknown":
                why = "records no model fingerprint to compare"
            lines.append(f"{m.source}: --strict: the signature {why}")
    if not lines:
        return
    shown = lines[:20] + ([f"... and {len(lines) - 20} more"] if len(lines) > 20 else [])
    fix = (
        "pass --map OLD_PREFIX=NEW_PREFIX (map=...) if the model names its layers differently, "
        "or use a signature extracted from this architecture"
    )
    if strict and all(not m.missing and not m.mismatched for m in matches):
        fix = "drop --strict (strict=False) to patch a model that shares only these tensors"
    raise RwsError(
        "the signature does not fit the model:\n  " + "\n  ".join(shown), path=model, fix=fix
    )


def _shape(shape: Sequence[int]) -> str:
    return "x".join(map(str, shape)) or "scalar"
