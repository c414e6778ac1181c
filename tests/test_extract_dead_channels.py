"""`rwsfmt extract` on a ReLU CNN with dead output channels (issue #8, item 1): channels that
training never changed give all-zero signature rows, and the file written must pass
`rwsfmt verify` (rwsfmt 0.1.0 wrote their scales as -0.0 and then refused its own file)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import rwsfmt
from rwsfmt_cli.main import main

CHANNELS = 256  # hundreds of output channels: the vectorised CPU path of the quantizer
DEAD = [0, 1, 2, 100, 170, 255]


def _net() -> torch.nn.Sequential:
    """conv -> ReLU -> pool -> linear, with DEAD channels whose bias keeps them at zero."""
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, CHANNELS, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(CHANNELS, 10),
    )
    with torch.no_grad():
        net[0].bias[DEAD] = -1e3  # ReLU outputs 0 for any input: no gradient ever reaches them
    return net


def _train(init: dict, noise: float, seed: int) -> dict:
    """A few real SGD steps on random images (with Gaussian noise for the robust model)."""
    torch.manual_seed(seed)
    net = _net()
    net.load_state_dict(init)
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    for _ in range(3):
        images = torch.rand(16, 3, 8, 8)
        images += noise * torch.randn_like(images)
        loss = torch.nn.functional.cross_entropy(net(images), torch.randint(0, 10, (16,)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.state_dict()


@pytest.fixture
def checkpoints(tmp_path):
    torch.manual_seed(0)
    init = _net().state_dict()
    torch.save(init, tmp_path / "init.pt")
    torch.save(_train(init, 0.0, 1), tmp_path / "std.pt")
    torch.save(_train(init, 0.3, 2), tmp_path / "noise.pt")
    return tmp_path


@pytest.mark.parametrize("storage", [[], ["--bits", "16"], ["--bits", "4", "--affine"]])
def test_extract_with_dead_channels_writes_a_file_verify_accepts(checkpoints, storage):
    d = checkpoints
    std, robust = torch.load(d / "std.pt"), torch.load(d / "noise.pt")
    init = torch.load(d / "init.pt")
    for sd in (std, robust):  # the dead channels really are unchanged, the others are not
        assert torch.equal(sd["0.weight"][DEAD], init["0.weight"][DEAD])
        assert not torch.equal(sd["0.weight"], init["0.weight"])
    out = d / "noise.rws"
    runner = CliRunner()
    args = ["extract", d / "std.pt", d / "noise.pt", d / "init.pt", "-o", out, "-q", *storage]
    result = runner.invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    verified = runner.invoke(main, ["verify", str(out)])
    assert verified.exit_code == 0, verified.output
    with rwsfmt.load(out) as sig:
        weight = sig.tensor("0.weight")
        info = sig.info("0.weight")
        scales = np.frombuffer(sig.payload("0.weight"), "<u4", count=info.n_scales)
    assert info.granularity == "channel" and info.n_scales == CHANNELS
    assert not weight[DEAD].any() and weight.abs().sum() > 0
    assert not scales[DEAD].any()  # +0.0 scales for the dead channels: no sign bit
