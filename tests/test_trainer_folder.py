"""Apply to a Hugging Face Trainer checkpoint folder: the training state is copied, not dropped."""

from __future__ import annotations

import pytest
import torch
from architectures import tiny_bert_config
from click.testing import CliRunner
from safetensors.torch import load_file

import rwsfmt
from rwsfmt_cli.main import main

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # Trainer needs it

STATE_FILES = ["optimizer.pt", "rng_state.pth", "scheduler.pt", "training_args.bin"]


class _Pairs(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": torch.tensor([1, 2, 3, 4]), "labels": torch.tensor(i % 2)}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny BERT saved with save_pretrained (before/), then trained one step by Trainer,
    which writes out/checkpoint-1/ with its training state beside the weights."""
    d = tmp_path_factory.mktemp("trainer")
    config = tiny_bert_config(num_hidden_layers=1, num_labels=2)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config)
    model.save_pretrained(d / "before")
    args = transformers.TrainingArguments(
        output_dir=str(d / "out"),
        max_steps=1,
        save_steps=1,
        per_device_train_batch_size=2,
        report_to=[],
        use_cpu=True,
        logging_strategy="no",
        seed=0,
        disable_tqdm=True,
    )
    transformers.Trainer(model=model, args=args, train_dataset=_Pairs()).train()
    return d


def test_apply_copies_the_training_state_of_a_trainer_checkpoint(run, tmp_path):
    ckpt = run / "out" / "checkpoint-1"
    assert all((ckpt / f).is_file() for f in STATE_FILES)
    sig = rwsfmt.extract(run / "before", ckpt, method="subtract", layers="all")
    rwsfmt.save(sig, tmp_path / "sig.rws")
    out = tmp_path / "patched"
    result = CliRunner().invoke(
        main, ["apply", str(ckpt), str(tmp_path / "sig.rws"), "-a", "0.5", "-o", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert "other formats not copied" not in result.output
    assert "training state copied" in result.output
    for name in [*STATE_FILES, "trainer_state.json", "config.json"]:
        assert (out / name).read_bytes() == (ckpt / name).read_bytes(), name
    patched = transformers.BertForSequenceClassification.from_pretrained(out).state_dict()
    original = transformers.BertForSequenceClassification.from_pretrained(ckpt).state_dict()
    name = next(n for n in patched if n.endswith("word_embeddings.weight"))
    disk = next(n for n in sig.names if n.endswith("word_embeddings.weight"))
    torch.testing.assert_close(patched[name], original[name] + 0.5 * sig.tensor(disk))


def test_weights_of_other_formats_are_still_left_out(run, tmp_path):
    ckpt = run / "out" / "checkpoint-1"
    folder = tmp_path / "model"
    folder.mkdir()
    for f in ckpt.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    stale = load_file(folder / "model.safetensors")
    torch.save(stale, folder / "pytorch_model.bin")  # stale weights beside model.safetensors
    sig = rwsfmt.extract(run / "before", ckpt, method="subtract", layers=1)
    out = tmp_path / "patched"
    rwsfmt.apply_checkpoint(folder, [(sig, 0.5)], out)
    assert not (out / "pytorch_model.bin").exists()
    assert (out / "optimizer.pt").exists()
