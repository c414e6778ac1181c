"""Hostile input, round 2 (issue 20): lying PyTorch storages, a file of no tensors, alphas
beyond float32, file names that are not UTF-8, and errors that always say the fix."""

from __future__ import annotations

import ast
import hashlib
import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from lying_pytorch import lying_files
from safetensors.torch import save_file
from test_patch import make_net, make_sig

import rwsfmt
from rwsfmt.container import MAX_TENSORS, TensorInfo, write_file
from rwsfmt.errors import RwsError
from rwsfmt.io import open_checkpoint
from rwsfmt.signature import SignatureBuilder
from rwsfmt_cli.main import main

ROOT = Path(__file__).resolve().parent.parent


def run(*args: object):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """A real model saved with torch.save, its signature, and init/robust checkpoints."""
    folder = tmp_path_factory.mktemp("model")
    net = make_net()
    torch.save(net.state_dict(), folder / "std.pt")
    rwsfmt.save(make_sig(net, 1), folder / "fog.rws")
    return folder


# ---------------------------------------------------------------- lying PyTorch storages

LIES = ["short", "long", "declared_more", "declared_huge", "view_past", "overlap"]


@pytest.fixture(scope="module")
def lies(model, tmp_path_factory) -> dict[str, Path]:
    return lying_files(model / "std.pt", tmp_path_factory.mktemp("lies"))


@pytest.mark.parametrize("trust_pickle", [False, True])
@pytest.mark.parametrize("lie", LIES)
def test_a_lying_storage_is_refused_before_any_weight_is_read(lies, lie, trust_pickle):
    with pytest.raises(RwsError, match="storages disagree with its contents") as caught:
        open_checkpoint(str(lies[lie]), trust_pickle=trust_pickle)
    assert caught.value.fix


def test_a_trusted_pickle_is_checked_without_running_its_code_twice(tmp_path):
    """The check reads a trusted pickle with every class but tensors stubbed out: its code
    runs once, in torch.load (a second run would fail here: the folder exists)."""
    from test_checkpoint import MakesFolder

    marker = tmp_path / "marker"
    torch.save({"w": torch.ones(3), "payload": MakesFolder(str(marker))}, tmp_path / "t.pt")
    with open_checkpoint(str(tmp_path / "t.pt"), trust_pickle=True) as ckpt:
        assert torch.equal(ckpt.tensor("w"), torch.ones(3)) and marker.exists()


@pytest.mark.parametrize("lie", LIES)
def test_every_command_refuses_a_lying_storage(model, lies, lie, tmp_path):
    """apply (which wrote weights read from neighbouring records with exit 0), extract
    (which died with a traceback), inspect: exit 2, a fix, nothing written."""
    bad = lies[lie]
    commands = {
        "apply": ["apply", bad, model / "fog.rws", "-a", "0.5", "-o", tmp_path / "out.pt"],
        "extract": [
            "extract",
            bad,
            model / "std.pt",
            "--method",
            "subtract",
            "-o",
            tmp_path / "x.rws",
        ],
        "extract-robust": [
            "extract",
            model / "std.pt",
            bad,
            "--method",
            "subtract",
            "-o",
            tmp_path / "y.rws",
        ],
        "inspect": ["inspect", bad],
    }
    for what, args in commands.items():
        code, out = run(*args)
        assert code == 2, (what, out)
        assert "storages disagree" in out and "fix:" in out, (what, out)
        assert "Traceback" not in out
    assert not any(tmp_path.iterdir())


def test_an_honest_file_rewritten_the_same_way_is_accepted(model, tmp_path):
    """The check refuses lies, not rewritten zips: torch's writer, every record kept."""
    from lying_pytorch import rewrite

    same = rewrite(model / "std.pt", tmp_path / "same.pt", lambda recs: None)
    with open_checkpoint(str(same)) as ckpt:
        assert torch.equal(ckpt.tensor("features.0.weight"), make_net().features[0].weight)


def test_views_and_shared_storages_pass(tmp_path):
    """Tensors viewing part of a storage, at an offset, transposed or tied, in a wrapper."""
    base = torch.arange(60, dtype=torch.float32)
    state = {
        "a.weight": base[10:40].view(5, 6),
        "b.weight": base.view(6, 10).t(),
        "c.weight": base,
        "d.bias": torch.zeros(0),
    }
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "views.pt")
    with open_checkpoint(str(tmp_path / "views.pt")) as ckpt:
        assert torch.equal(ckpt.tensor("a.weight"), base[10:40].view(5, 6))


# ---------------------------------------------------------------- a file of no tensors


def test_inspect_prints_a_file_of_no_tensors(tmp_path):
    path = tmp_path / "empty.rws"
    rwsfmt.save(SignatureBuilder("empty", rwsfmt.QuantConfig()).build(provenance={}), path)
    code, out = run("inspect", path)
    assert code == 0, out
    assert "0 tensors" in out and "Traceback" not in out


# ---------------------------------------------------------------- alpha beyond float32


@pytest.mark.parametrize("alpha", [1e40, 3.5e38, -1e308])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_an_alpha_beyond_float32_is_refused(model, tmp_path, alpha, dtype):
    net = make_net(dtype=dtype)
    save_file(net.state_dict(), tmp_path / "m.safetensors")
    with pytest.raises(RwsError, match="beyond float32's range") as caught:
        rwsfmt.patch(net, model / "fog.rws", alpha)
    assert "between -2 and 2" in caught.value.fix
    with pytest.raises(RwsError, match="beyond float32's range"):
        rwsfmt.apply(net.state_dict(), model / "fog.rws", alpha)
    code, out = run(
        "apply",
        tmp_path / "m.safetensors",
        model / "fog.rws",
        f"--alpha={alpha}",
        "-o",
        tmp_path / "out.safetensors",
    )
    assert code == 2 and "fix: use --alpha between" in out, out
    assert not (tmp_path / "out.safetensors").exists()


# ---------------------------------------------------------------- names that are not UTF-8


def test_names_that_are_not_utf8_print_escaped_under_a_strict_utf8_stdout(model, tmp_path):
    """Every command, text and JSON: no UnicodeEncodeError; text shows `\\xff`, and JSON
    reads back to the very name (os.fsencode gives the bytes again)."""
    sig = tmp_path / os.fsdecode(b"f\xffog.rws")
    std = tmp_path / os.fsdecode(b"m\xfe.pt")
    sig.write_bytes((model / "fog.rws").read_bytes())
    std.write_bytes((model / "std.pt").read_bytes())
    out_pt = tmp_path / os.fsdecode(b"o\xfd.pt")
    env = {
        **os.environ,
        "PYTHONIOENCODING": "utf-8:strict",
        "PYTHONPATH": os.pathsep.join(sys.path),
    }
    runs = [
        ["inspect", sig],
        ["inspect", "--json", sig],
        ["inspect", std],
        ["verify", sig],
        ["verify", "--json", sig],
        ["apply", std, sig, "-a", "0.5", "-o", out_pt],
        ["extract", std, std, "--method", "subtract", "-o", tmp_path / os.fsdecode(b"e\xfd.rws")],
        ["compare", sig, sig, "--json"],
        ["inspect", tmp_path / os.fsdecode(b"missing\xff.rws")],
    ]
    for args in runs:
        done = subprocess.run(
            [sys.executable, "-m", "rwsfmt", *map(str, args)], env=env, capture_output=True
        )
        text = (done.stdout + done.stderr).decode("utf-8")
        assert "Traceback" not in text, text
        assert done.returncode == (2 if "missing" in str(args[-1]) else 0), text
        if "--json" in args:
            report = json.loads(done.stdout)  # valid JSON
            if args[0] == "inspect":
                assert os.fsencode(report["path"]) == os.fsencode(sig)
        elif args[0] in ("inspect", "verify"):
            assert "\\xff" in text or "\\xfe" in text


# ---------------------------------------------------------------- every error has a fix


def _error_calls() -> list[str]:
    """`file:line` of every RwsError (or subclass) raised without `fix=` in the package."""
    errors = {"RwsError", "SignatureError"}  # IntegrityError's default fix: get the file again
    missing = []
    for path in [*(ROOT / "rwsfmt").rglob("*.py"), *(ROOT / "cli").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                name = getattr(node.func, "id", getattr(node.func, "attr", None))
                keywords = {k.arg for k in node.keywords}
                if name in errors and "fix" not in keywords and None not in keywords:
                    missing.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    return missing


def test_no_error_is_raised_without_a_fix():
    assert _error_calls() == []
    with pytest.raises(TypeError):
        RwsError("a problem")  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="without a fix"):
        RwsError("a problem", fix="")
    assert "fix: the file is damaged" in str(rwsfmt.IntegrityError("a problem"))


# ---------------------------------------------------------------- symbolic links in folders


def _folder(tmp_path: Path, net: torch.nn.Module) -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    save_file(net.state_dict(), folder / "model.safetensors")
    (folder / "config.json").write_text("{}")
    return folder


def test_a_companion_linking_out_of_the_folder_is_never_copied(model, tmp_path):
    """`apply` copied README.md -> /outside/secret into the output as a regular file."""
    folder = _folder(tmp_path, make_net())
    secret = tmp_path / "secret.txt"
    secret.write_text("not for publishing")
    (folder / "README.md").symlink_to(secret)
    code, out = run("apply", folder, model / "fog.rws", "-a", "0.5", "-o", tmp_path / "out")
    assert code == 2, out
    assert "README.md is a symbolic link" in out and "fix: replace the link" in out
    assert not (tmp_path / "out").exists()
    with open_checkpoint(str(folder)) as ckpt:  # reading the weights alone is fine
        with pytest.raises(RwsError, match="outside the model folder"):
            ckpt.write(tmp_path / "out", {})
    assert not (tmp_path / "out").exists()


def test_in_place_never_writes_through_a_link_out_of_the_folder(model, tmp_path):
    folder = _folder(tmp_path, make_net())
    outside = tmp_path / "elsewhere.safetensors"
    (folder / "model.safetensors").rename(outside)
    (folder / "model.safetensors").symlink_to(outside)
    before = outside.read_bytes()
    code, out = run("apply", folder, model / "fog.rws", "-a", "0.5", "--in-place")
    assert code == 2 and "writing in place would change that file" in out, out
    assert outside.read_bytes() == before
    code, out = run("apply", folder, model / "fog.rws", "-a", "0.5", "-o", tmp_path / "new")
    assert code == 0, out  # a new folder: the linked shard is read, as a checkpoint
    assert not (tmp_path / "new" / "model.safetensors").is_symlink()
    (folder / "model.safetensors").unlink()
    outside.rename(folder / "model.safetensors")
    (folder / "rwsfmt_applied.json").symlink_to(tmp_path / "record.json")  # (missing: none yet)
    code, out = run("apply", folder, model / "fog.rws", "-a", "0.5", "--in-place")
    assert code == 2 and "rwsfmt_applied.json is a symbolic link" in out, out
    assert not (tmp_path / "record.json").exists()


def test_a_hugging_face_cache_snapshot_made_of_links_still_works(model, tmp_path):
    """Snapshot folders (models--ORG--NAME/snapshots/REV) are links into ../../blobs: links
    inside the repository folder are followed; one leading out of it is refused."""
    repo = tmp_path / "hub" / "models--org--net"
    blobs, snapshot = repo / "blobs", repo / "snapshots" / "abc123"
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    save_file(make_net().state_dict(), blobs / "1111")
    (blobs / "2222").write_text("{}")
    (blobs / "3333").write_text("# net")
    for name, blob in [
        ("model.safetensors", "1111"),
        ("config.json", "2222"),
        ("README.md", "3333"),
    ]:
        (snapshot / name).symlink_to(Path("../../blobs") / blob)
    code, out = run("apply", snapshot, model / "fog.rws", "-a", "0.5", "-o", tmp_path / "out")
    assert code == 0, out
    assert (tmp_path / "out" / "README.md").read_text() == "# net"
    code, out = run("apply", snapshot, model / "fog.rws", "-a", "0.5", "--in-place")
    assert code == 2 and "shared blobs" in out, out
    (tmp_path / "secret").write_text("x")
    (snapshot / "notes.txt").symlink_to(tmp_path / "secret")
    code, out = run("apply", snapshot, model / "fog.rws", "-a", "0.5", "-o", tmp_path / "out2")
    assert code == 2 and "notes.txt is a symbolic link" in out, out


# ---------------------------------------------------------------- aliased names


def test_two_different_tensors_for_one_model_tensor_are_an_error_naming_both(tmp_path):
    """`fc.weight` and `module.fc.weight` were applied as if tied: the second dropped."""
    net = make_net()
    shape = net.state_dict()["features.0.weight"].shape
    g = torch.Generator().manual_seed(0)
    first, second = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    aliased = rwsfmt.from_tensors(
        {"features.0.weight": first, "module.features.0.weight": second}, label="aliased"
    )
    with pytest.raises(RwsError, match="features.0.weight and module.features.0.weight") as caught:
        rwsfmt.apply(net.state_dict(), aliased, 0.5)
    assert "keep one of each pair" in caught.value.fix
    path = tmp_path / "aliased.rws"
    rwsfmt.save(aliased, path)
    save_file(net.state_dict(), tmp_path / "m.safetensors")
    code, out = run("apply", tmp_path / "m.safetensors", path, "-a", "0.5", "-o", tmp_path / "o.pt")
    assert code == 2 and "both lead to features.0.weight" in out, out
    tied = rwsfmt.from_tensors(
        {"features.0.weight": first, "module.features.0.weight": first}, label="tied"
    )
    patched = rwsfmt.apply(net.state_dict(), tied, 0.5)  # the same values: tied, applied once
    expected = net.state_dict()["features.0.weight"] + 0.5 * tied.tensor("features.0.weight")
    assert torch.equal(patched["features.0.weight"], expected)


# ---------------------------------------------------------------- large valid files, early


def _many_tensors(path: Path, count: int = MAX_TENSORS) -> Path:
    """`count` one-element float32 tensors: a header near the format's 16 MiB."""
    payload = struct.pack("<f", 1e-3)
    digest = hashlib.sha256(payload).hexdigest()
    float32 = {"scheme": "float", "bits": 32}
    infos = [
        TensorInfo(f"t{i}", "delta", (1,), "float32", float32, "none", "raw", 0, 4, 4, digest)
        for i in range(count)
    ]
    write_file(path, {"label": "many", "provenance": {}}, infos, lambda _: payload)
    return path


@pytest.fixture(scope="module")
def many(tmp_path_factory) -> Path:
    return _many_tensors(tmp_path_factory.mktemp("many") / "many.rws")


@pytest.mark.parametrize("bits", [8, "auto"])
def test_convert_refuses_a_header_past_the_limit_before_encoding(many, bits):
    """65,536 tensors whose new entries outgrow 16 MiB: refused before any tensor is
    encoded (it took 37 s, 308 s with bits='auto', before refusing at the end)."""
    quant = rwsfmt.QuantConfig(bits=bits, target_bpp=8 if bits == "auto" else None)
    started = []  # the progress callback runs when the encoding starts
    progress = lambda items, total, what: started.append(what) or items  # noqa: E731
    with rwsfmt.load(many) as sig, pytest.raises(RwsError, match="would not fit one file"):
        rwsfmt.convert(sig, quant, progress=progress)
    assert not started


@pytest.mark.filterwarnings("ignore:signature 2")  # (the same tensors twice: counted twice)
def test_merge_refuses_a_header_past_the_limit_before_merging(many, tmp_path):
    other = tmp_path / "other.rws"
    other.write_bytes(many.read_bytes())
    started = []
    progress = lambda items, total, what: started.append(what) or items  # noqa: E731
    with rwsfmt.load(many) as a, rwsfmt.load(other) as b:
        with pytest.raises(RwsError, match="would not fit one file"):
            rwsfmt.merge([a, b], method="mean", quant=rwsfmt.QuantConfig(bits=8), progress=progress)
    assert not started
    code, out = run("merge", many, other, "--mean", "--bits", "8", "-o", tmp_path / "m.rws")
    assert code == 2 and "would not fit one file" in out and "fix:" in out, out
    assert not (tmp_path / "m.rws").exists()


def test_a_header_that_fits_passes_the_early_check(tmp_path):
    """The estimate is a lower bound: a file at the limit converts as it did."""
    path = _many_tensors(tmp_path / "some.rws", 4_096)
    with rwsfmt.load(path) as sig:
        assert len(rwsfmt.convert(sig, rwsfmt.QuantConfig(bits=8)).names) == 4_096


def test_inspect_of_a_16_mib_provenance_string_is_quick(tmp_path):
    """Rich folded a 16 MB cell in quadratic time (7 s): long values are cut in the
    table, with their length, and whole in --json."""
    builder = SignatureBuilder("big", rwsfmt.QuantConfig())
    builder.add("fc.weight", torch.ones(2, 2))
    note = "x" * 16_000_000
    path = tmp_path / "big.rws"
    rwsfmt.save(builder.build(provenance={"meta": {"note": note}}), path)
    start = time.perf_counter()
    code, out = run("inspect", path)
    assert time.perf_counter() - start < 3  # (0.2 s; 7 s before)
    assert code == 0 and "16,000,000 characters: --json shows them all" in out
    code, out = run("inspect", "--json", path)
    assert json.loads(out)["provenance"]["meta"]["note"] == note
