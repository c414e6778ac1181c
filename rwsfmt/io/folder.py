"""Hugging Face style folders: `config.json` and friends beside the weights, which are one
file (`model.safetensors`, `pytorch_model.bin`) or shards listed by an index JSON."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Callable, Mapping, Sequence
from functools import cached_property
from typing import Any

import torch

from ..applied import RECORD_FILE, encode, read_folder_record
from ..atomic import atomic_folder, atomic_path, atomic_write
from ..errors import RwsError, spell
from ..inputs import open_input, strict_json
from ..names import natural_sorted
from .base import Checkpoint

SAFETENSORS_INDEX = "model.safetensors.index.json"
PYTORCH_INDEX = "pytorch_model.bin.index.json"
SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")
MAX_INDEX = 100 << 20  # real indexes are a few hundred KB
# Files holding weights in some format: never copied into a patched folder, where they would
# sit unpatched beside the patched ones and could be loaded instead of them.
WEIGHT_SUFFIXES = (
    ".safetensors",
    ".bin",
    ".pt",
    ".pth",
    ".ckpt",
    ".h5",
    ".msgpack",
    ".onnx",
    ".gguf",
)
_WEIGHT_INDEXES = (".safetensors.index.json", ".bin.index.json")
# The training state Hugging Face's Trainer (and accelerate) save in a checkpoint-N/ folder
# beside the weights: pickles with weight suffixes that hold no weights (the arguments, the
# optimizer's and scheduler's state, random states), copied as they are, like config files.
TRAINING_STATE = re.compile(
    r"(training_args|optimizer|scheduler|scaler|rng_state(_\d+)?|random_states(_\d+)?)"
    r"\.(bin|pt|pth|pkl)"
)

Opener = Callable[[str], Checkpoint]


def find_weights(path: str) -> tuple[str, dict[str, str] | None]:
    """(the index or single weight file in folder `path`, its weight map or None)."""
    for index in (SAFETENSORS_INDEX, PYTORCH_INDEX):
        index_path = os.path.join(path, index)
        if os.path.lexists(index_path):
            return index, _weight_map(index_path)
    for single in SINGLE_FILES:
        if os.path.lexists(os.path.join(path, single)):
            return single, None
    raise RwsError(
        "folder holds no checkpoint",
        path=path,
        fix=f"expected {SAFETENSORS_INDEX}, {PYTORCH_INDEX}, or one of {', '.join(SINGLE_FILES)}",
    )


def _weight_map(index_path: str) -> dict[str, str]:
    """The index's tensor name -> shard file name map, each shard a plain file name in the
    folder (never a path leading out of it)."""

    def bad(problem: str) -> RwsError:
        return RwsError(
            f"is not a valid index: {problem}",
            path=index_path,
            fix="re-download the folder or re-save it with save_pretrained",
        )

    with open_input(index_path, "an index file") as f:
        data = f.read(MAX_INDEX + 1)
    if len(data) > MAX_INDEX:
        raise bad(f"larger than {MAX_INDEX >> 20} MiB")
    try:
        doc = strict_json(data.decode("utf-8"))
    except ValueError as exc:
        raise bad(f"not JSON ({exc})") from None
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise bad("expected a JSON object whose 'weight_map' maps tensor names to shard files")
    for name, shard in weight_map.items():
        if not isinstance(shard, str):
            raise bad(f"tensor {name!r} maps to {shard!r}, not a shard file name")
        if shard in ("", ".", "..") or any(c in shard for c in "/\\\0"):
            raise bad(
                f"tensor {name!r} maps to {shard!r}, not the name of a file in the folder "
                "(paths are refused: a shard outside the folder could be any file)"
            )
    return weight_map


class FolderCheckpoint(Checkpoint):
    """The weights of a folder, read through one checkpoint per file; writing rewrites the
    touched files and copies the others, config and tokenizer files included."""

    folder = True

    def __init__(self, path: str, open_file: Opener) -> None:
        entry, weight_map = find_weights(path)
        self.sharded = weight_map is not None
        shard_files = sorted(set(weight_map.values())) if weight_map else [entry]
        where = os.path.join(path, entry)
        for shard in shard_files:
            if not os.path.lexists(os.path.join(path, shard)):
                raise RwsError(
                    f"the index names shard {shard!r}, which is not in the folder",
                    path=where,
                    fix="download the missing shard",
                )
        self._entry = entry
        self._shards: dict[str, Checkpoint] = {}
        try:
            for shard in shard_files:
                self._shards[shard] = open_file(os.path.join(path, shard))
        except BaseException:
            self.close()
            raise
        self._where: dict[str, str] = {}
        ordered: list[str] = []
        aliases: dict[str, str] = {}
        for shard, ckpt in self._shards.items():  # shards in file order, each in its own order
            aliases.update(ckpt.aliases)
            for name in ckpt.names:
                if name in self._where:
                    raise RwsError(
                        f"tensor {name!r} is in two shards",
                        path=path,
                        fix="the folder mixes two saves: keep one set of shards (and its index)",
                    )
                self._where[name] = shard
                ordered.append(name)
        # Shards split the state dict in order and their file names sort in that order, so
        # PyTorch shards read one after the other keep registration order.
        first = next(iter(self._shards.values()))
        is_ordered = all(c.ordered for c in self._shards.values())
        names = ordered if is_ordered else natural_sorted(ordered)
        files = [where] + [c.path for c in self._shards.values() if c.path != where]
        super().__init__(
            path, first.format, names, ordered=is_ordered, files=files, aliases=aliases
        )
        self.owns_tensors = all(c.owns_tensors for c in self._shards.values())
        self.layout = first.layout

    def _shard(self, name: str) -> Checkpoint:
        return self._shards[self._where[self.resolve(name)]]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shard(name).shape(name)

    def dtype(self, name: str) -> torch.dtype:
        return self._shard(name).dtype(name)

    def tensor(self, name: str) -> torch.Tensor:
        return self._shard(name).tensor(name)

    @cached_property
    def applied(self) -> list[dict[str, Any]]:
        return read_folder_record(self.path)

    def write(
        self,
        out_path: str | os.PathLike,
        replacements: Mapping[str, torch.Tensor],
        applied: Sequence[Mapping[str, Any]] | None = None,
    ) -> None:
        """Write the folder: touched weight files rewritten, others copied, the index and every
        other file (config, tokenizer, subfolders) kept, stray weight files of other formats
        left out; the record of applied signatures is the file `rwsfmt_applied.json`. A new
        folder appears only once complete; in an existing folder each file is replaced
        atomically."""
        out = os.fspath(out_path)
        new = self._checked_replacements(replacements)
        in_place = os.path.isdir(out) and os.path.samefile(out, self.path)
        self.check_write(in_place)
        if os.path.exists(out) and not os.path.isdir(out):
            raise RwsError(
                "is a file, but the checkpoint is a folder",
                path=out,
                fix="give a folder path for the output, or a file name ending in "
                ".safetensors or .pt to convert",
            )
        if os.path.isdir(out):  # each file replaced atomically
            self._write_files(out, new, applied, in_place=in_place)
        else:  # a new folder appears only once complete
            with atomic_folder(out) as tmp:
                self._write_files(tmp, new, applied, in_place=False)

    def _write_files(
        self,
        target: str,
        new: Mapping[str, torch.Tensor],
        applied: Sequence[Mapping[str, Any]] | None,
        in_place: bool,
    ) -> None:
        """Write the touched weight files into folder `target` and, unless it is the model's
        own folder, copy the others and the companion files; then the record, if new."""
        for shard, ckpt in self._shards.items():
            mine = {n: t for n, t in new.items() if self._where[n] == shard}
            if mine:
                ckpt.write(os.path.join(target, shard), mine)
            elif not in_place:
                _copy_file(ckpt.path, os.path.join(target, shard))
        if not in_place:
            self._copy_companions(target)
        record = os.path.join(target, RECORD_FILE)
        if applied:
            with atomic_write(record) as f:
                f.write(encode(applied).encode("utf-8"))
        elif applied is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(record)

    def check_write(self, in_place: bool) -> None:
        """Refuse, before any work, a write that would copy a file from outside the folder
        into the output (a companion that is a symbolic link leading out of `link_root`) or,
        `in_place`, write through a symbolic link to a file outside the folder."""
        if in_place:
            folder = os.path.realpath(self.path)
            for shard in [*self._shards, RECORD_FILE]:  # the files an in-place write replaces
                real = os.path.realpath(os.path.join(self.path, shard))
                if not _inside(real, folder):
                    raise RwsError(
                        f"{shard} is a symbolic link to {real}, outside the folder: "
                        "writing in place would change that file",
                        path=self.path,
                        fix=spell("write a new folder with -o OUT", "write to a new folder")
                        + " (in a Hugging Face cache the shards are links to shared blobs)",
                    )
            return
        root = link_root(self.path)
        for rel, full in _companions(self.path):
            real = os.path.realpath(full)
            if not _inside(real, root) and not (rel in self._shards or self._is_other_weights(rel)):
                raise RwsError(
                    f"{rel} is a symbolic link to {real}, outside the model folder: rwsfmt "
                    "copies no file from outside the folder into its output",
                    path=self.path,
                    fix=f"replace the link by a copy of the file, or remove {rel} from the folder",
                )

    def skipped_files(self) -> list[str]:
        """Weight files of other formats in the folder, which a written copy leaves out."""
        return sorted(rel for rel, _ in _companions(self.path) if self._is_other_weights(rel))

    def training_state_files(self) -> list[str]:
        """The Trainer's training state in the folder (optimizer.pt, ...), copied unpatched."""
        return sorted(
            rel
            for rel, _ in _companions(self.path)
            if TRAINING_STATE.fullmatch(os.path.basename(rel))
        )

    def _is_other_weights(self, rel: str) -> bool:
        return rel not in self._shards and rel != self._entry and _is_weight_file(rel)

    def _copy_companions(self, target: str) -> None:
        for rel, src in _companions(self.path):
            if rel in self._shards or self._is_other_weights(rel):
                continue
            dest = os.path.join(target, rel)
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            _copy_file(src, dest)

    def close(self) -> None:
        for ckpt in self._shards.values():
            ckpt.close()


def link_root(folder: str) -> str:
    """The real folder that the symbolic links in model folder `folder` may lead into: the
    folder itself or, for a snapshot of the Hugging Face cache
    (`models--ORG--NAME/snapshots/REVISION`, whose files are links to `../../blobs/`), its
    repository folder `models--ORG--NAME`."""
    real = os.path.realpath(folder)
    snapshots, repo = os.path.dirname(real), os.path.dirname(os.path.dirname(real))
    is_snapshot = os.path.basename(snapshots) == "snapshots" and os.path.basename(repo).startswith(
        ("models--", "datasets--", "spaces--")
    )
    return repo if is_snapshot else real


def _inside(real: str, root: str) -> bool:
    """Whether real path `real` lies in folder `root` (a real path too)."""
    return os.path.commonpath([real, root]) == root


def _companions(folder: str) -> list[tuple[str, str]]:
    """(path relative to `folder`, full path) of every file below it (symlinks followed, as in
    a Hugging Face cache snapshot; hidden folders such as .git skipped), sorted."""
    out = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            full = os.path.join(root, name)
            if os.path.isfile(full):
                out.append((os.path.relpath(full, folder), full))
    return out


def _is_weight_file(rel: str) -> bool:
    name = os.path.basename(rel)
    if TRAINING_STATE.fullmatch(name):
        return False
    return name.endswith(WEIGHT_SUFFIXES) or name.endswith(_WEIGHT_INDEXES)


def _copy_file(src: str, dst: str) -> None:
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)
