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
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from .atomic import same_file
from .device import resolve_device
from .errors import RwsError, spell, warn
from .io import Checkpoint, open_checkpoint
from .io.base import refuse_nonfinite
from .io.open import Source
from .order import OrderReference
from .provenance import as_text, input_record
from .quant import QuantConfig
from .select import Rule, checkpoint_order, energy_cut, entry_kind, select
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
) -> Signature:
    """Compute the signature of `robust` relative to `std` (paths, state dicts or modules).

    `layers` (N or 'all'; default the paper's 5 shallowest, or all with `include`/`energy`),
    `include`/`exclude` (regexes on tensor names) and `energy` (keep the shallowest layers
    holding that share of the signature's squared norm) choose the tensors, counted in depth
    order: the PyTorch file's own order, naming rules for safetensors, or `order` (a module,
    state dict, PyTorch checkpoint or text file of names of the same architecture; see
    `rwsfmt.order`). `method` is 'project' (Eq. 1, needs `init`) or 'subtract'
    (robust - std). `state_key` picks the weights inside training checkpoints (e.g.
    'state_dict_ema'). Returns an in-memory signature; `rwsfmt.save` writes it.
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
    rule = Rule.make(layers, include, exclude, energy)
    quant = quant or QuantConfig(bits=bits)
    device = resolve_device(device)
    track = progress or (lambda items, total, description: items)
    sources = {"std": std, "robust": robust, **({"init": init} if init is not None else {})}

    with contextlib.ExitStack() as stack, ThreadPoolExecutor(1) as hasher:
        ckpts: dict[str, Checkpoint] = {}
        for role, source in sources.items():
            ckpts[role] = stack.enter_context(
                open_checkpoint(source, trust_pickle=trust_pickle, state_key=state_key)
            )
        _check_agreement(ckpts)
        ref = ckpts["std"]
        depth = checkpoint_order(ref, order)
        segments = select(ref, rule, depth)
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

        builder = SignatureBuilder(label or default_label(robust, corruption), quant)
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
            "selection": {**rule.to_json(), **depth.to_json(), "layer_count": len(segments)},
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
        return builder.build(provenance=provenance, model_fingerprint=ref.fingerprint())


class _Compute:
    """Per-tensor arithmetic on `device`: float32 elementwise (float64 for float64
    checkpoints), dot products summed in float64 across blocks."""

    def __init__(self, ckpts: Mapping[str, Checkpoint], method: str, device: torch.device):
        self.ckpts, self.method, self.device = ckpts, method, device

    def _load(self, role: str, name: str) -> torch.Tensor:
        """A tensor this code may modify in place (never the checkpoint's own memory)."""
        ckpt = self.ckpts[role]
        t = ckpt.tensor(name)
        dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
        out = t.to(device=self.device, dtype=dtype)
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


def _check_agreement(ckpts: Mapping[str, Checkpoint]) -> None:
    """std, robust and init must hold the same tensor names, shapes and dtypes (a name tied
    to another in one file may be absent from, or separate in, another: safetensors files
    store tied tensors once)."""
    ref = ckpts["std"]
    for role, other in ckpts.items():
        if other is ref:
            continue
        missing = [n for n in ref.names if n not in other and n not in other.aliases]
        extra = [n for n in other.names if n not in ref and n not in ref.aliases]
        if missing or extra:
            name, where, lacks = (missing[0], "std", role) if missing else (extra[0], role, "std")
            raise RwsError(
                f"tensor {name!r} is in {where} ({ckpts[where].path}) but not in {lacks} "
                f"({ckpts[lacks].path}); {len(missing) + len(extra)} name(s) differ",
                fix="std, robust and init must be checkpoints of one architecture",
            )
        for name in ref.names:
            for what in ("shape", "dtype"):
                a, b = getattr(ref, what)(name), getattr(other, what)(name)
                if a != b:
                    raise RwsError(
                        f"tensor {name!r} has {what} {_show(a)} in std ({ref.path}) but "
                        f"{_show(b)} in {role} ({other.path})",
                        fix="std, robust and init must be checkpoints of one architecture "
                        "saved in the same dtype",
                    )


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
    if not isinstance(robust, (str, os.PathLike)):
        return "signature"
    path = pathlib.Path(os.path.abspath(os.fspath(robust)))
    own = path.name if path.is_dir() else path.stem
    above = [p.name for p in path.parents][:_LABEL_FOLDERS]
    specific = [n for n in (own, *above) if n and not _GENERIC_NAME.fullmatch(n)]
    return as_text(specific[0] if specific else own)
