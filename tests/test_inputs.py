"""Hostile or broken inputs to the commands that read checkpoints and signatures: special
files, malformed safetensors and shard indexes, tensors rwsfmt cannot use, NaN and inf.

Every case must end in exit 2 (or `RwsError`) naming the file and the problem: never a
hang, never a traceback, never exit 0 with an output no reader can open.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

import rwsfmt
from rwsfmt.errors import RwsError
from rwsfmt.io import open_checkpoint
from rwsfmt_cli.main import main

HANG_S = 60  # a command still running after this long is hanging on its input


def run(*args: object) -> CliRunner:
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_refused(result, *fragments: str) -> None:
    """Exit 2 with `error: ...` naming every fragment, and no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert result.stderr.startswith("error: "), result.output
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in result.stderr, (fragment, result.stderr)


def weights(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "conv.weight": torch.randn(4, 3, 3, 3, generator=g),
        "conv.bias": torch.randn(4, generator=g),
        "fc.weight": torch.randn(2, 4, generator=g),
    }


@pytest.fixture
def trio(tmp_path):
    """std.pt, robust.pt, init.pt and a signature of them, fog.rws, in tmp_path."""
    for seed, role in enumerate(("init", "std", "robust")):
        torch.save(weights(seed), tmp_path / f"{role}.pt")
    result = run(
        "extract", *(tmp_path / f"{r}.pt" for r in ("std", "robust", "init")),
        "--layers", "all", "-q", "-o", tmp_path / "fog.rws",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return tmp_path


# ---------------------------------------------------------------- special files


def run_process(*args: object) -> subprocess.CompletedProcess:
    """The real command in a child process: a hang fails the test instead of blocking it."""
    return subprocess.run(
        [sys.executable, "-m", "rwsfmt", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=HANG_S,
    )


@pytest.mark.parametrize(
    "command",
    [
        ["inspect", "{fifo}"],
        ["verify", "{fifo}"],
        ["apply", "{fifo}", "{d}/fog.rws", "-a", "1", "-o", "{d}/out.pt"],
        ["apply", "{d}/std.pt", "{fifo}", "-a", "1", "-o", "{d}/out.pt"],
        ["extract", "{fifo}", "{d}/robust.pt", "{d}/init.pt", "-o", "{d}/out.rws"],
        ["extract", "{d}/std.pt", "{d}/robust.pt", "{fifo}", "-o", "{d}/out.rws"],
        ["merge", "{d}/fog.rws", "{fifo}", "-o", "{d}/out.rws"],
    ],
    ids=["inspect", "verify", "apply-model", "apply-sig", "extract-std", "extract-init", "merge"],
)
def test_a_fifo_is_refused_at_once_by_every_command(trio, command):
    fifo = trio / "pipe"
    os.mkfifo(fifo)
    before = set(os.listdir(trio))
    proc = run_process(*(a.format(fifo=fifo, d=trio) for a in command))
    assert proc.returncode == 2, proc.stderr
    said = proc.stdout + proc.stderr  # verify reports on stdout
    assert f"{fifo}" in said and "is a FIFO (named pipe)" in said, said
    assert "Traceback" not in said
    assert set(os.listdir(trio)) == before


def test_devices_and_sockets_are_refused(trio):
    sock_path = trio / "sock"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(sock_path))
        assert_refused(run("inspect", sock_path), f"{sock_path}: is a socket, not a .rws file")
    assert_refused(
        run("extract", trio / "std.pt", os.devnull, trio / "init.pt", "-o", trio / "o.rws"),
        f"{os.devnull}: is a character device, not a checkpoint file",
    )


@pytest.mark.parametrize("member", ["model.safetensors", "model.safetensors.index.json", "shard"])
def test_a_fifo_inside_a_folder_is_refused(tmp_path, member):
    folder = tmp_path / "model"
    folder.mkdir()
    if member == "shard":
        save_file(weights(0), folder / "a.safetensors")
        index = {"weight_map": {"conv.weight": "a.safetensors", "fc.weight": "b.safetensors"}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
        member = "b.safetensors"
    os.mkfifo(folder / member)
    with pytest.raises(RwsError, match="is a FIFO"):
        open_checkpoint(folder)


def test_a_folder_given_as_a_signature_is_refused(tmp_path):
    (tmp_path / "sig.rws").mkdir()
    with pytest.raises(RwsError, match="sig.rws: is a folder, not a .rws file"):
        rwsfmt.load(tmp_path / "sig.rws")


# ---------------------------------------------------------------- malformed safetensors

F32x2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


def handmade(path, header: dict | bytes, data: bytes = bytes(8), length: int | None = None):
    """A safetensors file written byte by byte: length, header JSON, data."""
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(body) if length is None else length) + body + data)
    return path


def entry(dtype="F32", shape=(2,), offsets=(0, 8)) -> dict:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


MALFORMED = {
    "deep-json": (b"[" * 100_000 + b"]" * 100_000, bytes(8), "nested too deeply"),
    "infinity-in-shape": (
        b'{"a":{"dtype":"F32","shape":[Infinity],"data_offsets":[0,8]}}',
        bytes(8),
        "Infinity is not a JSON number",
    ),
    "nan-in-offsets": (
        b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,NaN]}}',
        bytes(8),
        "NaN is not a JSON number",
    ),
    "huge-int": (
        b'{"a":{"dtype":"F32","shape":[' + b"9" * 5000 + b'],"data_offsets":[0,8]}}',
        bytes(8),
        "header is not valid JSON",
    ),
    "big-dim": ({"a": entry(shape=(2**70,))}, bytes(8), "too large"),
    "zero-times-huge": ({"a": entry(shape=(0, 2**62, 2**62), offsets=(0, 0))}, b"", "too large"),
    "negative-dim": ({"a": entry(shape=(-2,))}, bytes(8), "shape [-2]"),
    "float-dim": ({"a": entry(shape=(2.0,))}, bytes(8), "shape [2.0]"),
    "bool-dim": ({"a": entry(shape=(True, 2))}, bytes(8), "shape [true, 2]"),
    "string-dim": ({"a": entry(shape=("2",))}, bytes(8), 'shape ["2"]'),
    "shape-not-list": ({"a": {**F32x2, "shape": "22"}}, bytes(8), 'shape "22"'),
    "rank-65": ({"a": entry(shape=(1,) * 65, offsets=(0, 4))}, bytes(4), "at most 64"),
    "negative-offset": ({"a": entry(offsets=(-8, 0))}, bytes(8), "data_offsets [-8, 0]"),
    "float-offset": ({"a": entry(offsets=(0.0, 8))}, bytes(8), "data_offsets [0.0, 8]"),
    "offsets-backwards": ({"a": entry(shape=(0,), offsets=(8, 0))}, bytes(8), "begin <= end"),
    "three-offsets": ({"a": entry(offsets=(0, 8, 8))}, bytes(8), "data_offsets [0, 8, 8]"),
    "gap-before": ({"a": entry(offsets=(4, 12))}, bytes(12), "leaves a gap at 0"),
    "gap-between": (
        {"a": entry(shape=(1,), offsets=(0, 4)), "b": entry(shape=(1,), offsets=(8, 12))},
        bytes(12),
        "tensor 'b' starts at byte 8 of the data and leaves a gap at 4",
    ),
    "overlap": (
        {"a": entry(), "b": entry(shape=(1,), offsets=(4, 8))},
        bytes(8),
        "overlaps the tensor before it",
    ),
    "trailing-bytes": ({"a": entry()}, bytes(12), "cover 8 bytes, but the data section holds 12"),
    "past-the-end": ({"a": entry(shape=(4,), offsets=(0, 16))}, bytes(8), "holds 8"),
    "unknown-dtype": ({"a": entry(dtype="F31")}, bytes(8), 'unknown dtype "F31"'),
    "dtype-not-string": ({"a": entry(dtype=["F32"])}, bytes(8), 'unknown dtype ["F32"]'),
    "size-mismatch": ({"a": entry(dtype="F64")}, bytes(8), "F64 [2] takes 16 bytes"),
    "missing-field": ({"a": {"dtype": "F32", "shape": [2]}}, bytes(8), "expected an object"),
    "entry-not-object": ({"a": [0, 8]}, bytes(8), "expected an object"),
    "header-not-object": (b"[1, 2]", b"", "not a JSON object"),
    "header-too-long": (json.dumps({"a": F32x2}).encode(), bytes(8), "does not fit the file"),
    "not-utf8": (b'{"\xff":1}', b"", "header is not valid JSON"),
    "duplicate-key": (
        b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},'
        b'"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}',
        bytes(8),
        "key 'a' appears twice",
    ),
    "metadata-int": ({"__metadata__": {"epoch": 3}, "a": F32x2}, bytes(8), "__metadata__"),
    "metadata-list": ({"__metadata__": ["x"], "a": F32x2}, bytes(8), "__metadata__"),
}


# Accepted by the safetensors library: a key given twice (which value is meant?), more than
# 64 dimensions, and a zero-size shape whose other dimensions overflow torch's strides.
STRICTER = {"duplicate-key", "rank-65", "zero-times-huge"}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_safetensors_are_refused_naming_the_file_and_problem(tmp_path, case):
    header, data, problem = MALFORMED[case]
    length = 1 << 20 if case == "header-too-long" else None
    path = handmade(tmp_path / "m.safetensors", header, data, length)
    with pytest.raises(RwsError) as info:
        with open_checkpoint(path) as ckpt:
            for name in ckpt.names:
                ckpt.tensor(name)
    message = str(info.value)
    assert message.startswith(f"{path}: is not a valid safetensors file")
    assert problem in message, message
    if case in STRICTER:
        return
    with pytest.raises(SafetensorError), safe_open(path, "pt") as f:
        for name in f.keys():
            f.get_tensor(name)


def test_lenient_but_valid_headers_are_read_as_safetensors_reads_them(tmp_path):
    """Entries out of offset order, extra fields, null metadata, zero-size tensors."""
    header = {
        "__metadata__": None,
        "b": {**entry(shape=(1,), offsets=(8, 12)), "note": "extra fields are ignored"},
        "a": entry(),
        "empty": entry(shape=(0, 3), offsets=(12, 12)),
    }
    data = struct.pack("<3f", 1.0, 2.0, 3.0)
    path = handmade(tmp_path / "ok.safetensors", json.dumps(header).encode() + b"  ", data)
    with open_checkpoint(path) as ckpt, safe_open(path, "pt") as ref:
        assert sorted(ckpt.names) == sorted(ref.keys())
        for name in ckpt.names:
            assert torch.equal(ckpt.tensor(name), ref.get_tensor(name))


def test_a_gap_between_tensors_never_reaches_an_output(trio):
    """Before: apply copied the gap into the output and exited 0; safetensors cannot read it."""
    d = trio
    sd = torch.load(d / "std.pt", weights_only=True)
    raw = {k: v.numpy().tobytes() for k, v in sd.items()}
    header, offset = {}, 0
    for name, value in sd.items():
        header[name] = entry(shape=value.shape, offsets=(offset, offset + len(raw[name])))
        offset += len(raw[name]) + 4  # 4 stray bytes after each tensor
    data = b"".join(b + bytes(4) for b in raw.values())
    model = handmade(d / "gappy.safetensors", header, data)
    assert_refused(
        run("apply", model, d / "fog.rws", "-a", "1", "-o", d / "out.safetensors"),
        str(model),
        "leaves a gap",
    )
    assert not (d / "out.safetensors").exists()


# ---------------------------------------------------------------- sharded indexes


@pytest.fixture
def sharded(tmp_path):
    """A folder with two real shards and a valid index; returns (folder, write_index)."""
    folder = tmp_path / "model"
    folder.mkdir()
    sd = weights(0)
    save_file({"conv.weight": sd["conv.weight"]}, folder / "a.safetensors")
    save_file(
        {"conv.bias": sd["conv.bias"], "fc.weight": sd["fc.weight"]}, folder / "b.safetensors"
    )
    index = folder / "model.safetensors.index.json"

    def write_index(doc) -> str:
        index.write_bytes(doc if isinstance(doc, bytes) else json.dumps(doc).encode())
        return str(index)

    write_index({"weight_map": {"conv.weight": "a.safetensors", "fc.weight": "b.safetensors"}})
    return folder, write_index


@pytest.mark.parametrize(
    ("doc", "problem"),
    [
        ({"weight_map": {"conv.weight": 3}}, "'conv.weight' maps to 3, not a shard file name"),
        ({"weight_map": {"conv.weight": None}}, "maps to None"),
        ({"weight_map": {"conv.weight": "../../etc/passwd"}}, "paths are refused"),
        ({"weight_map": {"conv.weight": "/etc/passwd"}}, "paths are refused"),
        ({"weight_map": {"conv.weight": "sub/a.safetensors"}}, "paths are refused"),
        ({"weight_map": {"conv.weight": ".."}}, "paths are refused"),
        ({"weight_map": {"conv.weight": "a\\..\\..\\x"}}, "paths are refused"),
        ({"weight_map": {}}, "'weight_map' maps tensor names"),
        ({"weight_map": ["a.safetensors"]}, "'weight_map' maps tensor names"),
        ({"metadata": {}}, "'weight_map' maps tensor names"),
        (["weight_map"], "'weight_map' maps tensor names"),
        ("a.safetensors", "'weight_map' maps tensor names"),
        (b"[" * 100_000, "nested too deeply"),
        (b'{"weight_map": {"x": NaN}}', "NaN is not a JSON number"),
        (b"\xff\xfe", "not JSON"),
    ],
)
def test_bad_shard_indexes_are_refused(sharded, doc, problem):
    folder, write_index = sharded
    index = write_index(doc)
    with pytest.raises(RwsError) as info:
        open_checkpoint(folder)
    message = str(info.value)
    assert message.startswith(f"{index}: is not a valid index") and problem in message, message


def test_a_missing_shard_is_named(sharded):
    folder, write_index = sharded
    index = write_index({"weight_map": {"conv.weight": "a.safetensors", "x": "c.safetensors"}})
    with pytest.raises(RwsError, match="names shard 'c.safetensors', which is not in the folder"):
        open_checkpoint(folder)
    # and the command says so too, about the index
    result = run("extract", folder, folder, folder, "-o", folder.parent / "o.rws")
    assert_refused(result, index, "c.safetensors")


# ---------------------------------------------------------------- tensors rwsfmt cannot use

UNSUPPORTED = {
    "sparse-coo": (lambda t: t.to_sparse(), "is a sparse_coo tensor"),
    "sparse-csr": (lambda t: t.to_sparse_csr(), "is a sparse_csr tensor"),
    "meta": (lambda t: torch.empty_like(t, device="meta"), "has no data (a meta tensor)"),
    "float8-e4m3": (lambda t: t.to(torch.float8_e4m3fn), "is float8_e4m3fn"),
    "float8-e5m2": (lambda t: t.to(torch.float8_e5m2), "is float8_e5m2"),
    "quantized": (lambda t: torch.quantize_per_tensor(t, 0.1, 0, torch.qint8), "is quantized"),
}


@pytest.mark.filterwarnings("ignore::UserWarning")  # torch: quantized and sparse are beta
@pytest.mark.parametrize("case", list(UNSUPPORTED))
@pytest.mark.parametrize("command", ["extract", "apply"])
def test_unsupported_tensors_are_refused_by_name(trio, case, command):
    d = trio
    make, problem = UNSUPPORTED[case]
    sd = weights(1)
    sd["fc.weight"] = make(sd["fc.weight"])
    torch.save(sd, d / "odd.pt")
    if command == "extract":
        result = run("extract", d / "odd.pt", d / "robust.pt", d / "init.pt", "-o", d / "o.rws")
    else:
        result = run("apply", d / "odd.pt", d / "fog.rws", "-a", "1", "-o", d / "o.pt")
    assert_refused(result, f"{d / 'odd.pt'}: tensor 'fc.weight' {problem}", "fix: ")
    assert not (d / "o.rws").exists() and not (d / "o.pt").exists()


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_float8_safetensors_are_refused(tmp_path, dtype):
    sd = {k: v.to(dtype) for k, v in weights(0).items()}
    save_file(sd, tmp_path / "f8.safetensors")
    with pytest.raises(RwsError, match=f"tensor 'conv.bias' is {str(dtype)[6:]}, a float of 8"):
        open_checkpoint(tmp_path / "f8.safetensors")


def test_junk_and_complex_entries_are_carried_through_untouched(trio):
    """Non-tensor values and complex buffers are not weights: never selected, kept as they are."""
    d = trio
    for role in ("std", "robust", "init"):
        sd = torch.load(d / f"{role}.pt", weights_only=True)
        sd.update({"freqs": torch.randn(3, dtype=torch.complex64), "epoch": 3, "tag": "x"})
        torch.save(sd, d / f"j{role}.pt")
    result = run("extract", d / "jstd.pt", d / "jrobust.pt", d / "jinit.pt", "--layers", "all",
                 "-o", d / "j.rws", "-q")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "freqs" not in rwsfmt.load(d / "j.rws").names
    result = run("apply", d / "jstd.pt", d / "j.rws", "-a", "1", "-o", d / "out.pt", "-q")
    assert result.exit_code == 0, result.output
    out, before = (torch.load(d / p, weights_only=True) for p in ("out.pt", "jstd.pt"))
    assert out["epoch"] == 3 and out["tag"] == "x" and torch.equal(out["freqs"], before["freqs"])


# ---------------------------------------------------------------- NaN and infinity


@pytest.mark.parametrize("role", ["std", "robust", "init"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_extract_refuses_nonfinite_inputs_naming_the_file_and_tensor(trio, role, value):
    """Before: NaN in std made <v_base, v_base> NaN, the projection was skipped, exit 0."""
    d = trio
    sd = torch.load(d / f"{role}.pt", weights_only=True)
    sd["conv.weight"][1, 2, 0, 0] = value
    torch.save(sd, d / f"bad{role}.pt")
    paths = {r: d / (f"bad{r}.pt" if r == role else f"{r}.pt") for r in ("std", "robust", "init")}
    result = run("extract", paths["std"], paths["robust"], paths["init"], "-o", d / "o.rws")
    assert_refused(
        result,
        f"{paths[role]}: tensor 'conv.weight' of the {role} checkpoint holds NaN or infinite",
    )
    assert not (d / "o.rws").exists()


def test_nonfinite_values_in_tensors_not_used_do_not_matter(trio):
    d = trio
    sd = torch.load(d / "std.pt", weights_only=True)
    sd["fc.weight"][0, 0] = float("nan")
    torch.save(sd, d / "nanfc.pt")
    result = run("extract", d / "nanfc.pt", d / "robust.pt", d / "init.pt", "--layers", "1",
                 "-o", d / "o.rws", "-q")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert rwsfmt.load(d / "o.rws").names == ["conv.weight", "conv.bias"]
    result = run("apply", d / "nanfc.pt", d / "o.rws", "-a", "1", "-o", d / "out.pt", "-q")
    assert result.exit_code == 0, result.output
    assert torch.isnan(torch.load(d / "out.pt", weights_only=True)["fc.weight"][0, 0])


@pytest.mark.parametrize("dry_run", [False, True])
def test_apply_refuses_a_model_with_nonfinite_values_where_it_patches(trio, dry_run):
    d = trio
    sd = torch.load(d / "std.pt", weights_only=True)
    sd["conv.bias"][0] = float("inf")
    save_file(sd, d / "inf.safetensors")
    output = ["--dry-run"] if dry_run else ["-o", d / "out.safetensors"]
    result = run("apply", d / "inf.safetensors", d / "fog.rws", "-a", "1", *output)
    assert_refused(
        result, f"{d / 'inf.safetensors'}: tensor 'conv.bias' of the model holds NaN or infinite"
    )
    assert not (d / "out.safetensors").exists()
