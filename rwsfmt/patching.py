"""Applying signatures: to state dicts (pure), to live modules (reversibly) and to files.

    patched[k] = std[k] + sum_i alpha_i * RWS_i[k]              (delta entries)
    patched[k] = std[k] + sum_i w_i * (target_i[k] - std[k])    (target entries)

The weights `w_i` of target entries (normalization statistics) follow a `StatsRule`:
`convex` (the default) uses `w_i = a_i / max(1, sum_j a_j)` with `a_i = max(alpha_i, 0)`,
so the statistics stay inside the convex hull of std's and the targets' values (equal to
`sum`, `w_i = alpha_i`, whenever the alphas are >= 0 and sum to at most 1); `keep` leaves
std's statistics untouched (`w_i = 0`).

Every composition runs in float32 (float64 for float64 models) and is cast once to the
model's dtype; alpha multiplies once. Signatures are dequantized on the device of the
tensor they patch, so only their quantized bytes cross to a GPU.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from .applied import Record, entry, without
from .atomic import check_destination, refuse_overwriting_inputs, same_file, target_lock
from .device import resolve_device
from .errors import RwsError, as_path, described, note, spell, warn
from .hub import HubModel, refuse_cache_output, resolve
from .io import Checkpoint, Format, open_checkpoint, output_format, write_checkpoint
from .io.base import all_finite, refuse_nonfinite
from .io.pytorch import PyTorchCheckpoint
from .match import MapLike, Match, match, parse_map, require
from .naming import Naming
from .provenance import file_sha256
from .signature import (
    Signature,
    SignatureBase,
    SignatureLike,
    as_signature,
    warn_repeated,
)
from .statsrule import DEFAULT_STATS, StatsRule
from .undo import UndoRecorder, check_undoable, is_undo, restored, undo_plan

DEFAULT_ALPHA = 0.8
MAX_USUAL_ALPHA = 2.0  # a larger |alpha| is warned about (RwsWarning)
MAX_ALPHA = torch.finfo(torch.float32).max  # a larger |alpha| is refused: deltas scale in float32

Entries = SignatureLike | Sequence[tuple[SignatureLike, float]]


class Contribution(NamedTuple):
    """One signature's entry for one tensor: `kind` 'delta' or 'target', float32 values."""

    kind: str
    alpha: float
    values: torch.Tensor


def compose(
    base: torch.Tensor,
    contributions: Iterable[Contribution],
    *,
    stats: StatsRule | str = DEFAULT_STATS,
    reuse_base: bool = False,
    out: torch.Tensor | None = None,
    name: str = "a tensor",
) -> torch.Tensor:
    """`base` patched by `contributions` in order, in float32 (or float64), cast once.

    Target contributions are weighted by the `stats` rule first. Contributions whose
    weight is 0 are skipped, and with none left `base` itself is returned, so alpha 0 (and
    `keep` for a tensor holding only targets) gives the input back bit for bit. `reuse_base`
    lets a float32/float64 `base` that the caller owns (and holds finite) be overwritten with
    the result (one large allocation less); `out` (a tensor of base's shape and dtype, not
    base) receives the result instead. A result that is infinite or NaN where `base` was
    finite (the patch overflows base's dtype) raises `RwsError` naming `name`.
    """
    active = [c for c in weighted(contributions, stats) if c.alpha != 0]
    work = torch.promote_types(base.dtype, torch.float32)
    start = base.detach().to(work)
    only_deltas = all(c.kind == "delta" for c in active)  # targets read `start` throughout
    if out is not None and out.dtype == work:
        target = out  # the first add writes straight into it
    elif reuse_base and only_deltas and start.data_ptr() == base.data_ptr():
        target = start
    else:
        target = None
    result = start if not active else None
    for c in active:
        values = c.values.to(device=base.device, dtype=work)
        if c.kind == "target":
            values = values - start
        if result is None:
            result = torch.add(start, values, alpha=c.alpha, out=target)
        else:
            result.add_(values, alpha=c.alpha)
    if out is None:
        if not active:
            return base
        out = result.to(base.dtype)
    elif result is not out:
        out.copy_(result)
    _check_finite(out, None if target is start else base, name, active)
    return out


def _check_finite(
    result: torch.Tensor, base: torch.Tensor | None, name: str, active: list[Contribution]
) -> None:
    """Refuse a patched tensor that overflowed its dtype (a finite weight became inf or NaN);
    values the model already held as inf or NaN are its own and stay as they were. `base`
    None: it was overwritten by the result (`reuse_base`, whose callers refuse a non-finite
    base), so every non-finite value is the patch's."""
    if all_finite(result) or (
        base is not None and bool((torch.isfinite(result) | ~torch.isfinite(base)).all())
    ):
        return
    alphas = ", ".join(f"{c.alpha:g}" for c in active)
    dtype = str(result.dtype).removeprefix("torch.")
    raise RwsError(
        f"patching {name} at alpha {alphas} gives values beyond the {dtype} range "
        "(infinite or NaN where the model's weights were finite)",
        fix="lower alpha, or check that the signature belongs to this model",
    )


def weighted(contributions: Iterable[Contribution], stats: StatsRule | str) -> list[Contribution]:
    """`contributions` with the target entries' alphas replaced by their `stats` weights."""
    rule = StatsRule.parse(stats)
    items = list(contributions)
    if rule is StatsRule.SUM:
        return items
    if rule is StatsRule.KEEP:
        return [c for c in items if c.kind != "target"]
    scale = max(1.0, math.fsum(max(c.alpha, 0.0) for c in items if c.kind == "target"))
    return [c._replace(alpha=max(c.alpha, 0.0) / scale) if c.kind == "target" else c for c in items]


def as_entries(sigs: Entries, alpha: float | None = None) -> list[tuple[Signature, float]]:
    """Normalize `sig`, `path` or `[(sig or path, alpha), ...]` into `(Signature, alpha)` pairs.

    A single signature takes `alpha` (default 0.8); a list carries its own alphas.
    """
    if isinstance(sigs, (SignatureBase, str, os.PathLike)):
        pairs = [(sigs, DEFAULT_ALPHA if alpha is None else alpha)]
    else:
        if alpha is not None:
            raise RwsError(
                "alpha= was given together with a list of (signature, alpha) pairs",
                fix="put each alpha in its pair: [(sig, 0.8), ...]",
            )
        pairs = list(sigs)
        if not pairs:
            raise RwsError("no signatures to apply", fix="pass at least one (signature, alpha)")
    out = []
    for item in pairs:
        if not (isinstance(item, tuple) and len(item) == 2):
            raise RwsError(
                f"expected (signature, alpha) pairs, got {item!r}",
                fix="pass [(sig, 0.8), ...]: a signature or its path, and its alpha",
            )
        sig, a = item
        sig = as_signature(sig)
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not math.isfinite(a):
            raise RwsError(
                f"alpha for {sig.label or sig.path!r} must be a finite number, got {a!r}",
                fix=f"give {spell('--alpha', 'alpha')} a number such as 0.8",
            )
        if abs(a) > MAX_ALPHA:
            raise RwsError(
                f"alpha {a:g} for {sig.label or sig.path!r} lies beyond float32's range "
                f"(+-{MAX_ALPHA:.3g}), in which signatures are scaled: every patched value "
                "would overflow to infinity",
                fix=f"use {spell('--alpha', 'an alpha')} between -{MAX_USUAL_ALPHA:g} and "
                f"{MAX_USUAL_ALPHA:g} (the paper uses 0.5 to 1)",
            )
        if abs(a) > MAX_USUAL_ALPHA:
            warn(
                f"alpha {a:g} for {sig.label or sig.path!r} lies outside "
                f"[-{MAX_USUAL_ALPHA:g}, {MAX_USUAL_ALPHA:g}]: the patch adds the signature "
                f"{a:g} times, far past where its robust model was",
                fix=f"use {spell('--alpha', 'an alpha')} between -{MAX_USUAL_ALPHA:g} and "
                f"{MAX_USUAL_ALPHA:g} (alpha multiplies once; the paper uses 0.5 to 1)",
            )
        out.append((sig, float(a)))
    warn_repeated([s for s, _ in out], "it is applied twice, its alphas added")
    return out


def _plan(
    entries: Sequence[tuple[Signature, float]],
    ckpt: Checkpoint,
    prefix_map: Sequence[tuple[str, str]],
    strict: bool,
    model: str,
    naming: Naming,
) -> tuple[dict[str, list[tuple[Signature, str, float]]], list[Match]]:
    """Match every signature, translating names to the model's `naming` where they need it;
    return model name -> [(sig, sig name, alpha)] in model order."""
    shapes = {
        name: ckpt.shape(name) if ckpt.dtype(name).is_floating_point else None
        for name in ckpt.names
    }
    matches = [match(sig, shapes, prefix_map, ckpt.aliases, naming) for sig, _ in entries]
    require(matches, strict=strict, model=model)
    per_name: dict[str, list[tuple[Signature, str, float]]] = {}
    for (sig, alpha), m in zip(entries, matches, strict=True):
        for sig_name, target in m.targets.items():
            per_name.setdefault(target, []).append((sig, sig_name, alpha))
    ordered = {name: per_name[name] for name in ckpt.names if name in per_name}
    return ordered, matches


def _undoing(entries: Sequence[tuple[Signature, float]]) -> tuple[Record, dict[str, str]] | None:
    """For an undo file (applied alone, at alpha 1): the record entries it removes and the
    digest each tensor must have; None for ordinary signatures."""
    for sig, alpha in entries:
        if is_undo(sig):
            return undo_plan(sig, alpha, len(entries))
    return None


def _contributions(
    items: Sequence[tuple[Signature, str, float]], device: torch.device
) -> list[Contribution]:
    return [
        Contribution(sig.info(name).kind, alpha, sig.tensor(name, device=device))
        for sig, name, alpha in items
        if alpha != 0
    ]


def _state_dict_view(state_dict: Mapping[str, Any], what: str) -> PyTorchCheckpoint:
    """A flat state dict seen as a checkpoint: normalized names, tied tensors found."""
    ckpt = PyTorchCheckpoint(f"<{what}>", state_dict, Format.STATE_DICT)
    if ckpt.layout.keys:
        raise RwsError(
            f"the {what} is wrapped (its weights are under {'/'.join(ckpt.layout.keys)})",
            fix="pass the state dict itself",
        )
    return ckpt


def _check_state_dict(state_dict: object) -> None:
    """`RwsError` saying which function fits when `apply` is given no state dict."""
    if isinstance(state_dict, Mapping):
        return
    if isinstance(state_dict, (str, bytes, os.PathLike)):
        fix = "for a checkpoint file, rwsfmt.apply_checkpoint(path, sigs, output)"
    elif isinstance(state_dict, torch.nn.Module):
        fix = "pass model.state_dict(), or patch the model itself: rwsfmt.patch(model, sig)"
    else:
        fix = "pass model.state_dict() (a mapping of names to tensors)"
    raise RwsError(f"apply takes a state dict, got {described(state_dict)}", fix=fix)


def apply(
    state_dict: Mapping[str, torch.Tensor],
    sigs: Entries,
    alpha: float | None = None,
    *,
    map: MapLike = None,
    strict: bool = False,
    stats: StatsRule | str = DEFAULT_STATS,
) -> dict[str, torch.Tensor]:
    """A new state dict with the signatures applied; `state_dict` is not modified.

    Patched tensors are new (on the device and in the dtype of the originals); all
    others are the input's tensor objects. `stats` says how normalization statistics
    (target entries) compose (`StatsRule`). Raises `RwsError` when a signature tensor is
    missing or has another shape (`strict`: also when the whole architecture differs).
    An undo file (`rwsfmt.undo`), alone at alpha 1, restores the exact original tensors.
    """
    rule = StatsRule.parse(stats)
    entries = as_entries(sigs, alpha)
    undoing = _undoing(entries)
    _check_state_dict(state_dict)
    ckpt = _state_dict_view(state_dict, "state dict")
    plan, _ = _plan(entries, ckpt, parse_map(map), strict, "state dict", Naming())
    out = dict(state_dict)
    for name, items in plan.items():
        base = ckpt.tensor(name)
        contributions = _contributions(items, base.device)
        if undoing:
            new = restored(base, contributions[0].values, undoing[1][items[0][1]], repr(name))
        else:
            new = compose(base, contributions, stats=rule, name=repr(name))
        for key in ckpt.keys_of(name):  # tied keys stay one tensor
            out[key] = new
    return out


# ---------------------------------------------------------------- live modules


@dataclass
class _Slot:
    """One patched parameter or buffer: its pre-patch values and the active patches."""

    tensor: torch.Tensor
    original: torch.Tensor
    stats: StatsRule
    key: str
    active: dict[int, list[Contribution]] = field(default_factory=dict)

    def refresh(self) -> None:
        """Recompute from the original plus the active patches, in the order applied."""
        with torch.no_grad():
            if self.active:
                contributions = itertools.chain(*self.active.values())
                compose(
                    self.original,
                    contributions,
                    stats=self.stats,
                    out=self.tensor,
                    name=repr(self.key),
                )
            else:
                self.tensor.copy_(self.original)


# owning module -> attribute name -> slot; weak, so a discarded model takes its slots along
_SLOTS: weakref.WeakKeyDictionary[torch.nn.Module, dict[str, _Slot]] = weakref.WeakKeyDictionary()
_HANDLE_IDS = itertools.count()


class PatchHandle:
    """The patches that one `patch()` call put on a module; `remove()` takes them off.

    Handles stack and can be removed in any order: each tensor is recomputed from its
    original values plus the patches still active, so removing all restores it bit for bit.
    """

    def __init__(self, names: list[str], slots: list[tuple[torch.nn.Module, str]]) -> None:
        self.id = next(_HANDLE_IDS)
        self.names = names  # the module's state-dict keys this handle patched
        self._slots = slots
        self.matches: list[Match] = []
        self.active = True

    def remove(self) -> None:
        """Undo this handle's patches; removing twice is a no-op."""
        if not self.active:
            return
        for owner, attr in self._slots:
            table = _SLOTS.get(owner, {})
            slot = table.get(attr)
            if slot is None or self.id not in slot.active:
                continue
            del slot.active[self.id]
            slot.refresh()
            if not slot.active:
                del table[attr]
        self.active = False

    def __enter__(self) -> PatchHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "active" if self.active else "removed"
        return f"<PatchHandle: {len(self.names)} tensors, {state}>"


def patch(
    model: torch.nn.Module,
    sigs: Entries,
    alpha: float | None = None,
    *,
    map: MapLike = None,
    strict: bool = False,
    stats: StatsRule | str = DEFAULT_STATS,
) -> PatchHandle:
    """Patch `model` in place, on whatever device its tensors live; returns the handle.
    On an error (a damaged signature, a patch overflowing a dtype) the model is left as it was.

    Parameters keep their identity (values are copied into them under no_grad), so
    optimizers and hooks keep working. `handle.remove()` restores the model bit for bit.
    A single signature takes `alpha` (default 0.8); or pass `[(sig, alpha), ...]`.
    Stacked patches compose as one call with all their signatures would, so the
    normalization statistics they share must be patched under one `stats` rule.
    """
    if not isinstance(model, torch.nn.Module):
        raise RwsError(
            f"patch takes a live torch.nn.Module, got {type(model).__name__}",
            fix="pass the model; for a state dict use rwsfmt.apply, for a file "
            "rwsfmt.apply_checkpoint",
        )
    rule = StatsRule.parse(stats)
    entries = as_entries(sigs, alpha)
    if any(is_undo(sig) for sig, _ in entries):
        raise RwsError(
            "an undo file restores a checkpoint file, not a live model",
            fix="take a live patch off with handle.remove(), which restores it bit for bit",
        )
    live = _state_dict_view(model.state_dict(keep_vars=True), "model")
    plan, matches = _plan(
        entries, live, parse_map(map), strict, type(model).__name__, Naming(module=model)
    )
    targets = [(name, *_owner(model, live.key(name), live.tensor(name))) for name in plan]
    _check_stats_rule(plan, targets, live, rule)
    handle = PatchHandle([live.key(name) for name in plan], [(o, a) for _, o, a in targets])
    handle.matches = matches
    try:
        for name, owner, attr in targets:
            tensor = live.tensor(name)
            table = _SLOTS.setdefault(owner, {})
            slot = table.get(attr)
            if slot is None or slot.tensor is not tensor:
                slot = _Slot(tensor, tensor.detach().clone(), rule, live.key(name))
                table[attr] = slot
            elif not slot.active:
                slot.stats = rule
            slot.active[handle.id] = _contributions(plan[name], tensor.device)
            slot.refresh()
    except BaseException:  # a damaged blob or an overflow half-way: the model as it was
        handle.remove()
        raise
    return handle


def _check_stats_rule(
    plan: Mapping[str, list[tuple[Signature, str, float]]],
    targets: Sequence[tuple[str, torch.nn.Module, str]],
    live: Checkpoint,
    rule: StatsRule,
) -> None:
    """Refuse, before touching anything, to stack a patch whose target entries would
    compose under another rule than the active patches of the same tensor."""
    for name, owner, attr in targets:
        slot = _SLOTS.get(owner, {}).get(attr)
        if slot is None or slot.tensor is not live.tensor(name) or slot.stats is rule:
            continue
        held = [c.kind for cs in slot.active.values() for c in cs]
        held += [sig.info(sig_name).kind for sig, sig_name, _ in plan[name]]
        if "target" in held:
            raise RwsError(
                f"{live.key(name)!r} is already patched with stats={slot.stats.value!r}; "
                f"a second patch with stats={rule.value!r} cannot compose with it",
                fix=f"pass stats={slot.stats.value!r}, or remove the active patches first",
            )


@contextlib.contextmanager
def patched(
    model: torch.nn.Module,
    sigs: Entries,
    alpha: float | None = None,
    *,
    map: MapLike = None,
    strict: bool = False,
    stats: StatsRule | str = DEFAULT_STATS,
) -> Iterator[PatchHandle]:
    """`with rwsfmt.patched(model, [(fog, 0.8), (snow, 0.3)]):` patch, then restore."""
    handle = patch(model, sigs, alpha, map=map, strict=strict, stats=stats)
    try:
        yield handle
    finally:
        handle.remove()


def _owner(model: torch.nn.Module, key: str, tensor: torch.Tensor) -> tuple[torch.nn.Module, str]:
    """The submodule and attribute name that hold the state-dict entry `key`."""
    prefix, _, attr = key.rpartition(".")
    try:
        owner = model.get_submodule(prefix)
    except AttributeError:
        owner = None
    if owner is None or getattr(owner, attr, None) is not tensor:
        raise RwsError(
            f"{key!r} is not a parameter or buffer of {type(model).__name__}, so it cannot be "
            "patched in place",
            fix="patch its state dict with rwsfmt.apply() and load that instead",
        )
    return owner, attr


# ---------------------------------------------------------------- checkpoint files


@dataclass
class TensorChange:
    """What applying did to one tensor; norms (float64, of the change) only when measured."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    signatures: list[str]
    statistics: bool = False  # a normalization statistic (target entries), composed by `stats`
    change_norm: float | None = None
    relative_change: float | None = None


@dataclass
class ApplyReport:
    """The outcome of `apply_checkpoint`: per-tensor changes and how each signature matched."""

    model: str
    output: str | None
    format: str
    changes: list[TensorChange]
    matches: list[Match]
    tensors_in_model: int
    written: bool
    output_format: Format | None = None  # None for a dry run or in place (the model's format)
    notes: list[str] = field(default_factory=list)  # what a conversion left behind
    applied: Record = field(default_factory=list)  # the output's record of applied signatures
    undo: str | None = None  # the undo file written (save_undo)
    undone: bool = False  # the signatures were an undo file: the model was restored


def apply_checkpoint(
    model_path: str | os.PathLike,
    sigs: Entries,
    output: str | os.PathLike | None,
    alpha: float | None = None,
    *,
    map: MapLike = None,
    strict: bool = False,
    stats: StatsRule | str = DEFAULT_STATS,
    device: str | torch.device | None = None,
    in_place: bool = False,
    dry_run: bool = False,
    trust_pickle: bool = False,
    progress: Callable[[Iterable[Any], int, str], Iterable[Any]] | None = None,
    force: bool = False,
    save_undo: str | os.PathLike | None = None,
    revision: str | None = None,
    download: bool = False,
) -> ApplyReport:
    """Patch the checkpoint at `model_path` into `output`, in the format it was read.

    Unpatched tensors are kept byte for byte and the file is written atomically. Writing
    over `model_path` needs `in_place=True`, which reads and writes it under `target_lock`:
    concurrent in-place runs take turns, each patching the other's result. `dry_run`
    measures the changes and writes nothing.
    `stats` says how normalization statistics (target entries) compose (`StatsRule`).

    The output records the signatures applied (`rwsfmt.applied`: label, file SHA-256, alpha,
    stats rule); a signature the model's record already lists is refused unless `force`.
    `save_undo` writes an undo file that restores the model bit for bit (`rwsfmt.undo`);
    applying an undo file restores the tensors and removes its entries from the record.
    `model_path` may be a Hugging Face id read from the cache (`rwsfmt.hub`; `revision`,
    `download` as in `extract`), which is never written: `output` goes elsewhere.
    """
    rule = StatsRule.parse(stats)
    if output is None and not dry_run:
        raise RwsError(
            "no output path given",
            fix=spell("pass -o OUT (or --dry-run)", "pass output= (or dry_run=True)"),
        )
    model = resolve(model_path, revision=revision, download=download)
    model_path = as_path(model, "the path of a checkpoint file or folder")
    if not dry_run:  # only huggingface_hub writes into its cache
        where = spell("-o OUT", "output=") + " outside it"
        refuse_cache_output(model_path if in_place else output, fix=f"write elsewhere: {where}")
    dev = resolve_device(device)
    entries = as_entries(sigs, alpha)
    undoing = _undoing(entries)
    if save_undo is not None:
        save_undo = _check_save_undo(os.fspath(save_undo), dry_run, undoing is not None)
    if not dry_run:
        check_destination(output, allow_folder=True)  # before any work
    with contextlib.ExitStack() as stack:
        if in_place and not dry_run:
            # Read the model under the lock, so that a concurrent --in-place applies on top
            # of the other's result instead of losing it.
            stack.enter_context(target_lock(model_path))
        ckpt = stack.enter_context(
            contextlib.closing(open_checkpoint(model_path, trust_pickle=trust_pickle))
        )
        if not dry_run:
            output = _check_output(ckpt, os.fspath(output), entries, in_place, save_undo)
        naming = Naming(folder=ckpt.path if ckpt.folder else None)
        plan, matches = _plan(entries, ckpt, parse_map(map), strict, model_path, naming)
        if undoing:
            record, added = _record_undone(ckpt, undoing[0])
        else:
            record, added = _record(ckpt, entries, rule, force)
        recorder = None
        if save_undo is not None:
            check_undoable(list(plan), ckpt.dtype, model_path)
            recorder = UndoRecorder(
                save_undo, os.fspath(output), list(plan), added, ckpt.fingerprint()
            )
        written = None
        try:
            with _PatchedTensors(
                ckpt,
                plan,
                dev,
                stats=rule,
                measure=dry_run,
                progress=progress,
                undo=recorder,
                restore=undoing[1] if undoing else None,
            ) as patched:
                if dry_run:
                    for name in patched:
                        patched[name]  # computes and measures the change, writes nothing
                elif in_place:
                    ckpt.write(model_path, patched, record)
                else:
                    written = write_checkpoint(ckpt, output, patched, record)
            if recorder is not None:
                recorder.save()  # already saved, unless the plan was empty
        except BaseException:
            if recorder is not None:
                recorder.discard()
            raise
        notes = written.notes if written else []
        skipped = ckpt.skipped_files() if written and written.target.folder else []
        if skipped:
            notes.append(f"weight files of other formats not copied: {', '.join(skipped)}")
        state = ckpt.training_state_files() if written and written.target.folder else []
        if state:
            notes.append(
                f"training state copied as it was: {', '.join(state)} (the optimizer's "
                "moments are those of the unpatched weights)"
            )
        return ApplyReport(
            model=str(model) if isinstance(model, HubModel) else model_path,
            output=None if dry_run else output,
            format=ckpt.format,
            changes=[patched.changes[name] for name in plan],
            matches=matches,
            tensors_in_model=len(ckpt.names),
            written=not dry_run,
            output_format=written.target.format if written else None,
            notes=notes,
            applied=record,
            undo=save_undo,
            undone=undoing is not None,
        )


def _check_save_undo(path: str, dry_run: bool, undoing: bool) -> str:
    """Refuse an undo file that cannot be written or would make no sense, before any work."""
    if dry_run:
        raise RwsError(
            "a dry run writes nothing, not even an undo file",
            fix="drop --save-undo (save_undo=) or --dry-run",
        )
    if undoing:
        raise RwsError(
            "the signature is itself an undo file: restoring needs no undo file",
            path=path,
            fix="drop --save-undo (save_undo=); to patch again, apply the signatures again",
        )
    check_destination(path)
    return path


def _record(
    ckpt: Checkpoint, entries: Sequence[tuple[Signature, float]], rule: StatsRule, force: bool
) -> tuple[Record, Record]:
    """(the output's record, the entries this apply adds): the model's record plus one entry
    per signature applied at an alpha other than 0 (which changes nothing); a signature
    already applied to the model is refused unless `force` (then an `RwsWarning`); one
    given twice in this call is `warn_repeated`'s to report."""
    before = ckpt.applied
    seen = {e.get("sha256"): e for e in before if isinstance(e.get("sha256"), str)}
    added = []
    for sig, alpha in entries:
        if alpha == 0:
            continue
        digest = file_sha256(sig.path) if sig.path else None
        new = entry(sig.label, sig.path, digest, alpha, rule.value)
        earlier = seen.get(digest) if digest else None
        if earlier is not None:
            when = earlier.get("created")
            what = (
                f"signature {sig.label or os.path.basename(sig.path or '')!r} (sha256 "
                f"{digest[:12]}…) was already applied to this model at alpha "
                f"{earlier.get('alpha')}" + (f" ({when})" if isinstance(when, str) else "")
            )
            if not force:
                raise RwsError(
                    what,
                    path=ckpt.path,
                    fix=f"pass {spell('--force', 'force=True')} to apply it again, or apply "
                    "the undo file of that patch first",
                )
            note(f"{what}; applied again ({spell('--force', 'force=True')})", path=ckpt.path)
        added.append(new)
    return [*before, *added], added


def _record_undone(ckpt: Checkpoint, removed: Record) -> tuple[Record, Record]:
    """(the output's record, no new entries) for an undo file: the model's record without
    the entries of the patch it takes off (an `RwsWarning` when it does not list them)."""
    record = without(ckpt.applied, removed)
    if len(record) + len(removed) != len(ckpt.applied):
        warn(
            "the model's record of applied signatures does not list the patch this undo file "
            "takes off; its tensors are restored all the same",
            path=ckpt.path,
            fix="none if the model was re-saved by a tool that drops the record; otherwise "
            "check that the undo file was written by the apply that made this model",
        )
    return record, []


def _check_output(
    ckpt: Checkpoint,
    output: str,
    entries: Sequence[tuple[Signature, float]],
    in_place: bool,
    save_undo: str | None = None,
) -> str:
    """Refuse an output (or undo file) that would overwrite a signature, or the model without
    `in_place`; check that its name says which format to write."""
    sigs = [("signature", sig.path) for sig, _ in entries if sig.path]
    refuse_overwriting_inputs(output, sigs, fix="choose another -o path")
    model = [("input model", f) for f in [ckpt.path, *ckpt.files]]
    if save_undo is not None:
        refuse_overwriting_inputs(
            save_undo,
            [*sigs, *model, ("patched model", output)],
            fix="choose another --save-undo path",
        )
    if in_place:
        if not any(same_file(output, path) for _, path in model):
            raise RwsError(
                "in place means writing over the model itself, not another path",
                path=output,
                fix=spell(
                    "drop -o with --in-place, or drop --in-place",
                    "pass the model's own path as output with in_place=True, or in_place=False",
                ),
            )
        ckpt.check_write(in_place=True)
        return ckpt.path
    refuse_overwriting_inputs(
        output,
        model,
        fix=spell(
            "pass --in-place to overwrite it, or choose another -o path",
            "pass in_place=True to overwrite it, or choose another output",
        ),
    )
    if output_format(ckpt, output).folder:
        ckpt.check_write(in_place=False)
    return output


class _PatchedTensors(Mapping[str, torch.Tensor]):
    """The patched tensors of a checkpoint, each computed when a writer asks for it.

    Signature tensors are decoded ahead, in the writer's order, on a helper thread (SHA-256,
    zstd and dequantization release the GIL). When the checkpoint streams its writes, every
    base tensor is read into one reused buffer: memory stays at a few tensors, and no fresh
    pages are faulted in for each one. `measure` keeps the base to report change norms.
    """

    def __init__(
        self,
        ckpt: Any,
        plan: Mapping[str, list[tuple[Signature, str, float]]],
        device: torch.device,
        *,
        stats: StatsRule,
        measure: bool,
        progress: Callable[[Iterable[Any], int, str], Iterable[Any]] | None,
        undo: UndoRecorder | None = None,
        restore: Mapping[str, str] | None = None,
        ahead: int = 2,
    ) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self._ckpt, self._plan, self._device, self._measure = ckpt, plan, device, measure
        self._stats, self._undo, self._restore = stats, undo, restore
        self._order = [n for n in ckpt.write_order if n in plan]
        self._position = {n: i for i, n in enumerate(self._order)}
        self._ahead = ahead
        self._pool = ThreadPoolExecutor(max_workers=1)
        self._futures: dict[str, Any] = {}
        self._submitted = 0
        self._buffer = None
        if ckpt.streams_writes and not measure:
            largest = max((_nbytes(ckpt, n) for n in plan), default=0)
            self._buffer = torch.empty(largest, dtype=torch.uint8)
        self._ticks = iter(progress(range(len(plan)), len(plan), "patching")) if progress else None
        self.changes: dict[str, TensorChange] = {}

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._plan:
            raise KeyError(name)
        contributions = self._decoded(name)
        if self._buffer is not None:
            base = self._ckpt.tensor(name, buffer=self._buffer)
        else:
            base = self._ckpt.tensor(name)
        refuse_nonfinite(
            base,
            name,
            self._ckpt.path,
            "model",
            fix="the model is broken (its training diverged, or the file is damaged) and a "
            "patch cannot repair it: use an earlier checkpoint or re-download it",
        )
        on_dev = base.to(self._device)
        items = self._plan[name]
        if self._restore is not None:  # an undo file: the exact original values
            expected = self._restore[items[0][1]]
            new = restored(on_dev, contributions[0].values, expected, repr(name), self._ckpt.path)
        else:
            if self._undo is not None:
                self._undo.keep(name, on_dev)  # before compose, which may overwrite it
            owned = self._ckpt.owns_tensors and not self._measure
            new = compose(
                on_dev, contributions, stats=self._stats, reuse_base=owned, name=repr(name)
            )
            if self._undo is not None:
                self._undo.patched(name, new)
        change = TensorChange(
            name,
            tuple(base.shape),
            str(base.dtype).removeprefix("torch."),
            [sig.label or os.path.basename(sig.path or "") for sig, _, _ in items],
            statistics=self._restore is None and any(c.kind == "target" for c in contributions),
        )
        if self._measure:
            diff = new.to(torch.float64) - on_dev.to(torch.float64)
            change.change_norm = float(torch.linalg.vector_norm(diff))
            ref = float(torch.linalg.vector_norm(on_dev.to(torch.float64)))
            change.relative_change = change.change_norm / ref if ref else None
        self.changes[name] = change
        if self._ticks is not None:
            next(self._ticks, None)
        return new.cpu()

    def _decoded(self, name: str) -> list[Contribution]:
        """This tensor's contributions, after queueing the next `ahead` in write order."""
        stop = min(len(self._order), self._position[name] + self._ahead + 1)
        while self._submitted < stop:
            nxt = self._order[self._submitted]
            self._futures[nxt] = self._pool.submit(_contributions, self._plan[nxt], self._device)
            self._submitted += 1
        future = self._futures.pop(name, None)
        if future is None:  # asked out of order: decode it here
            return _contributions(self._plan[name], self._device)
        return future.result()

    def __contains__(self, name: object) -> bool:
        return name in self._plan  # Mapping's default would compute the tensor to find out

    def __iter__(self) -> Iterator[str]:
        return iter(self._order)

    def __len__(self) -> int:
        return len(self._order)

    def __enter__(self) -> _PatchedTensors:
        return self

    def __exit__(self, *exc: object) -> None:
        for future in self._futures.values():
            future.cancel()
        self._pool.shutdown(wait=True)
        if self._ticks is not None:
            for _ in self._ticks:  # finish the progress bar
                pass


def _nbytes(ckpt: Any, name: str) -> int:
    return math.prod(ckpt.shape(name)) * ckpt.dtype(name).itemsize
