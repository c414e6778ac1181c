"""Patching state dicts and live modules: numbers, composition, bit-exact removal, matching."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from bitwise import assert_bit_equal, bits_of, snapshot
from torch import nn

import rwsfmt
from rwsfmt.errors import RwsError
from rwsfmt.fingerprint import architecture_fingerprint
from rwsfmt.quant import QuantConfig


class Net(nn.Module):
    """A small CNN with BatchNorm: conv weights, biases, running statistics and a head."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
        )
        self.classifier = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


def make_net(seed: int = 0, dtype: torch.dtype = torch.float32, classes: int = 10) -> Net:
    torch.manual_seed(seed)
    net = Net(classes)
    with torch.no_grad():  # non-trivial BN statistics and an exact negative zero
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
        net.features[0].bias[0] = -0.0
    return net.to(dtype)


def fingerprint(model: nn.Module) -> str:
    sd = model.state_dict()
    return architecture_fingerprint((k, v.shape) for k, v in sd.items() if v.is_floating_point())


def make_sig(
    model: nn.Module,
    seed: int,
    *,
    label: str = "fog",
    bits: int = 8,
    names: tuple[str, ...] = ("features.0.weight", "features.0.bias", "features.3.weight"),
    targets: tuple[str, ...] = ("features.1.running_mean", "features.1.running_var"),
):
    """A signature over `names` (Gaussian deltas) plus BN target entries."""
    g = torch.Generator().manual_seed(seed)
    sd = model.state_dict()
    items = [(n, 0.05 * torch.randn(sd[n].shape, generator=g), "delta") for n in names]
    for n in targets:
        items.append((n, sd[n].float() + torch.rand(sd[n].shape, generator=g), "target"))
    return rwsfmt.from_tensors(
        items, label=label, quant=QuantConfig(bits=bits), model_fingerprint=fingerprint(model)
    )


# ---------------------------------------------------------------- apply(): the numbers


def test_apply_adds_alpha_times_signature_and_leaves_the_input_alone():
    model = make_net()
    sd = model.state_dict()
    before = {k: v.clone() for k, v in sd.items()}
    sig = make_sig(model, 1)
    out = rwsfmt.apply(sd, [(sig, 0.7)])
    assert_bit_equal(sd, before)  # pure
    for name in ("features.0.weight", "features.0.bias", "features.3.weight"):
        expected = before[name].double() + 0.7 * sig.tensor(name).double()
        torch.testing.assert_close(out[name].double(), expected, rtol=0, atol=1e-6)
        assert not torch.equal(out[name], before[name])
    for name in ("features.1.running_mean", "features.1.running_var"):
        expected = before[name] + 0.7 * (sig.tensor(name) - before[name])
        torch.testing.assert_close(out[name], expected, rtol=0, atol=1e-6)
    for name in ("features.4.weight", "classifier.weight", "features.1.num_batches_tracked"):
        assert out[name] is sd[name]  # untouched tensors are shared, not copied


def test_single_signature_form_and_exact_float32_signature():
    model = make_net()
    sd = model.state_dict()
    delta = torch.randn(sd["classifier.weight"].shape)
    sig = rwsfmt.from_tensors({"classifier.weight": delta}, label="x", quant=QuantConfig(bits=32))
    out = rwsfmt.apply(sd, sig, 0.5)
    assert torch.equal(out["classifier.weight"], sd["classifier.weight"] + 0.5 * delta)
    default = rwsfmt.apply(sd, sig)["classifier.weight"]  # alpha defaults to 0.8
    torch.testing.assert_close(default, sd["classifier.weight"] + 0.8 * delta, rtol=0, atol=1e-6)


def test_two_signatures_compose_as_a_sum():
    model = make_net()
    sd = model.state_dict()
    fog, snow = make_sig(model, 1, label="fog"), make_sig(model, 2, label="snow")
    out = rwsfmt.apply(sd, [(fog, 0.6), (snow, 0.3)])
    name = "features.3.weight"
    expected = (
        sd[name].double() + 0.6 * fog.tensor(name).double() + 0.3 * snow.tensor(name).double()
    )
    torch.testing.assert_close(out[name].double(), expected, rtol=0, atol=1e-6)
    mean = "features.1.running_mean"
    expected = sd[mean] + 0.6 * (fog.tensor(mean) - sd[mean]) + 0.3 * (snow.tensor(mean) - sd[mean])
    torch.testing.assert_close(out[mean], expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_alpha_zero_gives_the_input_back_exactly(dtype):
    model = make_net(dtype=dtype)
    sd = model.state_dict()
    out = rwsfmt.apply(sd, [(make_sig(model, 1), 0.0), (make_sig(model, 2), 0.0)])
    assert_bit_equal(out, sd)
    assert bits_of(out["features.0.bias"])[0] == bits_of(torch.tensor([-0.0], dtype=dtype))[0]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_low_precision_models_compose_in_float32_and_cast_once(dtype):
    model = make_net(dtype=dtype)
    sd = model.state_dict()
    fog, snow = make_sig(model, 1), make_sig(model, 2)
    out = rwsfmt.apply(sd, [(fog, 0.5), (snow, 0.5)])
    name = "features.0.weight"
    work = torch.promote_types(dtype, torch.float32)
    expected = (sd[name].to(work) + 0.5 * fog.tensor(name) + 0.5 * snow.tensor(name)).to(dtype)
    assert out[name].dtype == dtype
    torch.testing.assert_close(out[name], expected, rtol=0, atol=0)


def test_module_prefix_and_map():
    model = make_net()
    sig = make_sig(model, 1)
    wrapped = {f"module.{k}": v for k, v in model.state_dict().items()}
    out = rwsfmt.apply(wrapped, [(sig, 1.0)])
    assert list(out) == list(wrapped)  # keys kept as they were
    assert not torch.equal(out["module.features.0.weight"], wrapped["module.features.0.weight"])

    renamed = {k.replace("features.", "backbone.body."): v for k, v in model.state_dict().items()}
    with pytest.raises(RwsError, match="features.0.weight"):
        rwsfmt.apply(renamed, [(sig, 1.0)])
    out = rwsfmt.apply(renamed, [(sig, 1.0)], map={"features.": "backbone.body."})
    ref = rwsfmt.apply(model.state_dict(), [(sig, 1.0)])
    assert torch.equal(out["backbone.body.0.weight"], ref["features.0.weight"])
    # the map is also undone for the fingerprint: same architecture, only renamed
    handle = rwsfmt.patch(Renamed(model), sig, 1.0, map=["features.=backbone.body."], strict=True)
    assert handle.matches[0].architecture == "same"
    handle.remove()


class Renamed(nn.Module):
    def __init__(self, net: Net) -> None:
        super().__init__()
        self.backbone = nn.Module()
        self.backbone.body = net.features
        self.classifier = net.classifier


def test_missing_and_mismatched_tensors_are_listed_and_nothing_changes():
    model = make_net()
    sig = make_sig(model, 1)
    other = make_net(classes=10)
    other.features[3] = nn.Conv2d(8, 16, 5, padding=2)  # another kernel size
    del other.features[0].bias
    other.features[0].bias = None
    before = snapshot(other)
    with pytest.raises(RwsError) as err:
        rwsfmt.patch(other, sig, 0.8)
    text = str(err.value)
    assert "features.0.bias is missing" in text
    assert "features.3.weight: signature 16x8x3x3, model 16x8x5x5" in text
    assert "features.0.weight" not in text.replace("features.0.weight:", "")
    assert_bit_equal(snapshot(other), before)
    with pytest.raises(RwsError, match="missing"):
        rwsfmt.apply(other.state_dict(), [(sig, 0.8)])


def test_another_head_is_a_note_unless_strict():
    model = make_net()
    sig = make_sig(model, 1)
    headless = make_net(seed=3, classes=4)  # same backbone, 4-class head
    with rwsfmt.patched(headless, [(sig, 0.8)]) as handle:
        assert handle.matches[0].architecture == "different"
    with rwsfmt.patched(make_net(seed=3), [(sig, 0.8)]) as handle:
        assert handle.matches[0].architecture == "same"
    with pytest.raises(RwsError, match="different architecture"):
        rwsfmt.patch(headless, sig, 0.8, strict=True)
    unknown = rwsfmt.from_tensors({"classifier.bias": torch.ones(4)}, label="u")
    with pytest.raises(RwsError, match="records no model fingerprint"):
        rwsfmt.apply(headless.state_dict(), unknown, 1.0, strict=True)


def test_non_floating_and_bad_alpha_are_errors():
    model = make_net()
    sd = model.state_dict()
    sig = rwsfmt.from_tensors(
        {"features.1.num_batches_tracked": torch.ones(())}, label="int", quant=QuantConfig(bits=32)
    )
    with pytest.raises(RwsError, match="not a floating-point tensor"):
        rwsfmt.apply(sd, sig, 1.0)
    good = make_sig(model, 1)
    for alpha in (float("nan"), float("inf"), "0.5", True):
        with pytest.raises(RwsError, match="finite number"):
            rwsfmt.apply(sd, [(good, alpha)])
    with pytest.raises(RwsError, match="alpha= was given together"):
        rwsfmt.apply(sd, [(good, 0.5)], 0.5)
    with pytest.raises(RwsError, match="no signatures"):
        rwsfmt.apply(sd, [])


def test_signature_paths_are_accepted(tmp_path):
    model = make_net()
    sig = make_sig(model, 1)
    rwsfmt.save(sig, tmp_path / "fog.rws")
    a = rwsfmt.apply(model.state_dict(), [(tmp_path / "fog.rws", 0.5)])
    b = rwsfmt.apply(model.state_dict(), [(sig, 0.5)])
    assert_bit_equal(a, b)


# ---------------------------------------------------------------- patch(): live modules


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_patch_matches_apply_and_remove_restores_bit_for_bit(dtype):
    model = make_net(dtype=dtype)
    original = snapshot(model)
    sig = make_sig(model, 1)
    handle = rwsfmt.patch(model, sig, alpha=0.8)
    assert_bit_equal(snapshot(model), rwsfmt.apply(original, [(sig, 0.8)]))
    assert handle.names == [
        "features.0.weight",
        "features.0.bias",
        "features.1.running_mean",
        "features.1.running_var",
        "features.3.weight",
    ]
    handle.remove()
    assert_bit_equal(snapshot(model), original)
    handle.remove()  # a second removal is a no-op
    assert_bit_equal(snapshot(model), original)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_stacked_patches_removed_in_any_order(dtype):
    model = make_net(dtype=dtype)
    original = snapshot(model)
    sigs = [make_sig(model, s, label=f"s{s}") for s in (1, 2, 3)]
    alphas = [0.8, 0.5, -0.3]
    handles = [rwsfmt.patch(model, s, a) for s, a in zip(sigs, alphas, strict=True)]
    # stacking equals composing all three at once (one cast, not three)
    assert_bit_equal(snapshot(model), rwsfmt.apply(original, list(zip(sigs, alphas, strict=True))))
    handles[1].remove()
    expected = rwsfmt.apply(original, [(sigs[0], alphas[0]), (sigs[2], alphas[2])])
    assert_bit_equal(snapshot(model), expected)
    handles[0].remove()
    assert_bit_equal(snapshot(model), rwsfmt.apply(original, [(sigs[2], alphas[2])]))
    handles[2].remove()
    assert_bit_equal(snapshot(model), original)


def test_patches_on_different_tensors_and_a_new_patch_after_removal():
    model = make_net()
    original = snapshot(model)
    head = rwsfmt.from_tensors({"classifier.weight": torch.randn(10, 16)}, label="head")
    a = rwsfmt.patch(model, make_sig(model, 1), 1.0)
    b = rwsfmt.patch(model, head, 1.0)
    a.remove()
    c = rwsfmt.patch(model, make_sig(model, 2), 1.0)
    b.remove()
    c.remove()
    assert_bit_equal(snapshot(model), original)


def test_parameters_keep_identity_and_training_still_works():
    model = make_net()
    params = dict(model.named_parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with rwsfmt.patched(model, [(make_sig(model, 1), 0.8)]):
        assert all(p is params[n] for n, p in model.named_parameters())
        assert all(p.requires_grad for p in model.parameters())
        loss = model(torch.randn(4, 3, 8, 8)).square().mean()
        loss.backward()
        before = params["features.0.weight"].detach().clone()
        opt.step()
        assert not torch.equal(params["features.0.weight"], before)
    assert all(p is params[n] for n, p in model.named_parameters())


def test_patched_restores_after_an_exception():
    model = make_net()
    original = snapshot(model)
    with pytest.raises(ZeroDivisionError), rwsfmt.patched(model, [(make_sig(model, 1), 1.0)]):
        1 / 0  # noqa: B018
    assert_bit_equal(snapshot(model), original)


def test_patch_on_a_data_parallel_style_wrapper():
    model = make_net()
    wrapper = nn.Module()
    wrapper.module = model
    original = snapshot(model)
    with rwsfmt.patched(wrapper, [(make_sig(model, 1), 1.0)]) as handle:
        assert handle.names[0] == "module.features.0.weight"
        assert handle.matches[0].architecture == "same"
        assert not torch.equal(model.features[0].weight, original["features.0.weight"])
    assert_bit_equal(snapshot(model), original)


def test_public_names_resolve_to_functions_in_any_import_order():
    code = (
        "import rwsfmt, inspect; rwsfmt.apply; "
        "assert inspect.isfunction(rwsfmt.patch), rwsfmt.patch; "
        "assert inspect.isfunction(rwsfmt.patched)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_apply_given_a_path_or_a_module_names_the_function_that_takes_it(tmp_path):
    model = make_net()
    torch.save(model.state_dict(), tmp_path / "model.pt")
    rwsfmt.save(make_sig(model, 1), tmp_path / "fog.rws")
    for given, says, fix in (
        (tmp_path / "model.pt", "got PosixPath", "rwsfmt.apply_checkpoint(path, sigs, output)"),
        (str(tmp_path / "model.pt"), "got str", "rwsfmt.apply_checkpoint(path, sigs, output)"),
        (model, "got Net", "rwsfmt.patch(model, sig)"),
        (3, "got int 3", "pass model.state_dict()"),
    ):
        with pytest.raises(rwsfmt.RwsError, match=f"apply takes a state dict, {says}") as err:
            rwsfmt.apply(given, tmp_path / "fog.rws", 1.0)
        assert fix in err.value.fix


def test_functions_given_paths_leave_no_file_open(tmp_path):
    """A .rws opened by apply, patch, merge, convert, export or apply_checkpoint from its path
    is closed when they are done with it (no ResourceWarning, no descriptor left)."""
    import gc
    import warnings

    model = make_net()
    torch.save(model.state_dict(), tmp_path / "model.pt")
    for seed, name in ((1, "fog"), (2, "snow")):
        rwsfmt.save(make_sig(model, seed), tmp_path / f"{name}.rws")
    fog, snow = tmp_path / "fog.rws", tmp_path / "snow.rws"
    calls = [
        lambda: rwsfmt.apply(model.state_dict(), fog, 0.5),
        lambda: rwsfmt.patch(model, [(fog, 0.5), (snow, 0.2)]).remove(),
        lambda: rwsfmt.merge([fog, snow]),
        lambda: rwsfmt.convert(fog, rwsfmt.QuantConfig(bits=4)),
        lambda: rwsfmt.export_safetensors(fog, tmp_path / "fog.safetensors"),
        lambda: rwsfmt.apply_checkpoint(tmp_path / "model.pt", [(fog, 0.5)], tmp_path / "p.pt"),
    ]
    gc.collect()  # what earlier tests left in reference cycles is not this test's
    before = len(os.listdir("/proc/self/fd"))
    for call in calls:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            call()
            gc.collect()
        assert not [w for w in caught if issubclass(w.category, ResourceWarning)], call
    assert len(os.listdir("/proc/self/fd")) == before
