"""Signatures to and from safetensors, for tools that know nothing of `.rws` files.

    rwsfmt.export_safetensors(sig, "fog.safetensors")    # every tensor dequantized, float32
    sig = rwsfmt.import_safetensors("task_vector.safetensors", label="sketch")

An exported file carries the signature's header fields as safetensors metadata (strings
under `rwsfmt.` keys), so importing it restores the label, the entry kinds, source dtypes,
statistics, fingerprints and provenance. Any other safetensors file of floating tensors
(a task vector made elsewhere, say) imports as a signature of `delta` entries.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch

from . import lora
from .container import KINDS, SOURCE_DTYPES, VERSION, canonical_json
from .conversion import file_record, prior_error, requantized
from .deltacheck import DeltaCheck
from .errors import RwsError, as_path, spell, warn
from .extraction import Progress, default_label
from .inputs import strict_json
from .io.base import Format
from .io.open import sniff
from .io.safetensors import SafetensorsCheckpoint, write_file
from .names import natural_sorted
from .provenance import base_provenance
from .quant import QuantConfig
from .select import checkpoint_order
from .signature import Signature, SignatureBuilder, SignatureLike, as_signature

PREFIX = "rwsfmt."  # metadata keys of an exported signature
FORMAT_VERSION = f"{VERSION[0]}.0"  # the header fields an export carries are those of 1.0
_RESERVED = "__metadata__"  # the one name a safetensors file cannot give a tensor


def export_safetensors(
    sig: SignatureLike, path: str | os.PathLike, *, progress: Progress | None = None
) -> None:
    """Write every tensor of `sig`, dequantized to float32, to a safetensors file at `path`
    (atomically; the same signature gives the same bytes), with its header fields as
    metadata (see `export_metadata`). `sig` is a `Signature` or the path of a `.rws` file."""
    sig = as_signature(sig)
    if _RESERVED in sig:
        raise RwsError(
            f"tensor {_RESERVED!r} cannot be stored in a safetensors file, which reserves "
            "the name for its metadata",
            path=sig.path,
            fix="rename the tensor before exporting",
        )
    track = progress or (lambda items, total, description: items)
    decoded: Iterator[torch.Tensor] = (
        sig.tensor(name) for name in track(sig.names, len(sig), "exporting")
    )
    specs = [(info.name, torch.float32, info.shape) for info in sig.infos]
    try:  # write_file fetches the tensors one at a time, in the order of `specs`
        write_file(path, specs, lambda _name: next(decoded), export_metadata(sig))
    finally:
        decoded.close()


def export_metadata(sig: Signature) -> dict[str, str]:
    """The safetensors metadata of an exported signature: `rwsfmt.format_version`,
    `.label`, and as JSON `.fingerprint`, `.provenance`, `.kinds` (target entries),
    `.dtypes` (source dtypes other than float32) and `.stats` (per-tensor statistics)."""
    infos = sig.infos
    fields = {
        "format_version": FORMAT_VERSION,
        "label": sig.label,
        "fingerprint": _json(sig.fingerprint),
        "provenance": _json(sig.provenance),
        "kinds": _json({i.name: i.kind for i in infos if i.kind != "delta"}),
        "dtypes": _json({i.name: i.dtype for i in infos if i.dtype != "float32"}),
        "stats": _json({i.name: i.stats for i in infos if i.stats}),
    }
    # "format": "pt" is what Hugging Face writes and some loaders look for
    return {"format": "pt", **{PREFIX + key: value for key, value in fields.items()}}


def import_safetensors(
    path: str | os.PathLike,
    *,
    label: str | None = None,
    quant: QuantConfig | None = None,
    progress: Progress | None = None,
) -> Signature:
    """A signature from a safetensors file, or a PEFT LoRA adapter, stored per `quant`
    (default 8-bit), read one tensor at a time.

    A file `export_safetensors` wrote gets back its label, kinds, dtypes, statistics,
    fingerprints and provenance (plus an `imported` record). A PEFT LoRA adapter (its folder,
    or its adapter_model.safetensors beside adapter_config.json) becomes the deltas
    scale * B @ A under the base model's weight names (`rwsfmt.lora`). Any other file
    becomes `delta` entries in depth order (naming rules, as for extract), its provenance
    naming the file, with an `RwsWarning` when they look like a model's weights rather than
    differences (`rwsfmt.deltacheck`). The label defaults as extract's does, from the file's
    name or its folder's (`runs/fog/model.safetensors` -> `fog`). Integer and bool tensors
    (e.g. `num_batches_tracked`) are skipped and listed under the input's `skipped`; a file
    with no floating tensor is refused.
    """
    path = as_path(path, "the path of a safetensors file or a PEFT adapter folder")
    if os.path.isdir(path):
        return _import_lora(path, label, quant, progress)
    _refuse_other_formats(path)
    with SafetensorsCheckpoint(path) as ckpt:
        adapter = lora.is_lora(ckpt.names)
    if adapter:
        return _import_lora(path, label, quant, progress)
    track = progress or (lambda items, total, description: items)
    with SafetensorsCheckpoint(path) as ckpt:
        fields = _exported_fields(ckpt.metadata, path)
        floating = {n for n in ckpt.names if ckpt.dtype(n).is_floating_point}
        skipped = [
            {"name": n, "dtype": str(ckpt.dtype(n)).removeprefix("torch.")}
            for n in ckpt.names
            if n not in floating
        ]
        if not floating:
            found = ", ".join(sorted({s["dtype"] for s in skipped})) or "none at all"
            raise RwsError(
                f"holds no floating-point tensors (tensors found: {found}), so there is "
                "nothing to import",
                path=path,
                fix="a signature is made of float16, bfloat16, float32 or float64 tensors "
                "(weight differences); save those",
            )
        if fields:  # rwsfmt wrote the data in the signature's order
            order, selection = ckpt.write_order, None
        else:
            depth = checkpoint_order(ckpt)
            order, selection = depth.names, depth.to_json()
        names = [n for n in order if n in floating]
        kinds, dtypes, stats = (fields.get(key, {}) for key in ("kinds", "dtypes", "stats"))
        builder = SignatureBuilder(
            label if label is not None else fields.get("label") or default_label(path),
            quant or QuantConfig(),
        )
        check = DeltaCheck()
        for name in track(names, len(names), "importing"):
            extra = dict(stats.get(name, {}))
            prior = prior_error(extra.pop("quant_rel_error", None))
            tensor = ckpt.tensor(name)
            if not fields:
                check.add(name, tensor)
            with _about(path):
                builder.add(
                    name,
                    tensor,
                    kind=kinds.get(name, "delta"),
                    dtype=getattr(torch, dtypes[name]) if name in dtypes else ckpt.dtype(name),
                    stats=extra,
                    prior_error=prior,
                )
    why = check.verdict()
    if why:
        warn(
            f"these look like a model's weights, not differences between two models: {why}; "
            "applied, they would add the model to itself (doubling its weights)",
            path=path,
            fix="import the difference (fine-tuned minus base), or extract it: "
            + spell(
                "rwsfmt extract BASE FINETUNED --method subtract",
                "rwsfmt.extract(base, finetuned, method='subtract')",
            ),
        )
    record = file_record(path)
    if skipped:
        record["skipped"] = skipped
    provenance: dict[str, Any]
    if fields:
        imported = {"from": fields["provenance"].get("quantization"), **record}
        provenance = requantized(
            fields["provenance"], builder.quant, imported={**imported, **base_provenance()}
        )
        model = fields["fingerprint"].get("model")
    else:
        provenance = {
            "method": "import",
            "inputs": [{"role": "source", **record}],
            "selection": selection,
        }
        model = None
    return builder.build(provenance, model if isinstance(model, str) and model else None)


def _import_lora(
    path: str, label: str | None, quant: QuantConfig | None, progress: Progress | None
) -> Signature:
    """The deltas a PEFT LoRA adapter (folder or weights file) stands for (`rwsfmt.lora`)."""
    weights, config_path = lora.adapter_files(path)
    config = lora.read_config(config_path)
    _refuse_other_formats(weights)
    track = progress or (lambda items, total, description: items)
    with SafetensorsCheckpoint(weights) as ckpt:
        planned, whole = lora.plan(ckpt, natural_sorted(ckpt.names))
        builder = SignatureBuilder(label or default_label(path), quant or QuantConfig())
        for delta in track(planned, len(planned), "importing LoRA"):
            with _about(weights):
                builder.add(delta.name, lora.expand(ckpt, delta, config), dtype=ckpt.dtype(delta.a))
    if whole:
        shown = ", ".join(whole[:5]) + (f" and {len(whole) - 5} more" if len(whole) > 5 else "")
        warn(
            f"{len(whole)} tensor(s) hold whole values, not LoRA factors: {shown} "
            "(modules_to_save, trained biases); a signature holds differences, so they are "
            "left out",
            path=weights,
            fix="apply them with PEFT, or merge the adapter (merge_and_unload), save the model "
            "and extract a signature against the base model",
        )
    provenance = {
        "method": "import-lora",
        "inputs": [
            {"role": "adapter", **file_record(weights)},
            {"role": "adapter config", **file_record(config_path)},
        ],
        "lora": {**lora.describe(config), "left_out": whole},
    }
    return builder.build(provenance)


@contextlib.contextmanager
def _about(path: str) -> Iterator[None]:
    """The builder's errors, with the file they are about."""
    try:
        yield
    except RwsError as exc:
        raise RwsError(exc.problem, path=path, fix=exc.fix) from None


def _refuse_other_formats(path: str) -> None:
    """Raise `RwsError` unless the file at `path` holds safetensors bytes (by its bytes)."""
    kind = sniff(path)
    if kind == Format.SAFETENSORS:
        return
    if kind == Format.PYTORCH:
        raise RwsError(
            "is a PyTorch file, not safetensors",
            path=path,
            fix="save its tensors with safetensors.torch.save_file first",
        )
    raise RwsError(
        "is not a safetensors file",
        path=path,
        fix="give a .safetensors file (a .rws file needs no import; convert re-quantizes one)",
    )


def _exported_fields(metadata: dict[str, str], path: str) -> dict[str, Any]:
    """The header fields an exported signature carries as metadata, checked; {} for a file
    rwsfmt did not write."""
    version = metadata.get(PREFIX + "format_version")
    if version is None:
        return {}
    if version.partition(".")[0] != str(VERSION[0]):
        raise RwsError(
            f"was exported by an rwsfmt of format version {version!r}; this one knows "
            f"{FORMAT_VERSION}",
            path=path,
            fix="upgrade rwsfmt (pip install -U rwsfmt) to import it",
        )

    def bad(key: str, problem: str) -> RwsError:
        return RwsError(
            f"metadata {PREFIX}{key} {problem}",
            path=path,
            fix=f"export the signature again, or remove the {PREFIX}* metadata to import the "
            "tensors as plain deltas",
        )

    fields: dict[str, Any] = {}
    for key in ("fingerprint", "provenance", "kinds", "dtypes", "stats"):
        try:
            value = strict_json(metadata.get(PREFIX + key, "{}"))
            canonical_json(value)  # text that cannot be written back (a lone surrogate)
        except ValueError as exc:
            raise bad(key, f"is not valid JSON ({exc})") from None
        if not isinstance(value, dict):
            raise bad(key, "is not a JSON object")
        fields[key] = value
    for key, allowed in (("kinds", KINDS), ("dtypes", SOURCE_DTYPES)):
        wrong = [k for k, v in fields[key].items() if v not in allowed]
        if wrong:
            raise bad(key, f"gives {wrong[0]!r} a value other than {', '.join(allowed)}")
    wrong = [k for k, v in fields["stats"].items() if not isinstance(v, dict)]
    if wrong:
        raise bad("stats", f"gives {wrong[0]!r} a value that is not a JSON object")
    label = metadata.get(PREFIX + "label", "")
    try:
        label.encode("utf-8")
    except UnicodeEncodeError:
        raise bad("label", "is not valid Unicode (it holds a lone surrogate)") from None
    return {**fields, "label": label}


def _json(value: Any) -> str:
    return canonical_json(value).decode("utf-8")
