"""Which tensors a signature covers: layers in depth order, regular expressions, norm energy.

A *layer* is a module owning a >=2-D floating weight (conv, linear, embedding). The
shallowest N layers are every floating tensor from the start of the depth order up to, not
including, the first tensor of the (N+1)-th layer. Normalization statistics
(`running_mean`, `running_var`) are `target` entries; integer buffers are never selected.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

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


def layer_segments(ckpt: Checkpoint, order: DepthOrder) -> list[list[str]]:
    """The checkpoint's floating tensors in depth order, cut into layers.

    Segment k starts at the first tensor of the k-th layer module; tensors before the first
    layer (a ViT's `cls_token` and `pos_embed`) belong to the first segment.
    """
    names = [n for n in order.names if ckpt.dtype(n).is_floating_point]
    first_of_module: dict[str, int] = {}
    for i, name in enumerate(names):
        first_of_module.setdefault(_module(name), i)
    starts = sorted({first_of_module[_module(n)] for n in names if is_layer_weight(ckpt, n)})
    if not starts:
        starts = [0]
    starts[0] = 0
    bounds = [*starts, len(names)]
    return [names[a:b] for a, b in zip(bounds, bounds[1:], strict=False) if b > a]


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
    ) -> Rule:
        """Validate options. `layers=None` means the paper's 5 shallowest layers, or all layers
        when `include` or `energy` already narrow the selection."""
        chosen = layers is not None
        if layers is None:
            layers = "all" if include is not None or energy is not None else DEFAULT_LAYERS
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


def select(ckpt: Checkpoint, rule: Rule, order: DepthOrder) -> list[list[str]]:
    """The layers (lists of tensor names, depth order) the rule keeps before any energy cut."""
    segments = layer_segments(ckpt, order)
    if rule.layers != "all":
        if rule.chosen and int(rule.layers) > len(segments):
            warn(
                f"{_option('layers', rule.layers)} asks for more "
                f"layers than the model has ({len(segments)}): all {len(segments)} are kept",
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
