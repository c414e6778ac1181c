"""Every writer killed outright (SIGKILL) at many points leaves no partial file.

Each writer runs as a real process on inputs of a few MB and is killed with SIGKILL, 20
times: 12 times after 0, 1, ..., 11 steps spread over its measured run time (up to 10% past
its end), so the kills land before, during and after the write; 8 times as soon as its
temporary file holds 0%, 1/7, ..., 100% of the output's bytes (the last one between the last
write and the rename), since the write itself is a small part of the run. After each kill
the destination must be absent (a new file), the complete previous file, or the complete
new file; after one more successful run no temporary file (`.NAME.rwsfmt-tmp.*`) and no
lock file (`.NAME.rwsfmt-lock`) may remain beside it.

Starting Python and importing torch takes longer than the writes themselves, so the
processes are forked from a *zygote*: one child process that imports the command line once
(and runs no torch operation, so forking it is safe) and forks a fresh process per run. The
kills come from this test process, from outside, as a crash or an OOM killer would.

To cover another writer, add one `Writer` to `WRITERS`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

import rwsfmt
from rwsfmt.atomic import LOCK_MARK, TEMPORARY_MARK

pytestmark = pytest.mark.skipif(
    sys.platform != "linux", reason="forks a zygote and kills with SIGKILL (Linux)"
)

KILL_POINTS = 20  # per writer: TIMED kills spread over a measured run, the rest timed by
TIMED = 12  # the growth of the temporary file (0% to 100% of the output written)
TENSORS = {f"layers.{i}.weight": (384, 384) for i in range(6)}  # 3.4 MB in float32

ZYGOTE = textwrap.dedent(
    """
    import json, os, sys, time
    import torch, rwsfmt_cli.main as cli   # imported once, before any fork
    started = {}
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "run":
            pid = os.fork()
            if pid == 0:
                os.chdir(cmd["cwd"])
                null = os.open(os.devnull, os.O_WRONLY)
                os.dup2(null, 1); os.dup2(null, 2)
                try:
                    cli.main(cmd["args"], prog_name="rwsfmt")
                except SystemExit as exc:
                    os._exit(exc.code if isinstance(exc.code, int) else 1)
                os._exit(0)
            started[pid] = time.monotonic()
            print(json.dumps({"pid": pid}), flush=True)
        else:  # reap
            _, status = os.waitpid(cmd["pid"], 0)
            took = time.monotonic() - started.pop(cmd["pid"])
            print(json.dumps({"status": status, "seconds": took}), flush=True)
    """
)


class Zygote:
    """A process with the command line imported, forking one process per run."""

    def __init__(self) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "RWSFMT_MAX_DECODED": "none"}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", ZYGOTE],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )

    def _ask(self, **cmd) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def start(self, args: list[str], cwd: Path) -> int:
        return self._ask(op="run", args=args, cwd=str(cwd))["pid"]

    def reap(self, pid: int) -> tuple[int, float]:
        """(wait status, seconds from fork to exit) of a run."""
        answer = self._ask(op="reap", pid=pid)
        return answer["status"], answer["seconds"]

    def run(self, args: list[str], cwd: Path) -> float:
        """Run to the end; the seconds it took (it must succeed)."""
        status, seconds = self.reap(self.start(args, cwd))
        assert os.waitstatus_to_exitcode(status) == 0, f"rwsfmt {' '.join(args)} failed"
        return seconds

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def zygote():
    z = Zygote()
    yield z
    z.close()


def _checkpoint(path: Path, seed: int, scale: float = 1.0) -> Path:
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    save_file({n: scale * torch.randn(*shape, generator=g) for n, shape in TENSORS.items()}, path)
    return path


def _signature(path: Path, seed: int, bits: int = 16) -> Path:
    import torch

    g = torch.Generator().manual_seed(seed)
    builder = rwsfmt.SignatureBuilder(path.stem, rwsfmt.QuantConfig(bits=bits))
    for name, shape in TENSORS.items():
        builder.add(name, 0.01 * torch.randn(*shape, generator=g))
    rwsfmt.save(builder.build(provenance={"method": "project"}), path)
    return path


@dataclass(frozen=True)
class Writer:
    """A command that writes `output` in a folder prepared by `setup`.

    `in_place`: the output is one of the inputs (its previous bytes are the file before
    the run). Otherwise the output is written new half the time and over an older file
    (`previous`, any file the command may replace) the other half.
    """

    name: str
    setup: Callable[[Path], None]
    args: list[str]
    output: str
    in_place: bool = False


def _extract_inputs(d: Path) -> None:
    _checkpoint(d / "init.safetensors", 0)
    _checkpoint(d / "std.safetensors", 1, 0.01)
    _checkpoint(d / "robust.safetensors", 2, 0.01)


def _apply_inputs(d: Path) -> None:
    _checkpoint(d / "model.safetensors", 1)
    _signature(d / "fog.rws", 3, bits=8)


def _two_signatures(d: Path) -> None:
    _signature(d / "fog.rws", 3)
    _signature(d / "snow.rws", 4)


WRITERS = [
    Writer(
        "extract",
        _extract_inputs,
        ["extract", "std.safetensors", "robust.safetensors", "init.safetensors"]
        + ["--layers", "all", "-o", "out.rws"],
        "out.rws",
    ),
    Writer(
        "apply",
        _apply_inputs,
        ["apply", "model.safetensors", "fog.rws", "--alpha", "0.8", "-o", "out.safetensors"],
        "out.safetensors",
    ),
    Writer(
        "apply --in-place",
        _apply_inputs,
        ["apply", "model.safetensors", "fog.rws", "--alpha", "0.8", "--in-place"],
        "model.safetensors",
        in_place=True,
    ),
    Writer(
        "merge",
        _two_signatures,
        ["merge", "fog.rws", "snow.rws", "--method", "ties", "-o", "out.rws"],
        "out.rws",
    ),
    Writer(
        "convert",
        _two_signatures,
        ["convert", "fog.rws", "--bits", "4", "-o", "out.rws"],
        "out.rws",
    ),
    Writer(
        "export", _two_signatures, ["export", "fog.rws", "-o", "out.safetensors"], "out.safetensors"
    ),
    Writer(
        "import",
        lambda d: _checkpoint(d / "tv.safetensors", 5, 0.01),
        ["import", "tv.safetensors", "-o", "out.rws"],
        "out.rws",
    ),
    Writer(
        "sign",
        lambda d: (_two_signatures(d), rwsfmt.generate_key(d / "key")),
        ["sign", "fog.rws", "--key", "key"],
        "fog.rws",
        in_place=True,
    ),
]


def _leftovers(folder: Path, output: str) -> list[str]:
    """Temporary and lock files of writers of `output`."""
    return sorted(
        p.name
        for p in folder.iterdir()
        if p.name.startswith(f".{output}{TEMPORARY_MARK}") or p.name == f".{output}{LOCK_MARK}"
    )


def _running(pid: int) -> bool:
    """Whether `pid` still runs (not yet a zombie waiting for the zygote to reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _when_written(pid: int, folder: Path, output: str, share: float, size: int) -> None:
    """Return once process `pid`'s temporary file for `output` holds `share` of `size`
    bytes, or once the process has ended."""
    prefix = f".{output}{TEMPORARY_MARK}{pid}."
    while _running(pid):
        for entry in os.scandir(folder):
            if entry.name.startswith(prefix):
                try:
                    if entry.stat().st_size >= share * size:
                        return
                except FileNotFoundError:  # renamed into place just now
                    return
        time.sleep(0.0002)


@pytest.mark.parametrize("writer", WRITERS, ids=lambda w: w.name)
def test_a_killed_writer_leaves_no_partial_file(writer: Writer, zygote: Zygote, tmp_path: Path):
    writer.setup(tmp_path)
    dest = tmp_path / writer.output
    previous = dest.read_bytes() if writer.in_place else b"an older file, replaced whole"

    def reset(k: int) -> None:
        """The state before a run: the input as it was, or no output / an older output."""
        if writer.in_place or k % 2:
            dest.write_bytes(previous)
        else:
            dest.unlink(missing_ok=True)

    reset(1)
    zygote.run(writer.args, tmp_path)  # warms the page cache and torch's lazy set-up
    reset(1)
    seconds = zygote.run(writer.args, tmp_path)  # the measured run: the complete new file
    new = dest.read_bytes()
    assert new != previous
    landed = {"before": 0, "during": 0, "after": 0}
    for k in range(KILL_POINTS):
        reset(k)
        pid = zygote.start(writer.args, tmp_path)
        if k < TIMED:  # after k steps of the run's time, up to 10% past its end
            time.sleep(k * 1.1 * seconds / (TIMED - 1))
        else:  # once the temporary file holds 0%, ..., 100% of the output's bytes
            share = (k - TIMED) / (KILL_POINTS - TIMED - 1)
            _when_written(pid, tmp_path, writer.output, share, len(new))
        os.kill(pid, signal.SIGKILL)
        status, _ = zygote.reap(pid)
        finished = os.WIFEXITED(status)
        assert not finished or os.waitstatus_to_exitcode(status) == 0
        after = dest.read_bytes() if dest.exists() else None
        before = previous if (writer.in_place or k % 2) else None
        size = "none" if after is None else len(after)
        assert after in (before, new), f"kill {k}: {dest.name} is partial ({size} bytes)"
        if finished or after == new:
            landed["after"] += 1
        elif any(f"{TEMPORARY_MARK}{pid}." in t for t in _leftovers(tmp_path, writer.output)):
            landed["during"] += 1  # its temporary file was there
        else:
            landed["before"] += 1
    reset(1)
    zygote.run(writer.args, tmp_path)  # the next successful run sweeps what the kills left
    assert dest.read_bytes() == new
    assert _leftovers(tmp_path, writer.output) == []
    print(f"\n{writer.name}: {KILL_POINTS} kill points {landed}; a run takes {seconds:.2f} s")
    assert landed["during"] > 0, f"no kill landed during the write: {landed}"
