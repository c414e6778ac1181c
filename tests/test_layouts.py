"""Real checkpoint layouts: training-script wrappers, prefixes, tied weights, HF folders."""

from __future__ import annotations

import argparse
import copy
import json

import pytest
import torch
from architectures import resnet18, timm_vit
from click.testing import CliRunner
from safetensors.torch import load_file, save_file
from test_patch import assert_bit_equal

import rwsfmt
from rwsfmt.io import open_checkpoint
from rwsfmt.io.open import sniff
from rwsfmt_cli.main import main


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


def moved(sd: dict, seed: int, scale: float = 0.01) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        k: v + scale * torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone()
        for k, v in sd.items()
    }


def sgd_state(model: torch.nn.Module) -> dict:
    """A real optimizer state dict after one step (momentum buffers are tensors), taken on a
    copy so the model itself is not changed."""
    model = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    return opt.state_dict()


def imagenet_example(model: torch.nn.Module, sd: dict) -> dict:
    """pytorch/examples imagenet/main.py: DataParallel keys and best_acc1, a tensor."""
    return {
        "epoch": 90,
        "arch": "resnet18",
        "state_dict": {f"module.{k}": v for k, v in sd.items()},
        "best_acc1": torch.tensor(69.758),
        "optimizer": sgd_state(model),
        "scheduler": {"step_size": 30, "gamma": 0.1, "last_epoch": 90},
    }


def torchvision_reference(model: torch.nn.Module, sd: dict) -> dict:
    """torchvision references/classification/train.py, with an EMA model and the argparse
    Namespace of the run."""
    ema = {"n_averaged": torch.tensor(100), **{f"module.{k}": v for k, v in moved(sd, 9).items()}}
    return {
        "model": sd,
        "model_ema": ema,
        "optimizer": sgd_state(model),
        "lr_scheduler": {"last_epoch": 600},
        "epoch": 599,
        "args": argparse.Namespace(model="resnet18", lr=0.5, batch_size=128),
    }


def lightning(model: torch.nn.Module, sd: dict) -> dict:
    """PyTorch Lightning: the LightningModule holds the network as `self.model`."""
    return {
        "epoch": 9,
        "global_step": 4690,
        "pytorch-lightning_version": "2.4.0",
        "state_dict": {f"model.{k}": v for k, v in sd.items()},
        "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"current": {"ready": 10}}}},
        "callbacks": {
            "ModelCheckpoint{'monitor': 'val_loss'}": {"best_model_score": torch.tensor(0.3)}
        },
        "optimizer_states": [sgd_state(model)],
        "lr_schedulers": [{"last_epoch": 9}],
        "hparams_name": "kwargs",
        "hyper_parameters": {"lr": 0.1},
    }


def timm_train(model: torch.nn.Module, sd: dict) -> dict:
    """timm train.py's CheckpointSaver: state_dict, state_dict_ema, args (a Namespace)."""
    return {
        "epoch": 299,
        "arch": "resnet18",
        "state_dict": sd,
        "optimizer": sgd_state(model),
        "version": 2,
        "args": argparse.Namespace(model="resnet18", lr=0.1),
        "metric": 79.1,
        "state_dict_ema": moved(sd, 7),
    }


LAYOUTS = {
    "imagenet-example": (imagenet_example, ["state_dict"], "module."),
    "torchvision-reference": (torchvision_reference, ["model"], ""),
    "lightning": (lightning, ["state_dict"], "model."),
    "timm-train": (timm_train, ["state_dict"], ""),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_training_checkpoints_extract_and_apply_like_plain_state_dicts(tmp_path, layout):
    wrap, keys, prefix = LAYOUTS[layout]
    torch.manual_seed(0)
    model = resnet18()
    init = model.state_dict()
    plain = {"init": init, "std": moved(init, 1), "robust": moved(init, 2)}
    for role, sd in plain.items():
        torch.save(sd, tmp_path / f"{role}.pt")
        torch.save(wrap(model, sd), tmp_path / f"{role}-{layout}.pt")  # no --trust-pickle
    expected = rwsfmt.extract(*(tmp_path / f"{r}.pt" for r in ("std", "robust", "init")))
    got = rwsfmt.extract(*(tmp_path / f"{r}-{layout}.pt" for r in ("std", "robust", "init")))
    assert got.names == [prefix + n if prefix == "model." else n for n in expected.names]
    assert expected.names[0] == "conv1.weight" and "best_acc1" not in got.names
    for a, b in zip(expected.names, got.names, strict=True):
        assert torch.equal(expected.tensor(a), got.tensor(b))
    rwsfmt.save(got, tmp_path / "sig.rws")

    # apply to the wrapped file: the output keeps every wrapper entry, patches the weights
    code, out = run(
        "apply",
        tmp_path / f"std-{layout}.pt",
        tmp_path / "sig.rws",
        "-a",
        1,
        "-o",
        tmp_path / "o.pt",
    )
    assert code == 0, out
    assert f"patched {len(got.names)} of" in out
    written = torch.load(tmp_path / "o.pt", weights_only=False)
    original = torch.load(tmp_path / f"std-{layout}.pt", weights_only=False)
    assert set(written) == set(original)
    state = written
    for key in keys:
        state = state[key]
    want = rwsfmt.apply(
        plain["std"], [(got, 1.0)], map={"model.": ""} if prefix == "model." else None
    )
    assert_bit_equal({k.removeprefix(prefix): v for k, v in state.items()}, want)

    # the plain signature applies to the wrapped model and the wrapped one to the plain model
    code, out = run(
        "apply", tmp_path / "std.pt", tmp_path / "sig.rws", "-a", 1, "-o", tmp_path / "p.pt"
    )
    assert code == 0, out
    assert_bit_equal(torch.load(tmp_path / "p.pt", weights_only=True), want)


def test_state_key_picks_the_ema_weights(tmp_path):
    torch.manual_seed(0)
    model = resnet18()
    ckpt = timm_train(model, model.state_dict())
    torch.save(ckpt, tmp_path / "m.pth")
    with open_checkpoint(tmp_path / "m.pth") as main_weights:
        assert main_weights.alternatives == ("state_dict_ema",)
        assert torch.equal(main_weights.tensor("conv1.weight"), ckpt["state_dict"]["conv1.weight"])
    with open_checkpoint(tmp_path / "m.pth", state_key="state_dict_ema") as ema:
        assert torch.equal(ema.tensor("conv1.weight"), ckpt["state_dict_ema"]["conv1.weight"])
    with pytest.raises(rwsfmt.RwsError, match="'state_dict', 'state_dict_ema'"):
        open_checkpoint(tmp_path / "m.pth", state_key="model_ema")


def test_torch_compile_and_data_parallel_prefixes_in_any_order(tmp_path):
    torch.manual_seed(0)
    sd = resnet18().state_dict()
    for prefix in ("_orig_mod.", "module._orig_mod.", "_orig_mod.module."):
        torch.save({prefix + k: v for k, v in sd.items()}, tmp_path / "m.pt")
        with open_checkpoint(tmp_path / "m.pt") as ckpt:
            assert ckpt.names == list(sd)
            assert ckpt.layout.prefix == prefix


def test_safetensors_whose_header_length_starts_like_a_pickle(tmp_path):
    """About 1 file in 256 has 0x80 as the low byte of its header length."""
    tensors = {"a.weight": torch.ones(3, 3), "a.bias": torch.zeros(3)}
    for pad in range(1500):
        path = tmp_path / "m.safetensors"
        save_file(tensors, path, metadata={"pad": "x" * pad})
        head = path.read_bytes()[:2]
        if head[0] == 0x80 and head[1] in (2, 3, 4, 5):
            break
    else:
        pytest.fail("no padding gave a header length of 0x0?80")
    assert sniff(str(path)) == "safetensors"
    rwsfmt.save(rwsfmt.from_tensors({"a.weight": torch.ones(3, 3)}, label="x"), tmp_path / "x.rws")
    code, out = run("apply", path, tmp_path / "x.rws", "-a", 1, "-o", tmp_path / "o.safetensors")
    assert code == 0, out
    assert torch.equal(load_file(tmp_path / "o.safetensors")["a.weight"], torch.full((3, 3), 2.0))


class TiedLM(torch.nn.Module):
    """GPT-2's tying: the output layer shares the input embedding's weight."""

    def __init__(self) -> None:
        super().__init__()
        self.wte = torch.nn.Embedding(50, 16)
        self.block = torch.nn.Linear(16, 16)
        self.lm_head = torch.nn.Linear(16, 50, bias=False)
        self.lm_head.weight = self.wte.weight


def test_tied_weights_stay_tied_and_are_patched_once(tmp_path):
    torch.manual_seed(0)
    model = TiedLM()
    init = model.state_dict()
    std, robust = moved(init, 1), moved(init, 2)
    std["lm_head.weight"] = std["wte.weight"]  # torch.save stores one storage, two keys
    robust["lm_head.weight"] = robust["wte.weight"]
    for role, sd in (("init", init), ("std", std), ("robust", robust)):
        torch.save(sd, tmp_path / f"{role}.pt")
    sig = rwsfmt.extract(*(tmp_path / f"{r}.pt" for r in ("std", "robust", "init")), layers="all")
    assert sig.names == ["wte.weight", "block.weight", "block.bias"]
    assert sig.provenance["tied"] == {"lm_head.weight": "wte.weight"}
    # the robust model saved as safetensors stores the tied tensor once
    save_file(
        {k: v for k, v in robust.items() if k != "lm_head.weight"}, tmp_path / "r.safetensors"
    )
    mixed = rwsfmt.extract(tmp_path / "std.pt", tmp_path / "r.safetensors", tmp_path / "init.pt")
    assert mixed.names == sig.names
    rwsfmt.save(sig, tmp_path / "sig.rws")

    code, out = run(
        "apply", tmp_path / "std.pt", tmp_path / "sig.rws", "-a", 1, "-o", tmp_path / "o.pt"
    )
    assert code == 0, out
    written = torch.load(tmp_path / "o.pt", weights_only=True)
    assert written["lm_head.weight"].data_ptr() == written["wte.weight"].data_ptr()
    expected = std["wte.weight"] + sig.tensor("wte.weight")
    assert torch.equal(written["wte.weight"], expected)
    fresh = TiedLM()
    fresh.load_state_dict(written)  # strict: both keys, one patched tensor
    assert torch.equal(fresh.lm_head.weight, expected)

    # a signature that names both tied tensors patches the live model once, and removes
    both = rwsfmt.from_tensors(
        {"wte.weight": sig.tensor("wte.weight"), "lm_head.weight": sig.tensor("wte.weight")},
        label="both",
        quant=rwsfmt.QuantConfig(bits=32),
    )
    model.load_state_dict(std)
    before = model.wte.weight.detach().clone()
    handle = rwsfmt.patch(model, both, alpha=1.0)
    assert handle.matches[0].tied == ["lm_head.weight -> wte.weight"]
    assert torch.equal(model.lm_head.weight, before + sig.tensor("wte.weight"))
    handle.remove()
    assert torch.equal(model.wte.weight, before)
    applied = rwsfmt.apply(model.state_dict(), [(both, 1.0)])
    assert applied["lm_head.weight"] is applied["wte.weight"]
    assert torch.equal(applied["wte.weight"], before + sig.tensor("wte.weight"))


def test_vit_class_token_and_position_embedding_ride_with_the_first_layer(tmp_path):
    torch.manual_seed(0)
    init = timm_vit().state_dict()
    sig = rwsfmt.extract(moved(init, 1), moved(init, 2), init, layers=2)
    assert sig.names[:4] == [
        "cls_token",
        "pos_embed",
        "patch_embed.proj.weight",
        "patch_embed.proj.bias",
    ]
    # a transformer's layers are counted as blocks: 2 layers end with block 1
    assert sig.names[-2:] == ["blocks.1.mlp.fc2.weight", "blocks.1.mlp.fc2.bias"]


transformers = pytest.importorskip("transformers")


def test_hugging_face_folder_keeps_its_config_and_loads_after_patching(tmp_path):
    transformers.logging.set_verbosity_error()
    config = transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config)
    model.save_pretrained(tmp_path / "std")
    (tmp_path / "std" / "tokenizer.json").write_text("{}")
    (tmp_path / "std" / "1_Pooling").mkdir()
    (tmp_path / "std" / "1_Pooling" / "config.json").write_text('{"pooling": "mean"}')
    names = list(open_checkpoint(tmp_path / "std").names)
    sd = load_file(tmp_path / "std" / "model.safetensors")
    touched = [
        "bert.embeddings.position_embeddings.weight",
        "bert.encoder.layer.0.output.dense.bias",
    ]
    deltas = {n: 0.01 * torch.ones_like(sd[n]) for n in touched}
    rwsfmt.save(
        rwsfmt.from_tensors(deltas, label="d", quant=rwsfmt.QuantConfig(bits=32)),
        tmp_path / "d.rws",
    )
    code, out = run(
        "apply", tmp_path / "std", tmp_path / "d.rws", "-a", 1, "-o", tmp_path / "patched"
    )
    assert code == 0, out
    out_dir = tmp_path / "patched"
    assert json.loads((out_dir / "config.json").read_text()) == json.loads(
        (tmp_path / "std" / "config.json").read_text()
    )
    assert (out_dir / "1_Pooling" / "config.json").read_text() == '{"pooling": "mean"}'
    reloaded = transformers.BertForSequenceClassification.from_pretrained(out_dir)
    patched = load_file(out_dir / "model.safetensors")
    for name in names:
        expected = sd[name] + deltas[name] if name in deltas else sd[name]
        assert torch.equal(patched[name], expected), name
    emb = reloaded.bert.embeddings.position_embeddings.weight
    assert torch.equal(emb, sd[touched[0]] + deltas[touched[0]])


def test_a_pytorch_file_named_safetensors_is_read_as_what_it_is(tmp_path):
    torch.save({"a": torch.ones(2)}, tmp_path / "lies.safetensors")
    assert sniff(str(tmp_path / "lies.safetensors")) == "pytorch"
    with open_checkpoint(tmp_path / "lies.safetensors") as ckpt:
        assert ckpt.format == "pytorch" and ckpt.names == ["a"]


def test_extract_notes_an_ema_copy_it_did_not_use(tmp_path):
    torch.manual_seed(0)
    model = resnet18()
    init = model.state_dict()
    for role, sd in (("init", init), ("std", moved(init, 1)), ("robust", moved(init, 2))):
        torch.save(timm_train(model, sd), tmp_path / f"[{role}].pth")  # a name rich would eat
    paths = [tmp_path / f"[{r}].pth" for r in ("std", "robust", "init")]
    code, out = run("extract", *paths, "-o", tmp_path / "s.rws")
    assert code == 0, out
    assert "note: [std].pth also holds weights under 'state_dict_ema'" in out
    code, out = run("extract", *paths, "-o", tmp_path / "e.rws", "--state-key", "state_dict_ema")
    assert code == 0, out
    ema = rwsfmt.load(tmp_path / "e.rws")
    assert ema.provenance["inputs"][0]["layout"] == "under 'state_dict_ema'"


def test_provenance_of_layouts_ties_and_order_follows_the_header_schema(tmp_path):
    import jsonschema
    from conftest import SPEC, split

    torch.manual_seed(0)
    model = TiedLM()
    init = model.state_dict()
    paths = []
    for role, sd in (("std", moved(init, 1)), ("robust", moved(init, 2)), ("init", init)):
        sd["lm_head.weight"] = sd["wte.weight"]
        torch.save(timm_train(model, sd), tmp_path / f"{role}.pth")
        paths.append(tmp_path / f"{role}.pth")
    rwsfmt.save(rwsfmt.extract(*paths, order=model), tmp_path / "s.rws")
    _, header, _ = split((tmp_path / "s.rws").read_bytes())
    schema = json.loads((SPEC / "header.schema.json").read_text())
    jsonschema.Draft202012Validator(schema).validate(header)
    prov = header["provenance"]
    assert prov["tied"] == {"lm_head.weight": "wte.weight"}
    assert prov["inputs"][0]["layout"] == "under 'state_dict'"
    assert prov["inputs"][0]["alternatives"] == ["state_dict_ema"]
    assert prov["selection"]["depth_order"] == "reference"
