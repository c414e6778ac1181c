"""Comparing signatures: cosine similarity and norm profiles per layer (the paper's Figures 2-5).

    result = rwsfmt.compare(["fog.rws", "snow.rws", "frost.rws"])
    result.overall.cosine[0][1]           # fog against snow, over every compared tensor
    [layer.name for layer in result.ranking()]   # where the signatures differ most, first

A *layer* is a module: the tensors whose names agree up to their last dot-separated part
(`features.0.weight` and `features.0.bias` form `features.0`), in the first signature's
depth order. Only delta entries are compared: normalization-statistic targets are the robust
model's statistics, not directions. Signatures holding different tensors are compared on
those that every one holds; the same name with another shape or kind means another
architecture, and is refused.

Tensors stream one name at a time: each is decoded from every signature, its Gram matrix
(every pairwise dot product) is added in float64 to its layer's, and it is dropped, so
memory stays near (number of signatures) x (largest tensor) in float32. Decoding uses numpy
(`dequant`), never torch, so that a comparison answers in a fraction of a second.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .container import RwsReader, TensorInfo
from .errors import RwsError, spell

if TYPE_CHECKING:
    import numpy as np

    from .signature import SignatureLike

Progress = Callable[[Iterable[Any], int, str], Iterable[Any]]

LAYER_RULE = "a layer is a module: the tensors named alike up to their last '.'-separated part"
RANKING_RULE = (
    "layers ranked by the mean cosine similarity between different signatures, lowest first: "
    "there the signatures point in the most different directions"
)
OVERALL = "all compared layers"


@dataclass(frozen=True)
class Compared:
    """One signature of a comparison: its label (unique within it) and where it came from."""

    label: str
    path: str | None
    tensors: int  # its delta tensors
    left_out: tuple[str, ...]  # its delta tensors that some other signature lacks


@dataclass(frozen=True)
class LayerResult:
    """Cosine similarities and norms of every signature over one layer (or all of them).

    `cosine[i][j]` is None where signature i or j is zero there; `rel_norm[i]` is
    ||RWS|| / ||std weight|| over the layer, None where the file records no `rel_norm`.
    """

    name: str
    tensors: tuple[str, ...]
    parameters: int
    cosine: tuple[tuple[float | None, ...], ...]
    norm: tuple[float, ...]
    rel_norm: tuple[float | None, ...]

    def pairs(self) -> list[tuple[int, int, float]]:
        """(i, j, cosine) for every pair of different signatures with a defined cosine."""
        n = len(self.cosine)
        return [
            (i, j, c)
            for i in range(n)
            for j in range(i + 1, n)
            if (c := self.cosine[i][j]) is not None
        ]

    @property
    def mean_cosine(self) -> float | None:
        """Mean cosine between different signatures: how alike they are in this layer."""
        values = [c for _, _, c in self.pairs()]
        return math.fsum(values) / len(values) if values else None

    @property
    def least_similar(self) -> tuple[int, int, float] | None:
        """(i, j, cosine) of the pair of signatures least alike in this layer."""
        return min(self.pairs(), key=lambda p: p[2], default=None)

    @property
    def most_similar(self) -> tuple[int, int, float] | None:
        """(i, j, cosine) of the pair of signatures most alike in this layer."""
        return max(self.pairs(), key=lambda p: p[2], default=None)

    def to_json(self, labels: Sequence[str]) -> dict[str, Any]:
        """JSON-ready data, pairs named by the signatures' `labels`."""
        return {
            "name": self.name,
            "tensors": list(self.tensors),
            "parameters": self.parameters,
            "cosine": [[_r(c) for c in row] for row in self.cosine],
            "mean_cosine": _r(self.mean_cosine),
            "least_similar": _pair_json(self.least_similar, labels),
            "most_similar": _pair_json(self.most_similar, labels),
            "norm": [_r(x) for x in self.norm],
            "rel_norm": [_r(x) for x in self.rel_norm],
        }


@dataclass(frozen=True)
class Comparison:
    """The result of `compare`: per-layer and overall similarities of two or more signatures."""

    signatures: tuple[Compared, ...]
    layers: tuple[LayerResult, ...]  # depth order
    overall: LayerResult  # every compared tensor at once
    targets_left_out: int  # normalization-statistic entries skipped, over all signatures

    @property
    def labels(self) -> list[str]:
        """The signatures' labels, in the order they were given."""
        return [s.label for s in self.signatures]

    @property
    def relative(self) -> bool:
        """Whether every signature records its norm relative to the std weight everywhere."""
        return all(r is not None for layer in self.layers for r in layer.rel_norm)

    @property
    def partial(self) -> bool:
        """Whether some signature holds tensors that were left out (not held by all)."""
        return any(s.left_out for s in self.signatures)

    def ranking(self) -> list[LayerResult]:
        """Layers by mean cosine between different signatures, lowest (most different) first;
        ties keep depth order, layers where every signature is zero come last."""
        return sorted(self.layers, key=lambda layer: _sort_key(layer.mean_cosine))

    def to_json(self) -> dict[str, Any]:
        """JSON-ready data: what `rwsfmt compare --json` prints."""
        labels = self.labels
        return {
            "signatures": [
                {
                    "label": s.label,
                    "path": s.path,
                    "tensors": s.tensors,
                    "left_out": list(s.left_out),
                }
                for s in self.signatures
            ],
            "layer_rule": LAYER_RULE,
            "ranking_rule": RANKING_RULE,
            "norms_relative_to_std": self.relative,
            "targets_left_out": self.targets_left_out,
            "overall": self.overall.to_json(labels),
            "layers": [layer.to_json(labels) for layer in self.layers],
            "ranking": [layer.name for layer in self.ranking()],
        }


def layer_of(name: str) -> str:
    """The module a tensor belongs to: its name without the last '.'-separated part."""
    return name.rpartition(".")[0] or name


def compare(
    signatures: Sequence[SignatureLike],
    *,
    layer: str | None = None,
    progress: Progress | None = None,
) -> Comparison:
    """Compare two or more signatures (paths or loaded `Signature`s) layer by layer.

    `layer` restricts the comparison to one layer (an `RwsError` lists the layers when there
    is no such one); `progress(items, total, description)` may wrap the loop over tensors.
    Files given as paths are opened here and closed again.
    """
    if isinstance(signatures, (str, bytes, os.PathLike)) or hasattr(signatures, "names"):
        signatures = [signatures]  # one signature (a path's characters are not paths)
    if len(signatures) < 2:
        raise RwsError(
            f"compare needs at least two signatures, got {len(signatures)}",
            fix="give two or more .rws files",
        )
    sources: list[_Source] = []
    try:
        for s in signatures:
            sources.append(_Source.of(s))
        return _compare(sources, layer, progress)
    finally:
        for src in sources:
            src.close()


@dataclass
class _Source:
    """What a comparison reads of one signature: its tensors' header entries and payloads."""

    label: str
    path: str | None
    infos: dict[str, TensorInfo]
    stored: Callable[[TensorInfo], bytes | bytearray]  # checked, within the decode limit
    close: Callable[[], None]

    @classmethod
    def of(cls, sig: SignatureLike) -> _Source:
        """A path is opened (header read and validated); a `Signature` is read as it is, a
        `WeightedSum` built first."""
        if isinstance(sig, (str, os.PathLike)):
            reader = RwsReader(sig)
            h = reader.header
            infos = {i.name: i for i in h.tensors}
            return cls(h.label, reader.path, infos, reader.read_decodable, reader.close)
        from .signature import as_signature  # imports torch: only for objects in memory

        sig = as_signature(sig)
        infos = {i.name: i for i in sig.infos}
        return cls(sig.label, sig.path, infos, lambda i: sig.decodable(i.name), lambda: None)

    @property
    def where(self) -> str:
        """How error messages name the signature: its file name, else its label."""
        return os.path.basename(self.path) if self.path else repr(self.label)

    def deltas(self) -> list[str]:
        """Names of its delta entries (the directions compared), in its order."""
        return [n for n, i in self.infos.items() if i.kind == "delta"]


def _compare(sources: list[_Source], layer: str | None, progress: Progress | None) -> Comparison:
    import numpy as np

    shared = _shared(sources)
    layers = _layers(shared)
    if layer is not None:
        layers = {layer: _pick(layer, layers)}
    names = [name for members in layers.values() for name in members]
    n = len(sources)
    sums = {lname: _Sums(n) for lname in layers}
    track = progress or (lambda items, total, description: items)
    for name in track(names, len(names), "comparing"):
        rows = np.empty((n, sources[0].infos[name].numel), dtype=np.float32)
        for i, src in enumerate(sources):
            _decode(src, name, rows[i])
        rel = [_rel_norm(src.infos[name]) for src in sources]
        sums[layer_of(name)].add(_gram(rows), rel)
    results = [sums[lname].result(lname, members, sources[0]) for lname, members in layers.items()]
    total = _Sums(n)
    for part in sums.values():
        total.merge(part)
    held = set(shared)
    compared = tuple(
        Compared(
            label, src.path, len(src.deltas()), tuple(x for x in src.deltas() if x not in held)
        )
        for label, src in zip(_labels(sources), sources, strict=True)
    )
    targets = sum(len(src.infos) - len(src.deltas()) for src in sources)
    overall = total.result(layer or OVERALL, names, sources[0])
    return Comparison(compared, tuple(results), overall, targets)


def _gram(rows: np.ndarray) -> np.ndarray:
    """Every pairwise dot product of the rows, in float64, a slice of columns at a time (so
    the float64 copy stays small)."""
    import numpy as np

    gram = np.zeros((len(rows), len(rows)))
    for start in range(0, rows.shape[1], _COLUMNS):
        part = rows[:, start : start + _COLUMNS].astype(np.float64)
        gram += part @ part.T
    return gram


_COLUMNS = 1 << 16  # elements per slice: 512 KiB of float64 per signature


def _decode(src: _Source, name: str, out: np.ndarray) -> None:
    """One tensor of one signature into `out`, flat float32 (checksum verified, payload
    checked)."""
    from .dequant import stored_values

    info = src.infos[name]
    stored_values(src.stored(info), info, src.path or "<memory>", out)


def _shared(sources: list[_Source]) -> list[str]:
    """The delta tensors every signature holds, in the first one's order; a name held with
    different shapes or kinds (another architecture) is an `RwsError`."""
    first: dict[str, tuple[TensorInfo, _Source]] = {}
    for src in sources:
        for info in src.infos.values():
            ref, ref_src = first.setdefault(info.name, (info, src))
            if ref.shape != info.shape or ref.kind != info.kind:
                raise RwsError(
                    f"tensor {info.name!r} is {info.kind} {list(info.shape)} in {src.where} "
                    f"but {ref.kind} {list(ref.shape)} in {ref_src.where}: the signatures "
                    "come from different architectures",
                    fix="compare signatures extracted from one architecture",
                )
    held = [set(src.deltas()) for src in sources]
    shared = [name for name in sources[0].deltas() if all(name in h for h in held)]
    if not shared:
        listing = "; ".join(f"{src.where}: {_some(src.deltas())}" for src in sources)
        raise RwsError(
            f"no signature tensor is held by all {len(sources)} signatures ({listing}): "
            "they come from different architectures, or hold different layers",
            fix="compare signatures extracted from one architecture, with the same layers",
        )
    return shared


def _layers(names: list[str]) -> dict[str, list[str]]:
    """Tensor names grouped by layer, layers in order of their first tensor."""
    layers: dict[str, list[str]] = {}
    for name in names:
        layers.setdefault(layer_of(name), []).append(name)
    return layers


def _pick(layer: str, layers: dict[str, list[str]]) -> list[str]:
    """The tensors of `layer`, or an `RwsError` that lists the layers there are."""
    if layer in layers:
        return layers[layer]
    hint = ""
    if layer_of(layer) in layers:
        hint = f"; {layer!r} is a tensor of layer {layer_of(layer)!r}"
    shown = list(layers)[:_LISTED]
    more = len(layers) - len(shown)
    listing = ", ".join(shown) + (f" and {more} more" if more else "")
    raise RwsError(
        f"no layer {layer!r} among the tensors the signatures share{hint}",
        fix=f"give {spell('--layer', 'layer=')} one of: {listing}",
    )


_LISTED = 20  # layers an error message lists


def _some(names: list[str]) -> str:
    """The first three names and how many more, for error messages."""
    shown = ", ".join(names[:3])
    return shown + (f" and {len(names) - 3} more" if len(names) > 3 else "") if names else "none"


class _Sums:
    """Running float64 sums over a set of tensors: the Gram matrix of the signatures and, per
    signature, the squared norm of the std weight (derived from `rel_norm`; None once a
    tensor lacks it)."""

    def __init__(self, n: int) -> None:
        import numpy as np

        self.gram = np.zeros((n, n))
        self.std_sq: list[float | None] = [0.0] * n

    def add(self, gram: np.ndarray, rel: list[float | None]) -> None:
        """Add one tensor: its Gram matrix and each signature's recorded `rel_norm`."""
        self.gram += gram
        for i, r in enumerate(rel):
            s = self.std_sq[i]
            # ||std|| = ||RWS|| / rel_norm; a zero rel_norm leaves ||std|| unknown
            self.std_sq[i] = None if s is None or not r else s + float(gram[i, i]) / (r * r)

    def merge(self, other: _Sums) -> None:
        """Add another set of tensors' sums (a layer's, into the overall ones)."""
        self.gram += other.gram
        self.std_sq = [
            None if a is None or b is None else a + b
            for a, b in zip(self.std_sq, other.std_sq, strict=True)
        ]

    def result(self, name: str, tensors: list[str], src: _Source) -> LayerResult:
        """The cosines and norms these sums give, for `tensors` (shapes read from `src`)."""
        sq = [max(float(self.gram[i, i]), 0.0) for i in range(len(self.std_sq))]
        cosine = tuple(
            tuple(
                max(-1.0, min(1.0, float(self.gram[i, j]) / math.sqrt(a * b))) if a and b else None
                for j, b in enumerate(sq)
            )
            for i, a in enumerate(sq)
        )
        rel = tuple(math.sqrt(x / s) if s else None for x, s in zip(sq, self.std_sq, strict=True))
        parameters = sum(src.infos[t].numel for t in tensors)
        norms = tuple(map(math.sqrt, sq))
        return LayerResult(name, tuple(tensors), parameters, cosine, norms, rel)


def _rel_norm(info: TensorInfo) -> float | None:
    """The tensor's recorded ||RWS|| / ||std||, when the file holds a usable one."""
    value = info.stats.get("rel_norm")
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return float(value) if number and math.isfinite(value) and value >= 0 else None


def _labels(sources: list[_Source]) -> list[str]:
    """Each signature's label (its file name's stem when it has none), numbered where two
    or more are equal: `fog #1`, `fog #2`."""
    base = [
        src.label
        or (os.path.splitext(os.path.basename(src.path))[0] if src.path else "")
        or f"signature {i + 1}"
        for i, src in enumerate(sources)
    ]
    counts = Counter(base)
    taken = {b for b in base if counts[b] == 1}
    numbers: Counter[str] = Counter()
    out = []
    for b in base:
        label = b
        while counts[b] > 1 and (label == b or label in taken):
            numbers[b] += 1
            label = f"{b} #{numbers[b]}"
        taken.add(label)
        out.append(label)
    return out


def _pair_json(pair: tuple[int, int, float] | None, labels: Sequence[str]) -> Any:
    """A pair of signatures as JSON: their labels and their cosine."""
    if pair is None:
        return None
    return {"signatures": [labels[pair[0]], labels[pair[1]]], "cosine": _r(pair[2])}


def _sort_key(mean: float | None) -> tuple[bool, float]:
    """Ranking order: defined means ascending, then layers without one."""
    return (mean is None, mean if mean is not None else 0.0)


def _r(x: float | None) -> float | None:
    """A float for JSON, to 6 significant digits (beyond them it is rounding noise)."""
    return None if x is None else float(f"{x:.6g}")
