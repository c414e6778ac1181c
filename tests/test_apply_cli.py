"""`rwsfmt apply` on real checkpoint files: formats, byte-identity, safety rails, exit codes."""

from __future__ import annotations

import json
import os
import stat
import struct
import subprocess
import sys
import time

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file
from test_patch import assert_bit_equal, make_net, make_sig

import rwsfmt
from rwsfmt.atomic import target_lock
from rwsfmt_cli.main import main

PATCHED = [
    "features.0.weight",
    "features.0.bias",
    "features.1.running_mean",
    "features.1.running_var",
    "features.3.weight",
]


def run(*args: str):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


def safetensors_spans(path) -> tuple[bytes, dict[str, bytes]]:
    """(the header bytes, tensor name -> its raw data bytes) of a safetensors file."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = f.read(n)
        data = f.read()
    entries = {k: v for k, v in json.loads(header).items() if k != "__metadata__"}
    return header, {k: data[slice(*e["data_offsets"])] for k, e in entries.items()}


@pytest.fixture
def files(tmp_path):
    """A float32 model as safetensors, two signatures (fog from this model) on disk."""
    model = make_net()
    sd = model.state_dict()
    save_file(sd, tmp_path / "std.safetensors", metadata={"format": "pt"})
    rwsfmt.save(make_sig(model, 1, label="fog"), tmp_path / "fog.rws")
    rwsfmt.save(make_sig(model, 2, label="snow"), tmp_path / "snow.rws")
    return tmp_path, sd


def test_safetensors_output_patches_only_the_signature_tensors(files):
    tmp, sd = files
    code, out = run(
        "apply", tmp / "std.safetensors", tmp / "fog.rws", "-a", 0.8, "-o", tmp / "o.safetensors"
    )
    assert code == 0, out
    assert "patched 5 of" in out and "same architecture" in out and "o.safetensors" in out
    expected = rwsfmt.apply(sd, [(rwsfmt.load(tmp / "fog.rws"), 0.8)])
    assert_bit_equal(load_file(tmp / "o.safetensors"), expected)
    head_in, spans_in = safetensors_spans(tmp / "std.safetensors")
    head_out, spans_out = safetensors_spans(tmp / "o.safetensors")
    doc_in, doc_out = json.loads(head_in), json.loads(head_out)
    record = json.loads(doc_out["__metadata__"].pop("rwsfmt.applied"))
    assert doc_in == doc_out  # names, dtypes, offsets and metadata kept, the record added
    assert [(e["label"], e["alpha"]) for e in record] == [("fog", 0.8)]
    for name in spans_in:
        assert (spans_in[name] == spans_out[name]) == (name not in PATCHED), name


def test_two_signatures_with_one_alpha_each_compose(files):
    tmp, sd = files
    code, out = run(
        "apply",
        tmp / "std.safetensors",
        tmp / "fog.rws",
        tmp / "snow.rws",
        "--alpha",
        0.6,
        "--alpha",
        0.3,
        "-o",
        tmp / "o.safetensors",
    )
    assert code == 0, out
    fog, snow = rwsfmt.load(tmp / "fog.rws"), rwsfmt.load(tmp / "snow.rws")
    assert_bit_equal(load_file(tmp / "o.safetensors"), rwsfmt.apply(sd, [(fog, 0.6), (snow, 0.3)]))
    code, out = run(
        "apply",
        tmp / "std.safetensors",
        tmp / "fog.rws",
        tmp / "snow.rws",
        "-a",
        0.5,
        "-o",
        tmp / "p.safetensors",
    )
    assert code == 0, out
    assert_bit_equal(load_file(tmp / "p.safetensors"), rwsfmt.apply(sd, [(fog, 0.5), (snow, 0.5)]))


def test_alpha_count_must_match(files):
    tmp, _ = files
    code, out = run(
        "apply",
        tmp / "std.safetensors",
        tmp / "fog.rws",
        tmp / "snow.rws",
        "-a",
        0.1,
        "-a",
        0.2,
        "-a",
        0.3,
        "-o",
        tmp / "o.safetensors",
    )
    assert code == 2 and "3 --alpha values for 2 signatures" in out
    assert "fix: give one --alpha for all the signatures, or one per signature" in out
    code, out = run("apply", tmp / "std.safetensors", tmp / "fog.rws", "-a", "0.8,0.3")
    assert code == 2 and "error: 2 --alpha values for 1 signature\n" in out
    assert not (tmp / "o.safetensors").exists()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models(tmp_path, dtype):
    model = make_net(dtype=dtype)
    save_file(model.state_dict(), tmp_path / "m.safetensors")
    rwsfmt.save(make_sig(model, 1), tmp_path / "fog.rws")
    code, out = run(
        "apply",
        tmp_path / "m.safetensors",
        tmp_path / "fog.rws",
        "-a",
        1,
        "-o",
        tmp_path / "o.safetensors",
    )
    assert code == 0, out
    got = load_file(tmp_path / "o.safetensors")
    assert got["features.0.weight"].dtype == dtype
    assert_bit_equal(
        got, rwsfmt.apply(model.state_dict(), [(rwsfmt.load(tmp_path / "fog.rws"), 1.0)])
    )


def test_pytorch_file_with_wrapper_and_module_prefix(tmp_path):
    model = make_net()
    sd = {f"module.{k}": v for k, v in model.state_dict().items()}
    torch.save({"state_dict": sd, "epoch": 7}, tmp_path / "std.pt")
    rwsfmt.save(make_sig(model, 1), tmp_path / "fog.rws")
    code, out = run(
        "apply", tmp_path / "std.pt", tmp_path / "fog.rws", "-a", 0.8, "-o", tmp_path / "o.pt"
    )
    assert code == 0, out
    assert "same architecture" in out
    got = torch.load(tmp_path / "o.pt", weights_only=True)
    assert got["epoch"] == 7 and list(got["state_dict"]) == list(sd)
    assert_bit_equal(
        got["state_dict"], rwsfmt.apply(sd, [(rwsfmt.load(tmp_path / "fog.rws"), 0.8)])
    )
    for key in sd:
        same = torch.equal(got["state_dict"][key], sd[key])
        assert same == (key.removeprefix("module.") not in PATCHED), key


class TrainingConfig:
    """A user's own class pickled beside the weights: unpickling it needs trust."""

    def __init__(self, lr: float) -> None:
        self.lr = lr


def test_pickled_objects_need_trust_pickle(tmp_path):
    model = make_net()
    torch.save({"model": model.state_dict(), "args": TrainingConfig(lr=0.1)}, tmp_path / "m.pt")
    rwsfmt.save(make_sig(model, 1), tmp_path / "fog.rws")
    args = ["apply", tmp_path / "m.pt", tmp_path / "fog.rws", "-a", 0.8, "-o", tmp_path / "o.pt"]
    code, out = run(*args)
    assert code == 2 and "--trust-pickle" in out
    assert not (tmp_path / "o.pt").exists()
    code, out = run(*args, "--trust-pickle")
    assert code == 0, out
    assert torch.load(tmp_path / "o.pt", weights_only=False)["args"].lr == 0.1


def test_sharded_safetensors_folder(tmp_path):
    model = make_net()
    sd = model.state_dict()
    folder = tmp_path / "std"
    folder.mkdir()
    first = {k: v for k, v in sd.items() if k.startswith("features.0")}
    shards = {
        "model-00001-of-00002.safetensors": first,
        "model-00002-of-00002.safetensors": {k: v for k, v in sd.items() if k not in first},
    }
    weight_map = {}
    for shard, tensors in shards.items():
        save_file(tensors, folder / shard)
        weight_map.update(dict.fromkeys(tensors, shard))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (folder / "config.json").write_text('{"arch": "net"}')
    sig = make_sig(model, 1, names=("features.3.weight",), targets=())
    rwsfmt.save(sig, tmp_path / "deep.rws")
    code, out = run("apply", folder, tmp_path / "deep.rws", "-a", 0.5, "-o", tmp_path / "out")
    assert code == 0, out
    out_dir = tmp_path / "out"
    assert sorted(os.listdir(out_dir)) == sorted([*os.listdir(folder), "rwsfmt_applied.json"])
    for name in ("model-00001-of-00002.safetensors", "config.json", "model.safetensors.index.json"):
        assert (out_dir / name).read_bytes() == (folder / name).read_bytes(), name
    merged = {
        **load_file(out_dir / "model-00001-of-00002.safetensors"),
        **load_file(out_dir / "model-00002-of-00002.safetensors"),
    }
    assert_bit_equal(merged, rwsfmt.apply(sd, [(sig, 0.5)]))


def test_overwriting_the_input_needs_in_place(files):
    tmp, sd = files
    model = tmp / "std.safetensors"
    before = model.read_bytes()
    code, out = run("apply", model, tmp / "fog.rws", "-a", 0.8, "-o", model)
    assert code == 2 and "--in-place" in out
    assert model.read_bytes() == before
    code, out = run("apply", model, tmp / "fog.rws", "-a", 0.8, "--in-place", "-o", tmp / "other")
    assert code == 2 and model.read_bytes() == before
    code, out = run("apply", model, tmp / "fog.rws", "-a", 0.8)  # no -o: a new file beside it
    assert code == 0 and (tmp / "std-fog.safetensors").exists() and model.read_bytes() == before
    code, out = run("apply", model, tmp / "fog.rws", "-a", 0.8, "--in-place")
    assert code == 0, out
    assert_bit_equal(load_file(model), rwsfmt.apply(sd, [(rwsfmt.load(tmp / "fog.rws"), 0.8)]))
    assert [p.name for p in tmp.iterdir() if p.name.startswith(".")] == []  # no temp files left


def test_dry_run_reports_and_writes_nothing(files):
    tmp, sd = files
    before = sorted(os.listdir(tmp))
    code, out = run(
        "apply",
        tmp / "std.safetensors",
        tmp / "fog.rws",
        "-a",
        0.8,
        "--dry-run",
        "-o",
        tmp / "o.safetensors",
    )
    assert code == 0, out
    assert sorted(os.listdir(tmp)) == before
    assert "would patch 5 of" in out and "nothing written" in out
    for name in PATCHED:
        assert name in out
    report = rwsfmt.apply_checkpoint(
        tmp / "std.safetensors", [(tmp / "fog.rws", 0.8)], None, dry_run=True
    )
    change = {c.name: c for c in report.changes}["features.0.weight"]
    delta = rwsfmt.load(tmp / "fog.rws").tensor("features.0.weight")
    assert change.change_norm == pytest.approx(0.8 * float(delta.norm()), rel=1e-5)
    assert change.relative_change == pytest.approx(
        change.change_norm / float(sd["features.0.weight"].norm())
    )


def test_mismatch_exits_2_lists_names_and_writes_nothing(tmp_path):
    model = make_net()
    rwsfmt.save(make_sig(model, 1), tmp_path / "fog.rws")
    other = make_net()
    other.features[3] = torch.nn.Conv2d(8, 16, 5)
    sd = {k: v for k, v in other.state_dict().items() if k != "features.0.bias"}
    save_file(sd, tmp_path / "other.safetensors")
    code, out = run(
        "apply",
        tmp_path / "other.safetensors",
        tmp_path / "fog.rws",
        "-a",
        0.8,
        "-o",
        tmp_path / "o.safetensors",
    )
    assert code == 2
    assert "features.0.bias is missing" in out
    assert "features.3.weight: signature 16x8x3x3, model 16x8x5x5" in out
    assert not (tmp_path / "o.safetensors").exists()


def test_another_head_is_a_note_and_strict_refuses(tmp_path):
    rwsfmt.save(make_sig(make_net(), 1), tmp_path / "fog.rws")
    save_file(make_net(seed=5, classes=3).state_dict(), tmp_path / "three.safetensors")
    args = [
        "apply",
        tmp_path / "three.safetensors",
        tmp_path / "fog.rws",
        "-a",
        0.8,
        "-o",
        tmp_path / "o.safetensors",
    ]
    code, out = run(*args, "--strict")
    assert code == 2 and "different architecture" in out
    assert not (tmp_path / "o.safetensors").exists()
    code, out = run(*args)
    assert code == 0 and "only the signature's tensors match" in out


def test_map_renames_signature_prefixes(tmp_path):
    model = make_net()
    rwsfmt.save(make_sig(model, 1), tmp_path / "fog.rws")
    renamed = {k.replace("features.", "backbone."): v for k, v in model.state_dict().items()}
    save_file(renamed, tmp_path / "r.safetensors")
    args = [
        "apply",
        tmp_path / "r.safetensors",
        tmp_path / "fog.rws",
        "-a",
        0.8,
        "-o",
        tmp_path / "o.safetensors",
    ]
    code, out = run(*args)
    assert code == 2 and "features.0.weight is missing" in out
    code, out = run(*args, "--map", "features.=backbone.", "--strict")
    assert code == 0, out
    got = load_file(tmp_path / "o.safetensors")
    expected = rwsfmt.apply(model.state_dict(), [(rwsfmt.load(tmp_path / "fog.rws"), 0.8)])
    assert torch.equal(got["backbone.3.weight"], expected["features.3.weight"])
    code, out = run(*args, "--map", "features")
    assert code == 2 and "OLD_PREFIX=NEW_PREFIX" in out


def test_damaged_signature_is_an_error_and_nothing_is_written(files):
    tmp, _ = files
    data = bytearray((tmp / "fog.rws").read_bytes())
    data[-3] ^= 0x10  # a bit in the last tensor's blob
    (tmp / "bad.rws").write_bytes(bytes(data))
    code, out = run(
        "apply", tmp / "std.safetensors", tmp / "bad.rws", "-a", 0.8, "-o", tmp / "o.safetensors"
    )
    assert code == 2 and "bad.rws" in out
    assert not (tmp / "o.safetensors").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error when CUDA is absent")
def test_device_cuda_without_cuda_is_a_clear_error(files):
    tmp, _ = files
    code, out = run(
        "apply",
        tmp / "std.safetensors",
        tmp / "fog.rws",
        "-a",
        0.8,
        "--device",
        "cuda",
        "-o",
        tmp / "o.safetensors",
    )
    assert code == 2 and "CUDA is not available" in out
    assert not (tmp / "o.safetensors").exists()


def test_quiet_prints_nothing_and_module_entry_point_works(files):
    tmp, sd = files
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "rwsfmt",
            "apply",
            tmp / "std.safetensors",
            tmp / "fog.rws",
            "-a",
            "0.8",
            "-o",
            tmp / "o.safetensors",
            "--quiet",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "" and proc.stderr == ""
    assert_bit_equal(
        load_file(tmp / "o.safetensors"), rwsfmt.apply(sd, [(rwsfmt.load(tmp / "fog.rws"), 0.8)])
    )


@pytest.mark.parametrize("mode", [0o600, 0o640])
def test_in_place_keeps_the_models_permissions(files, mode):
    """A private checkpoint stays private: the replacement gets the model's mode, not 0644."""
    tmp, sd = files
    model = tmp / "std.safetensors"
    os.chmod(model, mode)
    code, out = run("apply", model, tmp / "fog.rws", "-a", 0.8, "--in-place")
    assert code == 0, out
    assert stat.S_IMODE(os.stat(model).st_mode) == mode
    assert_bit_equal(load_file(model), rwsfmt.apply(sd, [(rwsfmt.load(tmp / "fog.rws"), 0.8)]))


def test_in_place_through_a_symlink_patches_its_target_and_keeps_the_link(files):
    tmp, sd = files
    link = tmp / "current.safetensors"
    link.symlink_to("std.safetensors")
    code, out = run("apply", link, tmp / "fog.rws", "-a", 0.8, "--in-place")
    assert code == 0, out
    assert link.is_symlink() and os.readlink(link) == "std.safetensors"
    expected = rwsfmt.apply(sd, [(rwsfmt.load(tmp / "fog.rws"), 0.8)])
    assert_bit_equal(load_file(tmp / "std.safetensors"), expected)


def lock_waiters() -> set[int]:
    """PIDs blocked waiting for a flock, from /proc/locks (`N: -> FLOCK ... PID ...`)."""
    with open("/proc/locks") as f:
        return {int(line.split()[5]) for line in f if " -> FLOCK " in line}


@pytest.mark.skipif(not os.path.exists("/proc/locks"), reason="Linux: sees who waits for a lock")
def test_concurrent_in_place_applies_both_land(files):
    """Two `apply --in-place` runs started together on one model: the second waits for the
    first and patches its result, so neither patch is lost."""
    tmp, sd = files
    model = tmp / "std.safetensors"
    fog, snow = rwsfmt.load(tmp / "fog.rws"), rwsfmt.load(tmp / "snow.rws")
    procs = []
    with target_lock(model):  # both runs start, then wait here, neither has read the model
        for sig, alpha in ((tmp / "fog.rws", 0.8), (tmp / "snow.rws", 0.3)):
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "rwsfmt", "apply", model, sig, "-a", str(alpha)]
                    + ["--in-place", "-q"],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )
        deadline = time.monotonic() + 120
        while not {p.pid for p in procs} <= lock_waiters():
            assert time.monotonic() < deadline, "the runs never waited for the model's lock"
            assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
            time.sleep(0.05)
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    got = load_file(model)
    fog_first = rwsfmt.apply(rwsfmt.apply(sd, [(fog, 0.8)]), [(snow, 0.3)])
    snow_first = rwsfmt.apply(rwsfmt.apply(sd, [(snow, 0.3)]), [(fog, 0.8)])
    assert any(all(torch.equal(got[k], want[k]) for k in sd) for want in (fog_first, snow_first)), (
        "the result is not both patches, one after the other"
    )
    assert [p.name for p in tmp.iterdir() if ".rwsfmt-" in p.name] == []


def test_a_signature_where_the_model_goes_says_the_order(files):
    tmp, _ = files
    for args in (
        ["apply", tmp / "fog.rws", tmp / "std.safetensors", "-a", "1"],
        ["extract", tmp / "std.safetensors", tmp / "fog.rws", tmp / "std.safetensors", "-o", "x"],
    ):
        code, out = run(*args)
        assert code == 2 and "fog.rws: is a .rws signature, where a model checkpoint goes" in out
        assert "fix: give the model first, then the signatures" in out
    assert sorted(p.name for p in tmp.iterdir()) == ["fog.rws", "snow.rws", "std.safetensors"]
    with pytest.raises(rwsfmt.RwsError, match="where a model checkpoint goes") as err:
        rwsfmt.apply_checkpoint(tmp / "snow.rws", [(tmp / "fog.rws", 1.0)], tmp / "o.pt")
    assert err.value.fix == "pass a model checkpoint here, and .rws files only as signatures"
