"""Atomic writes: files appear whole with the usual permissions, or not at all."""

from __future__ import annotations

import os
import stat
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import rwsfmt
from rwsfmt.atomic import atomic_write
from rwsfmt.signature import from_tensors


def test_written_file_follows_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_write(tmp_path / "a.dat") as f:
            f.write(b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "a.dat").st_mode) == 0o644


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "keep.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_write(target) as f:
        f.write(b"new, half")
        raise RuntimeError("crash")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["keep.bin"]


def test_one_signature_can_be_read_from_several_threads(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {f"layer{i}.weight": torch.randn(64, 64, generator=g) for i in range(16)}
    rwsfmt.save(from_tensors(tensors, label="t"), tmp_path / "t.rws")
    with rwsfmt.load(tmp_path / "t.rws") as sig:
        expected = {name: sig.tensor(name) for name in sig.names}
        with ThreadPoolExecutor(4) as pool:
            for _ in range(5):
                got = dict(zip(sig.names, pool.map(sig.tensor, sig.names), strict=True))
                for name, value in got.items():
                    assert torch.equal(value, expected[name])
