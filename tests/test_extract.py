"""rwsfmt.extract: Eq. 1 per tensor, layer selection, targets, provenance, bad inputs."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from safetensors.torch import save_file

import rwsfmt
from rwsfmt.errors import RwsError
from rwsfmt.fingerprint import architecture_fingerprint
from rwsfmt.provenance import file_sha256


def conv_bn_net(layers: int = 7) -> torch.nn.Module:
    """Conv layers with BatchNorm between them, then a linear head."""
    mods: list[torch.nn.Module] = []
    for _ in range(layers - 1):
        mods += [torch.nn.Conv2d(4, 4, 3), torch.nn.BatchNorm2d(4)]
    mods.append(torch.nn.Linear(4, 3))
    return torch.nn.Sequential(*mods)


def trio(model: torch.nn.Module, seed: int = 0, scale: float = 0.05):
    """init, std and robust state dicts: std and robust are init plus independent noise."""
    torch.manual_seed(seed)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    for v in init.values():
        if v.is_floating_point():
            v.add_(torch.randn_like(v).abs() if v.dim() == 1 else 0)  # non-trivial BN stats

    def moved(offset: int):
        g = torch.Generator().manual_seed(seed + offset)
        return {
            k: v + scale * torch.randn(v.shape, generator=g).to(v.dtype)
            if v.is_floating_point()
            else v.clone()
            for k, v in init.items()
        }

    return init, moved(1), moved(2)


def eq1_float64(std, robust, init):
    """Eq. 1 computed directly in float64 on flattened vectors."""
    vb = (std.double() - init.double()).reshape(-1)
    vc = (robust.double() - init.double()).reshape(-1)
    bb = vb @ vb
    out = vc - (vc @ vb) / bb * vb if bb > 0 else vc
    return out.reshape(std.shape)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_matches_direct_float64_eq1_at_32_bits(dtype):
    init, std, robust = trio(conv_bn_net().to(dtype))
    sig = rwsfmt.extract(std, robust, init, bits=32, layers="all")
    deltas = [n for n in sig.names if sig.info(n).kind == "delta"]
    assert len(deltas) == 2 * 6 + 2 * 6 + 2  # convs, BN affine, head
    for name in deltas:
        expected = eq1_float64(std[name], robust[name], init[name])
        got = sig.tensor(name).double()
        err = (got - expected).norm() / expected.norm()
        assert err < 1e-6, (name, float(err))
        assert sig.info(name).dtype == str(dtype).replace("torch.", "")
        vb = (std[name].double() - init[name].double()).reshape(-1)
        assert abs(float(got.reshape(-1) @ vb)) <= 1e-5 * float(got.norm() * vb.norm())


def test_full_row_rank_conv_still_gets_a_nonzero_signature():
    """A 4 x 27 reshaped conv delta has full row rank: a column-space projector would be the
    identity and zero the signature. Projecting onto the single vector v_base does not."""
    init, std, robust = trio(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3)))
    vb = (std["0.weight"] - init["0.weight"]).reshape(4, -1)
    assert torch.linalg.matrix_rank(vb) == 4
    sig = rwsfmt.extract(std, robust, init, bits=32)
    rws = sig.tensor("0.weight")
    vc = robust["0.weight"] - init["0.weight"]
    assert rws.norm() > 0.5 * vc.norm()
    assert 0 < sig.info("0.weight").stats["rel_norm"]


def test_zero_base_direction_keeps_v_c():
    init, std, robust = trio(conv_bn_net(3))
    std["0.weight"] = init["0.weight"].clone()  # std did not move: v_base = 0
    sig = rwsfmt.extract(std, robust, init, bits=32)
    assert torch.equal(sig.tensor("0.weight"), robust["0.weight"] - init["0.weight"])
    assert "cos_base" not in sig.info("0.weight").stats
    assert "cos_base" in sig.info("0.bias").stats


def test_subtract_is_robust_minus_std_and_needs_no_init():
    init, std, robust = trio(conv_bn_net(3))
    sig = rwsfmt.extract(std, robust, method="subtract", bits=32)
    assert torch.equal(sig.tensor("0.weight"), robust["0.weight"] - std["0.weight"])
    assert sig.provenance["method"] == "subtract"
    with pytest.raises(RwsError, match="method='subtract'"):  # Python names, in Python
        rwsfmt.extract(std, robust)


def test_inputs_are_never_modified():
    init, std, robust = trio(conv_bn_net(3))
    before = [copy.deepcopy(sd) for sd in (init, std, robust)]
    rwsfmt.extract(std, robust, init, layers="all")
    rwsfmt.extract(std, robust, method="subtract")
    for sd, old in zip((init, std, robust), before, strict=True):
        assert all(torch.equal(sd[k], old[k]) for k in sd)


# ---------------------------------------------------------------- selection


def test_default_is_the_five_shallowest_layers_with_bn_stats_as_targets():
    init, std, robust = trio(conv_bn_net(7))
    sig = rwsfmt.extract(std, robust, init, bits=32)
    # Layers are the modules 0, 2, 4, 6, 8 (convs); BN modules 1, 3, ... ride with them.
    # The 6th layer is conv 10: everything before its first tensor is kept.
    expected = [k for k in std if int(k.split(".")[0]) < 10 and std[k].is_floating_point()]
    assert sig.names == expected
    assert not any(n.endswith("num_batches_tracked") for n in sig.names)
    assert sig.info("1.running_var").kind == "target"
    assert sig.info("1.weight").kind == "delta"
    assert torch.equal(sig.tensor("1.running_var"), robust["1.running_var"])
    assert sig.provenance["tensors"] == sig.names
    assert sig.provenance["layers"] == 5
    assert sig.provenance["selection"]["depth_order"] == "checkpoint"


def test_layer_count_include_exclude_and_all():
    init, std, robust = trio(conv_bn_net(7))
    assert rwsfmt.extract(std, robust, init, layers=1).names == [
        "0.weight",
        "0.bias",
        "1.weight",
        "1.bias",
        "1.running_mean",
        "1.running_var",
    ]
    everything = rwsfmt.extract(std, robust, init, layers="all").names
    assert everything[-2:] == ["12.weight", "12.bias"]
    only_weights = rwsfmt.extract(std, robust, init, include=r"\.weight$").names
    assert only_weights == [n for n in everything if n.endswith(".weight")]  # all layers
    no_bn = rwsfmt.extract(std, robust, init, layers=2, exclude=r"^[13]\.").names
    assert no_bn == ["0.weight", "0.bias", "2.weight", "2.bias"]
    with pytest.raises(RwsError, match="matches no floating-point tensor"):
        rwsfmt.extract(std, robust, init, include="nothing-like-this")
    for bad in (dict(layers=0), dict(layers="five"), dict(include="("), dict(energy=1.5)):
        with pytest.raises(RwsError):
            rwsfmt.extract(std, robust, init, **bad)
    with pytest.raises(RwsError, match="energy= chooses"):
        rwsfmt.extract(std, robust, init, layers=3, energy=0.5)


def test_pytorch_depth_order_versus_natural_sort_of_safetensors(tmp_path):
    # Registration order differs from name order: "z" is the first layer.
    model = torch.nn.ModuleDict(
        {"z": torch.nn.Linear(3, 3), "a": torch.nn.Linear(3, 3), "m": torch.nn.Linear(3, 3)}
    )
    init, std, robust = trio(model)
    for role, sd in (("init", init), ("std", std), ("robust", robust)):
        torch.save(sd, tmp_path / f"{role}.pt")
    sig = rwsfmt.extract(
        tmp_path / "std.pt", tmp_path / "robust.pt", tmp_path / "init.pt", layers=1
    )
    assert sig.names == ["z.weight", "z.bias"]

    # safetensors stores names sorted; a numeric-aware sort puts layers.2 before layers.10.
    layers = torch.nn.ModuleDict(
        {"layers": torch.nn.ModuleList(torch.nn.Linear(2, 2) for _ in range(12))}
    )
    init, std, robust = trio(layers)
    for role, sd in (("init", init), ("std", std), ("robust", robust)):
        save_file(sd, tmp_path / f"{role}.safetensors")
    sig = rwsfmt.extract(
        *(tmp_path / f"{r}.safetensors" for r in ("std", "robust", "init")), layers=3
    )
    assert sig.names == [f"layers.{i}.{p}" for i in range(3) for p in ("weight", "bias")]
    assert sig.provenance["selection"]["depth_order"] == "rules"


def test_energy_rule_keeps_the_shallowest_layers_holding_the_share():
    model = torch.nn.Sequential(*(torch.nn.Linear(10, 10, bias=False) for _ in range(4)))
    init = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    std = {k: v.clone() for k, v in init.items()}  # v_base = 0: RWS = robust - init
    magnitudes = [3.0, 2.0, 1.0, 0.5]  # squared norms 900, 400, 100, 25 (of 1425)
    robust = {f"{i}.weight": torch.full((10, 10), m) for i, m in enumerate(magnitudes)}
    pick = lambda e: rwsfmt.extract(std, robust, init, energy=e, bits=32).names  # noqa: E731
    assert pick(0.6) == ["0.weight"]  # 900 / 1425 = 0.63
    assert pick(0.65) == ["0.weight", "1.weight"]  # 1300 / 1425 = 0.91
    assert pick(0.95) == ["0.weight", "1.weight", "2.weight"]  # 0.98
    assert pick(1.0) == [f"{i}.weight" for i in range(4)]
    sig = rwsfmt.extract(std, robust, init, energy=0.65)
    assert sig.provenance["selection"]["energy"] == 0.65
    assert sig.provenance["layers"] == 2


# ---------------------------------------------------------------- provenance and files


def test_provenance_fingerprint_label_and_determinism(tmp_path, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    init, std, robust = trio(conv_bn_net(3))
    paths = {}
    for role, sd in (("init", init), ("std", std), ("fog", robust)):
        paths[role] = tmp_path / f"{role}.pt"
        torch.save(sd, paths[role])
    args = (paths["std"], paths["fog"], paths["init"])
    sig = rwsfmt.extract(*args, meta={"run": "7"}, corruption="fog", severity=5, dataset="digits")
    assert sig.label == "fog"
    prov = sig.provenance
    assert [i["role"] for i in prov["inputs"]] == ["std", "robust", "init"]
    assert prov["inputs"][1] == {
        "role": "robust",
        "name": "fog.pt",
        "size": os.path.getsize(paths["fog"]),
        "sha256": file_sha256(paths["fog"]),
    }
    assert (prov["corruption"], prov["severity"], prov["dataset"]) == ("fog", 5, "digits")
    assert prov["meta"] == {"run": "7"} and prov["quantization"]["bits"] == 8
    floating = [(k, v.shape) for k, v in std.items() if v.is_floating_point()]
    assert sig.fingerprint["model"] == architecture_fingerprint(floating)
    assert set(sig.info("0.weight").stats) == {"rel_norm", "cos_base", "quant_rel_error"}
    rwsfmt.save(sig, tmp_path / "a.rws")
    again = rwsfmt.extract(*args, meta={"run": "7"}, corruption="fog", severity=5, dataset="digits")
    rwsfmt.save(again, tmp_path / "b.rws")
    assert (tmp_path / "a.rws").read_bytes() == (tmp_path / "b.rws").read_bytes()
    loaded = rwsfmt.load(tmp_path / "a.rws")
    assert loaded.names == sig.names and loaded.provenance == prov


def test_same_signature_from_pytorch_files_and_sharded_safetensors(tmp_path):
    init, std, robust = trio(conv_bn_net(3))
    for role, sd in (("init", init), ("std", std), ("robust", robust)):
        torch.save(
            {"state_dict": {f"module.{k}": v for k, v in sd.items()}}, tmp_path / f"{role}.pt"
        )
        folder = tmp_path / role
        folder.mkdir()
        names = list(sd)
        weight_map = {}
        for i, part in enumerate((names[:5], names[5:]), 1):
            shard = f"model-0000{i}-of-00002.safetensors"
            save_file({k: sd[k] for k in part}, folder / shard)
            weight_map.update(dict.fromkeys(part, shard))
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map})
        )
    a = rwsfmt.extract(*(tmp_path / f"{r}.pt" for r in ("std", "robust", "init")), layers="all")
    b = rwsfmt.extract(*(tmp_path / r for r in ("std", "robust", "init")), layers="all")
    assert sorted(a.names) == sorted(b.names)
    assert a.fingerprint == b.fingerprint
    for name in a.names:
        assert torch.equal(a.tensor(name), b.tensor(name)), name


# ---------------------------------------------------------------- disagreeing inputs


def test_disagreeing_checkpoints_name_the_tensor():
    init, std, robust = trio(conv_bn_net(3))
    missing = dict(robust)
    del missing["2.bias"]
    with pytest.raises(RwsError, match=r"1 selected tensor\(s\) of std are not in robust"):
        rwsfmt.extract(std, missing, init)
    reshaped = dict(init)
    reshaped["0.bias"] = torch.zeros(5)
    with pytest.raises(RwsError, match=r"'0.bias' has shape \(4,\) in std .* \(5,\) in init"):
        rwsfmt.extract(std, robust, reshaped)
    # outside the selection, differences are noted and ignored
    with pytest.warns(rwsfmt.RwsWarning, match=r"2.bias \(not in robust\)"):
        assert "2.bias" not in rwsfmt.extract(std, missing, init, layers=1).names
    with pytest.warns(rwsfmt.RwsWarning, match=r"0.bias \(other shape in init\)"):
        rwsfmt.extract(std, robust, reshaped, exclude=r"^0\.bias$")
    # mixed float dtypes are computed in float32
    half = dict(robust)
    half["0.weight"] = half["0.weight"].half()
    with pytest.warns(rwsfmt.RwsWarning, match=r"1 of 14 .*robust float16.*computed in float32"):
        sig = rwsfmt.extract(std, half, init, bits=32)
    expected = eq1_float64(std["0.weight"], half["0.weight"], init["0.weight"])
    assert torch.allclose(sig.tensor("0.weight").double(), expected, rtol=1e-4, atol=1e-9)


def test_non_finite_values_are_reported():
    init, std, robust = trio(conv_bn_net(3))
    robust["0.bias"][0] = float("nan")
    with pytest.raises(RwsError, match="0.bias"):
        rwsfmt.extract(std, robust, init)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    init, std, robust = trio(conv_bn_net(3))
    cpu = rwsfmt.extract(std, robust, init, bits=32)
    gpu = rwsfmt.extract(std, robust, init, bits=32, device="cuda")
    for name in cpu.names:
        assert torch.allclose(cpu.tensor(name), gpu.tensor(name), rtol=1e-5, atol=1e-7)


def test_cuda_without_a_device_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    init, std, robust = trio(conv_bn_net(3))
    with pytest.raises(RwsError, match="device='cpu'"):
        rwsfmt.extract(std, robust, init, device="cuda")


def test_the_package_attribute_is_the_function_even_after_importing_the_module():
    import importlib

    importlib.import_module("rwsfmt.extraction")
    assert callable(rwsfmt.extract)
