"""Malformed safetensors inputs, seeded-random: header values swapped for junk, entries moved,
dropped and added, header lengths, truncations and stray bytes. For every case, through the
path extract and apply read models by (`open_checkpoint`, every tensor, a written copy):

- nothing but `RwsError` escapes, in bounded time;
- whatever rwsfmt accepts, the safetensors library accepts too, with the same tensors, and
  so does the copy rwsfmt writes of it (no exit 0 with an output no reader opens);
- every 10th case also runs `rwsfmt apply` itself, which exits 0 or 2, never a traceback.
"""

from __future__ import annotations

import json
import random
import struct
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from lying_pytorch import declare, patch_central, records, rewrite
from safetensors import safe_open
from safetensors.torch import save_file

import rwsfmt
from rwsfmt.errors import RwsError
from rwsfmt.io import open_checkpoint
from rwsfmt_cli.main import main as cli

CASES = 500
SEED = 20_250_301
CLI_EVERY = 10
CASE_LIMIT_S = 2.0  # measured: a few ms per case; seconds would mean a reader trusting a size

# JSON values no writer produces; float('nan') and inf are written as NaN and Infinity
JUNK: list = [
    -1, 2**64, 2**63, 10**30, 1.5, 8.0, float("nan"), float("inf"), -float("inf"), True, None,
    "8", "F32", "", [], [1], [-1], [2**62, 2**62, 0], [1] * 70, {}, {"a": 1},
    json.loads("[" * 50 + "]" * 50),
]  # fmt: skip
# alphas the command line takes: usual ones, and finite ones past float32's range (refused)
ALPHAS = ["1", "0.5", "-2", "1e40", "-3.5e38", "1e308"]
DTYPE_CODES = ["F32", "F16", "BF16", "F64", "I64", "U8", "BOOL", "F8_E4M3", "F8_E5M2", "X", "f32"]


def base_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "conv.weight": torch.randn(4, 3, 3, 3, generator=g),
        "conv.bias": torch.randn(4, generator=g).half(),
        "fc.weight": torch.randn(2, 4, generator=g).bfloat16(),
        "steps": torch.tensor([7]),
        "empty": torch.zeros(0, 3),
    }


def split_file(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def join_file(doc: dict, section: bytes) -> bytes:
    body = json.dumps(doc).encode()  # NaN and Infinity come out as such
    return struct.pack("<Q", len(body)) + body + section


def mutate(rng: random.Random, data: bytes) -> tuple[str, bytes]:
    """One random damage to a valid file: (its family, the damaged bytes)."""
    doc, section = split_file(data)
    names = [k for k in doc if k != "__metadata__"]
    name = rng.choice(names)
    family = rng.choice(
        ["value", "dtype", "drop-field", "offsets", "swap", "add", "drop", "metadata", "raw"]
    )
    if family == "value":
        doc[name][rng.choice(["shape", "data_offsets", "dtype"])] = rng.choice(JUNK)
    elif family == "dtype":
        doc[name]["dtype"] = rng.choice(DTYPE_CODES)
    elif family == "drop-field":
        del doc[name][rng.choice(["shape", "data_offsets", "dtype"])]
    elif family == "offsets":
        which = rng.randrange(2)
        doc[name]["data_offsets"][which] += rng.choice([-8, -4, -2, -1, 1, 2, 4, 8])
    elif family == "swap":
        other = rng.choice(names)
        doc[name]["data_offsets"], doc[other]["data_offsets"] = (
            doc[other]["data_offsets"],
            doc[name]["data_offsets"],
        )
    elif family == "add":
        doc[f"extra{rng.randrange(9)}"] = rng.choice(
            [{"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, rng.choice(JUNK)]
        )
    elif family == "drop":
        del doc[name]
    elif family == "metadata":
        doc["__metadata__"] = rng.choice([{"k": rng.choice(JUNK)}, rng.choice(JUNK), None])
    if family != "raw":
        return family, join_file(doc, section)
    damaged = bytearray(data)
    how = rng.choice(["length", "flip", "truncate", "append", "insert"])
    if how == "length":
        damaged[:8] = struct.pack("<Q", max(0, len(data) - 8 + rng.randint(-64, 64)))
    elif how == "flip":
        damaged[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    elif how == "truncate":
        del damaged[rng.randrange(len(data)) :]
    elif how == "append":
        damaged += bytes(rng.randint(1, 16))
    else:
        at = rng.randrange(8, len(data))
        damaged[at:at] = bytes(rng.randint(1, 16))
    return f"raw-{how}", bytes(damaged)


def read_with_safetensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(path, "pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


def read_and_copy(path: Path, out: Path) -> dict[str, torch.Tensor] | None:
    """rwsfmt's reading of `path` (every tensor, and a copy written to `out`), or None when
    it refuses the file. Anything but `RwsError` fails the test."""
    try:
        with open_checkpoint(path) as ckpt:
            tensors = {name: ckpt.tensor(name) for name in ckpt.names}
            ckpt.write(out, {})
    except RwsError:
        return None
    return tensors


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> tuple[Path, bytes]:
    """(a folder holding sig.rws for the base tensors, the bytes of the valid base file)."""
    d = tmp_path_factory.mktemp("fuzz_safetensors")
    base = base_tensors()
    save_file(base, d / "base.safetensors", metadata={"format": "pt"})
    deltas = {k: 0.01 * torch.ones(v.shape) for k, v in base.items() if v.is_floating_point()}
    rwsfmt.save(rwsfmt.from_tensors(deltas, label="fuzz"), d / "sig.rws")
    return d, (d / "base.safetensors").read_bytes()


def test_only_rws_errors_escape_and_accepted_files_are_valid(files):
    d, valid = files
    rng = random.Random(SEED)
    outcomes: Counter = Counter()
    runner = CliRunner()
    for case in range(CASES):
        family, data = mutate(rng, valid)
        path, out = d / "case.safetensors", d / "copy.safetensors"
        path.write_bytes(data)
        out.unlink(missing_ok=True)
        start = time.monotonic()
        tensors = read_and_copy(path, out)
        assert time.monotonic() - start < CASE_LIMIT_S, (case, family)
        outcomes[family, tensors is not None] += 1
        if tensors is not None:  # accepted: the library agrees, and the copy reads back
            assert_same(tensors, read_with_safetensors(path))
            assert_same(tensors, read_with_safetensors(out))
        if case % CLI_EVERY == 0:
            out.unlink(missing_ok=True)
            alpha = ALPHAS[case // CLI_EVERY % len(ALPHAS)]
            result = runner.invoke(cli, ["apply", str(path), str(d / "sig.rws"), f"--alpha={alpha}",
                                         "-q", "-o", str(out)])  # fmt: skip
            assert result.exit_code in (0, 2), (case, family, result.output, result.exception)
            assert "Traceback" not in result.output, (case, family)
            assert result.exit_code == 0 or "\n  fix: " in result.output, result.output
            assert result.exit_code == 2 or float(alpha) < 1e38, (alpha, result.output)
            if result.exit_code == 0:
                read_with_safetensors(out)
    refused = sum(n for (_, ok), n in outcomes.items() if not ok)
    assert 0 < refused < CASES, outcomes  # the campaign reaches both outcomes


# ---------------------------------------------------------------- lying PyTorch files

PT_CASES = 120
PT_SEED = 20_261_206


def mutate_pt(rng: random.Random, model_pt: Path, dst: Path) -> str:
    """One lie in a real `torch.save` zip (records rewritten by torch's own writer, or the
    central directory edited): what was done."""
    _, found = records(model_pt)
    keys = sorted(k.split("/")[1] for k in found if k.startswith("data/"))
    key = rng.choice(keys)
    record = found[f"data/{key}"]
    family = rng.choice(["cut", "extend", "declare", "central"])
    if family == "central":
        grow = rng.choice([-4, 4, 64, 200, 1 << 20])
        data = model_pt.read_bytes()
        dst.write_bytes(patch_central(data, f"/data/{key}", grow=max(grow, -len(record))))
        return f"central data/{key} {grow:+}"
    if family == "declare":
        numel = rng.choice(
            [0, 1, len(record) // 4 - 1, len(record) // 4 + 1, 10 * len(record), 1 << 40]
        )
        edit = lambda recs: recs.update({"data.pkl": declare(recs["data.pkl"], key, numel)})  # noqa: E731
        what = f"declare storage {key} as {numel} elements"
    elif family == "cut":
        n = rng.randrange(len(record))
        edit = lambda recs: recs.update({f"data/{key}": record[:n]})  # noqa: E731
        what = f"cut data/{key} to {n} of {len(record)} bytes"
    else:
        n = rng.choice([1, 4, 64, 4096])
        edit = lambda recs: recs.update({f"data/{key}": record + bytes(n)})  # noqa: E731
        what = f"extend data/{key} by {n} bytes"
    rewrite(model_pt, dst, edit)
    return what


def test_lying_pytorch_storages_are_refused_or_read_as_torch_reads_them(tmp_path):
    """A storage record cut short or extended, a storage declared with another size, a zip
    entry covering more or less than its record: rwsfmt refuses (RwsError with a fix; `apply`
    exits 2 with a fix line, every 10th case), or reads exactly what torch.load without
    memory-mapping reads (which checks every record's size)."""
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Linear(4, 4)
    )
    model_pt = tmp_path / "model.pt"
    torch.save(net.state_dict(), model_pt)
    sig = tmp_path / "sig.rws"
    deltas = {
        k: 0.01 * torch.ones(v.shape) for k, v in net.state_dict().items() if v.is_floating_point()
    }
    rwsfmt.save(rwsfmt.from_tensors(deltas, label="fuzz"), sig)
    rng = random.Random(PT_SEED)
    runner = CliRunner()
    outcomes: Counter = Counter()
    for case in range(PT_CASES):
        path, out = tmp_path / "case.pt", tmp_path / "out.pt"
        what = mutate_pt(rng, model_pt, path)
        try:
            with open_checkpoint(path) as ckpt:
                ours = {name: ckpt.tensor(name).clone() for name in ckpt.names}
        except RwsError as exc:
            assert exc.fix, what
            ours = None
        try:
            theirs = torch.load(path, weights_only=True, mmap=False)
        except Exception:  # torch's own reader refuses it too
            theirs = None
        outcomes[what.split()[0], ours is not None] += 1
        if ours is not None:
            assert theirs is not None, f"rwsfmt read what torch refuses: {what}"
            for name, t in ours.items():
                assert torch.equal(t, theirs[name]), (what, name)
        if case % CLI_EVERY == 0:
            out.unlink(missing_ok=True)
            result = runner.invoke(
                cli, ["apply", str(path), str(sig), "-a", "1", "-q", "-o", str(out)]
            )
            assert result.exit_code == (0 if ours is not None else 2), (what, result.output)
            assert result.exit_code == 0 or "\n  fix: " in result.output, (what, result.output)
            assert "Traceback" not in result.output, what
    refused = sum(n for (_, ok), n in outcomes.items() if not ok)
    assert refused > PT_CASES // 2, outcomes
