"""Likely mistakes are warned about (`warning: ...` on stderr, `rwsfmt.RwsWarning` in Python)
and never change the exit code: the same checkpoint twice, an all-zero signature, --layers
past the model, options that have no effect, a signature given twice, |alpha| > 2."""

from __future__ import annotations

import shutil
import warnings

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file
from test_patch import make_net, make_sig

import rwsfmt
from rwsfmt_cli.main import main


def run(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


def warned(result) -> list[str]:
    """The `warning: ...` lines of a run (stderr), checked to be on stderr only."""
    assert "warning:" not in result.stdout
    return [line for line in result.stderr.splitlines() if line.startswith("warning: ")]


@pytest.fixture
def ckpts(tmp_path):
    """init, std and robust safetensors checkpoints of a 6-conv net."""
    torch.manual_seed(0)
    init = torch.nn.Sequential(*(torch.nn.Conv2d(3, 3, 3) for _ in range(6))).state_dict()
    for role, seed in (("init", 0), ("std", 1), ("robust", 2)):
        g = torch.Generator().manual_seed(seed)
        sd = {
            k: v + (0.05 * torch.randn(v.shape, generator=g) if seed else 0)
            for k, v in init.items()
        }
        save_file(sd, tmp_path / f"{role}.safetensors")
    return tmp_path


@pytest.fixture
def sigs(tmp_path):
    """A model and two signatures, plus a byte copy of the first."""
    model = make_net()
    save_file(model.state_dict(), tmp_path / "model.safetensors")
    rwsfmt.save(make_sig(model, 1, label="fog"), tmp_path / "fog.rws")
    rwsfmt.save(make_sig(model, 2, label="snow"), tmp_path / "snow.rws")
    shutil.copy(tmp_path / "fog.rws", tmp_path / "fog-copy.rws")
    return tmp_path


def extract(d, std="std", robust="robust", init="init", *options):
    return run(
        "extract",
        *(d / f"{r}.safetensors" for r in (std, robust, init)),
        "-o",
        d / "out.rws",
        *options,
    )


def test_a_clean_extract_warns_nothing(ckpts):
    result = extract(ckpts)
    assert result.exit_code == 0 and warned(result) == []


def test_std_given_as_robust_is_warned_and_the_zero_signature_too(ckpts):
    result = extract(ckpts, "std", "std")
    assert result.exit_code == 0
    lines = warned(result)
    assert any("STD and ROBUST are the same file" in line for line in lines), lines
    assert any("the signature is all zero" in line for line in lines), lines
    assert "fix: check that ROBUST is the robust model" in result.stderr


def test_a_copy_is_the_same_bytes(ckpts):
    shutil.copy(ckpts / "std.safetensors", ckpts / "copy.safetensors")
    result = extract(ckpts, "std", "robust", "copy")
    assert result.exit_code == 0
    assert any("STD and INIT hold the same bytes" in line for line in warned(result))


def test_more_layers_than_the_model_has(ckpts):
    result = extract(ckpts, "std", "robust", "init", "--layers", "9")
    assert result.exit_code == 0
    [line] = warned(result)
    assert "--layers 9 asks for more layers than the model has (6): all 6 are kept" in line
    assert "fix: use --layers all, or at most 6" in result.stderr


def test_options_without_effect(ckpts):
    result = extract(ckpts, "std", "robust", "init", "--group-size", "64")
    assert result.exit_code == 0
    [line] = warned(result)
    assert "--group-size has no effect" in line
    grouped = extract(ckpts, "std", "robust", "init", "--group-size", "9", "--granularity", "group")
    assert grouped.exit_code == 0 and warned(grouped) == []
    exact = extract(ckpts, "std", "robust", "init", "--bits", "32", "--affine")
    assert any("--affine/--symmetric has no effect" in line for line in warned(exact))


def test_quiet_keeps_warnings(ckpts):
    result = extract(ckpts, "std", "std", "init", "--quiet")
    assert result.exit_code == 0 and result.stdout == ""
    assert warned(result)


@pytest.mark.parametrize("twin", ["fog.rws", "fog-copy.rws"])
def test_the_same_signature_twice(sigs, twin):
    model = sigs / "model.safetensors"
    result = run("apply", model, sigs / "fog.rws", sigs / twin, "-a", "0.5", "--dry-run")
    result_merge = run("merge", sigs / "fog.rws", sigs / twin, "-o", sigs / "m.rws")
    how = "is the same file as" if twin == "fog.rws" else "holds the same tensors as"
    for r, consequence in ((result, "applied twice"), (result_merge, "counts twice")):
        assert r.exit_code == 0
        [line] = warned(r)
        assert f"signature 2 ({sigs / twin}) {how} signature 1" in line and consequence in line
    different = run("merge", sigs / "fog.rws", sigs / "snow.rws", "-o", sigs / "m2.rws")
    assert different.exit_code == 0 and warned(different) == []


def test_alpha_outside_minus_two_two(sigs):
    out = sigs / "out.safetensors"
    result = run("apply", sigs / "model.safetensors", sigs / "fog.rws", "-a", "3", "-o", out)
    assert result.exit_code == 0
    [line] = warned(result)
    assert "alpha 3 for 'fog' lies outside [-2, 2]" in line
    assert "fix: use --alpha between -2 and 2" in result.stderr
    edge = run("apply", sigs / "model.safetensors", sigs / "fog.rws", "-a", "-2", "-o", out)
    assert edge.exit_code == 0 and warned(edge) == []


def test_python_gets_rws_warnings_spelled_for_python(ckpts, sigs):
    with pytest.warns(rwsfmt.RwsWarning, match="layers=9 asks for more layers"):
        rwsfmt.extract(*(ckpts / f"{r}.safetensors" for r in ("std", "robust", "init")), layers=9)
    state = make_net().state_dict()
    with pytest.warns(rwsfmt.RwsWarning, match="use an alpha between -2 and 2"):
        rwsfmt.apply(state, [(rwsfmt.load(sigs / "fog.rws"), 2.5)])
    with warnings.catch_warnings():
        warnings.simplefilter("error", rwsfmt.RwsWarning)  # turns them into errors
        with pytest.raises(rwsfmt.RwsWarning, match="same file"):
            rwsfmt.apply(state, [(sigs / "fog.rws", 0.5), (sigs / "fog.rws", 0.5)])
