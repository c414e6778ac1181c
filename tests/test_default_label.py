"""The default label of an extracted signature: --corruption, else a specific input name."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file
from test_patch import make_net

import rwsfmt
from rwsfmt_cli.main import main


@pytest.fixture
def runs(tmp_path):
    """std.pt, init.pt and robust models as training scripts leave them: runs/fog/robust.pt,
    runs/snow/checkpoint-500/ (a Hugging Face style folder), runs/frost.pt."""
    torch.save(make_net(0).state_dict(), tmp_path / "init.pt")
    torch.save(make_net(1).state_dict(), tmp_path / "std.pt")
    (tmp_path / "runs/fog").mkdir(parents=True)
    torch.save(make_net(2).state_dict(), tmp_path / "runs/fog/robust.pt")
    (tmp_path / "runs/snow/checkpoint-500").mkdir(parents=True)
    state = {k: v.contiguous() for k, v in make_net(3).state_dict().items()}
    save_file(state, tmp_path / "runs/snow/checkpoint-500/model.safetensors", {"format": "pt"})
    torch.save(make_net(4).state_dict(), tmp_path / "runs/frost.pt")
    return tmp_path


@pytest.mark.parametrize(
    ("robust", "corruption", "label"),
    [
        ("runs/fog/robust.pt", None, "fog"),  # the folder, not "robust"
        ("runs/snow/checkpoint-500", None, "snow"),  # a Trainer checkpoint's run folder
        ("runs/frost.pt", None, "frost"),  # a specific file stem is kept
        ("runs/fog/robust.pt", "haze", "haze"),  # --corruption first
    ],
)
def test_default_label(runs, robust, corruption, label):
    sig = rwsfmt.extract(
        runs / "std.pt", runs / robust, runs / "init.pt", layers=1, corruption=corruption
    )
    assert sig.label == label


def test_cli_signatures_from_one_name_in_several_folders_differ(runs):
    result = CliRunner().invoke(
        main,
        [
            "extract",
            str(runs / "std.pt"),
            str(runs / "runs/fog/robust.pt"),
            str(runs / "init.pt"),
            "-o",
            str(runs / "out.rws"),
            "--layers",
            "1",
        ],
    )
    assert result.exit_code == 0, result.output
    assert rwsfmt.load(runs / "out.rws").label == "fog"


@pytest.mark.parametrize(
    ("robust", "output", "label"),
    [
        ("robust.pt", "fog.rws", "fog"),  # the mission's line: not the current folder's name
        ("runs/fog/robust.pt", "haze.rws", "haze"),  # the name the user chose
        ("runs/fog/robust.pt", "out.rws", "fog"),  # a generic output name: the folder
        ("runs/frost.pt", "haze.rws", "frost"),  # a specific input name first
    ],
)
def test_cli_label_is_outs_stem_when_robusts_name_is_generic(
    runs, robust, output, label, monkeypatch
):
    monkeypatch.chdir(runs)
    (runs / "robust.pt").write_bytes((runs / "runs/fog/robust.pt").read_bytes())
    result = CliRunner().invoke(
        main, ["extract", "std.pt", robust, "init.pt", "-o", output, "--layers", "1"]
    )
    assert result.exit_code == 0, result.output
    assert rwsfmt.load(runs / output).label == label
