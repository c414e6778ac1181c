"""Option groups shared by several commands."""

from __future__ import annotations

from collections.abc import Callable

import click

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


def rws_output_option(help: str) -> Callable:
    """The required `-o/--output OUT.rws` of commands that write a signature file."""
    return click.option(
        "-o",
        "--output",
        required=True,
        type=click.Path(dir_okay=False),
        metavar="OUT.rws",
        help=help,
    )


def quant_options(default_bits: int | None = 8) -> Callable:
    """Add --bits, --granularity, --group-size and --affine (how tensors are stored)."""
    bits_help = "Bits per value: 4, 8 or 16 (linear quantization) or 32 (exact float32)."
    if default_bits is None:
        bits_help += " Default: as the first input was stored."
    options = [
        click.option(
            "--bits",
            type=click.Choice(["4", "8", "16", "32"]),
            default=None if default_bits is None else str(default_bits),
            show_default=default_bits is not None,
            callback=lambda _ctx, _param, v: None if v is None else int(v),
            help=bits_help,
        ),
        click.option(
            "--granularity",
            type=click.Choice(["channel", "tensor", "group"]),
            default="channel",
            show_default=True,
            help="One scale per output channel, per tensor, or per group of values.",
        ),
        click.option(
            "--group-size",
            type=click.IntRange(min=1, max=MAX_GROUP_SIZE),
            default=128,
            show_default=True,
            help="Values per scale with --granularity group.",
        ),
        click.option(
            "--affine", is_flag=True, help="Affine (scale + zero point) instead of symmetric."
        ),
    ]

    def decorate(f: Callable) -> Callable:
        for option in reversed(options):
            f = option(f)
        return f

    return decorate


def quant_config(bits: int, granularity: str, group_size: int, affine: bool):
    """The library's QuantConfig for the parsed options (imports torch: call it late)."""
    from rwsfmt.quant import QuantConfig

    return QuantConfig(
        bits=bits, symmetric=not affine, granularity=granularity, group_size=group_size
    )
