"""Which names a transformers model's tensors go by, and translating a signature's names.

transformers 5 stores some architectures under legacy names on disk (`save_pretrained`) and
renames them when it loads (`from_pretrained`, `state_dict()`): ViT's
`vit.encoder.layer.0.attention.attention.query.weight` is `vit.layers.0.attention.q_proj.weight`
in memory. A signature records the naming of the checkpoints it came from (provenance
`naming`, `record_of`); when its names do not fit a model, `Naming.translations` offers them in
the model's naming, built from transformers' own conversion mapping (`rename_source_key` over
the model's `WeightRenaming`s and `WeightConverter`s), in either direction. Tensors a
converter fuses or splits (q/k/v, experts, gate/up) are flagged, never renamed to a slice.

transformers is optional (`pip install 'rwsfmt[hf]'`) and imported only when names need
translating; this module imports neither it nor torch at import time.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .inputs import open_input, strict_json

DISK = "transformers-disk"  # a save_pretrained folder: legacy names where transformers keeps them
MODULE = "transformers-module"  # a PreTrainedModel's own (state_dict) names
LOAD, SAVE = "load", "save"  # disk names -> module names, and back
CONFIG = "config.json"
_MAX_CONFIG = 16 << 20  # real configs are a few KB
_WHERE = {
    LOAD: ("on disk (save_pretrained)", "in memory (from_pretrained)"),
    SAVE: ("in memory (from_pretrained)", "on disk (save_pretrained)"),
}


def read_config(folder: str) -> dict[str, Any] | None:
    """The folder's `config.json` as a dict, or None when it has none or it is not a JSON
    object (a folder of weights alone)."""
    path = os.path.join(folder, CONFIG)
    if not os.path.isfile(path):
        return None
    with open_input(path, "a config file") as f:
        data = f.read(_MAX_CONFIG + 1)
    try:
        config = strict_json(data.decode("utf-8")) if len(data) <= _MAX_CONFIG else None
    except ValueError:  # UnicodeDecodeError included
        return None
    return config if isinstance(config, dict) else None


def record_of(source: object, folder: str | None = None) -> dict[str, str] | None:
    """The provenance `naming` record of a checkpoint: a Hugging Face `folder` (its
    config.json) or a live `PreTrainedModel`; None for anything else (names as they are)."""
    if folder is not None:
        config = read_config(folder)
        if config is None:
            return None
        archs = config.get("architectures")
        record = {
            "kind": DISK,
            "architecture": archs[0] if isinstance(archs, list) and archs else None,
            "model_type": config.get("model_type"),
            "transformers": config.get("transformers_version"),
        }
    else:
        model = _pretrained(source)
        if model is None:
            return None
        record = {
            "kind": MODULE,
            "architecture": type(model).__name__,
            "model_type": model.config.model_type,
            "transformers": _version(),
        }
    return {k: v for k, v in record.items() if isinstance(v, str) and v}


def describe(record: Mapping[str, Any]) -> str:
    """A `naming` record in words, e.g. "transformers' names on disk (save_pretrained) of
    ViTForImageClassification (vit), transformers 5.25.0"."""
    kind = record.get("kind")
    words = {DISK: _WHERE[LOAD][0], MODULE: _WHERE[LOAD][1]}
    text = f"transformers' names {words[kind]}" if kind in words else str(kind)
    model = ", ".join(str(record[k]) for k in ("architecture", "model_type") if k in record)
    version = record.get("transformers")
    text += f" of {model}" if model else ""
    return text + (f", transformers {version}" if version else "")


def _pretrained(obj: object) -> Any:
    """`obj` if it is a transformers `PreTrainedModel` (then transformers is imported), else
    None."""
    modeling = sys.modules.get("transformers.modeling_utils")
    return obj if modeling is not None and isinstance(obj, modeling.PreTrainedModel) else None


class Translator:
    """One model's conversion mapping, both ways: LOAD renames names stored on disk to the
    module's, SAVE the module's back (as `save_pretrained` does)."""

    def __init__(self, model: str, load: Sequence[Any], save: Sequence[Any]) -> None:
        from transformers import __version__

        self.model, self.version = model, __version__
        reverse = [t.reverse_transform() for t in reversed(save)]
        self._ways = {LOAD: _split(load), SAVE: _split(reverse)}

    def rename(self, name: str, direction: str) -> tuple[str, str | None]:
        """(`name` in the other naming, None) or, when a converter fuses or splits the tensor,
        (the first name it goes to, its operations, e.g. 'MergeModulelist, Concatenate')."""
        from transformers.core_model_loading import rename_source_key

        renamings, converters = self._ways[direction]
        new, pattern = rename_source_key(name, renamings, converters, reverse=direction == SAVE)
        if pattern is None:
            return new, None
        converter = next(c for c in converters if pattern in c.source_patterns)
        return new, ", ".join(type(op).__name__ for op in converter.operations)


def _split(transforms: Sequence[Any]) -> tuple[list[Any], list[Any]]:
    """(the renamings, the converters) among `transforms`, each in order."""
    from transformers.core_model_loading import WeightConverter

    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    return [t for t in transforms if not isinstance(t, WeightConverter)], converters


def _from_module(model: Any) -> Translator | None:
    """The translator of a live model: the conversions `from_pretrained` used, else the
    architecture's mapping (without the legacy renamings and prefix changes when saving, as
    `revert_weight_conversion` does)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import PrefixChange

    used = getattr(model, "_weight_conversions", None)
    load = used or get_model_conversion_mapping(model)
    save = used or [
        t
        for t in get_model_conversion_mapping(model, add_legacy=False)
        if not isinstance(t, PrefixChange)
    ]
    return Translator(type(model).__name__, load, save) if load or save else None


def _from_config(config: Any, architecture: str | None) -> Translator | None:
    """The translator of `architecture` (else the base model of `config`), built on the meta
    device: no weights are allocated."""
    import torch
    import transformers

    cls = getattr(transformers, architecture, None) if architecture else None
    with torch.device("meta"):
        if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
            model = cls(config)
        else:
            model = transformers.AutoModel.from_config(config)
    return _from_module(model)


@functools.lru_cache(maxsize=8)
def _from_record(architecture: str | None, model_type: str) -> Translator | None:
    """The translator of a recorded architecture, on its default configuration."""
    from transformers import AutoConfig

    return _from_config(AutoConfig.for_model(model_type), architecture)


def _from_folder(folder: str) -> Translator | None:
    from transformers import AutoConfig

    config = read_config(folder) or {}
    archs = config.get("architectures")
    architecture = archs[0] if isinstance(archs, list) and archs else None
    return _from_config(AutoConfig.from_pretrained(folder, local_files_only=True), architecture)


@dataclass
class Translation:
    """A signature's names in a model's naming: `names` (one per signature tensor), `fused`
    (index -> what a converter makes of that tensor), `line` (what was translated, one
    line); `back` takes a model name back to the signature's naming."""

    names: list[str]
    fused: dict[int, str]
    line: str
    translator: Translator
    direction: str

    def back(self, name: str) -> str:
        return self.translator.rename(name, SAVE if self.direction == LOAD else LOAD)[0]


@dataclass
class Naming:
    """The naming of the model a signature is applied to: a live module, a folder's
    config.json, or unknown (a state dict: only the signature's record says). Translators are
    built, and transformers imported, only when `translations` is iterated."""

    module: Any = None
    folder: str | None = None
    problem: str | None = None  # why no translation could be tried, for the error's fix
    _own: list[Translator | None] = field(default_factory=list)

    def translations(
        self, names: Sequence[str], record: Mapping[str, Any] | None
    ) -> Iterator[Translation]:
        """Every translation of `names` that changes one or more, the model's own mapping
        first, then the one `record` (the signature's provenance `naming`) names."""
        record = record if isinstance(record, Mapping) else {}
        order = (SAVE, LOAD) if record.get("kind") == MODULE else (LOAD, SAVE)
        for translator in self._translators(record):
            for direction in order:
                renamed = [translator.rename(n, direction) for n in names]
                new = [r for r, _ in renamed]
                if new == list(names):
                    continue
                fused = {
                    i: f"{names[i]!r} (transformers' {ops} maps it to {r!r} {_WHERE[direction][1]})"
                    for i, (r, ops) in enumerate(renamed)
                    if ops is not None
                }
                changed = sum(a != b for a, b in zip(names, new, strict=True))
                source, target = _WHERE[direction]
                line = (
                    f"{changed} of {len(names)} names translated from {translator.model}'s "
                    f"names {source} to its names {target}, by transformers "
                    f"{translator.version}'s conversion mapping"
                )
                yield Translation(new, fused, line, translator, direction)

    def _translators(self, record: Mapping[str, Any]) -> Iterator[Translator]:
        """The model's own translator (if it is a transformers model), then the recorded
        architecture's when it is another."""
        model = _pretrained(self.module)
        config = read_config(self.folder) if self.folder is not None else None
        if model is None and config is None and record.get("kind") not in (DISK, MODULE):
            return  # no transformers model on either side: transformers is not imported
        if not _has_mapping():
            self.problem = (
                "install transformers 5 (pip install 'rwsfmt[hf]') so that rwsfmt can "
                "translate between transformers' names on disk and in memory"
            )
            return
        if not self._own:  # built once: a signature list may ask again for each signature
            if model is not None:
                self._own.append(self._built(_from_module, model))
            else:
                self._own.append(None if config is None else self._built(_from_folder, self.folder))
        own = self._own[0]
        if own is not None:
            yield own
        architecture, model_type = record.get("architecture"), record.get("model_type")
        if isinstance(model_type, str) and (own is None or own.model != architecture):
            architecture = architecture if isinstance(architecture, str) else None
            recorded = self._built(_from_record, architecture, model_type)
            if recorded is not None:
                yield recorded

    def _built(self, build: Any, *args: Any) -> Translator | None:
        """`build(*args)`, or None (and `problem` says why) when transformers cannot build
        the model, e.g. a model type this version does not know."""
        try:
            return build(*args)
        except Exception as exc:  # transformers raises many kinds; the names stay untranslated
            first = (str(exc).splitlines() or [""])[0]
            self.problem = (
                f"update transformers: {_version()} could not build the model whose conversion "
                f"mapping translates the names ({type(exc).__name__}: {first})"
            )
            return None


def same_names(ckpts: dict[str, Any], sources: Mapping[str, object]) -> None:
    """Read robust and init under std's names where transformers names them the other way
    (one a save_pretrained folder, another a live model or a state_dict() file): each such
    checkpoint in `ckpts` (role -> Checkpoint) becomes a `RenamedCheckpoint` saying what was
    translated. A tensor stored fused or split differently is refused by name."""
    from .errors import RwsError
    from .io.renamed import RenamedCheckpoint

    ref = ckpts["std"]
    known = set(ref.names) | set(ref.aliases)
    for role, other in list(ckpts.items()):
        names = [*other.names, *other.aliases]
        before = sum(n in known for n in names)
        if other is ref or before == len(names):
            continue
        module = next(
            (s for s in (sources[role], sources["std"]) if _pretrained(s) is not None), None
        )
        folder = next((c.path for c in (other, ref) if c.folder), None)
        record = record_of(sources["std"], ref.path if ref.folder else None)
        best, score = None, before
        for translation in Naming(module, folder).translations(names, record):
            fits = sum(n in known for n in translation.names)
            if fits > score:
                best, score = translation, fits
        if best is None:
            continue
        if best.fused:
            raise RwsError(
                f"{role} holds tensors that transformers fuses or splits differently from "
                f"std ({ref.path}): {', '.join(best.fused.values())}",
                path=other.path,
                fix="save std, robust and init the same way: all with save_pretrained, or "
                "all with torch.save(model.state_dict())",
            )
        renames = dict(zip(names, best.names, strict=True))
        ckpts[role] = RenamedCheckpoint(other, renames, best.line)


def _version() -> str:
    return sys.modules["transformers"].__version__


def _has_mapping() -> bool:
    """Whether transformers (5, with its conversion mapping) can be imported."""
    try:
        import transformers.conversion_mapping  # noqa: F401
    except ImportError:
        return False
    return True
