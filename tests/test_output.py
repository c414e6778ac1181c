"""Output that reads everywhere: tables that never cut a name or a number (60 columns, pipes),
--json and --quiet on every command, `inspect` of several files, one error style."""

from __future__ import annotations

import json
import re

import pytest
import torch
from click.testing import CliRunner
from conftest import VECTORS
from safetensors.torch import save_file

import rwsfmt
from rwsfmt_cli.main import main

LONG = "model.encoder.layers.11.self_attention.query_key_value.weight"
COMMANDS = ["extract", "apply", "inspect", "verify", "merge", "compare", "convert", "export"]


def run(*args: object, columns: int | None = None):
    env = {"COLUMNS": str(columns)} if columns else {"COLUMNS": ""}
    return CliRunner(env=env).invoke(main, [str(a) for a in args])


def _sig(path, seed: int, label: str):
    g = torch.Generator().manual_seed(seed)
    tensors = {
        LONG: torch.randn(48, 16, generator=g),
        "conv1.weight": torch.randn(8, 3, 3, 3, generator=g),
    }
    rwsfmt.save(rwsfmt.from_tensors(tensors, label=label), path)
    return path


@pytest.fixture
def files(tmp_path):
    """Two signatures with a 60-character tensor name, and checkpoints holding it."""
    for role, seed in (("init", 0), ("std", 1), ("robust", 2)):
        g = torch.Generator().manual_seed(seed)
        state = {LONG: torch.randn(48, 16, generator=g), "conv1.weight": torch.randn(8, 3, 3, 3)}
        save_file(state, tmp_path / f"{role}.safetensors")
    _sig(tmp_path / "fog.rws", 1, "fog")
    _sig(tmp_path / "snow.rws", 2, "snow")
    return tmp_path


def _name_column(text: str) -> str:
    """The first word of every line, joined: a name folded onto several lines of a table's
    first column reads whole again."""
    return "".join(line.split()[0] for line in text.splitlines() if line.split())


def _numbers(text: str) -> set[str]:
    return set(re.findall(r"-?\d[\d,]*\.\d+(?:e[-+]\d+)?", text))


def _outputs(d) -> dict[str, list[object]]:
    """Commands that print tables, by what they print."""
    return {
        "inspect": ["inspect", d / "fog.rws"],
        "compare": ["compare", d / "fog.rws", d / "snow.rws"],
        "extract": [
            "extract",
            *(d / f"{r}.safetensors" for r in ("std", "robust", "init")),
            "--layers",
            "all",
            "-o",
            d / "out.rws",
        ],
    }


@pytest.mark.parametrize("command", ["inspect", "compare", "extract"])
def test_tables_cut_nothing_at_60_columns_and_keep_rows_whole_in_a_pipe(files, command):
    args = _outputs(files)[command]
    piped = run(*args)
    assert piped.exit_code == 0, piped.output
    narrow = run(*args, columns=60)
    assert narrow.exit_code == 0, narrow.output
    layer = LONG.rsplit(".", 1)[0] if command == "compare" else LONG
    hashes = re.compile(r"[0-9a-f]+…")  # inspect shortens digests on purpose: not numbers
    assert "…" not in hashes.sub("", piped.output + narrow.output)
    assert max(map(len, narrow.stdout.splitlines())) <= 60
    assert layer in _name_column(narrow.stdout)  # folded, never cut
    # in a pipe every row is one line: the name whole, and its numbers on the same line
    row = next(line for line in piped.stdout.splitlines() if line.split()[:1] == [layer])
    assert _numbers(row) and _numbers(row) <= _numbers(narrow.stdout)  # every number whole
    assert _numbers(piped.stdout) == _numbers(narrow.stdout)


@pytest.mark.parametrize("command", [*COMMANDS, "import"])
def test_every_command_takes_json_and_quiet(command):
    result = run(command, "--help")
    assert result.exit_code == 0
    assert "--json" in result.output and "--quiet" in result.output


def test_json_of_extract_and_apply(files):
    d = files
    ckpts = [d / f"{r}.safetensors" for r in ("std", "robust", "init")]
    result = run("extract", *ckpts, "-o", d / "x.rws", "--json")
    doc = json.loads(result.stdout)
    assert doc["label"] == "x"  # robust.safetensors is generic: -o x.rws names it
    assert LONG in [t["name"] for t in doc["tensors"]]
    out = d / "patched.safetensors"
    result = run("apply", d / "std.safetensors", d / "x.rws", "-a", "0.5", "-o", out, "--json")
    doc = json.loads(result.stdout)
    assert doc["written"] and doc["output"] == str(out) and len(doc["changes"]) == 2
    assert doc["signatures"] == [{"path": str(d / "x.rws"), "alpha": 0.5}]


def test_inspect_takes_several_files(files, tmp_path):
    both = run("inspect", files / "fog.rws", files / "snow.rws")
    assert both.exit_code == 0
    assert both.stdout.count(str(files / "fog.rws")) == 1 and "snow" in both.stdout
    docs = json.loads(run("inspect", "--json", files / "fog.rws", files / "snow.rws").stdout)
    assert [d["label"] for d in docs] == ["fog", "snow"]
    (tmp_path / "notes.txt").write_text("hello")
    mixed = run("inspect", files / "fog.rws", tmp_path / "notes.txt")
    assert mixed.exit_code == 2 and "fog" in mixed.stdout
    assert f"error: {tmp_path / 'notes.txt'}: not a .rws file" in mixed.stderr
    docs = json.loads(run("inspect", "--json", files / "fog.rws", tmp_path / "notes.txt").stdout)
    assert docs[1]["error"] == "not a .rws file"
    single = json.loads(run("inspect", "--json", files / "fog.rws").stdout)
    assert single["label"] == "fog"  # one file: one object, as before


def test_quiet_prints_nothing_and_keeps_the_exit_code(files, tmp_path):
    assert run("inspect", "-q", files / "fog.rws").stdout == ""
    damaged = tmp_path / "damaged.rws"
    data = bytearray((VECTORS / "sym8_channel.rws").read_bytes())
    data[-3] ^= 0x10
    damaged.write_bytes(data)
    result = run("verify", "-q", files / "fog.rws", damaged)
    assert result.exit_code == 1 and result.output == ""


def test_one_error_style(files):
    usage = run("apply", files / "std.safetensors", files / "fog.rws")
    assert usage.exit_code == 2
    assert usage.stderr.startswith("error: missing --alpha")
    assert "fix: add --alpha 0.8" in usage.stderr and "Usage:" not in usage.stderr
    library = run("extract", files / "std.safetensors", files / "robust.safetensors", "-o", "x.rws")
    assert library.exit_code == 2
    assert "fix: pass INIT as the third checkpoint, or use --method subtract" in library.stderr
    with pytest.raises(rwsfmt.RwsError, match="pass init=, or use method='subtract'"):
        rwsfmt.extract(files / "std.safetensors", files / "robust.safetensors")
