"""The record of applied signatures that a patched checkpoint carries (no torch import).

Every `rwsfmt apply` appends one entry per signature to the output's record, a JSON list:

    [{"label": "fog", "file": "fog.rws", "sha256": "...", "alpha": 0.8, "stats": "convex",
      "tool_version": "0.1.0", "created": "2025-01-01T00:00:00Z"}, ...]

It lives where each format keeps metadata that a reader can get at without loading (let
alone unpickling) the weights:

- safetensors: the `__metadata__` string under `rwsfmt.applied`;
- PyTorch (`torch.save` zip files): an extra zip entry `<archive>/rwsfmt_applied.json` beside
  `data.pkl`, which `torch.load` ignores, so the state dict itself is untouched;
- Hugging Face folders: a file `rwsfmt_applied.json` beside the weights.

Undoing a patch removes its entries again (`rwsfmt.undo`).
"""

from __future__ import annotations

import json
import math
import os
import zipfile
from collections.abc import Mapping, Sequence
from typing import Any

from .errors import RwsError
from .inputs import open_input, sniff, strict_json
from .provenance import as_text, created_at

METADATA_KEY = "rwsfmt.applied"  # safetensors __metadata__ key
RECORD_FILE = "rwsfmt_applied.json"  # zip entry (inside the archive folder) and folder file
MAX_RECORD = 16 << 20

Record = list[dict[str, Any]]


def entry(
    label: str, path: str | None, sha256: str | None, alpha: float, stats: str
) -> dict[str, Any]:
    """One signature's entry: its label, file name and SHA-256, alpha, stats rule, tool, time."""
    from . import __version__

    return {
        "label": label,
        "file": as_text(os.path.basename(path)) if path else None,
        "sha256": sha256,
        "alpha": alpha,
        "stats": stats,
        "tool_version": __version__,
        "created": created_at(),
    }


def encode(record: Sequence[Mapping[str, Any]]) -> str:
    """The record as canonical JSON text (sorted keys, compact): one record, one text."""
    return json.dumps(list(record), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def decode(text: str | bytes | None, path: str) -> Record:
    """A stored record (None: the file has none) as a list of entries; `RwsError` when it
    is not a JSON list of objects."""
    if text is None:
        return []
    try:
        value = strict_json(text)
    except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        value = exc
    if not (isinstance(value, list) and all(isinstance(e, dict) for e in value)):
        raise RwsError(
            f"its record of applied signatures ({METADATA_KEY}) is not a JSON list of objects",
            path=path,
            fix=f"the file is damaged, or another tool wrote {METADATA_KEY}: re-save the "
            "model without it",
        )
    return value


def without(record: Sequence[Mapping[str, Any]], removed: Sequence[Mapping[str, Any]]) -> Record:
    """`record` with each entry of `removed` taken out once (its last occurrence)."""
    out = [dict(e) for e in record]
    for gone in removed:
        for i in range(len(out) - 1, -1, -1):
            if out[i] == gone:
                del out[i]
                break
    return out


# ---------------------------------------------------------------- PyTorch zip files


def _archive_folder(z: zipfile.ZipFile) -> str | None:
    """The folder `torch.save` put every entry in (`archive`), or None for another zip."""
    names = z.namelist()
    folder = names[0].split("/", 1)[0] if names and "/" in names[0] else None
    return folder if folder and f"{folder}/data.pkl" in names else None


def read_zip_record(path: str) -> Record:
    """The record stored in a `torch.save` zip file at `path` ([] if none or not a zip)."""
    with open_input(path, "a PyTorch file") as f:
        if not zipfile.is_zipfile(f):
            return []
        try:
            with zipfile.ZipFile(f) as z:
                folder = _archive_folder(z)
                name = f"{folder}/{RECORD_FILE}"
                if folder is None or name not in z.namelist():
                    return []
                if z.getinfo(name).file_size > MAX_RECORD:
                    raise RwsError(
                        f"its record of applied signatures is larger than {MAX_RECORD >> 20} MiB",
                        path=path,
                        fix="the file is damaged; re-save the model",
                    )
                text = z.read(name)
        except zipfile.BadZipFile as exc:
            raise RwsError(
                f"cannot be read as a zip file ({exc})",
                path=path,
                fix="the file is damaged; re-download or re-save it",
            ) from None
    return decode(text, path)


def append_zip_record(f: Any, record: Sequence[Mapping[str, Any]]) -> None:
    """Add the record as an entry of the `torch.save` zip file open in `f` (read and
    write), in the archive's own folder; a fixed timestamp keeps the bytes deterministic."""
    f.seek(0)
    with zipfile.ZipFile(f, "a") as z:
        folder = _archive_folder(z) or "archive"
        info = zipfile.ZipInfo(f"{folder}/{RECORD_FILE}", date_time=(1980, 1, 1, 0, 0, 0))
        z.writestr(info, encode(record).encode("utf-8"))


# ---------------------------------------------------------------- folders


def read_folder_record(folder: str) -> Record:
    """The record kept in `folder/rwsfmt_applied.json` ([] if there is none)."""
    path = os.path.join(folder, RECORD_FILE)
    if not os.path.lexists(path):
        return []
    with open_input(path, "a record file") as f:
        data = f.read(MAX_RECORD + 1)
    if len(data) > MAX_RECORD:
        raise RwsError(f"larger than {MAX_RECORD >> 20} MiB", path=path, fix="remove the file")
    return decode(data, path)


# ---------------------------------------------------------------- inspect MODEL


def describe_model(path: str | os.PathLike, *, trust_pickle: bool = False) -> dict[str, Any]:
    """A model checkpoint (file or folder) described as JSON-ready data: its format,
    tensors by dtype, and the signatures applied to it (`applied`)."""
    from .io import open_checkpoint

    with open_checkpoint(path, trust_pickle=trust_pickle) as ckpt:
        dtypes: dict[str, int] = {}
        parameters = 0
        for name in ckpt.names:
            dtype = str(ckpt.dtype(name)).removeprefix("torch.")
            dtypes[dtype] = dtypes.get(dtype, 0) + 1
            parameters += math.prod(ckpt.shape(name))
        return {
            "path": os.fspath(path),
            "format": str(ckpt.format),
            "folder": ckpt.folder,
            "sharded": ckpt.sharded,
            "layout": str(ckpt.layout),
            "tensor_count": len(ckpt.names),
            "parameters": parameters,
            "dtypes": dict(sorted(dtypes.items())),
            "applied": ckpt.applied,
        }


def is_model(path: str | os.PathLike) -> bool:
    """Whether `path` is a model checkpoint rather than a `.rws` file: a folder, or a regular
    file not named `.rws` whose first bytes are a safetensors or PyTorch file's."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return True
    if not os.path.isfile(path) or path.endswith(".rws"):
        return False
    try:
        return sniff(path) is not None
    except RwsError:
        return False
