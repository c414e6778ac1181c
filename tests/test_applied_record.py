"""The record of applied signatures a patched checkpoint carries, and `rwsfmt inspect MODEL`."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import zipfile

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import save_file
from test_patch import make_net, make_sig

import rwsfmt
from rwsfmt.errors import RwsError
from rwsfmt_cli.main import main

EPOCH = "1700000000"  # 2023-11-14T22:13:20Z


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture
def files(tmp_path, monkeypatch):
    """A BatchNorm model as safetensors and as a bare .pt state dict, and two signatures."""
    monkeypatch.setenv("SOURCE_DATE_EPOCH", EPOCH)
    model = make_net()
    save_file(model.state_dict(), tmp_path / "std.safetensors", metadata={"format": "pt"})
    torch.save(model.state_dict(), tmp_path / "std.pt")
    rwsfmt.save(make_sig(model, 1, label="fog"), tmp_path / "fog.rws")
    rwsfmt.save(make_sig(model, 2, label="snow"), tmp_path / "snow.rws")
    return tmp_path, model


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def entry(tmp, label: str, alpha: float) -> dict:
    return {
        "label": label,
        "file": f"{label}.rws",
        "sha256": sha256(tmp / f"{label}.rws"),
        "alpha": alpha,
        "stats": "convex",
        "tool_version": rwsfmt.__version__,
        "created": "2023-11-14T22:13:20Z",
    }


def safetensors_record(path) -> list[dict]:
    with safe_open(path, "pt") as f:
        return json.loads(f.metadata()["rwsfmt.applied"])


def zip_record(path) -> list[dict]:
    """Read with zipfile alone: no torch, no unpickling."""
    with zipfile.ZipFile(path) as z:
        return json.loads(z.read("archive/rwsfmt_applied.json"))


def test_safetensors_output_records_each_signature_and_keeps_its_metadata(files):
    tmp, _ = files
    code, out, _ = run(
        "apply", tmp / "std.safetensors", tmp / "fog.rws", "-a", 0.8, "-o", tmp / "p.safetensors"
    )
    assert code == 0, out
    assert safetensors_record(tmp / "p.safetensors") == [entry(tmp, "fog", 0.8)]
    with safe_open(tmp / "p.safetensors", "pt") as f:
        assert f.metadata()["format"] == "pt"
    code, out, _ = run(
        "apply",
        tmp / "p.safetensors",
        tmp / "snow.rws",
        "-a",
        0.3,
        "-o",
        tmp / "pp.safetensors",
        "--stats",
        "sum",
    )
    assert code == 0, out
    assert safetensors_record(tmp / "pp.safetensors") == [
        entry(tmp, "fog", 0.8),
        {**entry(tmp, "snow", 0.3), "stats": "sum"},
    ]


def test_pytorch_record_is_a_zip_entry_and_the_state_dict_still_loads_strictly(files):
    tmp, model = files
    code, out, _ = run(
        "apply", tmp / "std.pt", tmp / "fog.rws", tmp / "snow.rws", "-a", 0.5, "-o", tmp / "p.pt"
    )
    assert code == 0, out
    assert zip_record(tmp / "p.pt") == [entry(tmp, "fog", 0.5), entry(tmp, "snow", 0.5)]
    for mmap in (False, True):
        state = torch.load(tmp / "p.pt", weights_only=True, mmap=mmap)
        assert list(state) == list(model.state_dict())  # no extra key beside the weights
        fresh = make_net(seed=5)
        fresh.load_state_dict(state, strict=True)
        expected = rwsfmt.apply(
            model.state_dict(),
            [(rwsfmt.load(tmp / "fog.rws"), 0.5), (rwsfmt.load(tmp / "snow.rws"), 0.5)],
        )
        for k, v in fresh.state_dict().items():
            assert torch.equal(v, expected[k]), k


def test_wrapped_checkpoints_folders_and_conversions_carry_the_record(files):
    tmp, model = files
    torch.save({"state_dict": model.state_dict(), "epoch": 3}, tmp / "train.ckpt")
    rwsfmt.apply_checkpoint(tmp / "train.ckpt", [(tmp / "fog.rws", 1.0)], tmp / "p.ckpt")
    assert zip_record(tmp / "p.ckpt") == [entry(tmp, "fog", 1.0)]
    assert torch.load(tmp / "p.ckpt", weights_only=True)["epoch"] == 3

    rwsfmt.apply_checkpoint(tmp / "p.ckpt", [(tmp / "snow.rws", 1.0)], tmp / "c.safetensors")
    assert safetensors_record(tmp / "c.safetensors") == [
        entry(tmp, "fog", 1.0),
        entry(tmp, "snow", 1.0),
    ]

    folder = tmp / "hf"
    folder.mkdir()
    save_file(model.state_dict(), folder / "model.safetensors")
    report = rwsfmt.apply_checkpoint(folder, [(tmp / "fog.rws", 0.25)], tmp / "hf2")
    assert report.applied == [entry(tmp, "fog", 0.25)]
    record = json.loads((tmp / "hf2" / "rwsfmt_applied.json").read_text())
    assert record == [entry(tmp, "fog", 0.25)]
    with safe_open(tmp / "hf2" / "model.safetensors", "pt") as f:
        assert f.metadata() is None  # the shard itself is untouched but for its tensors


def test_the_same_signature_twice_is_refused_unless_forced(files):
    tmp, _ = files
    rwsfmt.apply_checkpoint(
        tmp / "std.safetensors", [(tmp / "fog.rws", 0.8)], tmp / "p.safetensors"
    )
    before = sorted(p.name for p in tmp.iterdir())
    code, out, err = run(
        "apply", tmp / "p.safetensors", tmp / "fog.rws", "-a", 0.5, "-o", tmp / "pp.safetensors"
    )
    assert code == 2, out
    assert "'fog'" in err and "already applied to this model at alpha 0.8" in err
    assert "--force" in err and "undo file" in err
    assert sorted(p.name for p in tmp.iterdir()) == before

    code, out, err = run(
        "apply",
        tmp / "std.safetensors",
        tmp / "fog.rws",
        tmp / "fog.rws",
        "-a",
        0.5,
        "-o",
        tmp / "pp.safetensors",
    )
    # twice in one call: a warning (the same signature given twice), not the record's refusal
    assert code == 0 and "warning: " in err and "is the same file as signature 1" in err

    code, out, err = run(
        "apply",
        tmp / "p.safetensors",
        tmp / "fog.rws",
        "-a",
        0.5,
        "-o",
        tmp / "pp.safetensors",
        "--force",
        "--quiet",
    )
    assert code == 0, err
    assert out == "" and err.startswith("note: ") and "signature 'fog'" in err
    assert "(--force)" in err
    assert safetensors_record(tmp / "pp.safetensors") == [
        entry(tmp, "fog", 0.8),
        entry(tmp, "fog", 0.5),
    ]
    # alpha 0 changes nothing: neither checked nor recorded
    rwsfmt.apply_checkpoint(tmp / "p.safetensors", [(tmp / "fog.rws", 0.0)], tmp / "z.pt")
    assert zip_record(tmp / "z.pt") == [entry(tmp, "fog", 0.8)]


def test_inspect_model_shows_format_tensors_and_record(files):
    tmp, _ = files
    code, out, _ = run("inspect", tmp / "std.pt")
    assert code == 0, out
    assert "pytorch" in out and "applied  none" in out
    rwsfmt.apply_checkpoint(tmp / "std.pt", [(tmp / "fog.rws", 0.8)], tmp / "p.pt")
    code, out, _ = run("inspect", tmp / "p.pt")
    assert code == 0, out
    assert "1 signature(s) recorded" in out and "fog.rws" in out and "0.8" in out
    assert sha256(tmp / "fog.rws")[:12] in out and "2023-11-14 22:13" in out
    code, out, _ = run("inspect", "--json", tmp / "p.pt")
    info = json.loads(out)
    assert info["applied"] == [entry(tmp, "fog", 0.8)]
    assert info["format"] == "pytorch" and info["tensor_count"] == 16
    assert info["dtypes"] == {"float32": 14, "int64": 2}


def test_inspect_of_a_folder_and_of_a_file_that_is_neither(files):
    tmp, model = files
    folder = tmp / "hf"
    folder.mkdir()
    save_file(model.state_dict(), folder / "model.safetensors")
    rwsfmt.apply_checkpoint(folder, [(tmp / "snow.rws", 1.0)], tmp / "hf2")
    info = json.loads(run("inspect", "--json", tmp / "hf2")[1])
    assert info["folder"] and [e["label"] for e in info["applied"]] == ["snow"]
    (tmp / "notes.txt").write_text("hello")
    code, out, err = run("inspect", tmp / "notes.txt")
    assert code == 2 and "not a .rws file" in err


def test_a_damaged_record_is_an_error_not_a_traceback(files):
    tmp, model = files
    save_file(model.state_dict(), tmp / "bad.safetensors", metadata={"rwsfmt.applied": "{oops"})
    for args in (
        ["inspect", tmp / "bad.safetensors"],
        ["apply", tmp / "bad.safetensors", tmp / "fog.rws", "-a", 1, "-o", tmp / "o.safetensors"],
    ):
        code, out, err = run(*args)
        assert code == 2 and "not a JSON list of objects" in err and "fix:" in err, err
    # extract does not read the record
    sd = model.state_dict()
    with pytest.warns(rwsfmt.RwsWarning, match="all zero"):  # robust is init here
        rwsfmt.extract(tmp / "bad.safetensors", sd, sd, layers=1)


def test_the_record_is_deterministic_under_source_date_epoch(files):
    tmp, _ = files
    for out in ("a.pt", "b.pt"):
        rwsfmt.apply_checkpoint(tmp / "std.pt", [(tmp / "fog.rws", 0.8)], tmp / out)
    assert (tmp / "a.pt").read_bytes() == (tmp / "b.pt").read_bytes()


def test_inspect_of_a_model_reads_no_pickle_for_the_record(files):
    """The record of a .pt file is read with zipfile: a reader without torch gets it."""
    tmp, _ = files
    rwsfmt.apply_checkpoint(tmp / "std.pt", [(tmp / "fog.rws", 0.8)], tmp / "p.pt")
    code = (
        "import sys\n"
        "from rwsfmt.applied import read_zip_record\n"
        f"print(read_zip_record({str(tmp / 'p.pt')!r})[0]['label'], 'torch' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.split() == ["fog", "False"], result.stderr


def test_library_errors_name_the_model(files):
    tmp, _ = files
    rwsfmt.apply_checkpoint(tmp / "std.pt", [(tmp / "fog.rws", 0.8)], tmp / "p.pt")
    with pytest.raises(RwsError) as info:
        rwsfmt.apply_checkpoint(tmp / "p.pt", [(tmp / "fog.rws", 0.8)], tmp / "pp.pt")
    assert info.value.path == str(tmp / "p.pt")
    with pytest.warns(rwsfmt.RwsWarning, match=r"already applied.*force=True"):
        report = rwsfmt.apply_checkpoint(
            tmp / "p.pt", [(tmp / "fog.rws", 0.8)], tmp / "pp.pt", force=True
        )
    assert len(report.applied) == 2
