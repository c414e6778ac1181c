"""`rwsfmt undo MODEL UNDO.rws`, apply of an undo file without --alpha, and --alpha lists."""

from __future__ import annotations

import pytest
import torch
from bitwise import assert_bit_equal
from click.testing import CliRunner
from test_patch import make_net

import rwsfmt
from rwsfmt_cli.main import main


def run(*args) -> tuple[int, str]:
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


@pytest.fixture
def trio(tmp_path):
    """std.pt and two signatures (fog.rws, snow.rws) extracted from checkpoints torch.save wrote."""
    for seed, role in enumerate(["init", "std", "fog", "snow"]):
        torch.save(make_net(seed).state_dict(), tmp_path / f"{role}.pt")
    for c in ("fog", "snow"):
        code, out = run(
            "extract",
            tmp_path / "std.pt",
            tmp_path / f"{c}.pt",
            tmp_path / "init.pt",
            "-o",
            tmp_path / f"{c}.rws",
            "--layers",
            "2",
        )
        assert code == 0, out
    return tmp_path


def load(path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)


def test_undo_command_restores_bit_for_bit(trio):
    std, patched, undo = trio / "std.pt", trio / "p.pt", trio / "undo.rws"
    code, out = run("apply", std, trio / "fog.rws", "-a", 0.8, "-o", patched, "--save-undo", undo)
    assert code == 0, out
    assert "rwsfmt undo" in out
    code, out = run("undo", patched, undo, "-o", trio / "restored.pt")
    assert code == 0, out
    before = load(std)
    assert_bit_equal(load(trio / "restored.pt"), before)
    # apply takes the undo file without --alpha too
    code, out = run("apply", patched, undo, "-o", trio / "again.pt")
    assert code == 0, out
    assert_bit_equal(load(trio / "again.pt"), before)


def test_undo_refuses_a_signature_and_apply_still_needs_alpha_for_one(trio):
    code, out = run("undo", trio / "std.pt", trio / "fog.rws", "-o", trio / "x.pt")
    assert code == 2 and "not an undo file" in out and "fix:" in out
    code, out = run("apply", trio / "std.pt", trio / "fog.rws", "-o", trio / "x.pt")
    assert code == 2 and "missing --alpha" in out and "--alpha 0.8,0.3" in out
    assert not (trio / "x.pt").exists()


def test_alpha_list_is_repeated_alpha(trio):
    sigs = [trio / "fog.rws", trio / "snow.rws"]
    outputs = {}
    for key, alphas in {"list": ["-a", "0.8,0.3"], "repeated": ["-a", 0.8, "-a", 0.3]}.items():
        outputs[key] = trio / f"{key}.pt"
        code, out = run("apply", trio / "std.pt", *sigs, *alphas, "-o", outputs[key])
        assert code == 0, out
    a, b = load(outputs["list"]), load(outputs["repeated"])
    assert all(torch.equal(a[n], b[n]) for n in a)
    fog, snow = (rwsfmt.load(s) for s in sigs)
    name = "features.0.weight"
    expected = load(trio / "std.pt")[name] + 0.8 * fog.tensor(name) + 0.3 * snow.tensor(name)
    torch.testing.assert_close(a[name], expected)


@pytest.mark.parametrize("alpha", ["0.8,x", "0.8,,0.3", "nan", "0.8,inf"])
def test_bad_alpha_lists_are_usage_errors(trio, alpha):
    code, out = run("apply", trio / "std.pt", trio / "fog.rws", "-a", alpha, "-o", trio / "x.pt")
    assert code == 2 and "--alpha" in out
    assert not (trio / "x.pt").exists()
