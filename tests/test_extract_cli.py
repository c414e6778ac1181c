"""`rwsfmt extract` on the command line: files written, summary table, errors and exit codes."""

from __future__ import annotations

import json
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


# ------------------------------------------------------------------ storage (format 1.2)


@pytest.mark.parametrize(
    "args, quant, stored",
    [
        (["--bits", "1"], {"bits": 1}, {"scheme": "sign", "granularity": "channel"}),
        (["--bits", "2"], {"bits": 2}, {"scheme": "int2", "symmetric": True}),
        (
            ["--bits", "2", "--affine", "--granularity", "tensor"],
            {"bits": 2, "symmetric": False, "granularity": "tensor"},
            {"scheme": "int2", "symmetric": False, "granularity": "tensor"},
        ),
        (
            ["--bits", "1", "--density", "0.1"],
            {"bits": 1, "density": 0.1},
            {"scheme": "sparse", "values": {"scheme": "sign", "bits": 1}},
        ),
        (
            ["--bits", "4", "--density", "0.25", "--sparsity", "channel"],
            {"bits": 4, "density": 0.25, "sparsity": "channel"},
            {"scheme": "sparse", "values": {"scheme": "linear", "bits": 4}},
        ),
        (
            ["--bits", "2", "--density", "0.5", "--granularity", "group", "--group-size", "8"],
            {"bits": 2, "density": 0.5, "granularity": "group", "group_size": 8},
            {"scheme": "sparse", "values": {"scheme": "int2", "group_size": 8}},
        ),
        (
            ["--bits", "32", "--density", "0.3"],
            {"bits": 32, "density": 0.3},
            {"scheme": "sparse", "values": {"scheme": "float", "bits": 32}},
        ),
    ],
)
def test_storage_options_reach_the_file_and_verify(checkpoints, args, quant, stored):
    d = checkpoints
    out = d / "fog.rws"
    result = run("extract", d / "std.pt", d / "fog.pt", d / "init.pt", "-o", out, "-q", *args)
    assert result.exit_code == 0, result.output
    assert result.stderr == ""  # every option given has an effect: no warning
    assert run("verify", out).exit_code == 0
    sig = rwsfmt.load(out)
    assert sig.quant == rwsfmt.QuantConfig(**quant)
    conv = sig.info("0.weight")
    assert _within(conv.quant, stored), conv.quant
    if quant.get("density", 1) < 1:  # the share asked of the 81 entries, or of each channel's 27
        by_channel = quant.get("sparsity") == "channel"
        density = quant["density"]
        assert conv.nnz == (3 * round(density * 27) if by_channel else round(density * 81))
    targets = [i for i in sig.infos if i.kind == "target"]
    assert targets and all(i.quant == {"scheme": "float", "bits": 32} for i in targets)


def _within(quant: dict, expected: dict) -> bool:
    """Whether `quant` holds every key of `expected` (nested objects too) with its value."""
    for key, value in expected.items():
        if isinstance(value, dict):
            if not _within(quant.get(key, {}), value):
                return False
        elif quant.get(key) != value:
            return False
    return True


@pytest.mark.parametrize(
    "args, message, fix",
    [
        (["--bits", "1", "--affine"], "--bits 1 stores signs", "drop --affine, or give --bits 2"),
        (["--density", "0"], "--density 0 is not a share", "e.g. --density 0.1"),
        (["--density", "1.5"], "--density 1.5 is not a share", "e.g. --density 0.1"),
        (["--density", "nan"], "--density nan is not a share", "e.g. --density 0.1"),
        (
            ["--target-bpp", "0.5"],
            "--target-bpp is the budget of --bits auto; it does not apply to --bits 8",
            "add --bits auto",
        ),
        (
            ["--bits", "4", "--target-bpp", "0.5"],
            "it does not apply to --bits 4",
            "add --bits auto",
        ),
        (["--bits", "auto"], "--bits auto needs --target-bpp B", "--bits auto --target-bpp 0.5"),
        (
            ["--bits", "auto", "--target-bpp", "0"],
            "--target-bpp 0 is not a number of bits per parameter",
            "--bits auto --target-bpp 0.5",
        ),
        (["--bits", "3"], "--bits 3 is not a width rwsfmt stores", "use --bits 1, 2, 4, 8, 16"),
    ],
)
def test_bad_storage_options_are_usage_errors_with_a_fix(checkpoints, args, message, fix):
    d = checkpoints
    before = set(os.listdir(d))
    result = run("extract", d / "std.pt", d / "fog.pt", d / "init.pt", "-o", d / "o.rws", *args)
    assert result.exit_code == 2, result.output
    error, fix_line = result.stderr.splitlines()
    assert error.startswith("error: ") and message in error, error
    assert fix_line.startswith("  fix: ") and fix in fix_line, fix_line
    assert set(os.listdir(d)) == before


@pytest.mark.parametrize(
    "args, warning",
    [
        (["--sparsity", "channel"], "--sparsity has no effect"),
        (["--bits", "32", "--granularity", "group"], "--granularity has no effect"),
        (["--bits", "1", "--symmetric"], "--affine/--symmetric has no effect"),
        (["--bits", "2", "--group-size", "8"], "--group-size has no effect"),
    ],
)
def test_storage_options_without_effect_warn(checkpoints, args, warning):
    d = checkpoints
    out = d / "w.rws"
    result = run("extract", d / "std.pt", d / "fog.pt", d / "init.pt", "-o", out, "-q", *args)
    assert result.exit_code == 0, result.output
    assert f"warning: {warning}" in result.stderr and "fix: " in result.stderr
    assert rwsfmt.verify(out).ok


@pytest.fixture(scope="module")
def vgg(tmp_path_factory):
    """The six shallowest convolutions of VGG-16 at half width (32 to 128 channels): init,
    and std and robust moved from it by heavy-tailed (Laplace) steps whose scale varies by
    output channel, as trained deltas do. The default 5 layers hold 139,424 parameters."""
    d = tmp_path_factory.mktemp("vgg")
    g = torch.Generator().manual_seed(0)
    widths = [(3, 32), (32, 32), (32, 64), (64, 64), (64, 128), (128, 128)]
    init = {}
    for index, (cin, cout) in zip((0, 2, 5, 7, 10, 12), widths, strict=True):
        init[f"features.{index}.weight"] = (
            torch.randn(cout, cin, 3, 3, generator=g) / (4.5 * cin) ** 0.5
        )
        init[f"features.{index}.bias"] = torch.zeros(cout)

    def moved(scale: float) -> dict:
        out = {}
        for name, v in init.items():
            u = torch.rand(v.shape, generator=g) - 0.5
            laplace = -torch.sign(u) * torch.log1p(-2 * u.abs())
            channel = torch.exp(0.7 * torch.randn(v.shape[0], generator=g))
            out[name] = v + scale * channel.view(-1, *[1] * (v.dim() - 1)) * laplace
        return out

    torch.save(init, d / "init.pt")
    torch.save(moved(0.002), d / "std.pt")
    torch.save(moved(0.003), d / "robust.pt")
    return d


def test_bits_auto_fits_the_target_over_the_whole_file(vgg):
    """Measured (seed 0): 0.4853 bits per parameter for a target of 0.5 (0.9925 for 1)."""
    target = 0.5
    out = vgg / "auto.rws"
    args = ["--bits", "auto", "--target-bpp", target, "--json"]
    result = run("extract", vgg / "std.pt", vgg / "robust.pt", vgg / "init.pt", "-o", out, *args)
    assert result.exit_code == 0, result.output
    assert result.stderr == ""  # it fits: no warning
    parameters = sum(info.numel for info in rwsfmt.load(out).infos)
    assert parameters == 139_424
    bits = 8 * os.path.getsize(out) / parameters
    assert json.loads(result.stdout)["bits_per_parameter"] == bits
    assert 0.9 * target <= bits <= target  # every byte counted, header included
    sig = rwsfmt.load(out)
    assert sig.quant == rwsfmt.QuantConfig(bits="auto", target_bpp=target)
    assert len({info.scheme for info in sig.infos}) > 1  # a scheme per tensor
    assert run("verify", out).exit_code == 0
