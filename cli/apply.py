"""`rwsfmt apply`: patch a checkpoint file with one or more signatures."""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Sequence

import click

from rwsfmt.errors import RwsError
from rwsfmt.statsrule import DEFAULT_STATS, StatsRule

from .console import UsageError, progress_bar, say
from .options import (
    GroupedCommand,
    check_hub_options,
    hub_options,
    number_list,
    trust_pickle_option,
)
from .signing import public_key_option, signed_pairs

OPTION_GROUPS = {
    "Patching": ["alphas", "stats", "maps", "strict", "force"],
    "Output": ["output", "in_place", "dry_run", "save_undo"],
    "Running": ["device", "trust_pickle", "quiet", "as_json"],
    "Hugging Face ids": ["revision", "download"],
    "Signatures": ["key", "require_signature"],
}


@click.command(cls=GroupedCommand, groups=OPTION_GROUPS)
@click.argument("model", type=click.Path())
@click.argument(
    "signatures", nargs=-1, required=True, type=click.Path(dir_okay=False), metavar="SIG.rws..."
)
@click.option(
    "--alpha",
    "-a",
    "alphas",
    multiple=True,
    metavar="A[,A...]",
    callback=lambda ctx, param, values: tuple(number_list(values, "--alpha")),
    help="Strength: one for all signatures, or one per signature in order (repeated, or "
    "comma-separated: --alpha 0.8,0.3). Not needed for an undo file (always 1).",
)
@click.option(
    "--stats",
    type=click.Choice([r.value for r in StatsRule], case_sensitive=False),
    default=DEFAULT_STATS.value,
    show_default=True,
    help="How BatchNorm running statistics (target entries) compose: convex keeps them "
    "between std's and the targets' values (alphas scaled down when they sum past 1), sum "
    "adds every alpha * (target - std), keep leaves std's statistics as they are.",
)
@click.option(
    "--map",
    "maps",
    multiple=True,
    metavar="OLD=NEW",
    help="Rename signature tensors starting with OLD to start with NEW (repeatable).",
)
@click.option(
    "--strict",
    is_flag=True,
    help="Also require the whole architecture (not only the signature's tensors) to match.",
)
@click.option(
    "-o",
    "--output",
    type=click.Path(),
    help="Where to write the patched model: .safetensors, .pt/.pth/.bin (converting if the "
    "model is in the other format), or a folder for a folder MODEL. Default: a new file "
    "beside MODEL named after it and the signatures (model.pt + fog.rws: model-fog.pt).",
)
@click.option("--in-place", is_flag=True, help="Overwrite MODEL itself (atomically).")
@click.option("--dry-run", is_flag=True, help="Report what would change; write nothing.")
@click.option(
    "--save-undo",
    type=click.Path(dir_okay=False),
    metavar="UNDO.rws",
    help="Also write an undo file: `rwsfmt undo OUT UNDO.rws` (or applying it) restores "
    "MODEL's tensors bit for bit.",
)
@click.option(
    "--force",
    is_flag=True,
    help="Apply a signature that MODEL's record says was already applied (with a warning).",
)
@click.option(
    "--device", default="cpu", show_default=True, help="Where to compute: cpu, cuda or cuda:N."
)
@trust_pickle_option()
@click.option("--quiet", "-q", is_flag=True, help="No progress bar and no summary.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON report instead of text.")
@public_key_option(
    "Check each signed SIG.rws against this public key before any work: another key or a "
    "bad signature is refused."
)
@click.option(
    "--require-signature", is_flag=True, help="Also refuse unsigned SIG.rws files (needs --key)."
)
@hub_options
def apply(
    model: str,
    signatures: tuple[str, ...],
    alphas: tuple[float, ...],
    stats: str,
    maps: tuple[str, ...],
    strict: bool,
    output: str | None,
    in_place: bool,
    dry_run: bool,
    device: str,
    trust_pickle: bool,
    quiet: bool,
    save_undo: str | None,
    force: bool,
    as_json: bool,
    key: str | None,
    require_signature: bool,
    revision: str | None,
    download: bool,
) -> None:
    """Patch MODEL with SIG.rws files: std + alpha * signature, into a new file (or -o OUT).

    MODEL is a PyTorch (.pt/.pth/.bin/.ckpt) or safetensors file, a Hugging Face folder, or
    a Hugging Face id org/name[@REV] read from the local Hugging Face cache (never written).
    Without -o, the output is a new file or folder beside MODEL (for an id: in the current
    folder), named after MODEL and the signatures, never over an existing one. OUT's suffix
    names the format to write; in MODEL's own format every unpatched tensor, wrapper entry
    and metadata is kept byte for byte. Several signatures compose: their scaled deltas are
    summed in float32 and cast once; normalization statistics follow
    --stats.
    """
    from rwsfmt.io.open import refuse_signature
    from rwsfmt.patching import apply_checkpoint

    refuse_signature(model)  # before the signatures: `apply SIG.rws MODEL` says so
    alphas = alphas or _undo_alpha(signatures)
    if len(alphas) not in (1, len(signatures)):
        raise RwsError(
            f"{len(alphas)} --alpha values for {len(signatures)} "
            f"signature{'' if len(signatures) == 1 else 's'}",
            fix="give one --alpha for all the signatures, or one per signature, in order: "
            "--alpha 0.8,0.3",
        )
    check_hub_options([model], revision, download)
    chosen = output is None and not (in_place or dry_run)
    if in_place:
        output = output or model
    elif chosen:
        output = default_output(model, signatures)
    per_sig = alphas * len(signatures) if len(alphas) == 1 else alphas
    pairs = list(zip(signatures, per_sig, strict=True))

    report = apply_checkpoint(
        model,
        signed_pairs(pairs, key, require_signature),  # checked before any work
        output,
        map=maps,
        strict=strict,
        stats=stats,
        device=device,
        in_place=in_place,
        dry_run=dry_run,
        trust_pickle=trust_pickle,
        progress=progress_bar(quiet or as_json),
        force=force,
        save_undo=save_undo,
        revision=revision,
        download=download,
    )
    if as_json:
        click.echo(json.dumps(_report_json(report, pairs, stats), indent=2, sort_keys=True))
        return
    if dry_run:
        _print_changes(report)
    if not quiet:
        _print_summary(report, pairs, stats)
        if chosen:
            from rwsfmt.hub import is_hub_id

            where = (
                "in the current folder (the Hugging Face cache is never written)"
                if is_hub_id(model)
                else "beside the model"
            )
            say(f"  (no -o given: a new name {where}; -o OUT chooses another)")
    _print_record(report, quiet)


def default_output(model: str, signatures: Sequence[str]) -> str:
    """Where apply writes without -o: beside MODEL (in the current folder for a Hugging Face
    id), MODEL's name and the signatures' file stems: model.pt + fog.rws -> model-fog.pt,
    folder/ -> folder-fog/, org/name -> name-fog/; -2, -3, ... when the name is taken."""
    from rwsfmt.hub import is_hub_id
    from rwsfmt.inputs import sniff
    from rwsfmt.io.convert import SUFFIXES

    stems = [re.sub(r"[^\w.+-]", "_", os.path.splitext(os.path.basename(s))[0]) for s in signatures]
    tag = "+".join(stems) if len(stems) < 4 else f"{stems[0]}+{len(stems) - 1}more"
    if is_hub_id(model):
        folder, base, suffix = "", model.partition("@")[0].rpartition("/")[2], ""
    else:
        path = os.path.normpath(model)
        folder, base = os.path.split(path)
        suffix = ""
        if not os.path.isdir(path):
            base, suffix = os.path.splitext(base)
            if suffix.lower() not in SUFFIXES:  # the name must say the format to write
                kind = sniff(path)
                base, suffix = base + suffix, ".safetensors" if kind == "safetensors" else ".pt"
    for n in range(1, 100):
        candidate = os.path.join(folder, f"{base}-{tag}{f'-{n}' if n > 1 else ''}{suffix}")
        if not os.path.lexists(candidate):
            return candidate
    raise RwsError(
        "99 output names beside the model are taken", path=candidate, fix="choose one: -o OUT"
    )


def _undo_alpha(signatures: tuple[str, ...]) -> tuple[float, ...]:
    """The alpha of an apply without --alpha: 1 for one undo file (the only valid one)."""
    import rwsfmt
    from rwsfmt.undo import is_undo

    if len(signatures) == 1:
        with rwsfmt.load(signatures[0]) as sig:
            if is_undo(sig):
                return (1.0,)
    raise UsageError(
        "missing --alpha: how strongly to apply the signature(s)",
        fix="add --alpha 0.8 (one for all), or one per signature: --alpha 0.8,0.3",
    )


def _print_summary(report, pairs, stats: str) -> None:
    used = ", ".join(f"{os.path.basename(path)} x {alpha:g}" for path, alpha in pairs)
    verb = "patched" if report.written else "would patch"
    say(
        f"{verb} {len(report.changes)} of {report.tensors_in_model} tensors in "
        f"{report.model} ({report.format}) with {used}"
    )
    for m in report.matches:
        note = {
            "same": "same architecture as the signature's source model",
            "different": "only the signature's tensors match (another architecture or head)",
            "unknown": "the signature records no source architecture to compare",
        }[m.architecture]
        say(f"  {os.path.basename(m.source)}: {note}")
        if m.aligned:
            old, new = m.aligned
            how = f"prefix {new!r} added" if not old else f"prefix {old!r} removed"
            say(f"    names aligned to the model's: {how} (use --map to choose)")
        if m.translated:
            say(f"    {m.translated}")
        for tied in m.tied:
            say(f"    {tied}: tied to a tensor already patched, applied once")
    statistics = sum(change.statistics for change in report.changes)
    if statistics:
        say(
            f"  {statistics} normalization statistics composed with "
            f"--stats {StatsRule.parse(stats).value}"
        )
    if not report.written:
        say("dry run: nothing written")
        return
    converted = report.output_format not in (None, report.format)
    say(f"wrote {report.output}" + (f" ({report.output_format})" if converted else ""))
    for note in report.notes:
        say(f"  note: {note}")


def _print_record(report, quiet: bool) -> None:
    """What the record and the undo file say."""
    if quiet:
        return
    if report.undone:
        say("  undo: the tensors are back to the model's before that patch, bit for bit")
    if report.undo:
        say(f"wrote undo file {report.undo} (`rwsfmt undo` with it restores the model)")


def _print_changes(report) -> None:
    """One plain line per tensor (pipe-friendly): shape, dtype, norms of the change, name."""
    say(f"{'shape':>16}  {'dtype':<9} {'|change|':>10} {'relative':>9}  name (signatures)")
    for c in report.changes:
        shape = "x".join(map(str, c.shape)) or "scalar"
        rel = "-" if c.relative_change is None else f"{c.relative_change:.3g}"
        say(
            f"{shape:>16}  {c.dtype:<9} {c.change_norm:>10.4g} {rel:>9}  "
            f"{c.name} ({', '.join(c.signatures)})"
        )


def _report_json(report, pairs, stats: str) -> dict:
    """What --json prints: the run's parameters, every tensor changed, every match."""
    matches = [
        {
            "source": m.source,
            "label": m.label,
            "architecture": m.architecture,
            "aligned": list(m.aligned) if m.aligned else None,
            "translated": m.translated,
            "tied": list(m.tied),
        }
        for m in report.matches
    ]
    return {
        "model": report.model,
        "output": report.output,
        "written": report.written,
        "format": report.format,
        "output_format": report.output_format,
        "signatures": [{"path": path, "alpha": alpha} for path, alpha in pairs],
        "stats": StatsRule.parse(stats).value,
        "tensors_in_model": report.tensors_in_model,
        "changes": [dataclasses.asdict(c) for c in report.changes],
        "matches": matches,
        "notes": report.notes,
    }
