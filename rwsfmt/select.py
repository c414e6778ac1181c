"""Which tensors a signature covers: layers in depth order, regular expressions, norm energy.

What "the shallowest N layers" counts depends on the model:

- *Blocks*, on models built of repeated blocks without convolutions (transformers): numbered
  modules that repeat with the same tensors (`encoder.layer.N`, `layers.N`, `h.N`,
  `blocks.N`, `block.N`, ...; the outermost such stack, so a Swin stage's blocks and not its
  stages, a transformer layer and not its experts). The shallowest N are every floating tensor
  before block N: the embeddings and blocks 0 to N-1 (tensors between blocks, such as a
  stage's downsampling, ride with the block before them; the final norm and heads with the
  last block).
- *Layers*, everywhere else (CNNs, the paper's rule): a layer is a module owning a >=2-D
  floating weight (conv, linear, embedding), and the shallowest N layers are every floating
  tensor from the start of the depth order up to, not including, the first tensor of the
  (N+1)-th layer. On VGG-16 the first five are the convs features.{0,2,5,7,10}.

Normalization statistics (`running_mean`, `running_var`) are `target` entries; integer buffers
are never selected.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import RwsError, spell, warn
from .io import Checkpoint
from .order import DepthOrder, OrderReference, depth_order

NORM_STATS = ("running_mean", "running_var")
DEFAULT_LAYERS = 5


def entry_kind(name: str) -> str:
    """'target' for normalization statistics, 'delta' for everything else."""
    return "target" if name.rsplit(".", 1)[-1] in NORM_STATS else "delta"


def _module(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else ""


def is_layer_weight(ckpt: Checkpoint, name: str) -> bool:
    """A >=2-D floating tensor named `...weight`: the weight of a conv, linear or embedding."""
    return (
        name.rsplit(".", 1)[-1].endswith("weight")
        and ckpt.dtype(name).is_floating_point
        and len(ckpt.shape(name)) >= 2
    )


def checkpoint_order(ckpt: Checkpoint, reference: OrderReference | None = None) -> DepthOrder:
    """The depth order of a checkpoint's tensors (see `rwsfmt.order`)."""
    return depth_order(
        ckpt.names,
        ordered=ckpt.ordered,
        is_layer_weight=lambda n: is_layer_weight(ckpt, n),
        reference=reference,
    )


@dataclass(frozen=True)
class Blocks:
    """A model's repeated blocks: `of` maps each floating tensor inside one to the block's
    module name (`encoder.layer.3`); `size` counts each block's floating tensors; `stacks`
    names the repeated modules (`encoder.layer.N`); `conv` says a block holds a >=3-D weight."""

    of: dict[str, str]
    size: dict[str, int]
    stacks: list[str]
    conv: bool

    @property
    def counted(self) -> bool:
        """Whether layers are counted as blocks (blocks without convolutions: transformers)."""
        return bool(self.size) and not self.conv

    def to_json(self) -> dict[str, Any]:
        return {"unit": "block", "stacks": self.stacks} if self.counted else {"unit": "layer"}


def find_blocks(ckpt: Checkpoint) -> Blocks:
    """The repeated blocks of `ckpt`.

    A block is a numbered module (its last name part ends in a number) holding >= 2 layer
    weights, with a sibling of the same stem (`layer.2` beside `layer.3`) holding at least half
    the same (relative name, shape) pairs, and not inside another block.
    """
    members: dict[str, list[str]] = defaultdict(list)  # numbered module -> its tensors
    for name in (n for n in ckpt.names if _floating(ckpt, n)):
        parts = name.split(".")[:-1]
        for i, part in enumerate(parts):
            if part[-1:].isdigit():
                members[".".join(parts[: i + 1])].append(name)
    siblings: dict[tuple[str, str], list[tuple[int, str]]] = defaultdict(list)
    for module, tensors in members.items():
        if sum(is_layer_weight(ckpt, n) for n in tensors) >= 2:
            parent, _, last = module.rpartition(".")
            stem = last.rstrip("0123456789")
            siblings[(parent, stem)].append((int(last[len(stem) :]), module))
    stacked: dict[str, str] = {}  # module -> its stack's pattern
    for (parent, stem), children in siblings.items():
        children.sort()
        contents = [{(n[len(m) + 1 :], ckpt.shape(n)) for n in members[m]} for _, m in children]
        if any(_alike(a, b) for a, b in zip(contents, contents[1:], strict=False)):
            pattern = f"{parent}.{stem}N" if parent else f"{stem}N"
            stacked.update((m, pattern) for _, m in children)
    blocks = {
        m: pattern
        for m, pattern in stacked.items()
        if not any(".".join(m.split(".")[:i]) in stacked for i in range(1, m.count(".") + 1))
    }
    of = {n: b for b in blocks for n in members[b]}
    size = {b: len(members[b]) for b in blocks}
    conv = any(len(ckpt.shape(n)) >= 3 and is_layer_weight(ckpt, n) for n in of)
    return Blocks(of, size, sorted(set(blocks.values())), conv)


def _alike(a: set, b: set) -> bool:
    """Two modules share at least half of their (relative name, shape) pairs."""
    return 2 * len(a & b) >= len(a | b)


def _floating(ckpt: Checkpoint, name: str) -> bool:
    return ckpt.dtype(name).is_floating_point


def layer_segments(
    ckpt: Checkpoint, order: DepthOrder, blocks: Blocks | None = None
) -> list[list[str]]:
    """The checkpoint's floating tensors in depth order, cut into layers (or blocks, see the
    module docstring).

    A segment starts at the first tensor of each layer module (or block); tensors before the
    first (a ViT's `cls_token` and `pos_embed`, a BERT's embeddings when counting blocks)
    belong to the first segment.
    """
    blocks = find_blocks(ckpt) if blocks is None else blocks
    names = [n for n in order.names if _floating(ckpt, n)]
    first: dict[str, int] = {}
    if blocks.counted:
        for i, name in enumerate(names):
            if name in blocks.of:
                first.setdefault(blocks.of[name], i)
        starts = sorted(first.values())
    else:
        for i, name in enumerate(names):
            first.setdefault(_module(name), i)
        starts = sorted({first[_module(n)] for n in names if is_layer_weight(ckpt, n)})
    if not starts:
        starts = [0]
    starts[0] = 0
    bounds = [*starts, len(names)]
    return [names[a:b] for a, b in zip(bounds, bounds[1:], strict=False) if b > a]


def describe_segments(
    ckpt: Checkpoint, blocks: Blocks, segments: Sequence[Sequence[str]], total: int
) -> dict[str, Any]:
    """The provenance record of kept segments: the unit counted ('block' or 'layer', with the
    block `stacks`), `layer_count` of `layer_total`, and `kept`, each segment's block or
    layer module (`encoder.layer.0`, `features.10`)."""

    def label(segment: Sequence[str]) -> str:
        if blocks.counted:  # include= may have kept only what precedes a block
            return next((blocks.of[n] for n in segment if n in blocks.of), _module(segment[0]))
        return next((_module(n) for n in segment if is_layer_weight(ckpt, n)), _module(segment[0]))

    return {
        **blocks.to_json(),
        "layer_count": len(segments),
        "layer_total": total,
        "kept": [label(seg) for seg in segments],
    }


@dataclass(frozen=True)
class Rule:
    """A selection rule: `layers` (N or 'all'), `include`/`exclude` regexes, `energy` share."""

    layers: int | str = DEFAULT_LAYERS
    include: str | None = None
    exclude: str | None = None
    energy: float | None = None
    chosen: bool = field(default=True, compare=False)  # layers given, not the default

    @classmethod
    def make(
        cls,
        layers: int | str | None = None,
        include: str | None = None,
        exclude: str | None = None,
        energy: float | None = None,
        default: int | str = DEFAULT_LAYERS,
    ) -> Rule:
        """Validate options. `layers=None` means `default` (the paper's 5 shallowest layers), or
        all layers when `include` or `energy` already narrow the selection."""
        chosen = layers is not None
        if layers is None:
            layers = "all" if include is not None or energy is not None else default
        if isinstance(layers, str) and layers != "all":
            if not layers.isdigit():
                raise RwsError(
                    f"{_option('layers', repr(layers))} is not a number", fix=_layers_fix()
                )
            layers = int(layers)
        if isinstance(layers, int) and layers < 1:
            raise RwsError(f"{_option('layers', layers)} must be at least 1", fix=_layers_fix())
        if energy is not None:
            if not 0 < energy <= 1:
                raise RwsError(
                    f"{_option('energy', energy)} must be in (0, 1]",
                    fix=f"e.g. {_option('energy', 0.65)}",
                )
            if layers != "all":
                raise RwsError(
                    f"{spell('--energy', 'energy=')} chooses the number of layers itself",
                    fix=spell("use --energy without --layers", "leave layers= out with energy="),
                )
        for key, pattern in (("include", include), ("exclude", exclude)):
            if pattern is not None:
                try:
                    re.compile(pattern)
                except re.error as exc:
                    raise RwsError(
                        f"{_option(key, repr(pattern))} is not a regular expression: {exc}",
                        fix="write a Python regular expression, e.g. "
                        + _option(key, repr("^features\\.")),
                    ) from None
        return cls(layers, include, exclude, energy, chosen)

    def to_json(self) -> dict:
        out: dict = {"layers": self.layers}
        for key in ("include", "exclude", "energy"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out


def _option(name: str, value: object) -> str:
    """`--name VALUE` in the command line, `name=VALUE` in Python."""
    return spell(f"--{name} {value}", f"{name}={value}")


def _layers_fix() -> str:
    return "use " + spell("--layers N or all", "layers=N or 'all'")


def select(
    ckpt: Checkpoint, rule: Rule, order: DepthOrder, blocks: Blocks | None = None
) -> list[list[str]]:
    """The layers or blocks (lists of tensor names, depth order) the rule keeps before any
    energy cut."""
    blocks = find_blocks(ckpt) if blocks is None else blocks
    segments = layer_segments(ckpt, order, blocks)
    if rule.layers != "all":
        if rule.chosen and int(rule.layers) > len(segments):
            unit = "blocks" if blocks.counted else "layers"
            warn(
                f"{_option('layers', rule.layers)} asks for more "
                f"{unit} than the model has ({len(segments)}): all {len(segments)} are kept",
                path=ckpt.path,
                fix=spell("use --layers all", "use layers='all'") + f", or at most {len(segments)}",
            )
        segments = segments[: int(rule.layers)]
    inc = re.compile(rule.include) if rule.include is not None else None
    exc = re.compile(rule.exclude) if rule.exclude is not None else None
    kept = []
    for seg in segments:
        names = [
            n for n in seg if (inc is None or inc.search(n)) and (exc is None or not exc.search(n))
        ]
        if names:
            kept.append(names)
    if not kept:
        raise RwsError(
            f"the selection {rule.to_json()} matches no floating-point tensor",
            path=ckpt.path,
            fix=spell(
                "check --include/--exclude against the tensor names, or use --layers all",
                "check include=/exclude= against the tensor names, or use layers='all'",
            ),
        )
    return kept


def energy_cut(
    segments: Sequence[Sequence[str]], energy: float, squared_norms: Mapping[str, float]
) -> list[list[str]]:
    """The shallowest segments whose delta tensors hold `energy` of the total squared norm
    (`squared_norms`: name -> squared norm of its signature tensor)."""
    per_layer = [sum(squared_norms.get(n, 0.0) for n in seg) for seg in segments]
    total, running = sum(per_layer), 0.0
    for k, value in enumerate(per_layer):
        running += value
        if running >= energy * total:
            return [list(s) for s in segments[: k + 1]]
    return [list(s) for s in segments]


def warn_cut_blocks(blocks: Blocks, names: Iterable[str], path: str | None = None) -> None:
    """Warn when the selected `names` keep part of a block, not all of it (a count of layers
    that ends inside a ResNet block, or `include`/`exclude` that split a transformer layer)."""
    kept: dict[str, int] = defaultdict(int)
    for name in names:
        if name in blocks.of:
            kept[blocks.of[name]] += 1
    cut = [f"{b} ({k} of {blocks.size[b]} tensors)" for b, k in kept.items() if k < blocks.size[b]]
    if cut:
        warn(
            f"the selection keeps part of {len(cut)} block(s), whose tensors work together: "
            f"{few(cut)}",
            path=path,
            fix=spell(
                "choose --layers N so that it ends at a block, or --include/--exclude whole blocks",
                "choose layers=N so that it ends at a block, or include=/exclude= whole blocks",
            ),
        )


def few(items: Sequence[str], shown: int = 3) -> str:
    """The first `shown` items for a one-line message, and how many more."""
    head = ", ".join(items[:shown])
    return head + (f" and {len(items) - shown} more" if len(items) > shown else "")
