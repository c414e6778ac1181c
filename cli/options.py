"""Option groups shared by several commands."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import click

from rwsfmt.errors import warn

from .console import UsageError

if TYPE_CHECKING:
    from rwsfmt.quant import QuantConfig

MAX_GROUP_SIZE = 1 << 31  # the format's limit (spec section 9), repeated here so that
# --help does not import the library


class GroupedCommand(click.Command):
    """A command whose --help lists options under headings: `groups` maps a heading to
    option names, in order; options not named there are listed under "Other"."""

    def __init__(self, *args, groups: dict[str, list[str]], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.groups = groups

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        options = [p for p in self.get_params(ctx) if isinstance(p, click.Option)]
        records = {p.name: p.get_help_record(ctx) for p in options}
        sections = [(t, [records.pop(n) for n in names]) for t, names in self.groups.items()]
        sections.append(("Other", [r for r in records.values() if r]))
        for title, rows in sections:
            if rows:
                with formatter.section(title):
                    formatter.write_dl(rows)


def rws_output_option(help: str, metavar: str = "OUT.rws") -> Callable:
    """The required `-o/--output OUT.rws` of commands that write a file (a signature, unless
    `metavar` says otherwise)."""
    return click.option(
        "-o",
        "--output",
        required=True,
        type=click.Path(dir_okay=False),
        metavar=metavar,
        help=help,
    )


def trust_pickle_option(what: str = "a PyTorch MODEL") -> Callable:
    """--trust-pickle, for commands that read PyTorch checkpoints (`what` names them)."""
    return click.option(
        "--trust-pickle",
        is_flag=True,
        help=f"Allow arbitrary pickled objects in {what}: this runs code stored in the file, "
        "so only for files you trust.",
    )


def hub_options(f: Callable) -> Callable:
    """Add --revision and --download, for commands whose checkpoints may be Hugging Face ids
    (`org/name`, read from the local Hugging Face cache)."""
    f = click.option(
        "--download",
        is_flag=True,
        help="Download a Hugging Face id missing from the local cache (default: read the cache "
        "only; HF_HUB_OFFLINE=1 forbids downloads).",
    )(f)
    return click.option(
        "--revision",
        metavar="REV",
        help="Branch, tag or commit of checkpoints given as Hugging Face ids org/name (default "
        "main; org/name@REV names one per id).",
    )(f)


def check_hub_options(sources: list[str | None], revision: str | None, download: bool) -> None:
    """Warn about --revision or --download given where no checkpoint is a Hugging Face id."""
    from rwsfmt.hub import is_hub_id

    if any(is_hub_id(s) for s in sources):
        return
    for flag, given in (("--revision", revision), ("--download", download)):
        if given:
            _unused(flag, "no checkpoint is a Hugging Face id (org/name) missing locally")


def number_list(values: str | tuple[str, ...], flag: str) -> list[float]:
    """Finite numbers from comma-separated text, from one option or several given again
    (`--alpha 0.8,0.3` is `--alpha 0.8 --alpha 0.3`)."""
    texts = (values,) if isinstance(values, str) else values
    out = []
    for text in texts:
        try:
            numbers = [float(part) for part in text.split(",")]
        except ValueError:
            raise click.BadParameter(
                f"{text!r} is not a comma-separated list of numbers",
                param_hint=flag,
            ) from None
        if not all(math.isfinite(x) for x in numbers):
            raise click.BadParameter(f"{text!r} holds a value that is not finite", param_hint=flag)
        out += numbers
    return out


def report_options(f: Callable) -> Callable:
    """Add --quiet and --json (what a command that writes one file prints when done)."""
    f = click.option(
        "--json", "as_json", is_flag=True, help="Print a JSON summary instead of the line."
    )(f)
    return click.option("--quiet", "-q", is_flag=True, help="No progress bar and no summary line.")(
        f
    )


STORAGE = [  # the --help group quant_options adds, by the parameters' names
    "bits",
    "target_bpp",
    "store_density",
    "sparsity",
    "fit",
    "granularity",
    "group_size",
    "affine",
]
BITS = ("1", "2", "4", "8", "16", "32", "auto")


def quant_options(*, inherit: str | None = None, density_flag: str = "--density") -> Callable:
    """Add the storage options --bits, --target-bpp, --density, --sparsity, --fit,
    --granularity, --group-size and --affine/--symmetric (default 8-bit symmetric per
    channel, every entry kept); the command receives them as one `storage: Storage`
    argument. With `inherit`
    (e.g. "the input"), options left out keep its settings (the command calls
    `storage.inherit`), and --help says so. `density_flag` names --density where the command
    has a --density of its own (merge: --store-density)."""
    helps = [
        "Bits per value: 1 (signs + scale), 2, 4, 8, 16 (linear codes), 32 (exact float32), "
        "or auto (a scheme per tensor to fit --target-bpp).",
        "With --bits auto: bits per parameter for the whole file, header included.",
        "Share (0 < D <= 1) of each tensor's entries kept, the largest; the rest are 0.",
        f"Keep the {density_flag} share of each tensor, or of each output channel.",
        "Scales of 1/2-bit and sparse storage: the least squared error, or keep the "
        "signature's direction (its projection on the original).",
        "One scale per output channel, per tensor, or per group of values.",
        "Values per scale with --granularity group.",
        "Affine (scale + zero point) or symmetric quantization.",
    ]
    if inherit is not None:
        helps = [f"{h} Default: {inherit}'s." for h in helps]
    show = inherit is None
    options = [
        click.option(
            "--bits",
            type=_BitsChoice(BITS),
            default="8" if show else None,
            show_default=show,
            callback=lambda _ctx, _param, v: v if v in (None, "auto") else int(v),
            help=helps[0],
        ),
        click.option(
            "--target-bpp",
            type=float,
            metavar="B",
            callback=_check_target_bpp,
            help=helps[1],
        ),
        click.option(
            density_flag,
            "store_density",
            type=float,
            metavar="D",
            default=1.0 if show else None,
            show_default=show,
            callback=_check_density,
            help=helps[2],
        ),
        click.option(
            "--sparsity",
            type=click.Choice(["tensor", "channel"]),
            default="tensor",
            show_default=show,
            help=helps[3],
        ),
        click.option(
            "--fit",
            type=click.Choice(["error", "direction"]),
            default="error",
            show_default=show,
            help=helps[4],
        ),
        click.option(
            "--granularity",
            type=click.Choice(["channel", "tensor", "group"]),
            default="channel",
            show_default=show,
            help=helps[5],
        ),
        click.option(
            "--group-size",
            type=click.IntRange(min=1, max=MAX_GROUP_SIZE),
            default=128,
            show_default=show,
            help=helps[6],
        ),
        click.option("--affine/--symmetric", default=False, show_default=show, help=helps[7]),
    ]

    def decorate(f: Callable) -> Callable:
        @functools.wraps(f)  # also carries the options declared below this decorator
        def command(*args, **kwargs):
            given = {name: kwargs.pop(name) for name in STORAGE}
            storage = Storage(
                bits=given["bits"],
                target_bpp=given["target_bpp"],
                density=given["store_density"],
                sparsity=given["sparsity"],
                fit=given["fit"],
                granularity=given["granularity"],
                group_size=given["group_size"],
                affine=given["affine"],
                density_flag=density_flag,
                source=inherit,
            )
            return f(*args, storage=storage, **kwargs)

        for option in reversed(options):
            command = option(command)
        return command

    return decorate


class _BitsChoice(click.Choice):
    """--bits's choices, refusing others with the fix (click's message lists them only)."""

    def convert(self, value, param, ctx):
        try:
            return super().convert(value, param, ctx)
        except click.BadParameter:
            raise UsageError(
                f"--bits {value} is not a width rwsfmt stores",
                fix="use --bits 1, 2, 4, 8, 16 or 32, or --bits auto with --target-bpp B",
                ctx=ctx,
            ) from None


def _check_density(ctx: click.Context, param: click.Parameter, value: float | None) -> float | None:
    """--density as a share of entries: above 0, at most 1."""
    if value is not None and not (math.isfinite(value) and 0 < value <= 1):
        flag = param.opts[0]
        raise UsageError(
            f"{flag} {value:g} is not a share of entries: it must be above 0 and at most 1 "
            "(1 keeps every entry)",
            fix=f"e.g. {flag} 0.1 stores the largest 10% of each tensor's entries",
            ctx=ctx,
        )
    return value


def _check_target_bpp(
    ctx: click.Context, _param: click.Parameter, value: float | None
) -> float | None:
    """--target-bpp as a number of bits per parameter: above 0, at most 32."""
    if value is not None and not (math.isfinite(value) and 0 < value <= 32):
        raise UsageError(
            f"--target-bpp {value:g} is not a number of bits per parameter: it must be above 0 "
            "and at most 32",
            fix="e.g. --bits auto --target-bpp 0.5",
            ctx=ctx,
        )
    return value


@dataclass(frozen=True)
class Storage:
    """The storage options as parsed (None: left out, in a command that inherits them from
    `source`, e.g. "the input")."""

    bits: int | str | None
    target_bpp: float | None
    density: float | None
    sparsity: str
    fit: str
    granularity: str
    group_size: int
    affine: bool
    density_flag: str = "--density"
    source: str | None = None

    def config(self) -> QuantConfig:
        """The library's QuantConfig for the options (imports torch: call it late); refuses
        combinations no file can hold (usage errors, exit 2) and warns about options given
        on the command line that have no effect."""
        return self._resolve(None)

    def inherit(self, base: QuantConfig) -> QuantConfig:
        """`base` (how `source` is stored) changed by the options given on the command line:
        those left out keep its settings, where they apply to what was given."""
        return self._resolve(base)

    def _resolve(self, base: QuantConfig | None) -> QuantConfig:
        from rwsfmt.quant import QuantConfig

        def pick(name: str, ours: object, theirs: object) -> object:
            return ours if base is None or _given(name) else theirs

        b = base or QuantConfig()
        bits = pick("bits", self.bits, b.bits)
        bits_flag = "--bits" if base is None or _given("bits") else self.source
        auto = bits == "auto"
        target = self._target(bits, bits_flag, base)
        density = pick("store_density", self.density, b.density)
        flag = self.density_flag
        if auto:
            if _given("store_density"):
                _unused(flag, "--bits auto chooses how much of each tensor to keep")
            density = 1.0
        sparsity = pick("sparsity", self.sparsity, b.sparsity)
        if _given("sparsity") and not auto and density == 1:
            _unused(
                "--sparsity",
                f"it says where {flag} picks the kept entries, and every entry is kept",
                fix=f"add {flag} D (below 1), or drop --sparsity",
            )
        fit = pick("fit", self.fit, b.fit)
        if _given("fit") and not (bits in (1, 2, "auto") or density < 1):
            _unused("--fit", f"{bits}-bit dense codes keep their direction already")
        granularity = pick("granularity", self.granularity, b.granularity)
        group_size = pick("group_size", self.group_size, b.group_size)
        symmetric = pick("affine", not self.affine, b.symmetric)
        if bits == 1:
            if _given("affine") and self.affine:
                where = "--bits 1 stores" if bits_flag == "--bits" else f"{bits_flag} holds 1-bit"
                raise UsageError(
                    f"--affine adds a zero point to linear codes; {where} signs and a scale, "
                    "which have none",
                    fix="drop --affine, or give --bits 2 (or more) with it",
                )
            if _given("affine"):
                _unused("--affine/--symmetric", "1-bit signs are symmetric about 0 already")
            symmetric = True  # an inherited --affine does not apply to signs
        elif bits == 32:
            for name in ("granularity", "group_size", "affine"):
                if _given(name):
                    _unused(_flag(name), "--bits 32 stores exact float32, without scales")
        if bits != 32 and _given("group_size") and granularity != "group":
            _unused(
                "--group-size", f"it sets the group size of --granularity group, not {granularity}"
            )
        return QuantConfig(
            bits=bits,
            symmetric=symmetric,
            granularity=granularity,
            group_size=group_size,
            density=density,
            sparsity=sparsity,
            target_bpp=target,
            fit=fit,
        )

    def _target(
        self, bits: int | str, bits_flag: str | None, base: QuantConfig | None
    ) -> float | None:
        """--target-bpp: given with --bits auto, or kept from an input stored so."""
        if bits != "auto":
            if not _given("target_bpp"):
                return None
            stored = f"--bits {bits}" if bits_flag == "--bits" else f"{bits_flag} ({bits}-bit)"
            raise UsageError(
                f"--target-bpp is the budget of --bits auto; it does not apply to {stored}",
                fix="add --bits auto (a scheme per tensor, to fit the budget), or drop "
                "--target-bpp",
            )
        if _given("target_bpp"):
            return self.target_bpp
        if base is not None and base.bits == "auto":  # an input stored so: its budget
            return base.target_bpp
        raise UsageError(
            "--bits auto needs --target-bpp B: the bits per parameter the whole file may "
            "take, which it picks a scheme per tensor to fit",
            fix="e.g. --bits auto --target-bpp 0.5",
        )


def _flag(name: str) -> str:
    return "--affine/--symmetric" if name == "affine" else f"--{name.replace('_', '-')}"


def _unused(flag: str, reason: str, fix: str | None = None) -> None:
    warn(f"{flag} has no effect: {reason}", fix=fix or f"drop {flag}, or see --help")


def _given(name: str) -> bool:
    """Whether the option `name` of the running command was given (not its default)."""
    from click.core import ParameterSource

    source = click.get_current_context().get_parameter_source(name)
    return source not in (ParameterSource.DEFAULT, None)
