"""`rwsfmt convert` and `rwsfmt.convert`: re-quantizing a signature file."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from architectures import resnet18
from click.testing import CliRunner
from conftest import assemble, split

import rwsfmt
from rwsfmt.provenance import file_sha256
from rwsfmt_cli.main import main


def _checkpoints(seed: int = 0) -> tuple[dict, dict, dict]:
    """init, std and robust state dicts of a torchvision-style ResNet-18 (BatchNorm, so the
    signature holds targets), std and robust a small step away from init."""
    torch.manual_seed(seed)
    model = resnet18(width=8)
    init = {k: v.clone() for k, v in model.state_dict().items()}

    def trained(scale: float) -> dict:
        out = {}
        for k, v in init.items():
            if v.is_floating_point():
                step = scale * torch.randn_like(v)
                v = (v + step).abs() + 0.1 if k.endswith("running_var") else v + step
            out[k] = v
        return out

    return init, trained(0.01), trained(0.02)


@pytest.fixture(scope="module")
def extracted(tmp_path_factory) -> dict[int, Path]:
    """The same signature (5 shallowest layers, with BatchNorm targets) at 8 and 32 bits."""
    init, std, robust = _checkpoints()
    folder = tmp_path_factory.mktemp("signatures")
    paths = {}
    for bits in (8, 32):
        sig = rwsfmt.extract(std, robust, init, bits=bits, label="fog", corruption="fog")
        paths[bits] = folder / f"fog{bits}.rws"
        rwsfmt.save(sig, paths[bits])
    return paths


def _invoke(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_8_to_4_bits_is_within_half_a_step_and_keeps_targets_exact(extracted):
    sig = rwsfmt.load(extracted[8])
    converted = rwsfmt.convert(sig, rwsfmt.QuantConfig(bits=4))
    assert converted.names == sig.names
    targets = [i.name for i in sig.infos if i.kind == "target"]
    assert targets, "the ResNet signature should hold BatchNorm statistics"
    for info in converted.infos:
        before, after = sig.tensor(info.name), converted.tensor(info.name)
        assert info.kind == sig.info(info.name).kind
        assert info.dtype == sig.info(info.name).dtype
        if info.kind == "target":
            assert info.quant == {"scheme": "float", "bits": 32}
            assert torch.equal(after, before)
            continue
        assert info.bits == 4
        # symmetric per channel: each value moves by at most half a step, max|row| / 7 / 2
        rows = before.reshape(before.shape[0], -1) if before.dim() >= 2 else before.view(1, -1)
        step = rows.abs().amax(dim=1, keepdim=True) / 7
        moved = (after.reshape(rows.shape) - rows).abs()
        assert (moved <= step / 2 * (1 + 1e-5) + 1e-12).all(), info.name


def test_recorded_error_bounds_the_error_against_the_exact_signature(extracted):
    exact = rwsfmt.load(extracted[32])
    converted = rwsfmt.convert(rwsfmt.load(extracted[8]), rwsfmt.QuantConfig(bits=4))
    for info in converted.infos:
        if info.kind == "target":
            continue
        x = exact.tensor(info.name)
        actual = float((converted.tensor(info.name) - x).norm() / x.norm())
        assert actual <= info.stats["quant_rel_error"] * (1 + 1e-5), info.name
        assert 0.02 < actual < 0.25  # 4-bit codes of 8-bit values: a real, bounded error


def test_8_to_32_bits_keeps_every_value_exactly(extracted):
    sig = rwsfmt.load(extracted[8])
    converted = rwsfmt.convert(sig, rwsfmt.QuantConfig(bits=32))
    for name in sig.names:
        assert torch.equal(converted.tensor(name), sig.tensor(name)), name
        assert converted.info(name).quant == {"scheme": "float", "bits": 32}
        # exact storage adds no error: the 8-bit error recorded at extraction is kept
        assert converted.info(name).stats == sig.info(name).stats


def test_provenance_label_and_fingerprints_are_kept_and_the_conversion_recorded(extracted):
    sig = rwsfmt.load(extracted[8])
    converted = rwsfmt.convert(sig, rwsfmt.QuantConfig(bits=4, granularity="group"))
    prov = converted.provenance
    for key in ("method", "layers", "selection", "tensors", "inputs", "corruption", "created"):
        assert prov[key] == sig.provenance[key], key
    assert prov["quantization"] == rwsfmt.QuantConfig(bits=4, granularity="group").to_json()
    (record,) = prov["conversions"]
    assert record["from"] == sig.provenance["quantization"]
    assert record["to"] == prov["quantization"]
    assert record["source"] == {
        "name": extracted[8].name,
        "size": os.path.getsize(extracted[8]),
        "sha256": file_sha256(extracted[8]),
    }
    assert record["tool_version"] == rwsfmt.__version__
    assert record["created"] == "2023-11-14T22:13:20Z"  # SOURCE_DATE_EPOCH (conftest)
    assert record["reencoded"] == sum(i.kind == "delta" for i in sig.infos)
    assert converted.label == "fog" and converted.fingerprint == sig.fingerprint
    assert rwsfmt.convert(sig, rwsfmt.QuantConfig(), label="haze").label == "haze"


def test_conversions_chain_and_same_settings_copy_the_stored_bytes(tmp_path, extracted):
    sig = rwsfmt.load(extracted[8])
    again = rwsfmt.convert(sig, rwsfmt.QuantConfig(bits=8))
    for name in sig.names:  # nothing to change: every tensor copied as stored
        assert bytes(again.stored(name)) == bytes(sig.stored(name))
    rwsfmt.save(rwsfmt.convert(sig, rwsfmt.QuantConfig(bits=16)), tmp_path / "16.rws")
    chained = rwsfmt.convert(rwsfmt.load(tmp_path / "16.rws"), rwsfmt.QuantConfig(bits=4))
    assert [r["to"]["bits"] for r in chained.provenance["conversions"]] == [16, 4]


def test_cli_converts_and_says_what_changed(tmp_path, extracted):
    out = tmp_path / "fog4.rws"
    result = _invoke("convert", extracted[8], "-o", out, "--bits", "4")
    assert result.exit_code == 0, result.output
    assert "8-bit linear, symmetric, per channel -> 4-bit linear" in result.output
    assert rwsfmt.verify(out).ok
    assert os.path.getsize(out) < os.path.getsize(extracted[8])
    assert rwsfmt.load(out).quant == rwsfmt.QuantConfig(bits=4)

    result = _invoke("convert", out, "-o", tmp_path / "same.rws", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["reencoded"] == 0 and summary["to"]["bits"] == 4  # kept: nothing to do
    assert summary["tensors"] == len(rwsfmt.load(out))

    result = _invoke("convert", out, "-o", tmp_path / "q.rws", "--bits", "8", "--quiet")
    assert result.exit_code == 0 and result.output == ""


def test_cli_options_left_out_keep_the_input_settings(tmp_path, extracted):
    grouped = tmp_path / "grouped.rws"
    args = ["--granularity", "group", "--group-size", "64", "--affine"]
    assert _invoke("convert", extracted[8], "-o", grouped, *args).exit_code == 0
    assert _invoke("convert", grouped, "-o", tmp_path / "g4.rws", "--bits", "4").exit_code == 0
    assert rwsfmt.load(tmp_path / "g4.rws").quant == rwsfmt.QuantConfig(
        bits=4, symmetric=False, granularity="group", group_size=64
    )
    assert _invoke("convert", grouped, "-o", tmp_path / "sym.rws", "--symmetric").exit_code == 0
    assert rwsfmt.load(tmp_path / "sym.rws").quant == rwsfmt.QuantConfig(
        granularity="group", group_size=64
    )


def test_same_input_gives_the_same_bytes(tmp_path, extracted):
    for name in ("a.rws", "b.rws"):
        assert _invoke("convert", extracted[8], "-o", tmp_path / name, "--bits", "4").exit_code == 0
    assert (tmp_path / "a.rws").read_bytes() == (tmp_path / "b.rws").read_bytes()


def test_bad_input_is_exit_2_with_a_message_and_no_output(tmp_path, extracted):
    from safetensors.torch import save_file

    save_file({"w": torch.ones(2)}, tmp_path / "model.safetensors")
    link = tmp_path / "link.rws"
    link.symlink_to(extracted[8])
    out = tmp_path / "out.rws"
    cases = {
        "no such file": ["convert", tmp_path / "missing.rws", "-o", out],
        "not a .rws file": ["convert", tmp_path / "model.safetensors", "-o", out],
        "would overwrite the input signature": ["convert", extracted[8], "-o", link],
        "--bits 5 is not a width": ["convert", extracted[8], "-o", out, "--bits", "5"],
        "output folder does not exist": ["convert", extracted[8], "-o", tmp_path / "no" / "o.rws"],
    }
    for expected, args in cases.items():
        result = _invoke(*args)
        assert result.exit_code == 2, (expected, result.output)
        assert expected in result.output, (expected, result.output)
        assert "Traceback" not in result.output
        assert not out.exists()
    assert link.resolve() == extracted[8] and rwsfmt.verify(extracted[8]).ok


def test_metadata_of_any_shape_is_carried_not_trusted(tmp_path, extracted):
    """Fields from a file are informational: odd values of them (a `conversions` that is not
    a list, a quantization no QuantConfig takes, a statistic that is text) convert."""
    fields, doc, data = split(extracted[8].read_bytes())
    doc["provenance"]["conversions"] = "by hand"
    doc["provenance"]["quantization"] = {"bits": "eight", "granularity": ["x"]}
    for entry in doc["tensors"]:
        entry["stats"] = {"quant_rel_error": "small", "rel_norm": None}
    odd = tmp_path / "odd.rws"
    odd.write_bytes(assemble(doc, data, **fields))
    out = tmp_path / "out.rws"
    result = _invoke("convert", odd, "-o", out, "--bits", "16")
    assert result.exit_code == 0, result.output
    converted = rwsfmt.load(out)
    (record,) = converted.provenance["conversions"]
    assert record["from"] == {"bits": "eight", "granularity": ["x"]}
    assert converted.quant == rwsfmt.QuantConfig(bits=16)
    delta = next(i for i in converted.infos if i.kind == "delta")
    assert delta.stats["rel_norm"] is None and isinstance(delta.stats["quant_rel_error"], float)


# ------------------------------------------------------------------ storage (format 1.2)


@pytest.fixture(scope="module")
def wide(tmp_path_factory) -> Path:
    """An 8-bit signature of 21,504 parameters in two tensors: its header is a small part
    of it, so bits per parameter are mostly the tensors'."""
    g = torch.Generator().manual_seed(3)
    u = torch.rand(64 * 32 * 9 + 10 * 256, generator=g) - 0.5
    laplace = -torch.sign(u) * torch.log1p(-2 * u.abs())
    tensors = {
        "conv.weight": laplace[: 64 * 32 * 9].view(64, 32, 3, 3),
        "fc.weight": laplace[64 * 32 * 9 :].view(10, 256),
    }
    path = tmp_path_factory.mktemp("wide") / "wide.rws"
    rwsfmt.save(rwsfmt.from_tensors(tensors, label="wide"), path)
    return path


def _stored(path: Path) -> rwsfmt.QuantConfig:
    """The quantization a file records, after `rwsfmt verify` passed on it."""
    result = _invoke("verify", path)
    assert result.exit_code == 0, result.output
    return rwsfmt.load(path).quant


def test_cli_converts_to_the_new_schemes_and_keeps_what_is_left_out(tmp_path, extracted):
    def convert(source: Path, name: str, *args: str) -> Path:
        out = tmp_path / name
        result = _invoke("convert", source, "-o", out, *args)
        assert result.exit_code == 0, result.output
        assert result.stderr == "", result.stderr
        return out

    Q = rwsfmt.QuantConfig
    signs = convert(extracted[8], "signs.rws", "--bits", "1", "--density", "0.1")
    assert _stored(signs) == Q(bits=1, density=0.1)
    delta = next(i for i in rwsfmt.load(signs).infos if i.kind == "delta")
    assert delta.scheme == "sparse" and delta.values_quant["scheme"] == "sign"
    # left out: the density (and granularity) of the input
    int2 = convert(signs, "int2.rws", "--bits", "2")
    assert _stored(int2) == Q(bits=2, density=0.1)
    dense = convert(int2, "dense.rws", "--density", "1")
    assert _stored(dense) == Q(bits=2)
    channel = convert(
        extracted[8], "ch.rws", "--bits", "4", "--density", "0.2", "--sparsity", "channel"
    )
    assert _stored(channel) == Q(bits=4, density=0.2, sparsity="channel")
    assert _stored(convert(channel, "ch1.rws", "--bits", "1")) == Q(
        bits=1, density=0.2, sparsity="channel"
    )
    # an affine input goes to signs without complaint: its --affine does not apply to them
    affine = convert(
        extracted[8], "affine.rws", "--bits", "4", "--affine", "--granularity", "group"
    )
    assert _stored(convert(affine, "g1.rws", "--bits", "1")) == Q(bits=1, granularity="group")


def test_cli_bits_auto_fits_and_is_kept_or_left(tmp_path, wide):
    out = tmp_path / "auto.rws"
    result = _invoke("convert", wide, "-o", out, "--bits", "auto", "--target-bpp", "2", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    parameters = 64 * 32 * 9 + 10 * 256
    assert summary["bits_per_parameter"] == 8 * os.path.getsize(out) / parameters <= 2
    assert summary["to"] == rwsfmt.QuantConfig(bits="auto", target_bpp=2.0).to_json()
    assert _stored(out) == rwsfmt.QuantConfig(bits="auto", target_bpp=2.0)
    # --target-bpp alone re-fits a file stored with --bits auto; --bits 4 leaves auto
    refit = tmp_path / "refit.rws"
    assert _invoke("convert", out, "-o", refit, "--target-bpp", "1.5").exit_code == 0
    assert _stored(refit) == rwsfmt.QuantConfig(bits="auto", target_bpp=1.5)
    assert 8 * os.path.getsize(refit) / parameters <= 1.5  # the header alone takes ~0.9
    four = tmp_path / "four.rws"
    assert _invoke("convert", out, "-o", four, "--bits", "4").exit_code == 0
    assert _stored(four) == rwsfmt.QuantConfig(bits=4)


def test_cli_refuses_storage_the_input_cannot_take(tmp_path, extracted):
    signs = tmp_path / "signs.rws"
    assert _invoke("convert", extracted[8], "-o", signs, "--bits", "1").exit_code == 0
    out = tmp_path / "out.rws"
    cases = [
        (extracted[8], ["--target-bpp", "1"], "it does not apply to the input (8-bit)"),
        (extracted[8], ["--bits", "auto"], "--bits auto needs --target-bpp B"),
        (signs, ["--affine"], "the input holds 1-bit signs and a scale, which have none"),
        (extracted[8], ["--density", "0"], "--density 0 is not a share of entries"),
        (extracted[8], ["--density", "1.5"], "--density 1.5 is not a share of entries"),
    ]
    for source, args, message in cases:
        result = _invoke("convert", source, "-o", out, *args)
        assert result.exit_code == 2, (args, result.output)
        assert message in result.stderr and "  fix: " in result.stderr, (args, result.stderr)
        assert not out.exists()
