"""The README's memory bound, measured (`benchmarks/memory_bench.py`, here under a 64 MiB
decode limit, in one child process): verify and `load().tensor()` on the worst-case file of
every scheme and granularity, every command on the densest ones, and `convert` and `merge`
writing every dense scheme encoded by chunks (1 and 2 bits, `--fit direction`), add at most
the bound to the peak resident memory."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import memory_bench  # noqa: E402

MiB = 1 << 20
LIMIT = 64 * MiB


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_every_command_stays_within_the_bound_on_worst_case_files(tmp_path):
    numel = LIMIT // 4
    save_file({"t": torch.zeros(numel)}, str(tmp_path / "model.safetensors"))
    jobs, labels = [], []
    for i, (label, quant, filt) in enumerate(memory_bench.CASES):
        folder = tmp_path / str(i)
        folder.mkdir()
        (folder / "model.safetensors").symlink_to(tmp_path / "model.safetensors")
        path = folder / "worst.rws"
        memory_bench.worst_case(path, quant, filt, numel)
        densest = label in memory_bench.DENSEST
        commands = memory_bench.COMMANDS if densest else memory_bench.READING
        for command in commands:
            jobs.append((command, memory_bench.arguments(command, path, folder)))
            labels.append((label, command))
    results = memory_bench.added_peaks(jobs, LIMIT)
    over = []
    for (label, command), (code, peak) in zip(labels, results, strict=True):
        assert code == 0, (label, command)
        ratio = peak / memory_bench.bound(command, LIMIT)
        if ratio > 1:
            over.append(f"{label}, {command}: {peak / MiB:.0f} MiB, {ratio:.2f} of the bound")
    assert not over, "\n".join(over)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_writing_every_dense_scheme_stays_within_the_bound(tmp_path):
    """1- and 2-bit codes, per channel and per tensor, and `--fit direction` are encoded by
    chunks (`quant._encode_chunked`), not whole with full-size copies."""
    quant, filt = next(
        (q, f) for label, q, f in memory_bench.CASES if label == memory_bench.ENCODED
    )
    path = tmp_path / "worst.rws"
    memory_bench.worst_case(path, quant, filt, LIMIT // 4, memory_bench.ENCODED_COLUMNS)
    labels = [
        (label, command)
        for label in memory_bench.ENCODINGS
        if label not in memory_bench.UNBOUNDED and label != "bits 4"  # the first test's
        for command in ("convert", "merge")
    ]
    out = str(tmp_path / "out.rws")
    jobs = [memory_bench.encoding_job(command, label, path, out) for label, command in labels]
    # the first command of a process also allocates what lasts (about 30 MiB): run it twice
    results = memory_bench.added_peaks([jobs[0], *jobs], LIMIT)[1:]
    over = []
    for (label, command), (code, peak) in zip(labels, results, strict=True):
        assert code == 0, (label, command)
        ratio = peak / memory_bench.bound(command, LIMIT)
        if ratio > 1:
            over.append(f"{command} {label}: {peak / MiB:.0f} MiB, {ratio:.2f} of the bound")
    assert not over, "\n".join(over)
