"""Valid `.rws` files with hostile contents (issue #13, items 1-3 and 6): decompression bombs,
values no writer produces, rich markup and control characters, patches that overflow a
dtype, and headers of 65,536 tensors. Each is refused cleanly or shown as it is."""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import tracemalloc

import pytest
import torch
import zstandard
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import rwsfmt
from rwsfmt.container import TensorInfo, write_file
from rwsfmt.errors import RwsError
from rwsfmt.limits import DECODE_FLOOR, DECODE_RATIO, ENV_VAR, decode_limit, parse_size
from rwsfmt.quant import QuantConfig
from rwsfmt.signature import SignatureBuilder
from rwsfmt_cli.main import main as cli


def run(*args: object):
    """(exit code, output with line wrapping undone) of one CLI call, which must not crash."""
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert isinstance(result.exception, (SystemExit, type(None))), result.exception
    return result.exit_code, " ".join(result.output.split())


def _entry(name: str, shape: list[int], payload: bytes, bits: int = 8) -> tuple[TensorInfo, bytes]:
    """A tensor-granularity symmetric entry holding `payload` in one zstd frame."""
    frame = zstandard.ZstdCompressor(level=19, write_checksum=True).compress(payload)
    quant = {"scheme": "linear", "bits": bits, "symmetric": True, "granularity": "tensor"}
    info = TensorInfo(
        name=name,
        kind="delta",
        shape=tuple(shape),
        dtype="float32",
        quant=quant,
        filter="none",
        codec="zstd",
        offset=0,
        length=len(frame),
        decoded_length=len(payload),
        sha256=hashlib.sha256(frame).hexdigest(),
    )
    return info, frame


def _write(path, entries, label="crafted") -> None:
    blobs = {info.name: blob for info, blob in entries}
    meta = {"label": label, "fingerprint": {}, "provenance": {}}
    write_file(path, meta, [info for info, _ in entries], lambda info: blobs[info.name])


@pytest.fixture
def bomb(tmp_path):
    """A valid 8.6 KB file whose one 8-bit tensor of 2**28 codes decodes to 1 GiB of float32."""
    n = 1 << 28
    path = tmp_path / "bomb.rws"
    _write(path, [_entry("features.0.weight", [n], struct.pack("<f", 1e-3) + bytes([128]) * n)])
    assert os.path.getsize(path) < 16_384 and rwsfmt.verify(path, max_decoded_bytes=math.inf).ok
    return path


# --------------------------------------------------------------------------- decompression bombs


def test_bomb_is_refused_before_anything_is_allocated(bomb):
    tracemalloc.start()
    try:
        with rwsfmt.load(bomb) as sig, pytest.raises(RwsError) as err:
            sig.tensor("features.0.weight")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20  # the 1 GiB (and its 256 MiB payload) was never allocated
    message = str(err.value)
    assert "1.00 GiB of float32" in message and "decompression bomb" in message
    assert f"{ENV_VAR}=1GiB" in message and str(bomb) in message


def test_bomb_through_every_command_exits_2_and_writes_nothing(tmp_path, monkeypatch):
    """verify, merge and apply refuse before decoding (with the limit lowered to 1 MiB, so the
    model the bomb fits stays small); inspect, which reads the header only, still works."""
    n = 1 << 20
    bomb = tmp_path / "bomb.rws"
    _write(bomb, [_entry("features.0.weight", [n], struct.pack("<f", 1e-3) + bytes([128]) * n)])
    model = tmp_path / "model.safetensors"
    save_file({"features.0.weight": torch.zeros(n)}, model)
    monkeypatch.setenv(ENV_VAR, "1MiB")
    out = tmp_path / "out"
    for args in (
        ["verify", bomb],
        ["merge", bomb, bomb, "-o", f"{out}.rws"],
        ["apply", model, bomb, "-a", "1", "-o", f"{out}.safetensors"],
    ):
        code, output = run(*args)
        assert code == 2, (args, output)
        assert "decompression bomb" in output and f"{ENV_VAR}=4MiB" in output
    assert not list(tmp_path.glob("out*"))
    assert run("inspect", bomb)[0] == 0


def test_the_limit_can_be_raised_for_a_trusted_file(bomb, monkeypatch):
    with rwsfmt.load(bomb, max_decoded_bytes=1 << 30) as sig:
        assert sig.info("features.0.weight").numel == 1 << 28
    monkeypatch.setenv(ENV_VAR, "2GiB")
    assert run("verify", bomb)[0] == 0
    monkeypatch.setenv(ENV_VAR, "lots")
    code, output = run("verify", bomb)
    assert code == 2 and "RWSFMT_MAX_DECODED='lots' is not a size" in output


@pytest.mark.parametrize(
    ("text", "size"),
    [("8GiB", 8 << 30), ("500MB", 500e6), ("1000000", 1e6), ("1.5 KiB", 1536), ("none", math.inf)],
)
def test_sizes(text, size):
    assert parse_size(text) == size


def test_default_limit():
    assert decode_limit(1_000) == DECODE_FLOOR
    assert decode_limit(10 << 20) == DECODE_RATIO * (10 << 20)
    assert decode_limit(1_000, max_decoded_bytes=5) == 5


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("bits", [4, 8, 16])
def test_real_signatures_stay_well_inside_the_limit(tmp_path, seed, bits):
    """Signatures of real shapes (3x3 convolutions of 256 channels, half of them dead) decode
    to at most 21x their file size (measured), far inside the 128x ratio."""
    g = torch.Generator().manual_seed(seed)
    builder = SignatureBuilder("real", QuantConfig(bits=bits))
    for i in range(3):
        delta = 0.01 * torch.randn(256, 256, 3, 3, generator=g)
        delta[::2] = 0
        builder.add(f"features.{i}.weight", delta)
    path = tmp_path / "real.rws"
    rwsfmt.save(builder.build(), path)
    float32 = 4 * 3 * 256 * 256 * 9
    assert float32 / os.path.getsize(path) < DECODE_RATIO / 4


# --------------------------------------------------------------------------- values no writer makes


def test_group_size_beyond_the_format_is_refused_up_front(tmp_path):
    with pytest.raises(RwsError, match="group_size=3000000000 must be a whole number"):
        QuantConfig(granularity="group", group_size=3_000_000_000)
    for bad in ({"bits": True}, {"bits": "8"}, {"symmetric": 1}, {"granularity": ["group"]}):
        with pytest.raises(RwsError):
            QuantConfig(**bad)
    sd = {"features.0.weight": torch.randn(4, 3, 3, 3)}
    for role in ("std", "robust", "init"):
        torch.save({k: v + len(role) for k, v in sd.items()}, tmp_path / f"{role}.pt")
    out = tmp_path / "sig.rws"
    code, output = run(
        "extract", *(tmp_path / f"{r}.pt" for r in ("std", "robust", "init")), "-o", out,
        "--granularity", "group", "--group-size", "3000000000",
    )  # fmt: skip
    assert code == 2 and "--group-size" in output and not out.exists()


def test_a_patch_that_overflows_the_model_dtype_is_refused(tmp_path):
    """A valid signature (finite float32 deltas up to 1.3e38) applied to a float16 model, or at
    alpha 2 to a float32 one, would write inf: refused, naming the tensor, nothing written."""
    sig_path = tmp_path / "huge.rws"
    _write(sig_path, [_entry("weight", [4, 4], struct.pack("<f", 1e36) + bytes([255]) * 16)])
    for dtype, alpha in ((torch.float16, 1), (torch.bfloat16, 2), (torch.float32, 3)):
        model = tmp_path / "model.safetensors"
        save_file({"weight": torch.ones(4, 4, dtype=dtype)}, model)
        out = tmp_path / "out.safetensors"
        code, output = run("apply", model, sig_path, "-a", alpha, "-o", out)
        if dtype == torch.bfloat16:  # bfloat16 reaches 3.4e38: alpha 2 still fits
            assert code == 0 and torch.isfinite(load_file(out)["weight"]).all()
            out.unlink()
            continue
        assert code == 2 and "patching 'weight'" in output and "beyond the" in output, output
        assert not out.exists()
    net = torch.nn.Linear(4, 4, bias=False).half()
    net.weight.data.fill_(1)
    before = net.weight.detach().clone()
    with rwsfmt.load(sig_path) as sig, pytest.raises(RwsError, match="float16 range"):
        rwsfmt.patch(net, sig, alpha=1)
    assert torch.equal(net.weight, before)  # patch() leaves the model as it was


# --------------------------------------------------------------------------- markup and controls


def test_markup_and_control_characters_print_as_text(tmp_path):
    """Names, labels and paths holding rich markup (`[/x]`) or an escape sequence go through
    every command: exit 0, shown literally, the escape character never reaching the terminal."""
    folder = tmp_path / "["
    folder.mkdir()
    sd = {"a[/x].weight": torch.randn(4, 4), "b\x1b[31m.weight": torch.randn(4)}
    for i, role in enumerate(("std", "robust", "init")):
        save_file({k: v + i for k, v in sd.items()}, folder / f"{role}.safetensors")
    sig, sig2, merged = folder / "x].rws", folder / "y].rws", folder / "z].rws"
    inputs = [folder / f"{r}.safetensors" for r in ("std", "robust", "init")]
    for path, name in ((sig, "[/bold]fog\x1b]0;pwned\x07"), (sig2, "[/x]")):
        code, output = run("extract", *inputs, "-o", path, "--name", name, "--layers", "all")
        assert code == 0, output
    commands = [
        ["inspect", sig],
        ["verify", sig, sig2],
        ["merge", sig, sig2, "-o", merged],
        ["apply", inputs[0], sig, "-a", "0.5", "-o", folder / "p].safetensors"],
    ]
    for args in commands:
        code, output = run(*args)
        assert code == 0, (args, output)
        assert "\x1b" not in output and "\x07" not in output
    assert "a[/x].weight" in run("inspect", merged)[1]
    assert "[/bold]fog\\u001b]0;pwned\\u0007+[/x]" in run("inspect", merged)[1]


# --------------------------------------------------------------------------- many tensors


def test_inspect_shows_the_first_rows_and_json_shows_every_tensor(tmp_path):
    builder = SignatureBuilder("many", QuantConfig(bits=32))
    for i in range(150):
        builder.add(f"layers.{i}.weight", torch.full((2,), float(i)))
    path = tmp_path / "many.rws"
    rwsfmt.save(builder.build(provenance={"meta": {"tensors": None}}), path)
    code, output = run("inspect", path)
    assert code == 0 and "150 tensors" in output
    assert "layers.99.weight" in output and "layers.100.weight" not in output
    assert "the first 100 of 150 tensors: --all lists every one" in output
    assert "layers.149.weight" in run("inspect", "--all", path)[1]
    code, output = run("inspect", "--json", path)
    info = json.loads(output)
    assert info["tensor_count"] == 150 and len(info["tensors"]) == 150
    assert info["provenance"]["meta"] == {"tensors": None}
    assert output.count("\n") < 200  # one line per tensor


# --------------------------------------------------------------------------- pickle safety


@pytest.mark.parametrize(
    ("version", "safe"),
    [("2.13.0+cpu", True), ("2.6.0", True), ("2.5.1+cu121", False), ("1.13.1", False)],
)
def test_pytorch_files_need_a_torch_whose_weights_only_holds(version, safe):
    """Before torch 2.6, weights_only=True could be bypassed (CVE-2025-32434): rwsfmt refuses
    to unpickle with such a torch, even one installed against the package's requirement."""
    from rwsfmt.io.pytorch import require_safe_torch

    if safe:
        require_safe_torch(version)
    else:
        with pytest.raises(RwsError, match=r"(?s)CVE-2025-32434.*fix: upgrade torch"):
            require_safe_torch(version)


def test_file_names_that_are_not_utf8_become_text(tmp_path):
    """A name holding bytes that are not UTF-8 (Python keeps them as lone surrogates) cannot
    go into a JSON header as it is: labels and provenance names get U+FFFD instead."""
    sd = {"features.0.weight": torch.randn(4, 3, 3, 3)}
    odd = os.fsdecode(bytes(tmp_path) + b"/\xff.safetensors")
    for i, path in enumerate((tmp_path / "std.safetensors", odd, tmp_path / "init.safetensors")):
        save_file({k: v + i for k, v in sd.items()}, path)
    out = tmp_path / "sig.rws"
    code, output = run("extract", tmp_path / "std.safetensors", odd, tmp_path / "init.safetensors",
                       "-o", out, "--layers", "all")  # fmt: skip
    assert code == 0, output
    with rwsfmt.load(out) as sig:
        assert sig.label == "\ufffd"
        assert sig.provenance["inputs"][1]["name"] == "\ufffd.safetensors"
    assert run("import", odd, "-o", tmp_path / "imported.rws")[0] == 0
