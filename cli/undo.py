"""`rwsfmt undo`: restore a patched checkpoint with the undo file its apply wrote."""

from __future__ import annotations

import click

from .apply import apply
from .console import UsageError
from .options import trust_pickle_option


@click.command()
@click.argument("model", type=click.Path())
@click.argument("undo_file", type=click.Path(dir_okay=False), metavar="UNDO.rws")
@click.option(
    "-o",
    "--output",
    type=click.Path(),
    help="Where to write the restored model (as for apply).",
)
@click.option("--in-place", is_flag=True, help="Restore MODEL itself (atomically).")
@click.option("--dry-run", is_flag=True, help="Report what would change; write nothing.")
@trust_pickle_option()
@click.option("--quiet", "-q", is_flag=True, help="No summary.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON report instead of text.")
@click.pass_context
def undo(ctx: click.Context, model: str, undo_file: str, **options: object) -> None:
    """Restore MODEL, patched by `rwsfmt apply --save-undo UNDO.rws`, to its tensors before
    that patch, bit for bit: `apply MODEL UNDO.rws` at the only strength an undo file takes
    (1). A model changed since the patch is refused."""
    import rwsfmt
    from rwsfmt.undo import is_undo

    with rwsfmt.load(undo_file) as sig:
        if not is_undo(sig):
            raise UsageError(
                f"{undo_file} is not an undo file (its provenance says method "
                f"{sig.provenance.get('method')!r}, not 'undo')",
                fix="give the file `rwsfmt apply --save-undo` wrote; apply a signature with "
                "`rwsfmt apply MODEL SIG.rws --alpha A`",
            )
    ctx.invoke(apply, model=model, signatures=(undo_file,), alphas=(1.0,), **options)
