"""Tables never split a tensor name inside a word: they fold after a '.' (100 and 80 columns)."""

from __future__ import annotations

import re

import pytest
import torch
from architectures import tiny_bert_config
from click.testing import CliRunner

import rwsfmt
from rwsfmt_cli.main import main

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    """init/std/fog/snow folders of a tiny BERT written by save_pretrained, and two
    signatures extracted from them: names such as
    bert.encoder.layer.0.attention.output.LayerNorm.weight (54 characters)."""
    d = tmp_path_factory.mktemp("bert")
    config = tiny_bert_config()
    for seed, role in enumerate(["init", "std", "fog", "snow"]):
        torch.manual_seed(seed)
        transformers.BertModel(config).save_pretrained(d / role)
    for corruption in ("fog", "snow"):
        sig = rwsfmt.extract(d / "std", d / corruption, d / "init", layers="all")
        rwsfmt.save(sig, d / f"{corruption}.rws")
    return d


def first_words(text: str) -> list[str]:
    """The first word of every line below a table's header rule."""
    words, inside = [], False
    for line in text.splitlines():
        if line.strip().startswith("─"):
            inside = True
        elif not line.strip() or not line.startswith(" "):
            inside = False
        elif inside:
            words.append(line.split()[0])
    return words


def assert_folded_at_dots(text: str, names: list[str], columns: int) -> None:
    """Every line fits; every name-column piece is whole parts of a name; every name reads
    whole from its pieces."""
    assert max(map(len, text.splitlines())) <= columns
    assert "…" not in re.sub(r"[0-9a-f]+…", "", text)  # digests are shortened on purpose
    pieces = [w for w in first_words(text) if not w.isdigit()]  # compare's "1 fog" rows
    dotted = [f".{n}." for n in names]
    for piece in pieces:
        whole_parts = f".{piece.rstrip('.')}."
        assert any(whole_parts in n for n in dotted), f"{piece!r} splits a word"
    joined = "".join(pieces)
    assert all(n in joined for n in names)


@pytest.mark.parametrize("columns", [100, 80])
@pytest.mark.parametrize("command", ["inspect", "extract", "compare"])
def test_names_fold_after_dots(bert, tmp_path, command, columns):
    d = bert
    args = {
        "inspect": ["inspect", d / "fog.rws", "--all"],
        "extract": [
            "extract",
            d / "std",
            d / "fog",
            d / "init",
            "--layers",
            "all",
            "-o",
            tmp_path / "x.rws",
        ],
        "compare": ["compare", d / "fog.rws", d / "snow.rws"],
    }[command]
    result = CliRunner(env={"COLUMNS": str(columns)}).invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    names = rwsfmt.load(d / "fog.rws").names
    if command == "compare":  # layers: names without their last part
        names = sorted({n.rpartition(".")[0] for n in names})
    long = [n for n in names if len(n) > 40]
    assert long  # the case that used to break
    assert_folded_at_dots(result.stdout, names, columns)
