"""`rwsfmt inspect` and `rwsfmt verify` as a user runs them: real processes, real files."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import VECTORS, assemble, split

import rwsfmt


def run(*args: str, columns: int = 80) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": str(columns), "NO_COLOR": "1"}
    return subprocess.run(
        [sys.executable, "-m", "rwsfmt", *args], capture_output=True, text=True, env=env
    )


def test_inspect_table_in_an_80_column_pipe():
    result = run("inspect", str(VECTORS / "mixed.rws"))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert all(len(line) <= 80 for line in lines)
    text = result.stdout
    for expected in ["rws 1.0", "fog", "project, layers 2", "8-bit linear, symmetric"]:
        assert expected in text
    for name in ["conv1.weight", "bn1.running_mean", "fc.bias", "empty"]:
        assert any(line.split() and line.split()[0] == name for line in lines), name
    assert "target" in text and "f32" in text and "0.125" in text  # kind, quant, rel_norm


def test_inspect_folds_long_names_instead_of_hiding_them(tmp_path):
    import torch

    name = "model.encoder.layer.0.attention.self.query.weight"
    sig = rwsfmt.from_tensors({name: torch.randn(384, 384)}, label="long")
    rwsfmt.save(sig, tmp_path / "long.rws")
    result = run("inspect", str(tmp_path / "long.rws"))
    assert result.returncode == 0
    assert all(len(line) <= 80 for line in result.stdout.splitlines())
    firsts = "".join(line.split()[0] for line in result.stdout.splitlines() if line.split())
    assert name in firsts  # folded onto three lines of the name column, all there


def test_inspect_json_has_the_contract_fields():
    result = run("inspect", "--json", str(VECTORS / "mixed.rws"))
    assert result.returncode == 0
    info = json.loads(result.stdout)
    assert info["format_version"] == "1.0"
    assert info["fingerprint"]["signature"].startswith("sha256:")
    assert info["provenance"]["method"] == "project"
    first = info["tensors"][0]
    assert (first["name"], first["shape"], first["bits"]) == ("conv1.weight", [4, 2, 3, 3], 8)
    assert {t["name"]: t["kind"] for t in info["tensors"]}["bn1.running_var"] == "target"


def test_verify_exit_codes_and_json(tmp_path):
    good = VECTORS / "sym8_channel.rws"
    assert run("verify", str(good)).returncode == 0
    damaged = tmp_path / "damaged.rws"
    data = bytearray(good.read_bytes())
    data[-3] ^= 0x10
    damaged.write_bytes(data)
    result = run("verify", str(good), str(damaged))
    assert result.returncode == 1
    assert "OK" in result.stdout and "FAIL" in result.stdout and "checksum" in result.stdout
    report = json.loads(run("verify", "--json", str(good), str(damaged)).stdout)
    assert report["ok"] is False
    assert [f["ok"] for f in report["files"]] == [True, False]
    assert report["files"][1]["problems"]
    not_rws = tmp_path / "notes.txt"
    not_rws.write_text("hello")
    result = run("verify", str(damaged), str(not_rws))
    assert result.returncode == 2


@pytest.mark.parametrize("command", ["inspect", "verify"])
def test_bad_input_names_the_file_without_a_traceback(tmp_path, command):
    for content in [None, b"", b"PK\x03\x04 a zip", b"\x89RWS\r\n\x1a\n" + bytes(20)]:
        path = tmp_path / "input.rws"
        if content is None:
            path.unlink(missing_ok=True)
        else:
            path.write_bytes(content)
        result = run(command, str(path))
        assert result.returncode in (1, 2)
        output = result.stdout + result.stderr
        assert str(path) in output
        assert "Traceback" not in output


def test_newer_major_version_asks_to_upgrade(tmp_path):
    path = tmp_path / "future.rws"
    path.write_bytes(assemble({"tensors": []}, b"", major=2))
    result = run("inspect", str(path))
    assert result.returncode == 2
    assert "format version 2.0 is not supported" in result.stderr and "upgrade" in result.stderr


def test_inspect_works_on_a_file_with_damaged_data(tmp_path):
    path = tmp_path / "damaged.rws"
    data = bytearray((VECTORS / "mixed.rws").read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(data)
    assert run("inspect", str(path)).returncode == 0
    assert json.loads(run("inspect", "--json", str(path)).stdout)["label"] == "fog"
    assert run("verify", str(path)).returncode == 1


def test_inspect_survives_odd_provenance_and_markup_in_names(tmp_path):
    fields, doc, data = split((VECTORS / "sym8_channel.rws").read_bytes())
    doc["provenance"].update(inputs="not a list", components=[1, {"label": "[/]"}], meta=[1])
    doc["label"] = "[bold red]x[/]"
    doc["tensors"][0]["name"] = "[/]weird"
    path = tmp_path / "odd.rws"
    path.write_bytes(assemble(doc, data, **fields))
    result = run("inspect", str(path))
    assert result.returncode == 0, result.stderr
    assert "[/]weird" in result.stdout and "[bold red]x[/]" in result.stdout


@pytest.mark.parametrize("command", ["inspect", "verify"])
def test_inspect_and_verify_do_not_import_torch(command):
    code = (
        "import sys\n"
        "from rwsfmt_cli.main import main\n"
        "try:\n"
        f"    main([{command!r}, {str(VECTORS / 'mixed.rws')!r}])\n"
        "except SystemExit as e:\n"
        "    assert e.code == 0, e.code\n"
        "print('torch' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "False"


def test_inspect_shows_the_depth_order_and_verify_prints_odd_paths_as_they_are(tmp_path):
    import torch

    std, robust, init = (
        {"b.weight": torch.full((2, 2), v), "a.weight": torch.full((2, 2), 2 * v)}
        for v in (1.0, 3.0, 0.0)
    )
    with pytest.warns(rwsfmt.RwsWarning, match="all zero"):
        sig = rwsfmt.extract(std, robust, init, layers=1)
    path = tmp_path / "odd[x] [bold]name.rws"
    rwsfmt.save(sig, path)
    result = run("inspect", str(path))
    assert result.returncode == 0, result.stderr
    assert "checkpoint (the file's own module registration order)" in result.stdout
    assert "1 tensor\n" in result.stdout or "1 tensor " in result.stdout
    result = run("verify", str(path), columns=300)
    assert result.returncode == 0, result.stderr
    assert f"OK    {path}: 1 tensor," in result.stdout


@pytest.fixture
def sparse_signs(tmp_path):
    """A signed file of 1-bit signs of the largest 10% of each weight (format 1.2), with an
    8-bit bias and a float32 target: every byte of it (blobs, header, signature block)
    counts."""
    import torch

    g = torch.Generator().manual_seed(0)
    tensors = [
        ("features.0.weight", torch.randn(16, 5, 3, 3, generator=g), "delta"),
        ("features.0.bias", torch.randn(16, generator=g), "delta"),
        ("fc.weight", torch.randn(10, 64, generator=g), "delta"),
        ("bn.running_var", torch.rand(16, generator=g) + 0.5, "target"),
    ]
    quant = rwsfmt.QuantConfig(bits=1, density=0.1)
    path = tmp_path / "signs.rws"
    rwsfmt.save(rwsfmt.from_tensors(tensors, label="signs", quant=quant), path)
    pytest.importorskip("cryptography")
    rwsfmt.generate_key(tmp_path / "key")
    rwsfmt.sign(path, tmp_path / "key")
    return path


def test_inspect_counts_every_byte_in_bits_per_parameter(sparse_signs):
    import math
    import struct

    data = sparse_signs.read_bytes()
    header_length, data_length = struct.unpack_from("<QQ", data, 16)
    _, doc, _ = split(data)
    entries = doc["tensors"]
    parameters = sum(math.prod(e["shape"]) for e in entries)
    header = 64 + header_length
    block = len(data) - header - data_length
    assert block > 0  # signed

    info = json.loads(run("inspect", "--json", str(sparse_signs)).stdout)
    assert info["parameters"] == parameters == 720 + 16 + 640 + 16
    assert info["bits_per_parameter"] == 8 * len(data) / parameters
    assert info["header_bytes"] == header and info["data_bytes"] == data_length
    assert info["header_bits_per_parameter"] == 8 * header / parameters
    assert info["signature_block_bytes"] == block
    for entry, t in zip(entries, info["tensors"], strict=True):
        numel = math.prod(entry["shape"])
        assert t["bits_per_parameter"] == 8 * entry["length"] / numel
        q = entry["quant"]
        if entry["kind"] == "target" or len(entry["shape"]) < 2:  # vectors: exact or 8-bit
            assert (t["values_scheme"], t["nnz"], t["density"]) == (q["scheme"], numel, 1.0)
            assert t["scheme"] == ("float" if entry["kind"] == "target" else "linear")
            continue
        assert (t["scheme"], t["values_scheme"]) == ("sparse", "sign")
        assert t["nnz"] == q["nnz"] == round(0.1 * numel)
        assert t["density"] == q["nnz"] / numel
        assert t["granularity"] == q["values"]["granularity"]

    text = run("inspect", str(sparse_signs), columns=300).stdout
    file_bits = f"{8 * len(data) / parameters:.4g}: tensors {8 * data_length / parameters:.3g}"
    assert file_bits in text
    share = f"{100 * header / len(data):.3g}% of the file"
    assert f"header {8 * header / parameters:.3g} ({share})" in text
    assert f"signature block {8 * block / parameters:.3g}" in text
    assert "1-bit signs, a scale per channel; the largest 10% of each tensor kept" in text
    rows = {line.split()[0]: line for line in text.splitlines() if line.split()}
    conv = entries[0]
    assert "sparse 10% · sign, channel" in rows["features.0.weight"]
    assert f"{8 * conv['length'] / 720:.3g}" in rows["features.0.weight"].split()
    assert "72" in rows["features.0.weight"].split()  # kept: 10% of 720
    assert "linear 8 sym, tensor" in rows["features.0.bias"]  # vectors: 8 bits
    assert "f32" in rows["bn.running_var"] and "all" in rows["bn.running_var"].split()


def test_inspect_json_rows_come_with_sorted_keys(sparse_signs):
    """`inspect --json` writes each tensor's keys as `describe_tensor` orders them."""
    from rwsfmt.summary import describe

    for t in describe(sparse_signs)["tensors"]:
        assert list(t) == sorted(t)


def test_inspect_of_a_sparse_file_does_not_import_torch(sparse_signs):
    code = (
        "import sys\n"
        "from rwsfmt_cli.main import main\n"
        "try:\n"
        f"    main(['inspect', {str(sparse_signs)!r}])\n"
        "except SystemExit as e:\n"
        "    assert e.code == 0, e.code\n"
        "print('torch' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "sparse 10% · sign, channel" in result.stdout
    assert result.stdout.strip().splitlines()[-1] == "False"
