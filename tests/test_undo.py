"""`apply --save-undo`: the undo file restores the input bit for bit, statistics included."""

from __future__ import annotations

import io
import json
import os

import pytest
import torch
from bitwise import assert_bit_equal, bits_of
from click.testing import CliRunner
from safetensors.torch import load_file, save_file
from test_patch import make_net, make_sig

import rwsfmt
from rwsfmt.errors import RwsError
from rwsfmt.quant import QuantConfig
from rwsfmt_cli.main import main

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
STATS = ("features.1.running_mean", "features.1.running_var")


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


def save_model(sd: dict[str, torch.Tensor], path) -> None:
    """A checkpoint as the usual writers leave it: safetensors with `format: pt`, or torch.save
    through a file object (the archive folder named `archive`, as rwsfmt writes it)."""
    if str(path).endswith(".safetensors"):
        save_file(sd, path, metadata={"format": "pt"})
    else:
        buffer = io.BytesIO()
        torch.save(sd, buffer)
        path.write_bytes(buffer.getvalue())


def load_model(path) -> dict[str, torch.Tensor]:
    if str(path).endswith(".safetensors"):
        return load_file(path)
    return dict(torch.load(path, weights_only=True))


def big_sig(model):
    """Deltas on every conv and the head, targets for both BatchNorm layers' statistics."""
    sd = model.state_dict()
    names = tuple(n for n, v in sd.items() if v.is_floating_point() and "running" not in n)
    targets = tuple(n for n in sd if "running_" in n)
    return make_sig(model, 7, names=names, targets=targets)


def restored_counts(a: dict, b: dict) -> tuple[int, int]:
    """(tensors of `a` bit-equal in `b`, tensors of `a`)."""
    same = sum(
        torch.equal(bits_of(a[k]), bits_of(b[k])) if a[k].is_floating_point() else a[k].equal(b[k])
        for k in a
    )
    return same, len(a)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_apply_then_the_undo_file_gives_the_input_back_bit_for_bit(tmp_path, dtype, suffix):
    model = make_net(dtype=dtype)
    sd = model.state_dict()
    src = tmp_path / f"std{suffix}"
    save_model(sd, src)
    rwsfmt.save(big_sig(model), tmp_path / "fog.rws")
    patched, undo, back = tmp_path / f"p{suffix}", tmp_path / "undo.rws", tmp_path / f"b{suffix}"
    code, out = run(
        "apply", src, tmp_path / "fog.rws", "-a", 1.5, "-o", patched, "--save-undo", undo
    )
    assert code == 0, out
    assert f"wrote undo file {undo}" in out
    p = load_model(patched)
    changed = [k for k in sd if not torch.equal(p[k], sd[k])]
    assert len(changed) == len([k for k in sd if sd[k].is_floating_point()])  # all but counters
    assert set(STATS) <= set(changed)

    code, out = run("apply", patched, undo, "-a", 1, "-o", back)
    assert code == 0, out
    assert "bit for bit" in out
    assert restored_counts(sd, load_model(back)) == (len(sd), len(sd))
    assert_bit_equal(load_model(back), sd)
    assert back.read_bytes() == src.read_bytes()  # the record gone, the header as it was


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_a_negative_alpha_does_not_restore_the_statistics_but_the_undo_file_does(tmp_path, dtype):
    model = make_net(dtype=dtype)
    sd = model.state_dict()
    save_model(sd, tmp_path / "std.pt")
    sig = big_sig(model)
    rwsfmt.save(sig, tmp_path / "fog.rws")
    rwsfmt.apply_checkpoint(
        tmp_path / "std.pt", [(sig, 1.0)], tmp_path / "p.pt", save_undo=tmp_path / "u.rws"
    )
    minus = rwsfmt.apply(load_model(tmp_path / "p.pt"), [(sig, -1.0)])
    for name in STATS:  # convex: a negative alpha counts as 0 for targets
        assert not torch.equal(minus[name], sd[name])
    back = rwsfmt.apply(load_model(tmp_path / "p.pt"), [(rwsfmt.load(tmp_path / "u.rws"), 1.0)])
    assert_bit_equal(back, sd)


def test_in_place_round_trip_and_undo_files_in_reverse_order(tmp_path):
    model = make_net(dtype=torch.float16)
    src = tmp_path / "m.safetensors"
    save_model(model.state_dict(), src)
    original = src.read_bytes()
    rwsfmt.save(big_sig(model), tmp_path / "fog.rws")
    rwsfmt.save(make_sig(model, 3, label="snow"), tmp_path / "snow.rws")
    for sig, undo in (("fog", "u1.rws"), ("snow", "u2.rws")):
        code, out = run(
            "apply",
            src,
            tmp_path / f"{sig}.rws",
            "-a",
            0.8,
            "--in-place",
            "--save-undo",
            tmp_path / undo,
        )
        assert code == 0, out
    twice = src.read_bytes()
    code, out = run("apply", src, tmp_path / "u1.rws", "-a", 1, "--in-place")
    assert code == 2 and "changed since that patch" in out and "reverse order" in out, out
    assert src.read_bytes() == twice  # refused: nothing written
    for undo in ("u2.rws", "u1.rws"):
        code, out = run("apply", src, tmp_path / undo, "-a", 1, "--in-place")
        assert code == 0, out
    assert src.read_bytes() == original


def test_sharded_folder_round_trip(tmp_path):
    model = make_net(dtype=torch.bfloat16)
    sd = model.state_dict()
    folder = tmp_path / "std"
    folder.mkdir()
    first = {
        k: v for k, v in sd.items() if k.startswith("features.0") or k.startswith("features.1")
    }
    shards = {
        "model-1.safetensors": first,
        "model-2.safetensors": {k: v for k, v in sd.items() if k not in first},
    }
    weight_map = {}
    for shard, tensors in shards.items():
        save_model(tensors, folder / shard)
        weight_map.update(dict.fromkeys(tensors, shard))
    index = json.dumps({"metadata": {}, "weight_map": weight_map})
    (folder / "model.safetensors.index.json").write_text(index)
    (folder / "config.json").write_text("{}")
    rwsfmt.save(big_sig(model), tmp_path / "fog.rws")
    code, out = run(
        "apply",
        folder,
        tmp_path / "fog.rws",
        "-a",
        2,
        "-o",
        tmp_path / "p",
        "--save-undo",
        tmp_path / "u.rws",
    )
    assert code == 0, out
    assert (tmp_path / "p" / "rwsfmt_applied.json").exists()
    code, out = run("apply", tmp_path / "p", tmp_path / "u.rws", "-a", 1, "-o", tmp_path / "b")
    assert code == 0, out
    assert sorted(os.listdir(tmp_path / "b")) == sorted(os.listdir(folder))
    for name in os.listdir(folder):
        assert (tmp_path / "b" / name).read_bytes() == (folder / name).read_bytes(), name


def test_conversion_and_an_input_saved_by_path(tmp_path):
    """A .pt saved by path (its archive named after the file) patched into safetensors: the
    undo restores every tensor, in the format it is written to."""
    model = make_net()
    sd = model.state_dict()
    torch.save(sd, tmp_path / "std.pt")
    rwsfmt.save(big_sig(model), tmp_path / "fog.rws")
    rwsfmt.apply_checkpoint(
        tmp_path / "std.pt",
        [(tmp_path / "fog.rws", 1.0)],
        tmp_path / "p.safetensors",
        save_undo=tmp_path / "u.rws",
    )
    report = rwsfmt.apply_checkpoint(
        tmp_path / "p.safetensors", [(tmp_path / "u.rws", 1.0)], tmp_path / "b.pt"
    )
    assert report.undone and report.applied == []
    assert_bit_equal(load_model(tmp_path / "b.pt"), sd)


def test_misuse_of_undo_files_is_refused_before_anything_is_written(tmp_path):
    model = make_net()
    save_model(model.state_dict(), tmp_path / "std.pt")
    rwsfmt.save(make_sig(model, 1), tmp_path / "fog.rws")
    p, u = tmp_path / "p.pt", tmp_path / "u.rws"
    assert (
        run("apply", tmp_path / "std.pt", tmp_path / "fog.rws", "-a", 1, "-o", p, "--save-undo", u)[
            0
        ]
        == 0
    )
    before = sorted(os.listdir(tmp_path))
    cases = [
        (["apply", p, u, "-a", 0.5, "-o", tmp_path / "x.pt"], "rwsfmt undo MODEL UNDO.rws"),
        (["apply", p, u, tmp_path / "fog.rws", "-a", 1, "-o", tmp_path / "x.pt"], "alone"),
        (
            ["apply", p, u, "-a", 1, "-o", tmp_path / "x.pt", "--save-undo", tmp_path / "v.rws"],
            "itself an undo file",
        ),
        (
            [
                "apply",
                p,
                tmp_path / "fog.rws",
                "-a",
                1,
                "--dry-run",
                "--save-undo",
                tmp_path / "v.rws",
            ],
            "dry run",
        ),
        (
            [
                "apply",
                p,
                tmp_path / "fog.rws",
                "-a",
                1,
                "-o",
                tmp_path / "x.pt",
                "--force",
                "--save-undo",
                tmp_path / "fog.rws",
            ],
            "would overwrite the signature",
        ),
        (
            [
                "apply",
                tmp_path / "std.pt",
                tmp_path / "fog.rws",
                "-a",
                1,
                "-o",
                tmp_path / "x.pt",
                "--save-undo",
                tmp_path / "x.pt",
            ],
            "would overwrite the patched model",
        ),
        (["apply", tmp_path / "std.pt", u, "-a", 1, "-o", tmp_path / "x.pt"], "changed since"),
    ]
    for args, expected in cases:
        code, out = run(*args)
        assert code == 2 and expected in out and "fix:" in out and "Traceback" not in out, out
        assert sorted(os.listdir(tmp_path)) == before, args


def test_converted_undo_files_still_restore_and_forged_ones_are_refused(tmp_path):
    """convert keeps targets as exact float32, so an undo file survives it; a file that says
    `method: undo` without the digests is refused."""
    model = make_net()
    sd = model.state_dict()
    save_model(sd, tmp_path / "std.pt")
    rwsfmt.save(make_sig(model, 1), tmp_path / "fog.rws")
    rwsfmt.apply_checkpoint(
        tmp_path / "std.pt",
        [(tmp_path / "fog.rws", 1.0)],
        tmp_path / "p.pt",
        save_undo=tmp_path / "u.rws",
    )
    converted = rwsfmt.convert(rwsfmt.load(tmp_path / "u.rws"), QuantConfig(bits=4))
    rwsfmt.save(converted, tmp_path / "u4.rws")
    rwsfmt.apply_checkpoint(tmp_path / "p.pt", [(tmp_path / "u4.rws", 1.0)], tmp_path / "b.pt")
    assert_bit_equal(load_model(tmp_path / "b.pt"), sd)
    forged = rwsfmt.from_tensors(
        [(n, sd[n], "target") for n in STATS],
        label="undo",
        quant=QuantConfig(bits=32),
        provenance={"method": "undo"},
    )
    with pytest.raises(RwsError, match="does not hold exact values with their digests"):
        rwsfmt.apply(sd, forged, 1.0)


def test_save_undo_refuses_a_float64_model(tmp_path):
    model = make_net(dtype=torch.float64)
    save_model(model.state_dict(), tmp_path / "f64.pt")
    rwsfmt.save(make_sig(model, 1), tmp_path / "fog.rws")
    with pytest.raises(RwsError, match=r"cannot hold features.0.weight \(float64\)"):
        rwsfmt.apply_checkpoint(
            tmp_path / "f64.pt",
            [(tmp_path / "fog.rws", 1.0)],
            tmp_path / "o.pt",
            save_undo=tmp_path / "u.rws",
        )
    assert sorted(os.listdir(tmp_path)) == ["f64.pt", "fog.rws"]


def test_a_failing_patch_leaves_neither_output_nor_undo_file(tmp_path):
    model = make_net(dtype=torch.float16)
    save_model(model.state_dict(), tmp_path / "std.safetensors")
    rwsfmt.save(make_sig(model, 1), tmp_path / "fog.rws")
    code, out = run(
        "apply",
        tmp_path / "std.safetensors",
        tmp_path / "fog.rws",
        "-a",
        1e6,
        "-o",
        tmp_path / "p.safetensors",
        "--save-undo",
        tmp_path / "u.rws",
    )
    assert code == 2 and "beyond the float16 range" in out, out
    assert sorted(os.listdir(tmp_path)) == ["fog.rws", "std.safetensors"]


def test_live_patches_refuse_undo_files(tmp_path):
    model = make_net()
    save_model(model.state_dict(), tmp_path / "std.pt")
    rwsfmt.apply_checkpoint(
        tmp_path / "std.pt",
        make_sig(model, 1),
        tmp_path / "p.pt",
        1.0,
        save_undo=tmp_path / "u.rws",
    )
    with pytest.raises(RwsError, match="handle.remove"):
        rwsfmt.patch(model, rwsfmt.load(tmp_path / "u.rws"), 1.0)


def test_an_undo_on_a_file_whose_record_was_stripped_warns_and_restores(tmp_path):
    model = make_net()
    sd = model.state_dict()
    save_model(sd, tmp_path / "std.safetensors")
    rwsfmt.save(make_sig(model, 1), tmp_path / "fog.rws")
    rwsfmt.apply_checkpoint(
        tmp_path / "std.safetensors",
        [(tmp_path / "fog.rws", 1.0)],
        tmp_path / "p.safetensors",
        save_undo=tmp_path / "u.rws",
    )
    save_file(load_file(tmp_path / "p.safetensors"), tmp_path / "stripped.safetensors")
    with pytest.warns(rwsfmt.RwsWarning, match=r"does not list the patch(.|\n)*fix: "):
        rwsfmt.apply_checkpoint(
            tmp_path / "stripped.safetensors",
            [(tmp_path / "u.rws", 1.0)],
            tmp_path / "b.safetensors",
        )
    assert_bit_equal(load_model(tmp_path / "b.safetensors"), sd)
