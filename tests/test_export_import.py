"""`rwsfmt export` / `rwsfmt import`, `rwsfmt.export_safetensors` / `import_safetensors` and
`Signature.state_dict`: signatures to and from safetensors files."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from architectures import resnet18
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import rwsfmt
from rwsfmt.provenance import file_sha256
from rwsfmt_cli.main import main


def _invoke(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def fog(tmp_path_factory) -> Path:
    """An 8-bit signature of a float16 ResNet-18 (torchvision's names) with BatchNorm
    targets, its 5 shallowest layers."""
    torch.manual_seed(0)
    init = {
        k: v.half() if v.is_floating_point() else v for k, v in resnet18(8).state_dict().items()
    }

    def trained(scale: float) -> dict:
        return {
            k: (v + scale * torch.randn_like(v)).abs() if v.is_floating_point() else v
            for k, v in init.items()
        }

    sig = rwsfmt.extract(trained(0.01), trained(0.02), init, label="fog", dataset="digits")
    path = tmp_path_factory.mktemp("sig") / "fog.rws"
    rwsfmt.save(sig, path)
    return path


@pytest.fixture(scope="module")
def task_vector(tmp_path_factory) -> Path:
    """A task vector made elsewhere: fine-tuned minus pre-trained ResNet-18 weights, every
    entry of the state dict (num_batches_tracked too), saved with safetensors itself."""
    torch.manual_seed(1)
    pre, tuned = resnet18(8).state_dict(), resnet18(8).state_dict()
    path = tmp_path_factory.mktemp("tv") / "sketch_tv.safetensors"
    save_file({k: tuned[k] - pre[k] for k in pre}, path)
    return path


def test_state_dict_is_every_tensor_dequantized_under_its_name(fog):
    sig = rwsfmt.load(fog)
    state = sig.state_dict()
    assert list(state) == sig.names
    for name, value in state.items():
        assert value.dtype == torch.float32 and torch.equal(value, sig.tensor(name))


def test_export_holds_the_dequantized_values_and_the_header_as_metadata(tmp_path, fog):
    sig = rwsfmt.load(fog)
    out = tmp_path / "fog.safetensors"
    rwsfmt.export_safetensors(sig, out)
    loaded = load_file(out)
    assert set(loaded) == set(sig.names)
    for name in sig.names:
        assert torch.equal(loaded[name], sig.tensor(name)), name
    with safe_open(out, "pt") as f:
        meta = f.metadata()
    assert meta["rwsfmt.format_version"] == "1.0" and meta["rwsfmt.label"] == "fog"
    assert json.loads(meta["rwsfmt.provenance"]) == sig.provenance
    assert json.loads(meta["rwsfmt.fingerprint"]) == sig.fingerprint
    kinds = json.loads(meta["rwsfmt.kinds"])
    assert kinds and kinds == {i.name: "target" for i in sig.infos if i.kind == "target"}
    assert set(json.loads(meta["rwsfmt.dtypes"]).values()) == {"float16"}


def test_export_then_import_at_32_bits_is_bit_exact(tmp_path, fog):
    sig = rwsfmt.load(fog)
    out = tmp_path / "fog.safetensors"
    assert _invoke("export", fog, "-o", out).exit_code == 0
    back_path = tmp_path / "back.rws"
    result = _invoke("import", out, "-o", back_path, "--bits", "32")
    assert result.exit_code == 0, result.output
    back = rwsfmt.load(back_path)
    assert back.names == sig.names  # depth order, not the sorted order of safetensors
    assert back.label == "fog" and back.fingerprint == sig.fingerprint
    for info in back.infos:
        before = sig.info(info.name)
        assert torch.equal(back.tensor(info.name), sig.tensor(info.name)), info.name
        assert (info.kind, info.dtype, info.stats) == (before.kind, before.dtype, before.stats)
    prov = back.provenance
    assert {k: v for k, v in prov.items() if k not in ("quantization", "imported")} == {
        k: v for k, v in sig.provenance.items() if k != "quantization"
    }
    assert prov["quantization"] == {"bits": 32}
    assert prov["imported"]["from"] == sig.provenance["quantization"]
    assert prov["imported"]["sha256"] == file_sha256(out)
    # and back at 8 bits: the 8-bit values re-encode to themselves, but for the rounding of
    # a recomputed scale (one float32 step), which is why convert copies such tensors
    again = rwsfmt.import_safetensors(out)
    for name in sig.names:
        torch.testing.assert_close(again.tensor(name), sig.tensor(name), rtol=1e-6, atol=0)


def test_import_of_a_foreign_task_vector(tmp_path, task_vector):
    out = tmp_path / "tv.rws"
    result = _invoke("import", task_vector, "-o", out)
    assert result.exit_code == 0, result.output
    assert "skipped" in result.output and "num_batches_tracked (int64)" in result.output
    sig = rwsfmt.load(out)
    source = load_file(task_vector)
    floating = {k for k, v in source.items() if v.is_floating_point()}
    assert set(sig.names) == floating and len(floating) < len(source)
    assert sig.names[:3] == ["conv1.weight", "bn1.weight", "bn1.bias"]  # depth order
    assert sig.names[-2:] == ["fc.weight", "fc.bias"]
    assert {i.kind for i in sig.infos} == {"delta"}
    assert sig.label == "sketch_tv" and sig.quant == rwsfmt.QuantConfig(bits=8)
    prov = sig.provenance
    assert prov["method"] == "import" and prov["selection"] == {"depth_order": "rules"}
    (record,) = prov["inputs"]
    assert record["name"] == task_vector.name and record["sha256"] == file_sha256(task_vector)
    assert {s["dtype"] for s in record["skipped"]} == {"int64"}
    for name in sig.names:  # 8 bits, per channel: within the recorded error
        x = source[name]
        err = float((sig.tensor(name) - x).norm() / x.norm()) if x.norm() else 0.0
        assert err <= sig.info(name).stats["quant_rel_error"] * (1 + 1e-5) + 1e-7
        assert err < 0.02, name
    exact = rwsfmt.import_safetensors(task_vector, label="tv", quant=rwsfmt.QuantConfig(bits=32))
    assert exact.label == "tv"
    assert all(torch.equal(exact.tensor(n), source[n]) for n in exact.names)


def test_import_takes_every_float_dtype(tmp_path):
    values = {"a": torch.randn(4, 3), "b": torch.randn(4, 3, dtype=torch.float64)}
    values["c"], values["d"] = values["a"].half(), values["a"].bfloat16()
    save_file(values, tmp_path / "mixed.safetensors")
    sig = rwsfmt.import_safetensors(
        tmp_path / "mixed.safetensors", quant=rwsfmt.QuantConfig(bits=32)
    )
    assert [sig.info(n).dtype for n in "abcd"] == ["float32", "float64", "float16", "bfloat16"]
    for name in "abcd":
        assert torch.equal(sig.tensor(name), values[name].float())


def test_same_input_gives_the_same_bytes(tmp_path, fog, task_vector):
    for run in ("1", "2"):
        assert _invoke("export", fog, "-o", tmp_path / f"e{run}.safetensors").exit_code == 0
        assert _invoke("import", task_vector, "-o", tmp_path / f"i{run}.rws").exit_code == 0
    for a, b in (("e1.safetensors", "e2.safetensors"), ("i1.rws", "i2.rws")):
        assert (tmp_path / a).read_bytes() == (tmp_path / b).read_bytes()


def test_json_and_quiet_summaries(tmp_path, fog, task_vector):
    result = _invoke("export", fog, "-o", tmp_path / "f.safetensors", "--json")
    assert result.exit_code == 0
    summary = json.loads(result.output)
    assert summary["label"] == "fog" and summary["tensors"] == len(rwsfmt.load(fog))
    result = _invoke("import", task_vector, "-o", tmp_path / "t.rws", "--json", "--bits", "4")
    summary = json.loads(result.stdout)  # the note on skipped tensors goes to stderr
    assert summary["quantization"]["bits"] == 4 and summary["skipped"]
    result = _invoke("import", task_vector, "-o", tmp_path / "q.rws", "-q")
    assert result.exit_code == 0 and result.output == ""


def _damaged(path: Path) -> Path:
    path.write_bytes(struct.pack("<Q", 40) + b'{"w":{"dtype":"F32","shape":[2],"data_')
    return path


def test_bad_input_is_exit_2_with_a_message_and_no_output(tmp_path, fog, task_vector):
    save_file(
        {"step": torch.arange(3), "mask": torch.ones(2, dtype=torch.bool)},
        tmp_path / "ints.safetensors",
    )
    torch.save({"w": torch.ones(2)}, tmp_path / "model.pt")
    copy = tmp_path / "sig.safetensors"  # a .rws file under a safetensors name
    copy.write_bytes(fog.read_bytes())
    damaged = _damaged(tmp_path / "damaged.safetensors")
    out_rws, out_st = tmp_path / "out.rws", tmp_path / "out.safetensors"
    cases = [
        ("no such file", ["export", tmp_path / "missing.rws", "-o", out_st]),
        ("no such file", ["import", tmp_path / "missing.safetensors", "-o", out_rws]),
        ("not a .rws file", ["export", task_vector, "-o", out_st]),
        ("is not a safetensors file", ["import", fog, "-o", out_rws]),
        ("is a PyTorch file", ["import", tmp_path / "model.pt", "-o", out_rws]),
        ("not a valid safetensors file", ["import", damaged, "-o", out_rws]),
        (
            "no floating-point tensors (tensors found: bool, int64)",
            ["import", tmp_path / "ints.safetensors", "-o", out_rws],
        ),
        ("would overwrite the input signature", ["export", copy, "-o", copy]),
        ("would overwrite the input safetensors file", ["import", task_vector, "-o", task_vector]),
        ("does not end in .safetensors", ["export", fog, "-o", tmp_path / "out.pt"]),
        ("--bits 3 is not a width", ["import", task_vector, "-o", out_rws, "--bits", "3"]),
    ]
    for expected, args in cases:
        result = _invoke(*args)
        assert result.exit_code == 2, (expected, result.output)
        assert expected in result.output, (expected, result.output)
        assert "Traceback" not in result.output
        assert not out_rws.exists() and not out_st.exists() and not (tmp_path / "out.pt").exists()
    assert rwsfmt.verify(copy).ok and load_file(task_vector)


def test_tampered_rwsfmt_metadata_is_refused(tmp_path, fog):
    sig = rwsfmt.load(fog)
    exported = tmp_path / "fog.safetensors"
    rwsfmt.export_safetensors(sig, exported)
    tensors = load_file(exported)
    with safe_open(exported, "pt") as f:
        meta = f.metadata()
    cases = {
        "rwsfmt.kinds gives": {"rwsfmt.kinds": json.dumps({sig.names[0]: "bias"})},
        "rwsfmt.provenance is not valid JSON": {"rwsfmt.provenance": "{"},
        "rwsfmt.stats is not a JSON object": {"rwsfmt.stats": "[]"},
        "format version '2.0'": {"rwsfmt.format_version": "2.0"},
    }
    for expected, change in cases.items():
        path = tmp_path / "tampered.safetensors"
        save_file(tensors, path, metadata={**meta, **change})
        with pytest.raises(rwsfmt.RwsError, match=expected) as info:
            rwsfmt.import_safetensors(path)
        assert info.value.path == str(path)


def test_what_a_signature_cannot_hold_is_refused_naming_the_file(tmp_path):
    cases = {
        "9 dimensions": {"w": torch.ones([1] * 9)},
        "NaN or infinite": {"w": torch.tensor([1.0, float("nan")])},
        "beyond the float32 range": {"w": torch.tensor([1e300], dtype=torch.float64)},
        "1 to 1,024 bytes": {"x" * 1025: torch.ones(2)},
    }
    for expected, tensors in cases.items():
        path = tmp_path / "bad.safetensors"
        save_file(tensors, path)
        with pytest.raises(rwsfmt.RwsError, match=expected) as info:
            rwsfmt.import_safetensors(path)
        assert info.value.path == str(path)
    reserved = rwsfmt.from_tensors({"__metadata__": torch.ones(2)}, label="odd")
    with pytest.raises(rwsfmt.RwsError, match="reserves the name"):
        rwsfmt.export_safetensors(reserved, tmp_path / "odd.safetensors")
    assert not (tmp_path / "odd.safetensors").exists()


def test_odd_header_values_travel_as_text_both_ways(tmp_path):
    """A label and provenance values no one would choose (markup, an escape sequence, deep
    nesting, numbers of any size) go out as metadata and come back unchanged, and the
    summary line prints the label escaped."""
    label = "\x1b[31mfog[/x]"
    provenance = {"meta": {"k": [[["x"]], 1e308, -(2**62), None, "\u202e"]}, "quantization": 7}
    sig = rwsfmt.from_tensors({"w": torch.ones(3, 2)}, label=label, provenance=provenance)
    path = tmp_path / "odd.rws"
    rwsfmt.save(sig, path)
    exported, back = tmp_path / "odd.safetensors", tmp_path / "back.rws"
    for args in (["export", path, "-o", exported], ["import", exported, "-o", back]):
        result = _invoke(*args)
        assert result.exit_code == 0, result.output
        assert "\x1b" not in result.output and "fog[/x]" in result.output
    back_sig = rwsfmt.load(back)
    assert back_sig.label == label
    assert back_sig.provenance["meta"] == provenance["meta"]
    assert back_sig.provenance["imported"]["from"] == 7


def test_converted_and_imported_headers_match_the_schema(tmp_path, fog, task_vector):
    import jsonschema
    import reference_reader
    from conftest import SPEC

    schema = json.loads((SPEC / "header.schema.json").read_text(encoding="utf-8"))
    validator = jsonschema.Draft202012Validator(schema)
    exported = tmp_path / "fog.safetensors"
    steps = [
        ["convert", fog, "-o", tmp_path / "c.rws", "--bits", "4"],
        ["import", task_vector, "-o", tmp_path / "tv.rws"],
        ["export", fog, "-o", exported],
        ["import", exported, "-o", tmp_path / "back.rws"],
    ]
    for args in steps:
        assert _invoke(*args).exit_code == 0
    for name in ("c.rws", "tv.rws", "back.rws"):
        header, _ = reference_reader.read(str(tmp_path / name))
        validator.validate(header)
