"""How normalization statistics (target entries) compose: `stats=` and `rwsfmt apply --stats`.

Real torch BatchNorm layers with hundreds of channels; std's running variances in [0.5, 2]
and the targets' in [0.01, 0.5], so that `sum` with several signatures goes negative.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from bitwise import assert_bit_equal, snapshot
from click.testing import CliRunner
from torch import nn

import rwsfmt
from rwsfmt.errors import RwsError
from rwsfmt.patching import DEFAULT_STATS
from rwsfmt.quant import QuantConfig
from rwsfmt.statsrule import StatsRule
from rwsfmt_cli.main import main

STATS = ["bn1.running_mean", "bn1.running_var", "bn2.running_mean", "bn2.running_var"]
DELTAS = ["conv1.weight", "bn1.weight", "bn1.bias", "conv2.weight"]


class BNNet(nn.Module):
    """conv 3 -> 384, BN(384), 1x1 conv 384 -> 256, BN(256), pooled linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 384, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(384)
        self.conv2 = nn.Conv2d(384, 256, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(256)
        self.head = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.head(x.mean((2, 3)))


def make_model(seed: int = 0) -> BNNet:
    torch.manual_seed(seed)
    model = BNNet()
    with torch.no_grad():
        for bn in (model.bn1, model.bn2):
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
    return model.eval()


def make_sig(model: nn.Module, seed: int, label: str = "sig", bits: int = 8) -> rwsfmt.Signature:
    """Deltas on the convs and BN affine parameters; targets for both BN layers' statistics."""
    g = torch.Generator().manual_seed(seed)
    sd = model.state_dict()
    items = [(n, 0.05 * torch.randn(sd[n].shape, generator=g), "delta") for n in DELTAS]
    for n in STATS:
        shape = sd[n].shape
        if n.endswith("running_var"):
            value = 0.01 + 0.49 * torch.rand(shape, generator=g)
        else:
            value = sd[n] + torch.randn(shape, generator=g)
        items.append((n, value, "target"))
    return rwsfmt.from_tensors(items, label=label, quant=QuantConfig(bits=bits))


@pytest.fixture(scope="module")
def setup():
    model = make_model()
    sigs = [make_sig(model, s, label=f"s{s}") for s in (1, 2, 3, 4)]
    return model.state_dict(), sigs


# ---------------------------------------------------------------- the rules' numbers


@pytest.mark.parametrize("alphas", [(1.0,), (0.8,), (0.3, 0.5), (0.25, 0.25, 0.5), (0.6, 0.4)])
def test_convex_equals_sum_when_alphas_sum_to_at_most_1(setup, alphas):
    sd, sigs = setup
    entries = list(zip(sigs, alphas, strict=False))
    assert_bit_equal(
        rwsfmt.apply(sd, entries, stats="convex"), rwsfmt.apply(sd, entries, stats="sum")
    )


@pytest.mark.parametrize(
    "alphas", [(0.8, 0.8), (0.8, 0.8, 0.8), (1.0, 1.0, 1.0, 1.0), (1.5,), (2.0, 0.7), (1.2, -0.5)]
)
def test_convex_keeps_statistics_between_std_and_the_targets(setup, alphas):
    sd, sigs = setup
    entries = list(zip(sigs, alphas, strict=False))
    convex = rwsfmt.apply(sd, entries, stats=StatsRule.CONVEX)
    summed = rwsfmt.apply(sd, entries, stats=StatsRule.SUM)
    for name in STATS:
        stack = torch.stack([sd[name]] + [sig.tensor(name) for sig, _ in entries])
        low, high = stack.min(0).values, stack.max(0).values
        slack = 1e-6 * stack.abs().max()
        assert bool((convex[name] >= low - slack).all()), name
        assert bool((convex[name] <= high + slack).all()), name
        if name.endswith("running_var"):
            assert bool((convex[name] > 0).all()), name
    # the rule matters here: summed, the statistics leave that hull (variances go negative
    # for every positive alpha sum of 2 or more)
    positive = sum(max(a, 0.0) for a in alphas)
    outside = any(
        bool((summed[n] < torch.minimum(sd[n], sigs[0].tensor(n)) - 1e-3).any()) for n in STATS
    )
    assert outside
    if positive >= 2:
        assert bool((summed["bn1.running_var"] < 0).any())
    # the deltas are the same under every rule
    for name in DELTAS:
        assert torch.equal(convex[name], summed[name]), name


def test_convex_weights_are_alphas_over_their_sum(setup):
    sd, sigs = setup
    out = rwsfmt.apply(sd, [(sigs[0], 1.5), (sigs[1], 0.5)], stats="convex")
    name = "bn2.running_mean"
    expected = (
        sd[name].double()
        + 0.75 * (sigs[0].tensor(name).double() - sd[name].double())
        + 0.25 * (sigs[1].tensor(name).double() - sd[name].double())
    )
    torch.testing.assert_close(out[name].double(), expected, rtol=0, atol=1e-5)


def test_keep_leaves_statistics_untouched_and_applies_deltas(setup):
    sd, sigs = setup
    entries = [(sigs[0], 0.8), (sigs[1], 0.8), (sigs[2], 0.8)]
    kept = rwsfmt.apply(sd, entries, stats="keep")
    summed = rwsfmt.apply(sd, entries, stats="sum")
    for name in STATS:
        assert kept[name] is sd[name] or torch.equal(kept[name], sd[name]), name
    for name in DELTAS:
        assert not torch.equal(kept[name], sd[name]), name
        assert torch.equal(kept[name], summed[name]), name


def test_default_rule_is_convex_and_names_parse(setup):
    sd, sigs = setup
    entries = [(sigs[0], 0.9), (sigs[1], 0.9)]
    assert DEFAULT_STATS is StatsRule.CONVEX
    assert_bit_equal(rwsfmt.apply(sd, entries), rwsfmt.apply(sd, entries, stats="convex"))
    assert StatsRule.parse("KEEP") is StatsRule.KEEP
    assert rwsfmt.StatsRule is StatsRule
    with pytest.raises(RwsError, match="'sum', 'convex', 'keep'"):
        rwsfmt.apply(sd, entries, stats="mean")
    with pytest.raises(RwsError, match="unknown rule"):
        rwsfmt.patch(make_model(), sigs[0], 0.5, stats=3)


# ---------------------------------------------------------------- live modules


@pytest.mark.parametrize("rule", list(StatsRule))
def test_patch_matches_apply_and_remove_restores_bit_for_bit(setup, rule):
    _, sigs = setup
    model = make_model()
    original = snapshot(model)
    entries = [(sigs[0], 1.0), (sigs[1], 0.8), (sigs[2], 0.7)]
    handle = rwsfmt.patch(model, entries, stats=rule)
    assert_bit_equal(snapshot(model), rwsfmt.apply(original, entries, stats=rule))
    handle.remove()
    assert_bit_equal(snapshot(model), original)
    with rwsfmt.patched(model, sigs[3], 1.5, stats=rule):
        assert not torch.equal(model.conv1.weight, original["conv1.weight"])
    assert_bit_equal(snapshot(model), original)


@pytest.mark.parametrize("rule", list(StatsRule))
def test_stacked_patches_compose_as_one_call_and_remove_in_any_order(setup, rule):
    _, sigs = setup
    model = make_model()
    original = snapshot(model)
    alphas = [0.8, 0.9, 0.7]
    for order in [(0, 1, 2), (1, 2, 0), (2, 0, 1)]:
        handles = [rwsfmt.patch(model, sigs[i], alphas[i], stats=rule) for i in range(3)]
        entries = list(zip(sigs[:3], alphas, strict=True))
        assert_bit_equal(snapshot(model), rwsfmt.apply(original, entries, stats=rule))
        for i in order:
            handles[i].remove()
        assert_bit_equal(snapshot(model), original)


def test_stacking_another_rule_on_the_same_statistics_is_refused(setup):
    _, sigs = setup
    model = make_model()
    original = snapshot(model)
    handle = rwsfmt.patch(model, sigs[0], 0.8, stats="convex")
    patched = snapshot(model)
    with pytest.raises(RwsError, match="stats='convex'"):
        rwsfmt.patch(model, sigs[1], 0.8, stats="sum")
    assert_bit_equal(snapshot(model), patched)  # nothing changed
    only_deltas = rwsfmt.from_tensors({"conv2.weight": torch.ones(256, 384, 1, 1)}, label="d")
    rwsfmt.patch(model, only_deltas, 0.1, stats="sum").remove()  # no statistics: no conflict
    handle.remove()
    assert_bit_equal(snapshot(model), original)
    rwsfmt.patch(model, sigs[1], 0.8, stats="sum").remove()  # free again once removed
    assert_bit_equal(snapshot(model), original)


# ---------------------------------------------------------------- the command line


@pytest.fixture
def files(tmp_path, setup):
    sd, sigs = setup
    torch.save(sd, tmp_path / "std.pt")
    for i, sig in enumerate(sigs[:2]):
        rwsfmt.save(sig, tmp_path / f"s{i}.rws")
    return tmp_path, sd, [rwsfmt.load(tmp_path / f"s{i}.rws") for i in range(2)]


def run(*args: object) -> tuple[int, str]:
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


@pytest.mark.parametrize("rule", [None, "sum", "convex", "keep", "KEEP"])
def test_cli_stats_option_end_to_end(files, rule):
    tmp, sd, sigs = files
    out = tmp / "out.pt"
    option = [] if rule is None else ["--stats", rule]
    code, text = run("apply", tmp / "std.pt", tmp / "s0.rws", tmp / "s1.rws", "-a", 0.8,
                     *option, "-o", out, "-q")  # fmt: skip
    assert code == 0, text
    expected = rwsfmt.apply(sd, [(sigs[0], 0.8), (sigs[1], 0.8)], stats=rule or DEFAULT_STATS)
    assert_bit_equal(torch.load(out, weights_only=True), expected)


def test_cli_rejects_an_unknown_rule_with_exit_2(files):
    tmp, _, _ = files
    code, text = run("apply", tmp / "std.pt", tmp / "s0.rws", "-a", 1, "--stats", "mean",
                     "-o", tmp / "out.pt")  # fmt: skip
    assert code == 2
    assert "--stats" in text and "'mean' is not one of" in text and "convex" in text
    assert not (tmp / "out.pt").exists()


def test_cli_unknown_rule_in_a_real_process(files):
    tmp, _, _ = files
    proc = subprocess.run(
        [sys.executable, "-m", "rwsfmt", "apply", str(tmp / "std.pt"), str(tmp / "s0.rws"),
         "-a", "1", "--stats", "average", "-o", str(tmp / "out.pt")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "--stats" in proc.stderr and "sum" in proc.stderr and "keep" in proc.stderr
    assert not (tmp / "out.pt").exists()


def test_cli_summary_names_the_rule_for_statistics(files):
    tmp, sd, _ = files
    statistics = [k for k in sd if k.endswith(("running_mean", "running_var"))]
    code, text = run("apply", tmp / "std.pt", tmp / "s0.rws", "-a", 1, "--stats", "KEEP",
                     "-o", tmp / "out.pt")  # fmt: skip
    assert code == 0, text
    assert f"{len(statistics)} normalization statistics composed with --stats keep" in text
