"""Option groups shared by several commands."""

from __future__ import annotations

from collections.abc import Callable

import click


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
            type=click.IntRange(min=1),
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
