"""`rwsfmt merge` and `rwsfmt.merge`: sum, mean, TIES and DARE of signatures, re-quantized."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os

import pytest
import torch
from click.testing import CliRunner

import rwsfmt
from rwsfmt.merging import REGISTRY
from rwsfmt.signature import from_tensors
from rwsfmt_cli.main import main
from rwsfmt_cli.merge import METHODS

EXACT = rwsfmt.QuantConfig(bits=32)


def _sig(label: str, seed: int, extra: bool = False) -> rwsfmt.Signature:
    g = torch.Generator().manual_seed(seed)
    items = [
        ("conv.weight", torch.randn(8, 3, 3, 3, generator=g), "delta"),
        ("bn.running_mean", torch.randn(8, generator=g), "target"),
    ]
    if extra:
        items.append(("head.weight", torch.randn(4, 8, generator=g), "delta"))
    return from_tensors(items, label=label, quant=EXACT, model_fingerprint="sha256:" + "0" * 64)


def _deltas(label: str, **tensors: list[float]) -> rwsfmt.Signature:
    return from_tensors({k: torch.tensor(v) for k, v in tensors.items()}, label=label, quant=EXACT)


def test_weighted_sum_of_deltas_and_union_of_names():
    fog, snow = _sig("fog", 1), _sig("snow", 2, extra=True)
    merged = rwsfmt.merge([fog, snow], [0.7, 0.3], quant=EXACT)
    assert merged.names == ["conv.weight", "bn.running_mean", "head.weight"]
    expected = 0.7 * fog.tensor("conv.weight") + 0.3 * snow.tensor("conv.weight")
    torch.testing.assert_close(merged.tensor("conv.weight"), expected, rtol=0, atol=1e-6)
    # a tensor only one signature holds is that signature's, weighted
    torch.testing.assert_close(merged.tensor("head.weight"), 0.3 * snow.tensor("head.weight"))
    # targets with weights summing to 1 are the weighted mean of the targets
    mean = 0.7 * fog.tensor("bn.running_mean") + 0.3 * snow.tensor("bn.running_mean")
    torch.testing.assert_close(merged.tensor("bn.running_mean"), mean)
    assert merged.info("bn.running_mean").kind == "target"
    assert merged.fingerprint["model"] == fog.fingerprint["model"]
    comps = merged.provenance["components"]
    assert [(c["label"], c["weight"]) for c in comps] == [("fog", 0.7), ("snow", 0.3)]
    assert merged.provenance["merge"] == {
        "method": "sum",
        "lambda": 1.0,
        "targets": "weighted mean",
    }


def test_targets_are_weighted_means_of_the_positive_weights_whatever_the_method():
    fog, snow = _sig("fog", 1), _sig("snow", 2)
    t_fog, t_snow = fog.tensor("bn.running_mean"), snow.tensor("bn.running_mean")
    for method in METHODS:
        merged = rwsfmt.merge([fog, snow], [1.0, 3.0], method=method, lambda_=2.0, quant=EXACT)
        torch.testing.assert_close(merged.tensor("bn.running_mean"), 0.25 * t_fog + 0.75 * t_snow)
    # task negation: the negated signature's statistics are not moved toward
    negated = rwsfmt.merge([fog, snow], [1.0, -1.0], quant=EXACT)
    torch.testing.assert_close(negated.tensor("bn.running_mean"), t_fog)
    torch.testing.assert_close(
        negated.tensor("conv.weight"), fog.tensor("conv.weight") - snow.tensor("conv.weight")
    )
    with pytest.raises(rwsfmt.RwsError, match="'bn.running_mean'.*weights <= 0"):
        rwsfmt.merge([fog, snow], [0.0, -1.0])


def test_mean_true_is_method_mean():
    fog, snow = _sig("fog", 1), _sig("snow", 2)
    merged = rwsfmt.merge([fog, snow], [1.0, 3.0], mean=True, quant=EXACT)
    assert merged.provenance["method"] == "merge-mean"
    assert [c["weight"] for c in merged.provenance["components"]] == [0.25, 0.75]
    expected = 0.25 * fog.tensor("conv.weight") + 0.75 * snow.tensor("conv.weight")
    torch.testing.assert_close(merged.tensor("conv.weight"), expected)
    same = rwsfmt.merge([fog, snow], [1.0, 3.0], method="mean", quant=EXACT)
    assert torch.equal(same.tensor("conv.weight"), merged.tensor("conv.weight"))


def test_shape_conflicts_are_all_named():
    a = _deltas("a", w=[[1.0, 2.0]], v=[1.0, 2.0], u=[1.0])
    b = _deltas("b", w=[[1.0], [2.0]], v=[1.0], u=[2.0])
    with pytest.raises(rwsfmt.RwsError, match=r"2 tensor\(s\): 'w' .*'v' ") as info:
        rwsfmt.merge([a, b])
    assert "'u'" not in str(info.value)


def test_ties_by_hand():
    """Density 0.5 keeps 3 of 6 entries each; signs elected on the unweighted sum, so entry 4
    is + (4 - 3.5) although the weighted sum (2 - 7) is negative; lambda 2 doubles."""
    a = _deltas("a", w=[3.0, -1.0, 0.5, -2.0, 4.0, 0.1])
    b = _deltas("b", w=[-1.0, 2.0, 0.4, -3.0, -3.5, 0.2])
    # trimmed: a' = [3, 0, 0, -2, 4, 0], b' = [0, 2, 0, -3, -3.5, 0]; elected: + + + - + +
    # weighted (0.5, 2) and agreeing: [1.5], [4], none, [-1, -6], [2], none
    merged = rwsfmt.merge([a, b], [0.5, 2.0], method="ties", density=0.5, lambda_=2.0)
    expected = torch.tensor([1.5, 4.0, 0.0, -3.5, 2.0, 0.0]) * 2
    torch.testing.assert_close(merged.tensor("w"), expected, rtol=0, atol=0.02)
    exact = rwsfmt.merge([a, b], [0.5, 2.0], method="ties", density=0.5, lambda_=2.0, quant=EXACT)
    assert torch.equal(exact.tensor("w"), expected)
    assert exact.provenance["merge"] == {
        "method": "ties",
        "density": 0.5,
        "lambda": 2.0,
        "targets": "weighted mean",
    }
    # density 1 keeps everything; the default is 0.5
    torch.testing.assert_close(
        rwsfmt.merge([a, b], method="ties", density=1.0, quant=EXACT).tensor("w"),
        torch.tensor([3.0, 2.0, 0.45, -2.5, 4.0, 0.15]),
    )
    assert rwsfmt.merge([a, b], method="ties").provenance["merge"]["density"] == 0.5


def test_ties_agrees_with_peft():
    merge_utils = pytest.importorskip("peft.utils.merge_utils")
    g = torch.Generator().manual_seed(0)
    shapes = {"conv.weight": (16, 3, 3, 3), "conv.bias": (16,), "fc.weight": (10, 40)}
    sigs = []
    for i in range(3):
        # the third signature lacks fc.weight: it counts as zero there
        names = list(shapes) if i < 2 else ["conv.weight", "conv.bias"]
        sigs.append(
            from_tensors(
                {n: torch.randn(shapes[n], generator=g) for n in names}, label=f"s{i}", quant=EXACT
            )
        )
    weights = [0.7, 1.3, -0.4]
    worst = 0.0
    for density in (0.1, 0.2, 0.5, 0.9, 1.0):
        merged = rwsfmt.merge(sigs, weights, method="ties", density=density, quant=EXACT)
        for name, shape in shapes.items():
            inputs = [s.tensor(name) if name in s else torch.zeros(shape) for s in sigs]
            with pytest.warns(UserWarning) if density == 1 else contextlib.nullcontext():
                ref = merge_utils.ties(inputs, torch.tensor(weights), density, "total")
            worst = max(worst, float((merged.tensor(name) - ref).abs().max()))
    assert worst <= 1e-6


def test_dare_drops_and_rescales_deterministically():
    g = torch.Generator().manual_seed(3)
    a = from_tensors({"w": torch.randn(100, 100, generator=g), "b": torch.randn(5)}, label="a")
    zero = from_tensors({"w": torch.zeros(100, 100)}, label="zero", quant=EXACT)
    merged = rwsfmt.merge([a, zero], method="dare", density=0.3, seed=7, quant=EXACT)
    out, original = merged.tensor("w"), a.tensor("w")
    kept = out != 0
    assert abs(float(kept.float().mean()) - 0.3) < 0.02
    torch.testing.assert_close(out[kept], original[kept] / 0.3)
    assert merged.provenance["merge"]["seed"] == 7
    # the same seed gives the same values, whatever the order of the tensors; another differs
    reordered = from_tensors({"b": a.tensor("b"), "w": original}, label="a", quant=EXACT)
    again = rwsfmt.merge([reordered, zero], method="dare", density=0.3, seed=7, quant=EXACT)
    assert torch.equal(again.tensor("w"), out)
    other = rwsfmt.merge([a, zero], method="dare", density=0.3, seed=8, quant=EXACT)
    assert not torch.equal(other.tensor("w"), out)
    # density 1 drops nothing: dare is then the sum, dare_ties then ties
    b = _sig("b", 4)
    c = _sig("c", 5)
    for dare, plain in (("dare", "sum"), ("dare_ties", "ties")):
        x = rwsfmt.merge([b, c], method=dare, density=1.0, quant=EXACT)
        y = rwsfmt.merge([b, c], method=plain, **({"density": 1.0} if plain == "ties" else {}))
        torch.testing.assert_close(
            x.tensor("conv.weight"), y.tensor("conv.weight"), atol=0.02, rtol=0
        )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"weights": [1.0]}, "1 weights for 2 signatures"),
        ({"weights": [1.0, math.nan]}, "not all finite"),
        ({"weights": [True, 1.0]}, "not all finite numbers"),
        ({"method": "slerp"}, "unknown merge method 'slerp'"),
        ({"method": "ties", "density": 0.0}, r"density=0.0 is outside \(0, 1\]"),
        ({"method": "ties", "density": 1.5}, r"density=1.5 is outside \(0, 1\]"),
        ({"method": "dare", "density": math.nan}, "density=nan"),
        ({"density": 0.5}, "(?s)density has no effect with method 'sum'.*ties, dare"),
        ({"method": "ties", "seed": 1}, "seed has no effect with method 'ties'"),
        ({"method": "dare", "seed": -1}, "seed=-1 is not a whole number"),
        ({"lambda_": math.inf}, "lambda_=inf is not a finite number"),
        ({"mean": True, "method": "ties"}, "mean=True asks for method 'mean'"),
        ({"mean": True, "weights": [1.0, -1.0]}, "weights sum to 0"),
    ],
)
def test_bad_arguments_are_clear_errors(kwargs, message):
    with pytest.raises(rwsfmt.RwsError, match=message):
        rwsfmt.merge([_sig("fog", 1), _sig("snow", 2)], **kwargs)


def test_too_few_signatures():
    for sigs in ([], [_sig("fog", 1)]):
        with pytest.raises(rwsfmt.RwsError, match="at least two signatures"):
            rwsfmt.merge(sigs)


@pytest.fixture
def files(tmp_path) -> list[str]:
    paths = []
    for label, seed in (("fog", 1), ("snow", 2)):
        path = tmp_path / f"{label}.rws"
        rwsfmt.save(_sig(label, seed), path)
        paths.append(str(path))
    return paths


def test_cli_merge_writes_file_with_provenance(files, tmp_path):
    out = tmp_path / "both.rws"
    runner = CliRunner()
    args = ["merge", *files, "-o", str(out), "--weights", "0.5,0.5", "-m", "ties"]
    result = runner.invoke(main, [*args, "--density", "0.4", "--lambda", "1.5"])
    assert result.exit_code == 0, result.output
    assert "ties (density 0.4, lambda 1.5)" in result.output
    with rwsfmt.load(out) as merged:
        assert merged.label == "fog+snow"
        component = merged.provenance["components"][0]
        assert (component["name"], component["weight"]) == ("fog.rws", 0.5)
        with open(files[0], "rb") as f:
            assert component["sha256"] == hashlib.sha256(f.read()).hexdigest()
        assert merged.provenance["merge"]["density"] == 0.4
        assert rwsfmt.verify(out).ok
    shown = runner.invoke(main, ["inspect", str(out)], terminal_width=200)
    assert "merge-ties (density 0.4, lambda 1.5)" in shown.output
    quiet = runner.invoke(main, ["merge", *files, "-o", str(out), "--quiet"])
    assert quiet.exit_code == 0 and quiet.output == ""


def test_cli_json_summary(files, tmp_path):
    out = tmp_path / "both.rws"
    args = ["merge", *files, "-o", str(out), "--method", "dare", "--seed", "3", "--json"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["merge"] == {
        "method": "dare",
        "density": 0.5,
        "seed": 3,
        "lambda": 1.0,
        "targets": "weighted mean",
    }
    assert [c["label"] for c in summary["components"]] == ["fog", "snow"]
    assert summary["tensors"] == 2 and summary["bytes"] == os.path.getsize(out)


def test_cli_bad_input_exits_2_and_writes_nothing(files, tmp_path):
    other = tmp_path / "other.rws"
    rwsfmt.save(from_tensors({"conv.weight": torch.ones(4, 3, 3, 3)}, label="o"), other)
    bad = tmp_path / "bad.rws"
    cases = [
        ([files[0], str(tmp_path / "missing.rws")], [], "missing.rws: no such file"),
        ([files[0], str(other)], [], "'conv.weight' is delta [4, 3, 3, 3]"),
        ([files[0]], [], "at least two signatures"),
        ([], [], "Missing argument"),
        (files, ["--weights", "1"], "1 value(s) for 2 signatures"),
        (files, ["--weights", "a,b"], "not a comma-separated list"),
        (files, ["--weights", "1,nan"], "not finite"),
        (files, ["-m", "ties", "--density", "0"], "--density"),
        (files, ["-m", "ties", "--density", "1.5"], "--density"),
        (files, ["-m", "slerp"], "'slerp' is not one of"),
        (files, ["--density", "0.5"], "--density has no effect with --method sum"),
        (files, ["-m", "ties", "--seed", "1"], "--seed has no effect with --method ties"),
        (files, ["--mean", "-m", "ties"], "--mean is --method mean"),
        (files, ["--lambda", "nan"], "not a finite number"),
    ]
    runner = CliRunner()
    for paths, args, message in cases:
        result = runner.invoke(main, ["merge", *paths, "-o", str(bad), *args])
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output, (args, result.output)
        assert "Traceback" not in result.output
        assert not os.path.exists(bad)


def test_cli_methods_are_the_registry():
    assert sorted(METHODS) == sorted(REGISTRY)


def test_cli_storage_options_and_their_inheritance(files, tmp_path):
    """--store-density (merge's own --density is TIES's and DARE's) and the other storage
    options reach the merged file; left out, they are the first signature's."""
    runner = CliRunner()

    def merge(out, *args: str) -> rwsfmt.QuantConfig:
        result = runner.invoke(main, ["merge", *map(str, args), "-o", str(out)])
        assert result.exit_code == 0, result.output
        assert result.stderr == "", result.stderr
        assert runner.invoke(main, ["verify", str(out)]).exit_code == 0
        return rwsfmt.load(out).quant

    sparse = tmp_path / "sparse.rws"
    stored = ["--bits", "1", "--store-density", "0.5", "--sparsity", "channel"]
    assert merge(sparse, *files, "-m", "ties", "--density", "0.4", *stored) == rwsfmt.QuantConfig(
        bits=1, density=0.5, sparsity="channel"
    )
    conv = rwsfmt.load(sparse).info("conv.weight")
    assert conv.scheme == "sparse" and conv.nnz == 8 * round(0.5 * 27)
    # the first file's storage, with --bits 2 changed: still half of each channel kept
    again = merge(tmp_path / "again.rws", sparse, files[1], "--bits", "2")
    assert again == rwsfmt.QuantConfig(bits=2, density=0.5, sparsity="channel")


def test_cli_storage_usage_errors_name_the_flags(files, tmp_path):
    bad = tmp_path / "bad.rws"
    cases = [
        (["--density", "0.5"], "--store-density D stores the merged signature sparse"),
        (["--store-density", "0"], "--store-density 0 is not a share of entries"),
        (["--bits", "1", "--affine"], "--bits 1 stores signs and a scale"),
        (["--bits", "auto"], "--bits auto needs --target-bpp B"),
        (["--target-bpp", "1"], "it does not apply to the first signature (32-bit)"),
    ]
    for args, message in cases:
        result = CliRunner().invoke(main, ["merge", *files, "-o", str(bad), *args])
        assert result.exit_code == 2, (args, result.output)
        assert message in result.stderr, (args, result.stderr)
        assert not bad.exists()


def test_signatures_of_unrelated_architectures_warn_when_merged(tmp_path):
    """Two checkpoint trios of different models (no shared tensor name): the union is merged
    as documented, with a warning that names both files; shared tensors give no warning."""
    nets = {
        "conv": lambda: torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Conv2d(4, 4, 3)),
        "mlp": lambda: torch.nn.Sequential(
            torch.nn.Flatten(), torch.nn.Identity(), torch.nn.Identity(), torch.nn.Linear(8, 2)
        ),
    }
    for kind, make in nets.items():
        torch.manual_seed(0)
        for role in ("init", "std", "robust"):
            torch.save(make().state_dict(), tmp_path / f"{kind}-{role}.pt")
        paths = [str(tmp_path / f"{kind}-{role}.pt") for role in ("std", "robust", "init")]
        result = CliRunner().invoke(main, ["extract", *paths, "-o", str(tmp_path / f"{kind}.rws")])
        assert result.exit_code == 0, result.output
    conv, mlp = str(tmp_path / "conv.rws"), str(tmp_path / "mlp.rws")
    result = CliRunner().invoke(main, ["merge", conv, mlp, "-o", str(tmp_path / "m.rws")])
    assert result.exit_code == 0, result.output
    assert "warning: the signatures share no tensor and come from models of different" in (
        result.stderr
    )
    assert "conv.rws: 0.weight" in result.stderr and "mlp.rws: 3.weight" in result.stderr
    assert "fix: merge signatures extracted from one architecture" in result.stderr
    result = CliRunner().invoke(main, ["merge", conv, conv, "-o", str(tmp_path / "n.rws")])
    assert "share no tensor" not in result.stderr
