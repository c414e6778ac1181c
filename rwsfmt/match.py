"""Matching a signature's tensor names and shapes against a model's.

A signature applies to a model when every one of its tensors exists there with the same
shape, after

- wrapper prefixes (`module.` of DataParallel/DDP, `_orig_mod.` of torch.compile) are
  stripped,
- the `--map OLD=NEW` prefix renames are applied, or, without them, one prefix is added or
  removed when that makes *every* tensor fit (a signature of a bare backbone on a model
  that nests it as `model.` in a Lightning module or `bert.` in a task model),
- without `--map`, names that transformers keeps differently on disk and in memory are
  translated to the model's naming (`rwsfmt.naming`); tensors it fuses or splits are refused,
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
from .naming import Naming, Translation
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
    prefix rename found automatically, `translated` the one line saying which names were
    translated between transformers' names on disk and in memory (`rwsfmt.naming`), `fused`
    the tensors transformers fuses or splits (refused), `tied` the signature names that led
    to a tensor already patched through another name (with the same values), `conflicts` the
    pairs of different signature tensors that lead to one model tensor, `hint` why no
    translation was tried.
    """

    label: str
    source: str
    targets: dict[str, str] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    architecture: str = "unknown"
    aligned: tuple[str, str] | None = None
    translated: str | None = None
    fused: list[str] = field(default_factory=list)
    tied: list[str] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)
    hint: str | None = None

    @property
    def ok(self) -> bool:
        return not self.missing and not self.mismatched and not self.fused and not self.conflicts


def match(
    sig: Signature,
    shapes: Shapes,
    prefix_map: PrefixMap = (),
    aliases: Mapping[str, str] | None = None,
    naming: Naming | None = None,
) -> Match:
    """Line `sig` up with a model given as normalized name -> shape (None: not floating).

    `aliases` maps the model's tied names to the name they share a tensor with (tied names
    are not in `shapes`). Without `prefix_map`, names that do not fit are translated to the
    model's `naming` (transformers' names on disk or in memory) and a prefix is aligned. The
    model fingerprint is computed over its floating tensors with names mapped back through
    the renames, so a renamed but otherwise identical model still counts as 'same'.
    """
    aliases = aliases or {}
    names = [strip_wrappers(info.name) for info in sig.infos]
    wanted = [tuple(info.shape) for info in sig.infos]
    renames = list(prefix_map)
    translation = None
    if not renames and naming is not None and not _present(names, shapes, aliases):
        translation = _translate(sig, names, wanted, shapes, aliases, naming)
        if translation is not None:
            names = translation.names
    fused = translation.fused if translation else {}
    kept = [i for i in range(len(names)) if i not in fused]
    aligned = None
    if not renames:
        kept_names, kept_shapes = [names[i] for i in kept], [wanted[i] for i in kept]
        if not _present(kept_names, shapes, aliases):
            aligned = _align(kept_names, kept_shapes, shapes, aliases)
            renames = [aligned] if aligned else []
    result = Match(
        label=sig.label,
        source=sig.path or sig.label or "<signature>",
        aligned=aligned,
        translated=translation.line if translation else None,
        fused=[fused[i] for i in sorted(fused)],
        hint=naming.problem if naming is not None and translation is None else None,
    )
    patched: dict[str, str] = {}  # model name -> the signature name patching it
    for i in kept:
        info = sig.infos[i]
        target = rename(names[i], renames)
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
        back = translation.back if translation else (lambda name: name)
        actual = architecture_fingerprint(
            (back(rename(name, inverse)), shape)
            for name, shape in shapes.items()
            if shape is not None
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


def _present(names: Sequence[str], shapes: Shapes, aliases: Mapping[str, str]) -> bool:
    """Whether every name exists in the model as a floating tensor (through tied aliases)."""
    return all(shapes.get(aliases.get(n, n)) is not None for n in names)


def _fits(
    names: Sequence[str],
    wanted: Sequence[tuple[int, ...]],
    shapes: Shapes,
    aliases: Mapping[str, str],
) -> bool:
    """Whether every name exists in the model (through its tied aliases) with its shape."""
    for name, shape in zip(names, wanted, strict=True):
        have = shapes.get(aliases.get(name, name))
        if have is None or tuple(have) != shape:
            return False
    return True


def _translate(
    sig: Signature,
    names: Sequence[str],
    wanted: Sequence[tuple[int, ...]],
    shapes: Shapes,
    aliases: Mapping[str, str],
    naming: Naming,
) -> Translation | None:
    """The first translation of `names` to the model's naming under which every tensor that
    is not fused fits, directly or after aligning one prefix; None if there is none."""
    for translation in naming.translations(names, sig.provenance.get("naming")):
        kept = [i for i in range(len(names)) if i not in translation.fused]
        new = [translation.names[i] for i in kept]
        sizes = [wanted[i] for i in kept]
        if _fits(new, sizes, shapes, aliases) or _align(new, sizes, shapes, aliases):
            return translation
    return None


def _align(
    names: Sequence[str],
    wanted: Sequence[tuple[int, ...]],
    shapes: Shapes,
    aliases: Mapping[str, str],
) -> tuple[str, str] | None:
    """The one prefix to add or remove that makes every name exist in the model with its
    shape, or None."""
    if not names:
        return None
    first = names[0]
    candidates = {("", m[: -len(first)]) for m in shapes if m.endswith("." + first)}
    parts = first.split(".")
    candidates |= {(".".join(parts[:i]) + ".", "") for i in range(1, len(parts))}
    fitting = [
        pair
        for pair in sorted(candidates)
        if _fits([rename(n, [pair]) for n in names], wanted, shapes, aliases)
    ]
    return fitting[0] if len(fitting) == 1 else None


def require(matches: Sequence[Match], *, strict: bool, model: str) -> None:
    """Raise one `RwsError` listing every missing, mismatched or fused tensor (and, if
    `strict`, every signature whose source architecture differs from the model's)."""
    lines = []
    for m in matches:
        for name in m.missing:
            lines.append(f"{m.source}: {name} is missing from the model")
        for what in m.mismatched:
            lines.append(f"{m.source}: shape mismatch for {what}")
        for what in m.conflicts:
            lines.append(f"{m.source}: {what}")
        for what in m.fused:
            lines.append(f"{m.source}: {what} is fused or split differently in the model")
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
    hints = sorted({m.hint for m in matches if m.hint and (m.missing or m.mismatched)})
    if hints:
        fix = "; ".join(hints) + "; or " + fix
    if any(m.conflicts for m in matches):
        fix = (
            "keep one of each pair in the signature: wrapper prefixes (module., _orig_mod.) "
            "are stripped, so module.X and X name one model tensor"
        )
    elif any(m.fused for m in matches):
        fix = (
            "extract the signature from checkpoints in the model's own form (from the "
            "save_pretrained folders to apply it to a folder, from state_dict() files or live "
            "models to patch a live model), or leave these tensors out with "
            f"{spell('--exclude RE', 'exclude=RE')} when extracting; rwsfmt never patches a "
            "slice it cannot place exactly"
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
