"""A checkpoint read under other names: one transformers model saved two ways (its folder's
names on disk, its `state_dict()` names in memory) extracted as one."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .base import Checkpoint


class RenamedCheckpoint(Checkpoint):
    """`inner`'s tensors under `renames` (its name -> the new name; others keep theirs),
    read-only; `translated` says in one line what was renamed and by what."""

    def __init__(self, inner: Checkpoint, renames: Mapping[str, str], translated: str) -> None:
        aliases = {renames.get(a, a): renames.get(t, t) for a, t in inner.aliases.items()}
        names = [renames.get(n, n) for n in inner.names]
        super().__init__(
            inner.path,
            inner.format,
            names,
            ordered=inner.ordered,
            files=inner.files,
            aliases=aliases,
        )
        self.inner, self.translated = inner, translated
        self._old = {renames.get(n, n): n for n in inner.names}
        self.folder, self.sharded, self.layout = inner.folder, inner.sharded, inner.layout
        self.alternatives, self.owns_tensors = inner.alternatives, inner.owns_tensors

    def _inner_name(self, name: str) -> str:
        return self._old[self.resolve(name)]

    def shape(self, name: str) -> tuple[int, ...]:
        return self.inner.shape(self._inner_name(name))

    def dtype(self, name: str) -> torch.dtype:
        return self.inner.dtype(self._inner_name(name))

    def tensor(self, name: str) -> torch.Tensor:
        return self.inner.tensor(self._inner_name(name))
