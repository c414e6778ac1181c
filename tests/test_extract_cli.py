"""`rwsfmt extract` on the command line: files written, summary table, errors and exit codes."""

from __future__ import annotations

import os

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import rwsfmt
from rwsfmt_cli.main import main


@pytest.fixture
def checkpoints(tmp_path):
    """init.pt, std.pt and fog.pt: a conv/BN net, std and fog moved from init by noise."""
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = []
    for _ in range(6):
        layers += [torch.nn.Conv2d(3, 3, 3), torch.nn.BatchNorm2d(3)]
    init = torch.nn.Sequential(*layers).state_dict()
    for role, seed in (("init", None), ("std", 1), ("fog", 2)):
        g = torch.Generator().manual_seed(seed or 0)
        sd = {
            k: v + 0.05 * torch.randn(v.shape, generator=g) if seed and v.is_floating_point() else v
            for k, v in init.items()
        }
        torch.save(sd, tmp_path / f"{role}.pt")
    return tmp_path


def run(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_extract_writes_the_file_and_prints_a_table(checkpoints):
    d = checkpoints
    out = d / "fog.rws"
    result = run(
        "extract",
        d / "std.pt",
        d / "fog.pt",
        d / "init.pt",
        "-o",
        out,
        "--meta",
        "run=3",
        "--meta",
        "note=a=b",
        "--corruption",
        "fog",
        "--severity",
        "5",
        "--dataset",
        "digits",
    )
    assert result.exit_code == 0, result.output
    sig = rwsfmt.load(out)
    assert sig.label == "fog"  # the robust file's stem
    assert sig.provenance["meta"] == {"run": "3", "note": "a=b"}
    assert sig.provenance["severity"] == 5
    assert len(sig.names) == 5 * 4 + 2 * 5  # 5 conv + BN layers (BN: 2 deltas, 2 targets)
    for name in ("0.weight", "1.running_var", "rel. norm", "float32", "fog.rws"):
        assert name in result.stdout
    assert rwsfmt.verify(out).ok


def test_options_reach_the_library(checkpoints):
    d = checkpoints
    out = d / "s.rws"
    result = run(
        "extract",
        d / "std.pt",
        d / "fog.pt",
        "-o",
        out,
        "--method",
        "subtract",
        "--layers",
        "all",
        "--exclude",
        "running_",
        "--bits",
        "32",
        "--name",
        "f2",
        "--quiet",
    )
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    sig = rwsfmt.load(out)
    assert sig.label == "f2" and sig.provenance["method"] == "subtract"
    assert len(sig.names) == 6 * 4 and all(sig.info(n).kind == "delta" for n in sig.names)
    assert sig.infos[0].quant == {"scheme": "float", "bits": 32}


def test_safetensors_inputs(tmp_path, checkpoints):
    d = checkpoints
    for role in ("init", "std", "fog"):
        save_file(torch.load(d / f"{role}.pt", weights_only=True), d / f"{role}.safetensors")
    result = run(
        "extract",
        d / "std.safetensors",
        d / "fog.safetensors",
        d / "init.safetensors",
        "-o",
        d / "x.rws",
        "--include",
        r"^0\.",
        "-q",
    )
    assert result.exit_code == 0, result.output
    assert rwsfmt.load(d / "x.rws").names == ["0.weight", "0.bias"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["std.pt", "fog.pt"], "--method subtract"),  # projection without INIT
        (["std.pt", "fog.pt", "missing.pt"], "missing.pt"),
        (["std.pt", "fog.pt", "init.pt", "--layers", "many"], "--layers"),
        (["std.pt", "fog.pt", "init.pt", "--energy", "2"], "--energy"),
        (["std.pt", "fog.pt", "init.pt", "--include", "["], "--include"),
        (["std.pt", "fog.pt", "init.pt", "--meta", "novalue"], "KEY=VALUE"),
        (["std.pt", "other.pt", "init.pt"], "'0.weight'"),
        (["std.pt", "notes.txt", "init.pt"], "notes.txt"),
        (["std.pt", "evil.pt", "init.pt"], "--trust-pickle"),
    ],
)
def test_bad_input_exits_2_and_writes_nothing(checkpoints, args, message):
    d = checkpoints
    other = torch.load(d / "fog.pt", weights_only=True)
    other["0.weight"] = torch.zeros(3, 3, 5, 5)
    torch.save(other, d / "other.pt")
    (d / "notes.txt").write_text("not a checkpoint")
    torch.save({"x": torch.zeros(1), "run": MakesFolder(str(d / "marker"))}, d / "evil.pt")
    before = set(os.listdir(d))
    result = run(
        "extract", *(d / a if a.endswith((".pt", ".txt")) else a for a in args), "-o", d / "out.rws"
    )
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ") and message in result.stderr
    assert "Traceback" not in result.output
    assert set(os.listdir(d)) == before  # no output, no temporary file, no marker


def test_missing_output_folder_fails_before_any_work(checkpoints):
    d = checkpoints
    result = run("extract", d / "std.pt", d / "fog.pt", d / "init.pt", "-o", d / "no" / "x.rws")
    assert result.exit_code == 2 and "output folder does not exist" in result.stderr


def test_help_groups_options_by_purpose():
    result = run("extract", "--help")
    assert result.exit_code == 0
    text = result.output
    for title in ("Output:", "Tensor selection:", "Method:", "Description:"):
        assert title in text
    assert text.index("Tensor selection:") < text.index("--energy") < text.index("Method:")


class MakesFolder:
    """A pickle payload that would create a folder if it were ever unpickled."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))
