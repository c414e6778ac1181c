"""Matching a signature's tensor names and shapes against a model's.

A signature applies to a model when every one of its tensors exists there with the same
shape, after

- wrapper prefixes (`module.` of DataParallel/DDP, `_orig_mod.` of torch.compile) are
  stripped,
- the `--map OLD=NEW` prefix renames are applied, or, without them, one prefix is added or
  removed when that makes *every* tensor fit (a signature of a bare backbone on a model
  that nests it as `model.` in a Lightning module or `bert.` in a task model),
- tied names (`lm_head.weight` sharing `transformer.wte.weight`) lead to their one tensor,
  which is patched once.

Whether the *whole* architecture matches too (the signature's `fingerprint.model`) is
reported, not required: a signature transfers to the same backbone with another head.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from .errors import RwsError, spell
from .fingerprint import architecture_fingerprint
from .names import strip_wrappers
from .signature import Signature

PrefixMap = Sequence[tuple[str, str]]
MapLike = Mapping[str, str] | Iterable[tuple[str, str]] | Iterable[str] | None
Shapes = Mapping[str, tuple[int, ...] | None]


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
                    f"{spell('--map', 'map=')} {item!r} is not OLD_PREFIX=NEW_PREFIX",
                    fix=spell(
                        "write e.g. --map features.=backbone.features.",
                        "write e.g. map={'features.': 'backbone.features.'}",
                    ),
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

    `targets` maps each signature name to the model's name; `architecture` is 'same',
    'different' or 'unknown' (the signature records no model fingerprint); `aligned` is the
    prefix rename found automatically, `tied` the signature names that led to a tensor
    already patched through another name (with the same values), `conflicts` the pairs of
    different signature tensors that lead to one model tensor.
    """

    label: str
    source: str
    targets: dict[str, str] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    architecture: str = "unknown"
    aligned: tuple[str, str] | None = None
    tied: list[str] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.missing and not self.mismatched and not self.conflicts


def match(
    sig: Signature,
    shapes: Shapes,
    prefix_map: PrefixMap = (),
    aliases: Mapping[str, str] | None = None,
) -> Match:
    """Line `sig` up with a model given as normalized name -> shape (None: not floating).

    `aliases` maps the model's tied names to the name they share a tensor with (tied names
    are not in `shapes`). The model fingerprint is computed over its floating tensors with
    names mapped back through the renames, so a renamed but otherwise identical model still
    counts as 'same'.
    """
    aliases = aliases or {}
    names = [strip_wrappers(info.name) for info in sig.infos]
    renames = list(prefix_map)
    aligned = None
    if not renames and not all(shapes.get(aliases.get(n, n)) is not None for n in names):
        aligned = _align(sig, names, shapes, aliases)
        renames = [aligned] if aligned else []
    result = Match(label=sig.label, source=sig.path or sig.label or "<signature>", aligned=aligned)
    patched: dict[str, str] = {}  # model name -> the signature name patching it
    for info, name in zip(sig.infos, names, strict=True):
        target = rename(name, renames)
        target = aliases.get(target, target)
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
        elif target in patched and _same_values(sig, patched[target], info.name):
            result.tied.append(f"{info.name} -> {target}")
        elif target in patched:
            result.conflicts.append(
                f"{patched[target]} and {info.name} both lead to {target}, with different values"
            )
        else:
            result.targets[info.name] = target
            patched[target] = info.name
    expected = sig.model_fingerprint
    if expected:
        inverse = [(new, old) for old, new in renames]
        actual = architecture_fingerprint(
            (rename(name, inverse), shape) for name, shape in shapes.items() if shape is not None
        )
        result.architecture = "same" if actual == expected else "different"
    return result


def _same_values(sig: Signature, a: str, b: str) -> bool:
    """Whether signature tensors `a` and `b` hold the same values (tied weights stored under
    both names): the same stored bytes, or the same decoded float32 values."""
    first, second = sig.info(a), sig.info(b)
    if first.kind != second.kind:
        return False
    stored = first.sha256 == second.sha256 and first.quant == second.quant
    return stored or bool((sig.tensor(a) == sig.tensor(b)).all())


def _align(
    sig: Signature, names: Sequence[str], shapes: Shapes, aliases: Mapping[str, str]
) -> tuple[str, str] | None:
    """The one prefix to add or remove that makes every signature tensor exist in the model
    with its shape, or None."""
    first = names[0]
    candidates = {("", m[: -len(first)]) for m in shapes if m.endswith("." + first)}
    parts = first.split(".")
    candidates |= {(".".join(parts[:i]) + ".", "") for i in range(1, len(parts))}
    fitting = []
    for pair in sorted(candidates):
        targets = [aliases.get(t, t) for t in (rename(n, [pair]) for n in names)]
        if all(
            shapes.get(t) is not None and tuple(shapes[t]) == tuple(i.shape)
            for t, i in zip(targets, sig.infos, strict=True)
        ):
            fitting.append(pair)
    return fitting[0] if len(fitting) == 1 else None


def require(matches: Sequence[Match], *, strict: bool, model: str) -> None:
    """Raise one `RwsError` listing every missing or mismatched tensor (and, if `strict`,
    every signature whose source architecture differs from the model's)."""
    lines = []
    for m in matches:
        for name in m.missing:
            lines.append(f"{m.source}: {name} is missing from the model")
        for what in m.mismatched:
            lines.append(f"{m.source}: shape mismatch for {what}")
        for what in m.conflicts:
            lines.append(f"{m.source}: {what}")
        if strict and m.architecture != "same":
            why = "was made on a different architecture"
            if m.architecture == "unknown":
                why = "records no model fingerprint to compare"
            lines.append(f"{m.source}: {spell('--strict', 'strict=True')}: the signature {why}")
    if not lines:
        return
    shown = lines[:20] + ([f"... and {len(lines) - 20} more"] if len(lines) > 20 else [])
    fix = (
        f"pass {spell('--map OLD_PREFIX=NEW_PREFIX', 'map={OLD_PREFIX: NEW_PREFIX}')} if the "
        "model names its layers differently, "
        "or use a signature extracted from this architecture"
    )
    if any(m.conflicts for m in matches):
        fix = (
            "keep one of each pair in the signature: wrapper prefixes (module., _orig_mod.) "
            "are stripped, so module.X and X name one model tensor"
        )
    elif strict and all(not m.missing and not m.mismatched for m in matches):
        fix = spell("drop --strict", "pass strict=False") + (
            " to patch a model that shares only these tensors"
        )
    raise RwsError(
        "the signature does not fit the model:\n  " + "\n  ".join(shown), path=model, fix=fix
    )


def _shape(shape: Sequence[int]) -> str:
    return "x".join(map(str, shape)) or "scalar"
