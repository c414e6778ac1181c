"""Paths everywhere in the Python API, and signature arithmetic (`fog + snow`, `0.5 * fog`)."""

from __future__ import annotations

import pathlib

import pytest
import torch
from test_patch import make_net

import rwsfmt
from rwsfmt.errors import RwsError


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, pathlib.Path]:
    """fog.rws (every layer) and snow.rws (the first two layers only) extracted from real
    checkpoints saved with torch.save; both hold deltas and BatchNorm targets."""
    d = tmp_path_factory.mktemp("sigs")
    for seed, role in enumerate(["init", "std", "fog", "snow"]):
        torch.save(make_net(seed).state_dict(), d / f"{role}.pt")
    out = {}
    for corruption, layers in (("fog", "all"), ("snow", 2)):
        sig = rwsfmt.extract(d / "std.pt", d / f"{corruption}.pt", d / "init.pt", layers=layers)
        rwsfmt.save(sig, d / f"{corruption}.rws")
        out[corruption] = d / f"{corruption}.rws"
    out["dir"] = d
    return out


@pytest.mark.parametrize("as_path", [str, pathlib.Path])
def test_every_function_taking_a_signature_takes_a_path(files, tmp_path, as_path):
    fog, snow = as_path(files["fog"]), as_path(files["snow"])
    merged = rwsfmt.merge([fog, snow], [0.5, 0.5])
    assert set(merged.names) == set(rwsfmt.load(fog).names)
    assert rwsfmt.convert(fog, rwsfmt.QuantConfig(bits=4)).quant.bits == 4
    rwsfmt.export_safetensors(fog, tmp_path / "fog.safetensors")
    assert rwsfmt.import_safetensors(tmp_path / "fog.safetensors").names == merged.names
    rwsfmt.save(fog, tmp_path / "copy.rws")
    assert (tmp_path / "copy.rws").read_bytes() == files["fog"].read_bytes()
    assert rwsfmt.compare([fog, snow]).labels == ["fog", "snow"]
    model = make_net(1)
    with rwsfmt.patched(model, [(fog, 0.5), (snow, 0.5)]):
        pass
    rwsfmt.apply(model.state_dict(), fog)


@pytest.mark.parametrize(
    "call",
    [
        lambda f: rwsfmt.merge([f, 3]),
        lambda f: rwsfmt.convert(None, rwsfmt.QuantConfig()),
        lambda f: rwsfmt.export_safetensors({"a": 1}, "x.safetensors"),
        lambda f: rwsfmt.save(3.0, "x.rws"),
        lambda f: rwsfmt.compare([f, object()]),
        lambda f: rwsfmt.apply({}, [(b"x", 1.0)]),
        lambda f: rwsfmt.load(f) * float("nan"),
        lambda f: rwsfmt.load(f) / 0,
        # wrong types anywhere in the API: RwsError, never TypeError or AttributeError
        lambda f: rwsfmt.load(None),
        lambda f: rwsfmt.verify(3),
        lambda f: rwsfmt.save(f, None),
        lambda f: rwsfmt.export_safetensors(f, None),
        lambda f: rwsfmt.import_safetensors(None),
        lambda f: rwsfmt.extract(None, None, method="subtract"),
        lambda f: rwsfmt.patch(None, f),
        lambda f: rwsfmt.apply_checkpoint(None, f, "x.pt"),
        lambda f: rwsfmt.convert(f, 4),
        lambda f: rwsfmt.merge([f, f], 3),
    ],
)
def test_what_is_not_a_signature_is_an_rws_error(files, call):
    with pytest.raises(RwsError):
        call(files["fog"])


def test_arithmetic_is_the_weighted_sum_tensor_by_tensor(files):
    fog, snow = rwsfmt.load(files["fog"]), rwsfmt.load(files["snow"])
    only_fog = [n for n in fog.names if n not in snow]
    assert only_fog and set(snow.names) < set(fog.names)
    name, deep = "features.0.weight", only_fog[0]
    expressions = {
        "fog+snow": (fog + snow, 1.0, 1.0),
        "0.5*fog": (0.5 * fog, 0.5, 0.0),
        "0.5*fog ": (fog * 0.5, 0.5, 0.0),
        "-fog": (-fog, -1.0, 0.0),
        "fog-snow": (fog - snow, 1.0, -1.0),
        "0.25*fog+0.5*snow": ((fog + 2 * snow) / 4, 0.25, 0.5),
        "fog+snow ": (sum([fog, snow]), 1.0, 1.0),
        "2*fog-snow": (3 * fog - (fog + snow), 2.0, -1.0),  # fog's weights added: 3 - 1
    }
    for label, (total, a, b) in expressions.items():
        assert isinstance(total, rwsfmt.WeightedSum)
        assert total.label == label.strip()
        assert total.names == fog.names  # the union, in depth order
        expected = a * fog.tensor(name) + b * snow.tensor(name)
        torch.testing.assert_close(total.tensor(name), expected, rtol=0, atol=1e-6)
        # a tensor only fog holds counts as 0 in snow, as merge does
        torch.testing.assert_close(total.tensor(deep), a * fog.tensor(deep), rtol=0, atol=1e-6)


def test_save_requantizes_with_the_provenance_of_a_linear_merge(files, tmp_path):
    fog, snow = rwsfmt.load(files["fog"]), rwsfmt.load(files["snow"])
    rwsfmt.save(fog - 0.5 * snow, tmp_path / "sum.rws")
    rwsfmt.save(rwsfmt.merge([fog, snow], [1, -0.5], label="fog-0.5*snow"), tmp_path / "m.rws")
    assert (tmp_path / "sum.rws").read_bytes() == (tmp_path / "m.rws").read_bytes()
    saved = rwsfmt.load(tmp_path / "sum.rws")
    assert saved.provenance["method"] == "merge-sum"
    parts = [(c["label"], c["weight"], c["name"]) for c in saved.provenance["components"]]
    assert parts == [("fog", 1.0, "fog.rws"), ("snow", -0.5, "snow.rws")]
    # targets (BatchNorm statistics) are the weighted mean of the positive-weight targets
    target = next(i.name for i in saved.infos if i.kind == "target")
    torch.testing.assert_close(saved.tensor(target), fog.tensor(target))


def test_a_sum_is_a_signature_everywhere(files):
    fog, snow = rwsfmt.load(files["fog"]), rwsfmt.load(files["snow"])
    model = make_net(1)
    name = "features.0.weight"
    before = model.state_dict()[name].clone()
    with rwsfmt.patched(model, [(fog + snow, 0.5)]):
        change = model.state_dict()[name] - before
    expected = 0.5 * (fog.tensor(name) + snow.tensor(name))
    torch.testing.assert_close(change, expected, rtol=0, atol=2e-2 * expected.abs().max())
    assert rwsfmt.compare([fog + snow, fog]).labels == ["fog+snow", "fog"]


def test_negating_targets_alone_is_refused_as_merge_refuses_it(files):
    negated = -rwsfmt.load(files["fog"])
    with pytest.raises(RwsError, match="held only by signatures with weights <= 0"):
        negated.build()
    # with a positive component beside it the targets have a mean again
    assert len((negated + rwsfmt.load(files["snow"])).build()) == len(negated)
