"""Atomic writes: files appear whole with the usual permissions, or not at all; writers of one
target take turns; special files are refused; killed writers' temporaries are cleaned."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import rwsfmt
from rwsfmt.atomic import atomic_write, check_destination, remove_stale_temporaries, target_lock
from rwsfmt.errors import RwsError
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


# --- destinations: regular files and new paths only, symbolic links written through ---


def write(path, data: bytes = b"new") -> None:
    with atomic_write(path) as f:
        f.write(data)


def leftovers(folder) -> list[str]:
    """rwsfmt's temporary and lock files in `folder`."""
    return sorted(n for n in os.listdir(folder) if ".rwsfmt-" in n)


@pytest.mark.parametrize("mode", [0o600, 0o640, 0o444, 0o755])
def test_a_replaced_file_keeps_its_mode_and_the_data_stays_private_while_written(tmp_path, mode):
    target = tmp_path / "model.dat"
    target.write_bytes(b"old")
    os.chmod(target, mode)
    with atomic_write(target) as f:
        f.write(b"secret")
        f.flush()
        (tmp,) = temporaries(tmp_path, "model.dat", os.getpid())
        assert stat.S_IMODE(os.stat(tmp_path / tmp).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(target).st_mode) == mode
    assert target.read_bytes() == b"secret" and leftovers(tmp_path) == []


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="chown needs root")
def test_root_replacing_a_users_file_keeps_its_owner_and_group(tmp_path):
    target = tmp_path / "model.dat"
    target.write_bytes(b"old")
    os.chown(target, 1234, 5678)
    write(target)
    st = os.stat(target)
    assert (st.st_uid, st.st_gid) == (1234, 5678)


def test_a_symbolic_link_is_written_through_and_stays_a_link(tmp_path):
    (tmp_path / "store").mkdir()
    real = tmp_path / "store" / "model.dat"
    real.write_bytes(b"old")
    os.chmod(real, 0o600)
    link = tmp_path / "latest.dat"
    link.symlink_to(os.path.join("store", "model.dat"))
    write(link)
    assert link.is_symlink() and os.readlink(link) == os.path.join("store", "model.dat")
    assert real.read_bytes() == b"new" and stat.S_IMODE(os.stat(real).st_mode) == 0o600
    assert leftovers(tmp_path) == leftovers(tmp_path / "store") == []


def test_a_dangling_link_is_refused(tmp_path):
    (tmp_path / "link.dat").symlink_to("missing.dat")
    with pytest.raises(RwsError, match="symbolic link to missing.dat, which does not exist"):
        write(tmp_path / "link.dat")
    assert not (tmp_path / "missing.dat").exists()


def special_files(folder) -> list:
    """A named pipe, a socket and a character device."""
    fifo = folder / "pipe.dat"
    os.mkfifo(fifo)
    sock_path = folder / "s.dat"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(sock_path))
    server.close()
    return [
        (fifo, r"a named pipe \(FIFO\)"),
        (sock_path, "a socket"),
        ("/dev/null", "a character device"),
    ]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="POSIX special files")
def test_special_files_are_refused_before_anything_is_written(tmp_path):
    for path, kind in special_files(tmp_path):
        before = os.stat(path)
        with pytest.raises(RwsError, match=f"is {kind}, not a regular file") as caught:
            write(path)
        assert "fix:" in str(caught.value)
        after = os.stat(path)
        assert (after.st_ino, after.st_mode) == (before.st_ino, before.st_mode)
    assert leftovers(tmp_path) == []


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root may write anyway")
def test_a_folder_without_write_permission_is_refused_before_any_work(tmp_path):
    os.chmod(tmp_path, 0o500)
    try:
        with pytest.raises(RwsError, match="cannot be written: permission denied"):
            check_destination(tmp_path / "out.rws")
    finally:
        os.chmod(tmp_path, 0o700)


# --- temporaries of killed writers ---

WRITER = """
import sys
from rwsfmt.atomic import atomic_write, check_destination, remove_stale_temporaries, target_lock
from rwsfmt.errors import RwsError

with atomic_write(sys.argv[1]) as f:
    f.write(b"x" * (8 << 20))
    f.flush()
    print("writing", flush=True)
    sys.stdin.read()  # blocks until the parent closes stdin, or kills this process
"""


def start_writer(target) -> subprocess.Popen:
    """A process writing `target` through atomic_write, blocked mid-write (8 MB written)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(target)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline() == "writing\n"
    return proc


def finish(proc: subprocess.Popen) -> None:
    proc.stdin.close()
    assert proc.wait(timeout=60) == 0


def temporaries(folder, name: str, pid: int) -> list[str]:
    return [n for n in os.listdir(folder) if n.startswith(f".{name}.rwsfmt-tmp.{pid}.")]


@pytest.mark.skipif(os.name != "posix", reason="SIGKILL")
def test_the_next_write_removes_a_killed_writers_temporary_and_keeps_a_running_ones(tmp_path):
    killed = start_writer(tmp_path / "model.dat")
    killed.kill()  # SIGKILL: no cleanup code runs
    killed.wait(timeout=60)  # reaped: its PID no longer exists
    (stale,) = temporaries(tmp_path, "model.dat", killed.pid)
    assert os.path.getsize(tmp_path / stale) == 8 << 20

    running = start_writer(tmp_path / "other.dat")  # another target in the same folder
    try:
        write(tmp_path / "model.dat", b"good")
        assert (tmp_path / "model.dat").read_bytes() == b"good"
        assert temporaries(tmp_path, "model.dat", killed.pid) == []
        assert len(temporaries(tmp_path, "other.dat", running.pid)) == 1
    finally:
        finish(running)
    assert (tmp_path / "other.dat").stat().st_size == 8 << 20
    assert leftovers(tmp_path) == []


@pytest.mark.skipif(os.name != "posix", reason="process liveness by os.kill(pid, 0)")
def test_only_temporaries_of_this_target_whose_process_is_gone_are_removed(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait(timeout=60)
    alive = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=-1)
    try:
        stale_file = f".model.dat.rwsfmt-tmp.{gone.pid}.0123abcd"
        stale_folder = f".model.dat.rwsfmt-tmp.{gone.pid}.4567cdef"
        kept = [
            f".model.dat.rwsfmt-tmp.{alive.pid}.89abcdef",  # a running process's
            f".other.dat.rwsfmt-tmp.{gone.pid}.0123abcd",  # another target's
            f".model.dat.rwsfmt-tmp.{gone.pid}.rwsfmt-tmp.1.0123abcd",  # not our pattern
            "model.dat.tmp",
        ]
        for name in [stale_file, *kept]:
            (tmp_path / name).write_bytes(b"partial")
        (tmp_path / stale_folder).mkdir()
        (tmp_path / stale_folder / "model.safetensors").write_bytes(b"partial")
        remove_stale_temporaries(tmp_path / "model.dat")
        assert sorted(os.listdir(tmp_path)) == sorted(kept)
    finally:
        alive.stdin.close()
        alive.wait(timeout=60)


# --- locking: writers of one target take turns ---


@pytest.mark.skipif(os.name != "posix", reason="flock")
def test_a_second_writer_waits_for_the_first_and_writes_after_it(tmp_path):
    target = tmp_path / "model.dat"
    first = start_writer(target)
    second = threading.Thread(target=write, args=(target, b"second"))
    second.start()
    second.join(timeout=1.0)
    assert second.is_alive()  # waiting for the lock the first writer holds
    finish(first)
    second.join(timeout=60)
    assert not second.is_alive()
    assert target.read_bytes() == b"second"  # written after the first, not lost under it
    assert leftovers(tmp_path) == []


@pytest.mark.skipif(os.name != "posix", reason="flock")
def test_the_lock_is_reentrant_in_one_thread_and_leaves_no_file(tmp_path):
    with target_lock(tmp_path / "model.dat"):
        assert leftovers(tmp_path) == [".model.dat.rwsfmt-lock"]
        write(tmp_path / "model.dat")  # the writer takes the lock this thread holds
    assert leftovers(tmp_path) == []


# --- write errors: the file, the problem and the fix ---

RLIMITED = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
from rwsfmt_cli.main import main
main(sys.argv[1:], prog_name="rwsfmt")
"""


@pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="POSIX file size limits")
@pytest.mark.parametrize("suffix", [".pt", ".safetensors", ".rws"])
def test_a_failed_write_is_a_clear_error_with_nothing_left(tmp_path, suffix):
    """A real kernel write error (a file size limit: EFBIG) for every output format, also
    through torch.save, which reports it as a RuntimeError."""
    g = torch.Generator().manual_seed(0)
    for role in ("std", "robust"):
        torch.save({"w": torch.randn(256, 256, generator=g)}, tmp_path / f"{role}.pt")  # 256 KB
    rwsfmt.save(from_tensors({"w": torch.randn(256, 256)}, label="t"), tmp_path / "t.rws")
    out = tmp_path / f"out{suffix}"
    if suffix == ".rws":
        inputs = ["extract", tmp_path / "std.pt", tmp_path / "robust.pt", "--method", "subtract"]
        args = [*inputs, "--layers", "all", "--bits", "32", "-o", out, "-q"]
    else:
        args = ["apply", tmp_path / "std.pt", tmp_path / "t.rws", "-a", "1", "-o", out, "-q"]
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", RLIMITED, *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(f"error: {out}: cannot be written: file too large\n  fix: ")
    assert "Traceback" not in proc.stderr and "ulimit" in proc.stderr
    assert not out.exists() and leftovers(tmp_path) == []
