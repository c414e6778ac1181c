"""Checkpoints: PyTorch files, safetensors, sharded folders; reading, refusing, writing back."""

from __future__ import annotations

import json
import os
import zipfile
from collections import OrderedDict

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from rwsfmt.errors import RwsError
from rwsfmt.io import open_checkpoint
from rwsfmt.names import natural_sorted


def small_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3),
        torch.nn.BatchNorm2d(4),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(4, 2),
    )


class MakesFolder:
    """A pickle payload: unpickling it creates a folder (stands in for arbitrary code)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


# ---------------------------------------------------------------- PyTorch files


def test_pytorch_state_dict_keeps_registration_order_and_is_memory_mapped(tmp_path):
    sd = small_model().state_dict()
    torch.save(sd, tmp_path / "m.pt")
    with open_checkpoint(tmp_path / "m.pt") as ckpt:
        assert ckpt.format == "pytorch" and ckpt.ordered
        assert ckpt.names == list(sd)  # registration order, not sorted
        assert ckpt.dtype("1.num_batches_tracked") == torch.int64
        assert ckpt.shape("0.weight") == (4, 3, 3, 3)
        for name in sd:
            assert torch.equal(ckpt.tensor(name), sd[name])


@pytest.mark.parametrize("wrapper", ["state_dict", "model", "model_state_dict"])
def test_wrappers_and_ddp_prefix_are_unwrapped_and_restored_on_write(tmp_path, wrapper):
    sd = small_model().state_dict()
    wrapped = {
        "epoch": 7,
        wrapper: OrderedDict((f"module.{k}", v) for k, v in sd.items()),
        "optimizer": {"lr": 0.1, "betas": (0.9, 0.999)},
    }
    torch.save(wrapped, tmp_path / "w.pt")
    ckpt = open_checkpoint(tmp_path / "w.pt")
    assert ckpt.names == list(sd)
    new_bias = torch.arange(4, dtype=torch.float32)
    ckpt.write(tmp_path / "out.pt", {"0.bias": new_bias})
    out = torch.load(tmp_path / "out.pt", weights_only=True)
    assert out["epoch"] == 7 and out["optimizer"] == wrapped["optimizer"]
    assert list(out[wrapper]) == list(wrapped[wrapper])
    for key, value in wrapped[wrapper].items():
        expected = new_bias if key == "module.0.bias" else value
        assert torch.equal(out[wrapper][key], expected), key


def test_pytorch_write_keeps_state_dict_metadata_so_load_state_dict_works(tmp_path):
    model = small_model()
    torch.save(model.state_dict(), tmp_path / "m.pt")
    ckpt = open_checkpoint(tmp_path / "m.pt")
    ckpt.write(tmp_path / "m.pt", {"4.bias": torch.tensor([1.0, 2.0])})  # in place
    out = torch.load(tmp_path / "m.pt", weights_only=True)
    assert out._metadata == model.state_dict()._metadata
    model.load_state_dict(out)
    assert model[4].bias.tolist() == [1.0, 2.0]


def test_legacy_pickle_format_reads_without_mmap(tmp_path):
    sd = small_model().state_dict()
    torch.save(sd, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    assert not zipfile.is_zipfile(tmp_path / "old.pt")
    ckpt = open_checkpoint(tmp_path / "old.pt")
    assert ckpt.names == list(sd)
    assert torch.equal(ckpt.tensor("4.weight"), sd["4.weight"])


def test_pickle_payload_is_never_executed_without_trust(tmp_path):
    marker = tmp_path / "marker"
    torch.save({"w": torch.zeros(2), "payload": MakesFolder(str(marker))}, tmp_path / "evil.pt")
    with pytest.raises(RwsError) as err:
        open_checkpoint(tmp_path / "evil.pt")
    assert "trust_pickle=True" in str(err.value) and "evil.pt" in str(err.value)
    assert not marker.exists()
    # The user vouches for the file: it loads (and its code runs).
    ckpt = open_checkpoint(tmp_path / "evil.pt", trust_pickle=True)
    assert ckpt.names == ["w"] and marker.exists()


def test_whole_pickled_module_is_refused_with_advice(tmp_path):
    torch.save(small_model(), tmp_path / "whole.pt")
    with pytest.raises(RwsError, match="trust_pickle=True"):
        open_checkpoint(tmp_path / "whole.pt")
    with pytest.raises(RwsError, match="state_dict"):
        open_checkpoint(tmp_path / "whole.pt", trust_pickle=True)


# ---------------------------------------------------------------- safetensors


def transformer_like() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    out = {"embed.weight": torch.randn(10, 4, generator=g)}
    for i in (0, 1, 2, 10, 11):
        out[f"layers.{i}.attn.weight"] = torch.randn(4, 4, generator=g).to(torch.bfloat16)
        out[f"layers.{i}.norm.weight"] = torch.randn(4, generator=g).half()
    out["step"] = torch.tensor([3], dtype=torch.int64)
    return out


def test_safetensors_natural_sort_and_dtypes(tmp_path):
    tensors = transformer_like()
    save_file(tensors, tmp_path / "m.safetensors")
    with open_checkpoint(tmp_path / "m.safetensors") as ckpt:
        assert ckpt.format == "safetensors" and not ckpt.ordered
        assert ckpt.names.index("layers.2.attn.weight") < ckpt.names.index("layers.10.attn.weight")
        assert ckpt.names == natural_sorted(tensors)
        for name, value in tensors.items():
            assert ckpt.dtype(name) == value.dtype and ckpt.shape(name) == tuple(value.shape)
            assert torch.equal(ckpt.tensor(name), value)


def test_safetensors_write_replaces_only_named_tensors_and_keeps_metadata(tmp_path):
    tensors = transformer_like()
    src = tmp_path / "m.safetensors"
    save_file(tensors, src, metadata={"format": "pt", "origin": "test"})
    ckpt = open_checkpoint(src)
    ckpt.write(tmp_path / "same.safetensors", {})
    assert (tmp_path / "same.safetensors").read_bytes() == src.read_bytes()
    new = torch.ones(4, 4, dtype=torch.bfloat16)
    ckpt.write(src, {"layers.10.attn.weight": new})  # in place
    ckpt.close()
    with safe_open(src, "pt") as f:
        assert f.metadata() == {"format": "pt", "origin": "test"}
        for name, value in tensors.items():
            expected = new if name == "layers.10.attn.weight" else value
            assert torch.equal(f.get_tensor(name), expected), name


def test_ddp_prefix_in_safetensors_is_stripped_and_kept(tmp_path):
    save_file({"module.a.weight": torch.ones(2, 2)}, tmp_path / "p.safetensors")
    ckpt = open_checkpoint(tmp_path / "p.safetensors")
    assert ckpt.names == ["a.weight"]
    ckpt.write(tmp_path / "q.safetensors", {"a.weight": torch.zeros(2, 2)})
    with safe_open(tmp_path / "q.safetensors", "pt") as f:
        assert list(f.keys()) == ["module.a.weight"]
        assert f.get_tensor("module.a.weight").sum() == 0


def test_replacement_mismatch_and_unknown_name_are_refused(tmp_path):
    save_file({"a": torch.ones(2, 2)}, tmp_path / "m.safetensors")
    ckpt = open_checkpoint(tmp_path / "m.safetensors")
    with pytest.raises(RwsError, match="'a'.*torch.float64"):
        ckpt.write(tmp_path / "o.safetensors", {"a": torch.ones(2, 2, dtype=torch.float64)})
    with pytest.raises(RwsError, match=r"'a'.*\(4,\)"):
        ckpt.write(tmp_path / "o.safetensors", {"a": torch.ones(4)})
    with pytest.raises(RwsError, match="'b'"):
        ckpt.write(tmp_path / "o.safetensors", {"b": torch.ones(2, 2)})
    assert not (tmp_path / "o.safetensors").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temporary left


# ---------------------------------------------------------------- damaged and foreign files


def test_missing_non_checkpoint_and_damaged_files(tmp_path):
    cases = {"missing.pt": None, "notes.txt": b"hello, this is text\n", "empty.bin": b""}
    save_file({"a": torch.ones(100)}, tmp_path / "good.safetensors")
    data = (tmp_path / "good.safetensors").read_bytes()
    cases["truncated.safetensors"] = data[:-10]
    cases["badheader.safetensors"] = data[:8] + b"[" + data[9:]
    torch.save({"a": torch.ones(1000)}, tmp_path / "good.pt")
    cases["truncated.pt"] = (tmp_path / "good.pt").read_bytes()[:2000]
    for name, content in cases.items():
        if content is not None:
            (tmp_path / name).write_bytes(content)
        with pytest.raises(RwsError) as err:
            open_checkpoint(tmp_path / name)
        assert name in str(err.value) and "fix:" in str(err.value), str(err.value)
    with pytest.raises(RwsError, match="holds no checkpoint"):
        open_checkpoint(tmp_path / "..")


# ---------------------------------------------------------------- sharded folders


def write_sharded(folder, tensors, kind: str) -> None:
    folder.mkdir()
    names = list(tensors)
    shards = [names[: len(names) // 2], names[len(names) // 2 :]]
    weight_map = {}
    for i, part in enumerate(shards, 1):
        if kind == "safetensors":
            shard = f"model-0000{i}-of-00002.safetensors"
            save_file({n: tensors[n] for n in part}, folder / shard, metadata={"format": "pt"})
        else:
            shard = f"pytorch_model-0000{i}-of-00002.bin"
            torch.save({n: tensors[n] for n in part}, folder / shard)
        weight_map.update(dict.fromkeys(part, shard))
    index = (
        "model.safetensors.index.json" if kind == "safetensors" else "pytorch_model.bin.index.json"
    )
    (folder / index).write_text(
        json.dumps({"metadata": {}, "weight_map": dict(sorted(weight_map.items()))})
    )
    (folder / "config.json").write_text('{"hidden": 4}')


@pytest.mark.parametrize("kind", ["safetensors", "pytorch"])
def test_sharded_folder_reads_and_writes(tmp_path, kind):
    tensors = transformer_like() if kind == "safetensors" else small_model().state_dict()
    src = tmp_path / "src"
    write_sharded(src, tensors, kind)
    ckpt = open_checkpoint(src)
    assert ckpt.sharded and ckpt.format == kind
    expected_order = natural_sorted(tensors) if kind == "safetensors" else list(tensors)
    assert ckpt.names == expected_order
    last = ckpt.names[-1]
    assert torch.equal(ckpt.tensor(last), tensors[last])

    first = ckpt.names[0]
    new = torch.zeros_like(tensors[first])
    ckpt.write(tmp_path / "out", {first: new})
    assert sorted(os.listdir(tmp_path / "out")) == sorted(os.listdir(src))
    assert (tmp_path / "out" / "config.json").read_text() == '{"hidden": 4}'
    with open_checkpoint(tmp_path / "out") as out:
        for name, value in tensors.items():
            assert torch.equal(out.tensor(name), new if name == first else value), name
    untouched = [f for f in os.listdir(src) if "-00002-of-" in f]
    assert (tmp_path / "out" / untouched[0]).read_bytes() == (src / untouched[0]).read_bytes()

    ckpt.write(src, {last: torch.zeros_like(tensors[last])})  # in place
    ckpt.close()
    with open_checkpoint(src) as again:
        assert again.tensor(last).abs().sum() == 0
        assert torch.equal(again.tensor(first), tensors[first])


def test_sharded_index_naming_a_missing_shard(tmp_path):
    write_sharded(tmp_path / "m", transformer_like(), "safetensors")
    os.unlink(tmp_path / "m" / "model-00002-of-00002.safetensors")
    with pytest.raises(RwsError, match="model-00002-of-00002.safetensors"):
        open_checkpoint(tmp_path / "m")


# ---------------------------------------------------------------- in memory


def test_state_dict_and_module_in_memory(tmp_path):
    model = small_model()
    for source in (model, model.state_dict(), {"state_dict": model.state_dict()}):
        ckpt = open_checkpoint(source)
        assert ckpt.names == list(model.state_dict())
        assert ckpt.tensor("0.weight") is not None
    ckpt = open_checkpoint(model.state_dict())
    ckpt.write(tmp_path / "m.pt", {"4.bias": torch.zeros(2)})
    assert torch.load(tmp_path / "m.pt", weights_only=True)["4.bias"].tolist() == [0.0, 0.0]
