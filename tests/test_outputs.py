"""Outputs: never over an input, the format the name asks for, the same bytes every run."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file
from test_atomic import start_writer, temporaries
from test_patch import assert_bit_equal, make_net, make_sig

import rwsfmt
from rwsfmt_cli.main import main


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


@pytest.fixture
def trio(tmp_path):
    """init/std/fog .pt files of a small CNN, and the fog signature."""
    torch.manual_seed(0)
    init = make_net().state_dict()
    for role, seed in (("init", 0), ("std", 1), ("fog", 2)):
        g = torch.Generator().manual_seed(seed)
        sd = {
            k: v + 0.01 * seed * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
            for k, v in init.items()
        }
        torch.save(sd, tmp_path / f"{role}.pt")
    code, out = run(
        "extract",
        *(tmp_path / f"{r}.pt" for r in ("std", "fog", "init")),
        "-o",
        tmp_path / "fog.rws",
    )
    assert code == 0, out
    return tmp_path


def spellings(path):
    """The same file under other names: relative with ./, a symlink, a hard link."""
    folder = path.parent
    os.symlink(path, folder / "via-symlink")
    os.link(path, folder / "via-hardlink")
    return [
        f"{os.path.relpath(folder)}/./{path.name}",
        folder / "via-symlink",
        folder / "via-hardlink",
        path,
    ]


def test_extract_never_writes_over_its_inputs(trio):
    d = trio
    before = (d / "fog.pt").read_bytes()
    for target in spellings(d / "fog.pt"):
        code, out = run("extract", d / "std.pt", d / "fog.pt", d / "init.pt", "-o", target)
        assert code == 2, out
        assert "would overwrite the robust checkpoint" in out
    assert (d / "fog.pt").read_bytes() == before
    code, out = run("extract", d / "std.pt", d / "fog.pt", d / "init.pt", "-o", d / "init.pt")
    assert code == 2 and "init checkpoint" in out


def test_merge_never_writes_over_its_inputs(trio):
    d = trio
    (d / "snow.rws").write_bytes((d / "fog.rws").read_bytes())
    before = (d / "fog.rws").read_bytes()
    for target in spellings(d / "fog.rws"):
        code, out = run("merge", d / "fog.rws", d / "snow.rws", "-o", target)
        assert code == 2 and "would overwrite the input signature" in out, out
    assert (d / "fog.rws").read_bytes() == before
    assert run("merge", d / "fog.rws", d / "snow.rws", "--mean", "-o", d / "both.rws")[0] == 0


def test_apply_never_writes_over_a_signature_or_the_model_without_in_place(trio):
    d = trio
    sig_bytes, model_bytes = (d / "fog.rws").read_bytes(), (d / "std.pt").read_bytes()
    code, out = run("apply", d / "std.pt", d / "fog.rws", "-a", 1, "-o", d / "fog.rws")
    assert code == 2 and "would overwrite the signature" in out, out
    for target in spellings(d / "std.pt"):
        code, out = run("apply", d / "std.pt", d / "fog.rws", "-a", 1, "-o", target)
        assert code == 2 and "--in-place" in out, out
    assert (d / "fog.rws").read_bytes() == sig_bytes and (d / "std.pt").read_bytes() == model_bytes
    # in place through a hard link is still in place
    code, out = run(
        "apply", d / "std.pt", d / "fog.rws", "-a", 1, "--in-place", "-o", d / "via-hardlink"
    )
    assert code == 0, out
    assert (d / "std.pt").read_bytes() != model_bytes
    code, out = run(
        "apply", d / "fog.pt", d / "fog.rws", "-a", 1, "--in-place", "-o", d / "init.pt"
    )
    assert code == 2 and "in place means" in out


def test_apply_writes_the_format_the_output_names(trio):
    d = trio
    std = torch.load(d / "std.pt", weights_only=True)
    expected = rwsfmt.apply(std, [(rwsfmt.load(d / "fog.rws"), 0.8)])

    code, out = run("apply", d / "std.pt", d / "fog.rws", "-a", 0.8, "-o", d / "o.safetensors")
    assert code == 0, out
    assert "(safetensors)" in out
    assert_bit_equal(load_file(d / "o.safetensors"), expected)

    code, out = run("apply", d / "o.safetensors", d / "fog.rws", "-a", 0, "-o", d / "back.pt")
    assert code == 0, out
    assert_bit_equal(torch.load(d / "back.pt", weights_only=True), expected)

    for bad in ("o.rws", "o", "o.txt"):
        code, out = run("apply", d / "std.pt", d / "fog.rws", "-a", 1, "-o", d / bad)
        assert code == 2 and ".safetensors" in out and "fix:" in out, out
        assert not (d / bad).exists()
    (d / "folder").mkdir()
    code, out = run("apply", d / "std.pt", d / "fog.rws", "-a", 1, "-o", d / "folder")
    assert code == 2 and f"{d / 'folder'}: is a folder" in out, out
    assert ".tmp" not in out and os.listdir(d / "folder") == []


def test_a_wrapped_checkpoint_converts_to_plain_safetensors_and_says_so(trio):
    d = trio
    std = torch.load(d / "std.pt", weights_only=True)
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in std.items()}}, d / "w.pt")
    code, out = run("apply", d / "w.pt", d / "fog.rws", "-a", 0.5, "-o", d / "w.safetensors")
    assert code == 0, out
    assert "note: the input's layout (under 'state_dict', prefix 'module.' removed)" in out
    assert_bit_equal(
        load_file(d / "w.safetensors"), rwsfmt.apply(std, [(rwsfmt.load(d / "fog.rws"), 0.5)])
    )


def test_folder_to_single_file(tmp_path):
    model = make_net()
    sd = model.state_dict()
    folder = tmp_path / "std"
    folder.mkdir()
    save_file(sd, folder / "model.safetensors")
    (folder / "config.json").write_text("{}")
    rwsfmt.save(make_sig(model, 1), tmp_path / "fog.rws")
    code, out = run("apply", folder, tmp_path / "fog.rws", "-a", 1, "-o", tmp_path / "one.pt")
    assert code == 0, out
    assert "config" in out  # the note says the folder's other files stay behind
    assert_bit_equal(
        torch.load(tmp_path / "one.pt", weights_only=True),
        rwsfmt.apply(sd, [(rwsfmt.load(tmp_path / "fog.rws"), 1.0)]),
    )


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_same_inputs_give_the_same_bytes(trio, suffix):
    d = trio
    outputs = []
    for i in range(2):
        out = d / f"run{i}" / f"patched{suffix}"
        out.parent.mkdir()
        code, text = run("apply", d / "std.pt", d / "fog.rws", "-a", 0.8, "-o", out)
        assert code == 0, text
        outputs.append(out.read_bytes())
    assert outputs[0] == outputs[1]


def test_a_closed_pipe_ends_inspect_quietly_with_exit_0(tmp_path):
    """`rwsfmt inspect f.rws | head -1`: the reader has enough, nothing failed."""
    tensors = {f"layers.{i}.weight": torch.ones(2, 2) for i in range(3000)}
    rwsfmt.save(rwsfmt.from_tensors(tensors, label="many"), tmp_path / "many.rws")
    proc = subprocess.Popen(
        [sys.executable, "-m", "rwsfmt", "inspect", str(tmp_path / "many.rws"), "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    proc.stdout.readline()
    proc.stdout.close()  # like head -1
    assert proc.wait(timeout=60) == 0
    assert proc.stderr.read() == b""


def test_a_patched_folder_leaves_out_stale_weights_of_other_formats(tmp_path):
    """A folder with model.safetensors and an old pytorch_model.bin: the .bin copy would sit
    unpatched beside the patched file, and a loader could pick it."""
    model = make_net()
    sd = model.state_dict()
    folder = tmp_path / "std"
    (folder / "onnx").mkdir(parents=True)
    save_file(sd, folder / "model.safetensors")
    torch.save(sd, folder / "pytorch_model.bin")
    (folder / "onnx" / "model.onnx").write_bytes(b"stale")
    (folder / "config.json").write_text("{}")
    rwsfmt.save(make_sig(model, 1), tmp_path / "fog.rws")
    code, out = run("apply", folder, tmp_path / "fog.rws", "-a", 1, "-o", tmp_path / "out")
    assert code == 0, out
    assert "not copied: onnx/model.onnx, pytorch_model.bin" in out
    assert sorted(p.name for p in (tmp_path / "out").rglob("*")) == [
        "config.json",
        "model.safetensors",
        "rwsfmt_applied.json",  # the record of applied signatures
    ]


def rwsfmt_cli(*args, timeout: float = 120) -> subprocess.CompletedProcess:
    """The `rwsfmt` command in a child process (a hang fails the test instead of stalling it)."""
    return subprocess.run(
        [sys.executable, "-m", "rwsfmt", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="POSIX named pipes")
def test_outputs_onto_special_files_are_refused_without_hanging(trio):
    """A named pipe or a device (as root, /dev/null would be replaced) is refused at once."""
    d = trio
    os.mkfifo(d / "pipe.pt")
    commands = [
        ["extract", d / "std.pt", d / "fog.pt", d / "init.pt", "-o"],
        ["apply", d / "std.pt", d / "fog.rws", "-a", "1", "-o"],
        ["merge", d / "fog.rws", d / "fog.rws", "-o"],
    ]
    for command in commands:
        for out, kind in (
            (d / "pipe.pt", "a named pipe (FIFO)"),
            ("/dev/null", "a character device"),
        ):
            proc = rwsfmt_cli(*command, out)
            assert proc.returncode == 2, proc.stderr
            assert proc.stderr.startswith(f"error: {out}: is {kind}, not a regular file"), (
                proc.stderr
            )
            assert "fix:" in proc.stderr and "Traceback" not in proc.stderr
    assert stat.S_ISFIFO(os.stat(d / "pipe.pt").st_mode)
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
    assert [n for n in os.listdir(d) if n.startswith(".")] == []


def test_an_output_symlink_is_written_through(trio):
    """-o LINK replaces the file the link points to, and the link stays (as cp does)."""
    d = trio
    (d / "models").mkdir()
    (d / "models" / "patched.pt").write_bytes(b"an older patched model")
    os.chmod(d / "models" / "patched.pt", 0o640)
    (d / "latest.pt").symlink_to(os.path.join("models", "patched.pt"))
    code, out = run("apply", d / "std.pt", d / "fog.rws", "-a", 0.8, "-o", d / "latest.pt")
    assert code == 0, out
    assert os.readlink(d / "latest.pt") == os.path.join("models", "patched.pt")
    expected = rwsfmt.apply(
        torch.load(d / "std.pt", weights_only=True), [(rwsfmt.load(d / "fog.rws"), 0.8)]
    )
    assert_bit_equal(torch.load(d / "models" / "patched.pt", weights_only=True), expected)
    assert stat.S_IMODE(os.stat(d / "models" / "patched.pt").st_mode) == 0o640
    assert [n for n in os.listdir(d / "models") if n.startswith(".")] == []


@pytest.mark.skipif(os.name != "posix", reason="SIGKILL")
def test_a_killed_writers_temporary_is_removed_by_the_next_apply(trio):
    """What `kill -9` of an apply leaves (a multi-MB temporary) goes on the next run."""
    d = trio
    killed = start_writer(d / "patched.pt")
    killed.kill()
    killed.wait(timeout=60)
    assert len(temporaries(d, "patched.pt", killed.pid)) == 1
    code, out = run("apply", d / "std.pt", d / "fog.rws", "-a", 0.8, "-o", d / "patched.pt")
    assert code == 0, out
    assert [n for n in os.listdir(d) if n.startswith(".")] == []


NO_SPACE = """
set -e
full=$1 ro=$2
mount -t tmpfs -o size=256k tmpfs "$full"
mkdir "$ro" && mount -t tmpfs -o ro tmpfs "$ro"
shift 2
for out in "$@"; do
  rc=0; {python} -m rwsfmt apply {model} {sig} -a 1 -q -o "$out" || rc=$?
  echo "rc=$rc"
done
ls -A "$full"
echo "listed"
"""


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare (util-linux)")
def test_a_full_or_read_only_disk_is_a_clear_error_with_nothing_left(tmp_path):
    """A real ENOSPC: a 256 KB tmpfs mounted in a private mount namespace (unprivileged,
    through a user namespace) and a 1 MB model, for each output format; and a read-only
    mount."""
    d = tmp_path
    g = torch.Generator().manual_seed(0)
    torch.save({"w": torch.randn(512, 512, generator=g)}, d / "std.pt")
    rwsfmt.save(
        rwsfmt.from_tensors({"w": torch.randn(512, 512, generator=g)}, label="t"), d / "t.rws"
    )
    full, ro = d / "full", d / "ro"
    full.mkdir()
    outs = [full / "out.pt", full / "out.safetensors", ro / "out.pt"]
    script = NO_SPACE.format(python=sys.executable, model=d / "std.pt", sig=d / "t.rws")
    probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"user namespaces unavailable: {probe.stderr.decode().strip()}")
    proc = subprocess.run(
        ["unshare", "-rm", "sh", "-c", script, "sh", full, ro, *outs],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.stdout.splitlines() == ["rc=2", "rc=2", "rc=2", "listed"], proc.stderr
    errors = proc.stderr.split("error: ")[1:]
    for out, error in zip(outs[:2], errors, strict=False):
        assert error.startswith(f"{out}: cannot be written: no space left on device\n  fix: ")
        assert f"free space on the disk holding {full}" in error
    assert errors[2].startswith(f"{ro / 'out.pt'}: cannot be written: read-only file system")
    assert "Traceback" not in proc.stderr and len(errors) == 3
