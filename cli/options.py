"""Option groups shared by several commands."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import click

from rwsfmt.errors import warn

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


def report_options(f: Callable) -> Callable:
    """Add --quiet and --json (what a command that writes one file prints when done)."""
    f = click.option(
        "--json", "as_json", is_flag=True, help="Print a JSON summary instead of the line."
    )(f)
    return click.option("--quiet", "-q", is_flag=True, help="No progress bar and no summary line.")(
        f
    )


STORAGE = ["bits", "granularity", "group_size", "affine"]  # the --help group quant_options adds


def quant_options(*, inherit: str | None = None) -> Callable:
    """Add --bits, --granularity, --group-size and --affine/--symmetric (how tensors are
    stored; default 8-bit symmetric per channel). With `inherit` (e.g. "the input"), options
    left out keep its settings (the command calls `inherited_quant`), and --help says so."""
    default_bits: int | None = 8
    helps = [
        "Bits per value: 4, 8 or 16 (linear quantization) or 32 (exact float32).",
        "One scale per output channel, per tensor, or per group of values.",
        "Values per scale with --granularity group.",
        "Affine (scale + zero point) or symmetric quantization.",
    ]
    if inherit is not None:
        default_bits = None
        helps = [f"{h} Default: as {inherit} is stored." for h in helps]
    show = inherit is None
    options = [
        click.option(
            "--bits",
            type=click.Choice(["4", "8", "16", "32"]),
            default=None if default_bits is None else str(default_bits),
            show_default=default_bits is not None,
            callback=lambda _ctx, _param, v: None if v is None else int(v),
            help=helps[0],
        ),
        click.option(
            "--granularity",
            type=click.Choice(["channel", "tensor", "group"]),
            default="channel",
            show_default=show,
            help=helps[1],
        ),
        click.option(
            "--group-size",
            type=click.IntRange(min=1, max=MAX_GROUP_SIZE),
            default=128,
            show_default=show,
            help=helps[2],
        ),
        click.option("--affine/--symmetric", default=False, show_default=show, help=helps[3]),
    ]

    def decorate(f: Callable) -> Callable:
        for option in reversed(options):
            f = option(f)
        return f

    return decorate


def quant_config(bits: int, granularity: str, group_size: int, affine: bool) -> QuantConfig:
    """The library's QuantConfig for the parsed options (imports torch: call it late); warns
    about storage options given on the command line that it does not use."""
    from rwsfmt.quant import QuantConfig

    if bits == 32:
        unused = [o for o in ("granularity", "group_size", "affine") if _given(o)]
        reason = "--bits 32 stores exact float32, without scales"
    else:
        unused = ["group_size"] if _given("group_size") and granularity != "group" else []
        reason = f"it sets the group size of --granularity group, not {granularity}"
    for name in unused:
        flag = "--affine/--symmetric" if name == "affine" else f"--{name.replace('_', '-')}"
        warn(f"{flag} has no effect: {reason}", fix=f"drop {flag}, or see --help")
    return QuantConfig(
        bits=bits, symmetric=not affine, granularity=granularity, group_size=group_size
    )


def _given(name: str) -> bool:
    """Whether the option `name` of the running command was given (not its default)."""
    from click.core import ParameterSource

    source = click.get_current_context().get_parameter_source(name)
    return source not in (ParameterSource.DEFAULT, None)


def inherited_quant(
    base: QuantConfig, bits: int | None, granularity: str, group_size: int, affine: bool
) -> QuantConfig:
    """`base` changed by the storage options given on the command line;
    those left out keep its settings."""
    return quant_config(
        bits if _given("bits") else base.bits,
        granularity if _given("granularity") else base.granularity,
        group_size if _given("group_size") else base.group_size,
        affine if _given("affine") else not base.symmetric,
    )
