"""`rwsfmt compare` and `rwsfmt.compare`: cosine similarities and norms per layer."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import VECTORS

import rwsfmt
from rwsfmt.comparison import OVERALL, layer_of
from rwsfmt.dequant import dequantize
from rwsfmt.signature import SignatureBuilder, from_tensors
from rwsfmt_cli.main import main

EXACT = rwsfmt.QuantConfig(bits=32)
SHAPES = {"conv1.weight": (4, 3, 3, 3), "conv1.bias": (4,), "conv2.weight": (6, 4, 3, 3)}


def _tensors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=g) for name, shape in SHAPES.items()}


def _sig(label: str, tensors: dict[str, torch.Tensor], rel: float | None = 0.5, **extra):
    """An exact signature of `tensors`, recording `rel_norm` = rel for each (None: none)."""
    builder = SignatureBuilder(label, EXACT)
    for name, t in tensors.items():
        builder.add(name, t, stats={} if rel is None else {"rel_norm": rel})
    for name, t in extra.items():
        builder.add(name.replace("_", "."), t, kind="target")
    return builder.build()


def _save(folder: Path, label: str, tensors: dict[str, torch.Tensor], **kw) -> str:
    path = folder / f"{label}.rws"
    rwsfmt.save(_sig(label, tensors, **kw), path)
    return str(path)


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return float(a @ b / (a.norm() * b.norm()))


def _joined(tensors: dict[str, torch.Tensor], names) -> torch.Tensor:
    return torch.cat([tensors[n].flatten() for n in names])


def _run(*args: str):
    return CliRunner().invoke(main, ["compare", *args])


# ---- dequantization without torch


@pytest.mark.parametrize("path", sorted(VECTORS.glob("*.rws")), ids=lambda p: p.stem)
def test_numpy_dequantization_matches_torch_bit_for_bit_on_the_golden_files(path):
    with rwsfmt.load(path) as sig:
        for name in sig.names:
            got = dequantize(sig.payload(name), sig.info(name))
            want = sig.tensor(name).numpy()
            assert got.dtype == np.float32 and got.shape == want.shape
            assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), name


@pytest.mark.parametrize("bits", [4, 8, 16, 32])
@pytest.mark.parametrize("granularity", ["channel", "tensor", "group"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_numpy_dequantization_matches_torch_bit_for_bit(bits, granularity, symmetric):
    quant = rwsfmt.QuantConfig(
        bits=bits, granularity=granularity, symmetric=symmetric, group_size=7
    )
    g = torch.Generator().manual_seed(bits)
    tensors = {
        "conv": torch.randn(5, 3, 3, 3, generator=g),
        "odd": 1e-3 * torch.randn(13, generator=g),  # a short last group
        "zero": torch.zeros(2, 4),
    }
    sig = from_tensors(tensors, label="x", quant=quant)
    for name in sig.names:
        got = dequantize(sig.payload(name), sig.info(name))
        want = sig.tensor(name).numpy()
        assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), name


# ---- the library


def test_cosines_norms_and_layers_match_a_direct_computation():
    ts = [_tensors(seed) for seed in range(3)]
    ts[2] = {name: t + 2 * ts[0][name] for name, t in ts[2].items()}  # alike signature 0
    sigs = [
        _sig(label, t, rel=0.1 * (i + 1))
        for i, (label, t) in enumerate(zip("abc", ts, strict=True))
    ]
    result = rwsfmt.compare(sigs)
    assert [layer.name for layer in result.layers] == ["conv1", "conv2"]
    assert result.layers[0].tensors == ("conv1.weight", "conv1.bias")
    assert result.layers[0].parameters == 4 * 27 + 4
    assert result.overall.name == OVERALL and result.overall.parameters == 112 + 216
    for layer in [*result.layers, result.overall]:
        for i in range(3):
            assert layer.cosine[i][i] == pytest.approx(1.0)
            a = _joined(ts[i], layer.tensors)
            assert layer.norm[i] == pytest.approx(float(a.double().norm()), rel=1e-9)
            # every tensor records the same rel_norm, so the layer's is that one too
            assert layer.rel_norm[i] == pytest.approx(0.1 * (i + 1), rel=1e-9)
            for j in range(3):
                b = _joined(ts[j], layer.tensors)
                assert layer.cosine[i][j] == pytest.approx(_cos(a, b), abs=1e-9)
    assert result.overall.cosine[0][2] > 0.8 > abs(result.overall.cosine[0][1])
    assert result.relative and not result.partial and result.targets_left_out == 0
    pairs = result.layers[0].pairs()
    assert [(i, j) for i, j, _ in pairs] == [(0, 1), (0, 2), (1, 2)]
    assert result.layers[0].mean_cosine == pytest.approx(math.fsum(c for *_, c in pairs) / 3)
    assert result.layers[0].least_similar[2] == min(c for *_, c in pairs)


def test_layer_norm_relative_to_std_weighs_each_tensor_by_its_std_norm():
    w, b = torch.ones(4, 3, 3, 3), torch.ones(4)  # ||w||^2 = 108, ||b||^2 = 4
    builder = SignatureBuilder("a", EXACT)
    builder.add("conv1.weight", w, stats={"rel_norm": 0.5})  # ||std_w||^2 = 108 / 0.25
    builder.add("conv1.bias", b, stats={"rel_norm": 0.1})  # ||std_b||^2 = 4 / 0.01
    sig = builder.build()
    layer = rwsfmt.compare([sig, sig]).layers[0]
    assert layer.rel_norm[0] == pytest.approx(math.sqrt(112 / (432 + 400)))


def test_ranking_puts_the_layer_where_signatures_differ_most_first():
    g = torch.Generator().manual_seed(0)
    common = {name: torch.randn(shape, generator=g) for name, shape in SHAPES.items()}
    sigs = []
    for label in "abc":
        own = {name: torch.randn(shape, generator=g) for name, shape in SHAPES.items()}
        # conv2: mostly the common direction; conv1: mostly their own
        sigs.append(_sig(label, {n: (3 if "2" in n else 0.1) * common[n] + own[n] for n in SHAPES}))
    result = rwsfmt.compare(sigs)
    assert [layer.name for layer in result.ranking()] == ["conv1", "conv2"]
    assert result.to_json()["ranking"] == ["conv1", "conv2"]


def test_paths_and_signatures_alike_and_labels_made_unique(tmp_path):
    t = _tensors(0)
    (tmp_path / "x").mkdir()
    paths = [_save(tmp_path, "fog", t), _save(tmp_path / "x", "fog", _tensors(1))]
    nameless = from_tensors(_tensors(2), label="", quant=EXACT)
    result = rwsfmt.compare([*paths, nameless, _sig("fog #1", t)])
    assert result.labels == ["fog #2", "fog #3", "signature 3", "fog #1"]
    assert result.signatures[0].path == paths[0]
    assert result.overall.cosine[0][3] == pytest.approx(1.0)
    # a file without a label goes by its name
    rwsfmt.save(nameless, tmp_path / "blank.rws")
    assert rwsfmt.compare([tmp_path / "blank.rws", paths[0]]).labels == ["blank", "fog"]


def test_one_layer_only():
    sigs = [_sig(label, _tensors(seed)) for seed, label in enumerate("ab")]
    result = rwsfmt.compare(sigs, layer="conv2")
    assert [layer.name for layer in result.layers] == ["conv2"]
    assert result.overall.name == "conv2" and result.overall.tensors == ("conv2.weight",)
    assert not result.partial  # other layers were left out on request


def test_unknown_layer_lists_the_layers_there_are():
    sigs = [_sig(label, _tensors(seed)) for seed, label in enumerate("ab")]
    with pytest.raises(rwsfmt.RwsError, match="(?s)no layer 'conv9'.*one of: conv1, conv2"):
        rwsfmt.compare(sigs, layer="conv9")
    with pytest.raises(rwsfmt.RwsError, match="is a tensor of layer 'conv1'"):
        rwsfmt.compare(sigs, layer="conv1.weight")


def test_partial_overlap_compares_the_shared_tensors_and_says_what_was_left_out():
    a = _tensors(0)
    b = {k: v for k, v in _tensors(1).items() if k != "conv2.weight"}
    b["head.weight"] = torch.ones(2, 2)
    result = rwsfmt.compare([_sig("a", a), _sig("b", b)])
    assert result.overall.tensors == ("conv1.weight", "conv1.bias")
    assert result.partial
    assert [s.left_out for s in result.signatures] == [("conv2.weight",), ("head.weight",)]


def test_targets_are_left_out_and_counted():
    t = _tensors(0)
    sigs = [_sig(label, t, bn_running_var=torch.ones(4)) for label in "ab"]
    result = rwsfmt.compare(sigs)
    assert "bn.running_var" not in result.overall.tensors
    assert result.targets_left_out == 2


def test_zero_signature_has_no_cosine_and_no_relative_norm_without_statistics():
    zero = {name: torch.zeros(shape) for name, shape in SHAPES.items()}
    result = rwsfmt.compare([_sig("a", _tensors(0)), _sig("b", zero), _sig("c", _tensors(1))])
    assert result.overall.cosine[0][1] is None and result.overall.cosine[1][1] is None
    assert result.overall.pairs()[0][:2] == (0, 2)  # only the defined pair counts
    merged = rwsfmt.merge([_sig("a", _tensors(0)), _sig("c", _tensors(1))])  # records none
    result = rwsfmt.compare([merged, _sig("a", _tensors(0))])
    assert result.overall.rel_norm[0] is None and not result.relative
    assert result.to_json()["overall"]["rel_norm"][0] is None


@pytest.mark.parametrize(
    "other, match",
    [
        ({"conv1.weight": torch.ones(8, 3, 3, 3)}, r"'conv1.weight' is delta \[8, 3, 3, 3\] in"),
        ({"bert.embeddings.weight": torch.ones(4, 4)}, "no signature tensor is held by all 2"),
    ],
)
def test_different_architectures_are_refused_naming_the_files(tmp_path, other, match):
    a = _save(tmp_path, "vgg", _tensors(0))
    b = _save(tmp_path, "other", other)
    with pytest.raises(rwsfmt.RwsError, match=match) as info:
        rwsfmt.compare([a, b])
    assert "vgg.rws" in str(info.value) and "other.rws" in str(info.value)


def test_fewer_than_two_signatures_is_an_error():
    with pytest.raises(rwsfmt.RwsError, match="at least two signatures"):
        rwsfmt.compare([_sig("a", _tensors(0))])


def test_one_path_alone_is_one_signature_not_a_list_of_characters(tmp_path):
    path = _save(tmp_path, "fog", _tensors(0))
    for one in (path, str(path), _sig("a", _tensors(0))):
        with pytest.raises(rwsfmt.RwsError, match="at least two signatures, got 1"):
            rwsfmt.compare(one)


def test_each_tensor_is_decoded_once_per_signature_one_name_at_a_time(monkeypatch):
    import rwsfmt.comparison as comparison

    seen: list[str] = []
    decode = comparison._decode
    monkeypatch.setattr(
        comparison, "_decode", lambda src, name, out: (seen.append(name), decode(src, name, out))
    )
    sigs = [_sig(label, _tensors(seed)) for seed, label in enumerate("abc")]
    rwsfmt.compare(sigs)
    assert seen == [name for name in SHAPES for _ in range(3)]


def test_layer_of():
    assert layer_of("features.0.weight") == "features.0"
    assert layer_of("cls_token") == "cls_token"


# ---- the command line


@pytest.fixture
def three(tmp_path) -> list[str]:
    return [
        _save(tmp_path, label, _tensors(seed))
        for seed, label in enumerate(["fog", "snow", "frost"])
    ]


def test_tables_fit_80_columns_and_name_every_signature(three, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    result = _run(*three)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert max(map(len, lines)) <= 80
    for text in ("1 fog", "2 snow", "3 frost", "conv1", "conv2", "mean cos", "||RWS|| / ||std||"):
        assert text in result.output
    assert "differ most first" in result.output


def test_many_signatures_wrap_into_blocks_that_fit(tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    paths = [_save(tmp_path, f"corruption_{i:02d}", _tensors(i)) for i in range(19)]
    result = _run(*paths)
    assert result.exit_code == 0, result.output
    assert max(map(len, result.output.splitlines())) <= 80
    assert "19 corruption_18" in result.output


def test_json_is_one_object_with_every_matrix(three):
    result = _run(*three, "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert [s["label"] for s in doc["signatures"]] == ["fog", "snow", "frost"]
    assert [layer["name"] for layer in doc["layers"]] == ["conv1", "conv2"]
    assert len(doc["overall"]["cosine"]) == 3 and doc["overall"]["cosine"][1][1] == 1.0
    assert sorted(doc["ranking"]) == ["conv1", "conv2"]
    assert doc["norms_relative_to_std"] is True and doc["overall"]["rel_norm"] == [0.5] * 3
    assert set(doc["layers"][0]["least_similar"]) == {"signatures", "cosine"}


def test_one_layer_on_the_command_line(three):
    result = _run(*three, "--layer", "conv2")
    assert result.exit_code == 0, result.output
    assert "layer conv2" in result.output and "differ most first" not in result.output


def test_absolute_norms_are_said_to_be_so(tmp_path):
    paths = [_save(tmp_path, label, _tensors(seed), rel=None) for seed, label in enumerate("ab")]
    result = _run(*paths)
    assert result.exit_code == 0, result.output
    assert "absolute" in result.output and "no norm relative to the std weight" in result.output


def test_labels_are_printed_as_text_not_markup(tmp_path):
    odd = tmp_path / "odd.rws"
    rwsfmt.save(_sig("[bold red]x[/]", _tensors(0)), odd)
    result = _run(str(odd), _save(tmp_path, "y", _tensors(1)))
    assert result.exit_code == 0, result.output
    assert "1 [bold red]x[/]" in result.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["ONE"], "at least two signatures"),
        (["ONE", "missing.rws"], "missing.rws"),
        (["ONE", "OTHER_ARCH"], "different architectures"),
        (["ONE", "TWO", "--layer", "nope"], "no layer 'nope'"),
        (["ONE", "TWO", "--plot", "figure.jpg"], "does not end in .png"),
        (["ONE", "TWO", "--plot", "missing-folder/f.png"], "folder does not exist"),
    ],
)
def test_bad_input_exits_2_with_a_clear_message_and_writes_nothing(
    tmp_path, monkeypatch, args, message
):
    monkeypatch.chdir(tmp_path)
    files = {
        "ONE": _save(tmp_path, "one", _tensors(0)),
        "TWO": _save(tmp_path, "two", _tensors(1)),
        "OTHER_ARCH": _save(tmp_path, "other", {"conv1.weight": torch.ones(2, 2)}),
    }
    before = sorted(p.name for p in tmp_path.iterdir())
    plot = [] if "--plot" in args else ["--plot", "out.png"]  # nor a figure
    result = _run(*(files.get(a, a) for a in args), *plot)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_plot_may_not_overwrite_an_input(tmp_path):
    png = tmp_path / "a.png"
    rwsfmt.save(_sig("a", _tensors(0)), png)  # a signature file named .png
    other = _save(tmp_path, "b", _tensors(1))
    result = _run(str(png), other, "--plot", str(png))
    assert result.exit_code == 2 and "would overwrite the input signature" in result.output


def test_plot_writes_a_png(three, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "figure.png"
    result = _run(*three, "--plot", str(out))
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"wrote {out}" in result.output
    assert not [p for p in tmp_path.iterdir() if "rwsfmt-tmp" in p.name]


def test_plot_without_matplotlib_names_the_extra(three, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now fails
    out = tmp_path / "figure.png"
    result = _run(*three, "--plot", str(out))
    assert result.exit_code == 2
    assert "needs matplotlib" in result.output and "pip install 'rwsfmt[plot]'" in result.output
    assert not out.exists()


def test_compare_does_not_import_torch(three):
    code = (
        "import sys\n"
        "from rwsfmt_cli.main import main\n"
        "try:\n"
        f"    main(['compare', *{three!r}])\n"
        "except SystemExit as e:\n"
        "    assert e.code == 0, e.code\n"
        "print('torch' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "False"
