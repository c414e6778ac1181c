"""Hugging Face model ids, `org/name` or `org/name@revision`, read from the local Hugging Face
cache where `from_pretrained` finds them, through the optional `huggingface_hub`
(pip install 'rwsfmt[hf]').

The cache folder and offline mode come from the environment as huggingface_hub reads them
(`HF_HUB_CACHE`, else `HF_HOME/hub`, else `~/.cache/huggingface/hub`; `HF_HUB_OFFLINE`), read
at each call. A local path always wins over an id; nothing is downloaded unless asked
(`download=True`, `--download`). Cached files are symlinks from `snapshots/COMMIT/` into the
repo's `blobs/`: the snapshot is read as the model folder, its links followed only where they
stay inside the repo's cache folder.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from .errors import RwsError, spell

DEFAULT_REVISION = "main"
INSTALL = "pip install 'rwsfmt[hf]'"
# `org/name` as the Hub spells repo ids (letters, digits, '-', '_', '.'), then `@revision`
_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]*[A-Za-z0-9_])(?:@(?P<revision>[^\s@]+))?")
_TRUE = {"1", "ON", "YES", "TRUE"}  # huggingface_hub's spelling of a true environment value


@dataclass(frozen=True)
class HubModel:
    """`repo_id` at `revision` (as asked), which the cache holds as `commit` in the snapshot
    folder `path`; a path-like object naming that folder."""

    repo_id: str
    revision: str
    commit: str
    path: str

    def __fspath__(self) -> str:
        return self.path

    def __str__(self) -> str:
        at = "" if self.revision == DEFAULT_REVISION else f"@{self.revision}"
        return self.repo_id + at

    @property
    def name(self) -> str:
        """The repo's name without its owner: `name` of `org/name`."""
        return self.repo_id.rpartition("/")[2]

    @property
    def repo_folder(self) -> str:
        """The repo's folder in the cache, `models--org--name`, which holds refs, blobs and
        snapshots."""
        return os.path.dirname(os.path.dirname(self.path))


def is_hub_id(source: object) -> bool:
    """Whether `source` is read as a Hugging Face id: a string `org/name[@revision]` that is
    not a local path."""
    return (
        isinstance(source, str)
        and _ID.fullmatch(source) is not None
        and not os.path.lexists(source)
    )


def resolve(source: object, *, revision: str | None = None, download: bool = False) -> object:
    """`source` itself, unless it is a Hugging Face id (`is_hub_id`): then the `HubModel` of
    its snapshot in the cache (downloaded first if missing and `download`). `revision` (a
    branch, tag or commit; default 'main') applies to ids that name none with `@`."""
    if not is_hub_id(source):
        return source
    match = _ID.fullmatch(source)
    repo, named = match["repo"], match["revision"]
    if named and revision and named != revision:
        raise RwsError(
            f"two revisions: @{named} in the id and {spell('--revision', 'revision=')} {revision}",
            path=source,
            fix=f"give one of them (e.g. {repo}@{revision})",
        )
    return _snapshot(source, repo, named or revision or DEFAULT_REVISION, download)


def hub_cache() -> str:
    """The Hugging Face hub cache folder, from the environment as huggingface_hub reads it."""
    home = os.getenv(
        "HF_HOME",
        os.path.join(os.getenv("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "huggingface"),
    )
    home = _expand(home)
    legacy = os.getenv("HUGGINGFACE_HUB_CACHE", os.path.join(home, "hub"))
    return _expand(os.getenv("HF_HUB_CACHE", legacy))


def hub_offline() -> bool:
    """Whether `HF_HUB_OFFLINE` (or `TRANSFORMERS_OFFLINE`) forbids the network."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.upper() in _TRUE


def refuse_cache_output(path: str | os.PathLike, fix: str) -> None:
    """Raise `RwsError` when `path` lies inside the Hugging Face cache, which only
    huggingface_hub writes (a patched file there would pass for the downloaded model)."""
    cache = os.path.realpath(hub_cache())
    target = os.path.realpath(path)
    if os.path.commonpath([cache, target]) == cache:
        raise RwsError(
            f"is inside the Hugging Face cache ({cache}), which rwsfmt never writes",
            path=path,
            fix=fix,
        )


def _expand(path: str) -> str:
    return os.path.expandvars(os.path.expanduser(path))


def _snapshot(source: str, repo: str, revision: str, download: bool) -> HubModel:
    """The cached snapshot of `repo` at `revision` (fetched first with `download`)."""
    try:
        import huggingface_hub
        from huggingface_hub import errors
    except ImportError:
        raise RwsError(
            "no such file or folder; read as a Hugging Face model id, it needs huggingface_hub, "
            "which is not installed",
            path=source,
            fix=f"check the path, or {INSTALL} to read models from the Hugging Face cache",
        ) from None
    cache = hub_cache()
    offline = hub_offline()
    get = f"hf download {repo}" + (
        "" if revision == DEFAULT_REVISION else f" --revision {revision}"
    )
    try:
        path = huggingface_hub.snapshot_download(
            repo, revision=revision, cache_dir=cache, local_files_only=offline or not download
        )
    except errors.HFValidationError as exc:
        raise RwsError(
            f"no such file or folder, nor a valid Hugging Face model id ({exc})",
            path=source,
            fix="check the path",
        ) from None
    except getattr(errors, "IncompleteSnapshotError", ()) as exc:  # recent huggingface_hub
        raise RwsError(
            f"the Hugging Face cache holds {repo}@{revision} only in part: {exc}",
            path=source,
            fix=f"complete it: {get}",
        ) from None
    except errors.LocalEntryNotFoundError as exc:
        problem = (
            f"no such file or folder, and no Hugging Face model {repo}@{revision} in the "
            f"cache {cache}"
        )
        if not download:
            how = f"run {get} first, or pass {spell('--download', 'download=True')}"
        elif offline:
            how = f"HF_HUB_OFFLINE is set, so nothing was downloaded: unset it, or run {get}"
        else:
            problem += f", and the Hub could not be reached ({exc.__cause__ or exc})"
            how = f"check the network, or run {get} where the Hub is reachable"
        raise RwsError(
            problem, path=source, fix=f"check the path; to read the model from the Hub: {how}"
        ) from None
    except (OSError, errors.HfHubHTTPError) as exc:  # the download failed
        raise RwsError(
            f"could not download the Hugging Face model {repo}@{revision}: {exc}",
            path=source,
            fix=f"check the id, the network and your token (hf auth login), or run {get}",
        ) from None
    model = HubModel(repo, revision, os.path.basename(path), path)
    _check_links(model, source)
    return model


def _check_links(model: HubModel, source: str) -> None:
    """Refuse a snapshot holding a symlink that leads out of the repo's cache folder (the
    downloader links files only to `../../blobs/...`)."""
    root = os.path.realpath(model.repo_folder)
    blobs = os.path.realpath(os.path.join(model.repo_folder, "blobs"))  # may be moved + linked
    for folder, dirs, files in os.walk(model.path):
        for name in dirs + files:
            link = os.path.join(folder, name)
            if not os.path.islink(link):
                continue
            target = os.path.realpath(link)
            if not any(os.path.commonpath([r, target]) == r for r in (root, blobs)):
                raise RwsError(
                    f"the cached snapshot links {os.path.relpath(link, model.path)} to {target}, "
                    "outside the model's cache folder",
                    path=source,
                    fix=f"delete {model.repo_folder} and download the model again "
                    f"(hf download {model.repo_id})",
                )
