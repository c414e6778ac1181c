"""Outputs: never over an input, the format the name asks for, the same bytes every run."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file
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
    ]
