"""Extract a robust weight signature from std, robust and init checkpoints (Eq. 1 of the paper).

For every selected floating tensor k, flattened to a vector:

    v_base = std[k] - init[k];  v_c = robust[k] - init[k]
    RWS[k] = v_c - (<v_c, v_base> / <v_base, v_base>) * v_base       (RWS[k] = v_c if v_base = 0)

Tensors stream through one at a time: peak memory is a small multiple of the largest tensor
plus the compressed signature, never three models.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from .atomic import same_file
from .device import resolve_device
from .errors import RwsError, note, spell, warn
from .hub import HubModel, is_hub_id, resolve
from .io import Checkpoint, open_checkpoint
from .io.base import refuse_nonfinite
from .io.open import Source
from .naming import record_of, same_names
from .order import OrderReference
from .provenance import as_text, input_record
from .quant import QuantConfig
from .select import (
    DEFAULT_LAYERS,
    Rule,
    checkpoint_order,
    describe_segments,
    energy_cut,
    entry_kind,
    few,
    find_blocks,
    layer_segments,
    select,
    warn_cut_blocks,
)
from .signature import Signature, SignatureBuilder

METHODS = ("project", "subtract")
_DOT_BLOCK = 1 << 16  # elements summed in the checkpoint dtype; blocks in float64

Progress = Callable[[Iterable[str], int, str], Iterable[str]]


def extract(
    std: Source,
    robust: Source,
    init: Source | None = None,
    *,
    layers: int | str | None = None,
    include: str | None = None,
    exclude: str | None = None,
    energy: float | None = None,
    order: OrderReference | None = None,
    method: str = "project",
    bits: int = 8,
    quant: QuantConfig | None = None,
    label: str | None = None,
    meta: Mapping[str, Any] | None = None,
    corruption: str | None = None,
    severity: int | None = None,
    dataset: str | None = None,
    device: str | torch.device = "cpu",
    trust_pickle: bool = False,
    state_key: str | None = None,
    progress: Progress | None = None,
    revision: str | None = None,
    download: bool = False,
) -> Signature:
    """Compute the signature of `robust` relative to `std` (paths, state dicts or modules).

    `layers` (N or 'all'; default the paper's 5 shallowest, or all with `include`/`energy`
    or `method='subtract'`), `include`/`exclude` (regexes on tensor names) and `energy` (keep
    the shallowest layers holding that share of the signature's squared norm) choose the
    tensors of std, counted as blocks on transformers and as layers elsewhere (see
    `rwsfmt.select`), in depth order: the PyTorch file's own order, naming rules for
    safetensors, or `order` (a module,
    state dict, PyTorch checkpoint or text file of names of the same architecture; see
    `rwsfmt.order`). `method` is 'project' (Eq. 1, needs `init`) or 'subtract'
    (robust - std). `state_key` picks the weights inside training checkpoints (e.g.
    'state_dict_ema'). Only the selected tensors must be in robust and init, with the same
    shape; they may be in other float dtypes (computed in float32). The model fingerprint and
    each entry's recorded dtype are std's. Returns an in-memory signature; `rwsfmt.save`
    writes it.
    A string `org/name[@revision]` that is not a local path is read from the Hugging Face
    cache (`revision` for ids without `@`; `download=True` fetches what is missing).
    """
    if method not in METHODS:
        raise RwsError(
            f"unknown method {method!r}",
            fix=spell("use --method project or subtract", "use method='project' or 'subtract'"),
        )
    if method == "project" and init is None:
        raise RwsError(
            f"the projection (Eq. 1) needs {spell('INIT', 'init')}, the checkpoint std and "
            "robust were trained from",
            fix=spell(
                "pass INIT as the third checkpoint, or use --method subtract",
                "pass init=, or use method='subtract'",
            )
            + " (robust - std), the only method possible without it",
        )
    # A task vector (robust - std) is the whole delta: subtract keeps every layer by default.
    default = "all" if method == "subtract" else DEFAULT_LAYERS
    rule = Rule.make(layers, include, exclude, energy, default)
    quant = quant or QuantConfig(bits=bits)
    device = resolve_device(device)
    track = progress or (lambda items, total, description: items)
    given = {"std": std, "robust": robust, **({"init": init} if init is not None else {})}
    sources = {r: resolve(s, revision=revision, download=download) for r, s in given.items()}

    with contextlib.ExitStack() as stack, ThreadPoolExecutor(1) as hasher:
        ckpts: dict[str, Checkpoint] = {}
        for role, source in sources.items():
            ckpts[role] = stack.enter_context(
                open_checkpoint(source, trust_pickle=trust_pickle, state_key=state_key)
            )
        same_names(ckpts, sources)  # transformers' names on disk and in memory, as std's
        ref = ckpts["std"]
        depth = checkpoint_order(ref, order)
        blocks = find_blocks(ref)
        segments = select(ref, rule, depth, blocks)
        _check_agreement(ckpts, [n for seg in segments for n in seg])
        # Hash the input files while the tensors are processed (hashlib releases the GIL).
        records = {role: hasher.submit(_input_record, role, s) for role, s in sources.items()}
        compute = _Compute(ckpts, method, device)
        if rule.energy is not None:
            deltas = [n for seg in segments for n in seg if entry_kind(n) == "delta"]
            norms = {
                n: compute.delta(n)[1]["norm"] ** 2
                for n in track(deltas, len(deltas), "measuring norms")
            }
            segments = energy_cut(segments, rule.energy, norms)
        names = [n for seg in segments for n in seg]
        warn_cut_blocks(blocks, names, ref.path)

        builder = SignatureBuilder(label or default_label(sources["robust"], corruption), quant)
        zero = True  # every delta entry so far is all zero
        for name in track(names, len(names), "extracting"):
            kind = entry_kind(name)
            value, stats = compute.target(name) if kind == "target" else compute.delta(name)
            stats.pop("norm", None)
            zero = zero and (kind == "target" or not bool(value.any()))
            builder.add(name, value, kind=kind, dtype=ref.dtype(name), stats=stats)
            del value
        inputs = {role: records[role].result() for role in sources}
        _warn_same_inputs(sources, inputs)
        if zero and any(entry_kind(n) == "delta" for n in names):
            warn(
                f"the signature is all zero: every value of its {len(names)} tensor(s) is 0",
                fix=f"check that {spell('ROBUST', 'robust')} is the robust model, not a copy "
                f"of {spell('STD', 'std')} or {spell('INIT', 'init')}",
            )

        provenance: dict[str, Any] = {
            "method": method,
            "layers": rule.layers if rule.energy is None else len(segments),
            "selection": {
                **rule.to_json(),
                **depth.to_json(),
                **describe_segments(ref, blocks, segments, len(layer_segments(ref, depth, blocks))),
            },
            "tensors": names,
            "inputs": [_with_layout(inputs[role], ckpts[role]) for role in sources],
        }
        for key, value in (
            ("corruption", corruption),
            ("severity", severity),
            ("dataset", dataset),
        ):
            if value is not None:
                provenance[key] = value
        if meta:
            provenance["meta"] = dict(meta)
        if ref.aliases:
            provenance["tied"] = dict(sorted(ref.aliases.items()))
        if naming := record_of(std, ref.path if ref.folder else None):
            provenance["naming"] = naming  # transformers' names on disk or in memory
        return builder.build(provenance=provenance, model_fingerprint=ref.fingerprint())


class _Compute:
    """Per-tensor arithmetic on `device`: float32 elementwise from whatever float dtypes the
    inputs hold (float64 where one holds float64), dot products summed in float64 across
    blocks."""

    def __init__(self, ckpts: Mapping[str, Checkpoint], method: str, device: torch.device):
        self.ckpts, self.method, self.device = ckpts, method, device

    def _load(self, role: str, name: str) -> torch.Tensor:
        """A tensor this code may modify in place (never the checkpoint's own memory)."""
        ckpt = self.ckpts[role]
        t = ckpt.tensor(name)
        wide = any(c.dtype(name) == torch.float64 for c in self.ckpts.values())
        out = t.to(device=self.device, dtype=torch.float64 if wide else torch.float32)
        refuse_nonfinite(
            out,
            name,
            ckpt.path,
            f"{role} checkpoint",
            fix="the training run diverged or the file is damaged: use an earlier checkpoint "
            "or re-download it; if the tensor is a constant buffer, not a weight, leave it out "
            f"with {spell('--exclude RE', 'exclude=RE')}",
        )
        return out.clone() if out is t and not ckpt.owns_tensors else out

    def delta(self, name: str) -> tuple[torch.Tensor, dict[str, float]]:
        """The signature tensor of `name` and its stats (`rel_norm`, `cos_base`, `norm`)."""
        std = self._load("std", name)
        (ss,) = _dots((std, std))
        if self.method == "subtract":
            rws = self._load("robust", name).sub_(std)
            del std
            (rr,) = _dots((rws, rws))
            return rws, {"rel_norm": _ratio(rr, ss), "norm": rr**0.5}
        init = self._load("init", name)
        v_base = std.sub_(init)  # reuses std's memory
        v_c = self._load("robust", name).sub_(init)
        del init
        bb, cb, cc = _dots((v_base, v_base), (v_c, v_base), (v_c, v_c))
        coef = cb / bb if bb > 0 else 0.0
        rws = v_c.sub_(v_base, alpha=coef) if coef else v_c  # Eq. 1, in place
        rr = max(cc - coef * cb, 0.0)  # ||v_c - coef v_base||^2, exact in real arithmetic
        stats = {"rel_norm": _ratio(rr, ss), "norm": rr**0.5}
        if bb > 0 and cc > 0:
            stats["cos_base"] = cb / (bb * cc) ** 0.5
        return rws, stats

    def target(self, name: str) -> tuple[torch.Tensor, dict[str, float]]:
        """The robust model's normalization statistic; `rel_norm` is ||robust - std|| / ||std||."""
        std = self._load("std", name)
        robust = self._load("robust", name)
        diff = robust - std
        dd, ss = _dots((diff, diff), (std, std))
        return robust, {"rel_norm": _ratio(dd, ss)}


def _dots(*pairs: tuple[torch.Tensor, torch.Tensor]) -> list[float]:
    """Dot products <a, b> of same-size tensors: within blocks of `_DOT_BLOCK` elements in the
    tensors' dtype, across blocks in float64."""
    out = []
    for a, b in pairs:
        a, b = a.reshape(-1), b.reshape(-1)
        rows = a.numel() // _DOT_BLOCK
        body = rows * _DOT_BLOCK
        blocks = torch.linalg.vecdot(
            a[:body].view(rows, _DOT_BLOCK), b[:body].view(rows, _DOT_BLOCK)
        )
        out.append(float(blocks.double().sum() + torch.dot(a[body:], b[body:]).double()))
    return out


def _ratio(squared: float, squared_ref: float) -> float:
    return (squared / squared_ref) ** 0.5 if squared_ref > 0 else 0.0


def _check_agreement(ckpts: Mapping[str, Checkpoint], selected: Sequence[str]) -> None:
    """The `selected` tensors of std must be in robust and init with the same shape and a
    floating dtype (RwsError otherwise); differences elsewhere, which checkpoints saved by
    different library versions have (`position_ids` buffers), and mixed float dtypes are
    noted in one line each. A tied name may be stored once under its other name."""
    ref, chosen = ckpts["std"], set(selected)
    ignored: dict[str, list[str]] = {}  # name -> how it differs, outside the selection
    for role, other in ckpts.items():
        if other is ref:
            continue
        missing = [n for n in selected if n not in other and n not in other.aliases]
        if missing:
            raise RwsError(
                f"{len(missing)} selected tensor(s) of std are not in {role} ({other.path}): "
                f"{few(missing)}",
                fix="std, robust and init must be checkpoints of one architecture; to leave "
                "them out of the signature, "
                + spell(f"add --exclude {_exclusion(missing)}", f"exclude={_exclusion(missing)}"),
            )
        for name in selected:
            shape, other_shape = ref.shape(name), other.shape(name)
            if shape != other_shape:
                raise RwsError(
                    f"tensor {name!r} has shape {_show(shape)} in std ({ref.path}) but "
                    f"{_show(other_shape)} in {role} ({other.path})",
                    fix="std, robust and init must be checkpoints of one architecture",
                )
            if not other.dtype(name).is_floating_point:
                raise RwsError(
                    f"tensor {name!r} is {_show(ref.dtype(name))} in std ({ref.path}) but "
                    f"{_show(other.dtype(name))} in {role} ({other.path}): its difference "
                    "would mean nothing",
                    fix="std, robust and init must be checkpoints of one architecture; "
                    + spell(f"add --exclude {_exclusion([name])}", f"exclude={_exclusion([name])}"),
                )
        for name in ref.names:
            if name in chosen:
                continue
            if name not in other and name not in other.aliases:
                ignored.setdefault(name, []).append(f"not in {role}")
            elif ref.shape(name) != other.shape(name):
                ignored.setdefault(name, []).append(f"other shape in {role}")
        for name in other.names:
            if name not in ref and name not in ref.aliases:
                ignored.setdefault(name, []).append(f"only in {role}")
    if ignored:
        shown = [f"{n} ({', '.join(how)})" for n, how in ignored.items()]
        note(
            f"{len(ignored)} tensor(s) outside the selection differ between the inputs and "
            f"are ignored: {few(shown)}"
        )
    _note_mixed_dtypes(ckpts, selected)


def _note_mixed_dtypes(ckpts: Mapping[str, Checkpoint], selected: Sequence[str]) -> None:
    """One line when the selected tensors' float dtypes differ between the inputs (a bfloat16
    fine-tune of a float32 base): the arithmetic runs in float32 (float64 if an input holds
    float64) from whatever each holds; entries record std's dtype, the patched model's."""
    mixed = [n for n in selected if len({c.dtype(n) for c in ckpts.values()}) > 1]
    if not mixed:
        return
    held = ", ".join(
        f"{role} {'/'.join(sorted({_show(c.dtype(n)) for n in mixed}))}"
        for role, c in ckpts.items()
    )
    wide = any(c.dtype(n) == torch.float64 for c in ckpts.values() for n in mixed)
    note(
        f"{len(mixed)} of {len(selected)} selected tensor(s) differ in dtype ({held}): "
        f"computed in {'float64' if wide else 'float32'}, recorded as std's dtype"
    )


def _exclusion(names: Sequence[str]) -> str:
    """A regular expression matching exactly `names` (up to 3), quoted for a shell."""
    if len(names) > 3:
        return "RE (a regular expression matching them)"
    return "'^(" + "|".join(re.escape(n) for n in names) + ")$'"


_SAME_INPUTS = {  # what giving the same checkpoint twice makes of the signature
    ("std", "robust"): "the signature is zero",
    ("std", "init"): "std - init is zero, so nothing is projected off: the signature is "
    "robust - init",
    ("robust", "init"): "robust - init is zero, so the signature is zero",
}


def _warn_same_inputs(sources: Mapping[str, Source], records: Mapping[str, dict]) -> None:
    """Warn when two of std, robust and init are one file, or files with the same bytes."""
    for (a, b), consequence in _SAME_INPUTS.items():
        if a not in sources or b not in sources:
            continue
        paths = all(isinstance(sources[k], (str, os.PathLike)) for k in (a, b))
        if paths and same_file(sources[a], sources[b]):
            how = "are the same file"
        elif records[a].get("sha256") and records[a].get("sha256") == records[b].get("sha256"):
            how = "hold the same bytes"
        else:
            continue
        names = f"{spell(a.upper(), a)} and {spell(b.upper(), b)}"
        warn(
            f"{names} {how}: {consequence}",
            path=sources[b] if isinstance(sources[b], (str, os.PathLike)) else None,
            fix="check the checkpoints and their order: "
            + spell("STD ROBUST [INIT]", "extract(std, robust, init)"),
        )


def _show(value: Any) -> str:
    return str(tuple(value)) if isinstance(value, tuple) else str(value).replace("torch.", "")


def _input_record(role: str, source: Source) -> dict[str, Any]:
    if isinstance(source, HubModel):  # named by its id, not its snapshot folder
        hub = {"repo_id": source.repo_id, "revision": source.revision, "commit": source.commit}
        return {**input_record(role, source), "name": source.repo_id, "hub": hub}
    if isinstance(source, (str, os.PathLike)):
        return input_record(role, source)
    return {"role": role, "name": f"<{type(source).__name__}>"}


def _with_layout(record: dict[str, Any], ckpt: Checkpoint) -> dict[str, Any]:
    """The input record, with where the weights sat when that was not a plain file, and
    other entries that hold weights (an EMA copy) which `state_key` could have picked."""
    if not ckpt.layout.plain:
        record["layout"] = str(ckpt.layout)
    if ckpt.alternatives:
        record["alternatives"] = list(ckpt.alternatives)
    if translated := getattr(ckpt, "translated", None):
        record["names"] = translated  # read under std's names (rwsfmt.naming)
    return record


# Names that say which role a checkpoint plays or how it was saved, not what it is robust to
# (`robust.pt`, `model.safetensors`, `checkpoint-500/`, `checkpoints/`), case-insensitive.
_GENERIC_NAME = re.compile(
    r"(robust|std|standard|clean|init|base|model|pytorch_model|adapter_model|adapter|weights|"
    r"state_dict|ema|"
    r"checkpoints?|ckpts?|last|best|final|latest|epoch|step|runs?|out(put)?s?)([-_.]?\d+)?",
    re.IGNORECASE,
)
_LABEL_FOLDERS = 2  # how many folders above a generic name are looked at


def default_label(robust: Source, corruption: str | None = None) -> str:
    """A signature's label when none is given: `corruption`; else the robust input's name (a
    file's stem, a folder's name) or, when that is generic (`robust`, `model`,
    `checkpoint-500`), the nearest of the two folders above it whose name is not
    (`runs/fog/robust.pt` -> `fog`); 'signature' for one in memory."""
    if corruption:
        return corruption
    if isinstance(robust, HubModel):  # its repo's name, not its snapshot folder's hash
        return robust.name
    if not isinstance(robust, (str, os.PathLike)):
        return "signature"
    path = pathlib.Path(os.path.abspath(os.fspath(robust)))
    own = path.name if path.is_dir() else path.stem
    above = [p.name for p in path.parents][:_LABEL_FOLDERS]
    specific = [n for n in (own, *above) if n and not _GENERIC_NAME.fullmatch(n)]
    return as_text(specific[0] if specific else own)


def output_label(robust: str, output: str) -> str | None:
    """The output file's stem as the label (`-o fog.rws` -> `fog`) when `robust`'s own name
    (a path or a hub id as typed) is generic and the stem is not; else None."""
    if is_hub_id(robust):
        robust = robust.partition("@")[0]  # org/robust@v2: the repo's name, robust
    path, stem = pathlib.Path(os.path.normpath(robust)), pathlib.Path(output).stem
    own = path.name if path.is_dir() else path.stem
    if not stem or _GENERIC_NAME.fullmatch(stem) or (own and not _GENERIC_NAME.fullmatch(own)):
        return None
    return as_text(stem)
