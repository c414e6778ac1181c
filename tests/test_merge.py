"""`rwsfmt merge` and `rwsfmt.merge`: weighted sums of signatures, re-quantized."""

from __future__ import annotations

import os

import pytest
import torch
from click.testing import CliRunner

import rwsfmt
from rwsfmt.signature import from_tensors
from rwsfmt_cli.main import main

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


def test_sum_of_targets_is_refused_and_mean_accepted():
    fog, snow = _sig("fog", 1), _sig("snow", 2)
    with pytest.raises(rwsfmt.RwsError, match="bn.running_mean.*sum to 1"):
        rwsfmt.merge([fog, snow])
    merged = rwsfmt.merge([fog, snow], mean=True)
    assert merged.provenance["method"] == "merge-mean"


def test_shape_conflict_names_the_tensor():
    a = from_tensors({"w": torch.ones(2, 2)}, label="a", quant=EXACT)
    b = from_tensors({"w": torch.ones(3, 2)}, label="b", quant=EXACT)
    with pytest.raises(rwsfmt.RwsError, match="'w'"):
        rwsfmt.merge([a, b])


def test_cli_merge_writes_file_and_rejects_bad_weights(tmp_path):
    paths = []
    for label, seed in (("fog", 1), ("snow", 2)):
        path = tmp_path / f"{label}.rws"
        rwsfmt.save(_sig(label, seed), path)
        paths.append(str(path))
    out = tmp_path / "both.rws"
    runner = CliRunner()
    result = runner.invoke(main, ["merge", *paths, "-o", str(out), "--weights", "0.5,0.5"])
    assert result.exit_code == 0, result.output
    with rwsfmt.load(out) as merged:
        assert merged.label == "fog+snow"
        assert merged.provenance["components"][0]["name"] == "fog.rws"
        assert rwsfmt.verify(out).ok
    bad = tmp_path / "bad.rws"
    for args in (["--weights", "1"], ["--weights", "a,b"], []):
        result = runner.invoke(main, ["merge", *paths, "-o", str(bad), *args])
        assert result.exit_code == 2, result.output
        assert not os.path.exists(bad)
