"""The mission's own command lines, run exactly as written, on torch.save'd training
checkpoints; and where `apply` writes when no -o is given."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import rwsfmt
from rwsfmt_cli.main import main

MISSION = [
    "rwsfmt extract std.pt robust.pt init.pt -o fog.rws",
    "rwsfmt apply model.pt fog.rws --alpha 0.8",
    "rwsfmt inspect",
]


def net() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3),
        torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(8 * 4 * 4, 10),
    )


def train(model: torch.nn.Module, noise: float, seed: int, steps: int = 20) -> torch.nn.Module:
    """A few SGD steps on a fixed random task, inputs corrupted by `noise` (the 'fog')."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 3, 8, 8, generator=gen)
    y = torch.randint(0, 10, (64,), generator=gen)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        inputs = x + noise * torch.randn(x.shape, generator=gen)
        torch.nn.functional.cross_entropy(model(inputs), y).backward()
        opt.step()
    return model


@pytest.fixture
def checkpoints(tmp_path, monkeypatch):
    """init.pt, std.pt, robust.pt (training checkpoints: weights, optimizer state, epoch) and
    model.pt (std as deployed: a plain state dict), in the current folder."""
    torch.manual_seed(0)
    init = net()
    torch.save({"epoch": 0, "state_dict": init.state_dict()}, tmp_path / "init.pt")
    for name, noise, seed in [("std", 0.0, 1), ("robust", 1.0, 2)]:
        model = net()
        model.load_state_dict(init.state_dict())
        train(model, noise, seed)
        torch.save({"epoch": 20, "state_dict": model.state_dict()}, tmp_path / f"{name}.pt")
        if name == "std":
            torch.save(model.state_dict(), tmp_path / "model.pt")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def sh(line: str) -> subprocess.CompletedProcess:
    """A command line as written: `rwsfmt ...` run as the installed script would run."""
    words = line.split()
    assert words[0] == "rwsfmt"
    return subprocess.run(
        [sys.executable, "-m", "rwsfmt", *words[1:]], capture_output=True, text=True
    )


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_mission_command_lines_run_as_written(checkpoints):
    model_bytes = digest(checkpoints / "model.pt")
    results = [sh(line) for line in MISSION]
    for line, result in zip(MISSION, results, strict=True):
        assert result.returncode == 0, (line, result.stderr)
        assert "Traceback" not in result.stderr
    out = checkpoints / "model-fog.pt"
    assert "wrote model-fog.pt" in results[1].stdout
    assert digest(checkpoints / "model.pt") == model_bytes  # never over the model
    want = rwsfmt.apply(
        torch.load(checkpoints / "model.pt", weights_only=True), [(rwsfmt.load("fog.rws"), 0.8)]
    )
    got = torch.load(out, weights_only=True)
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name
    assert "the 1 .rws file(s) of the current folder" in results[2].stdout
    assert "fog.rws" in results[2].stdout and "robust.pt" in results[2].stdout
    code, output = run("inspect", "--json")  # the files found here: always a list
    assert code == 0 and [info["path"] for info in json.loads(output)] == ["fog.rws"]


def test_apply_without_o_never_writes_over_an_existing_file(checkpoints):
    assert sh(MISSION[0]).returncode == 0
    first = [run("apply", "model.pt", "fog.rws", "--alpha", "0.8") for _ in range(2)]
    assert [code for code, _ in first] == [0, 0]
    assert "wrote model-fog.pt" in first[0][1] and "wrote model-fog-2.pt" in first[1][1]
    taken = checkpoints / "model-fog-3.pt"
    taken.write_bytes(b"someone else's file")
    code, output = run("apply", "model.pt", "fog.rws", "--alpha", "0.5")
    assert code == 0 and "wrote model-fog-4.pt" in output
    assert taken.read_bytes() == b"someone else's file"


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


def test_default_output_names(tmp_path, monkeypatch):
    from rwsfmt_cli.apply import default_output

    monkeypatch.chdir(tmp_path)
    state = {"w": torch.ones(2)}
    torch.save(state, "weights")  # no suffix: the name gets the format's
    save_file(state, "plain")
    os.mkdir("modeldir")
    os.mkdir("sub")
    save_file(state, "sub/m.safetensors")
    assert default_output("sub/m.safetensors", ["sigs/fog.rws"]) == os.path.join(
        "sub", "m-fog.safetensors"
    )
    assert default_output("weights", ["fog.rws"]) == "weights-fog.pt"
    assert default_output("plain", ["fog.rws"]) == "plain-fog.safetensors"
    assert default_output("modeldir/", ["fog.rws", "snow.rws"]) == "modeldir-fog+snow"
    assert default_output("m.pt", ["a.rws", "b.rws", "c.rws", "d.rws"]) == "m-a+3more.pt"
    assert default_output("m.pt", ["my fog!.rws"]) == "m-my_fog_.pt"
    assert default_output("org/name@v1", ["fog.rws"]) == "name-fog"  # an id: here


def test_apply_without_o_to_a_folder_writes_a_sibling_folder(checkpoints):
    assert sh(MISSION[0]).returncode == 0
    folder = checkpoints / "deployed"
    folder.mkdir()
    save_file(torch.load("model.pt", weights_only=True), folder / "model.safetensors")
    (folder / "config.json").write_text("{}")
    code, output = run("apply", "deployed", "fog.rws", "--alpha", "0.8")
    assert code == 0, output
    out = checkpoints / "deployed-fog"
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "model.safetensors",
        "rwsfmt_applied.json",
    ]


def test_inspect_without_files_and_no_rws_here_says_so(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, output = run("inspect")
    assert code == 2
    assert "holds no .rws files" in output and "fix: give the files" in output
