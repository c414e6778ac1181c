"""Depth order: the same default selection from the .pt and the .safetensors copy of a model.

safetensors stores names sorted (`classifier.*` before `features.*`), so the order is rebuilt
by naming rules (rwsfmt.order). The corpus is real module trees: torchvision and timm
architectures rebuilt with their exact names (tests/architectures.py) and tiny real
`transformers` models.
"""

from __future__ import annotations

import pytest
import torch
from architectures import CODE_BUILT, hugging_face, timm_vit, vgg16
from click.testing import CliRunner
from safetensors.torch import save_file

import rwsfmt
from rwsfmt.io import open_checkpoint
from rwsfmt.order import OrderSource, rule_order
from rwsfmt.select import Rule, checkpoint_order, select
from rwsfmt_cli.main import main

CORPUS = {**CODE_BUILT, **hugging_face()}

# Transformers are counted in blocks, so the order of tensors inside a block (RoBERTa registers
# its position embeddings after the embeddings' LayerNorm, BERT before it; CLIP registers k, v,
# q projections, LLaMA and ViT q, k, v), which no naming rule can tell from sorted names, does
# not change what N layers select: every count from 1 to 8 agrees on every model.


def save_both(model: torch.nn.Module, folder, name: str):
    """The model as a PyTorch file and as safetensors; tied tensors (GPT-2's lm_head and
    wte) are stored once in safetensors, under the name registered first, as
    `save_pretrained` does."""
    pt, st = folder / f"{name}.pt", folder / f"{name}.safetensors"
    sd = model.state_dict()
    torch.save(sd, pt)
    seen: set[int] = set()
    untied = {}
    for key, value in sd.items():
        if value.data_ptr() not in seen:
            seen.add(value.data_ptr())
            untied[key] = value.contiguous()
    save_file(untied, st)
    return pt, st


def selection(path, layers: int) -> list[str]:
    with open_checkpoint(path) as ckpt:
        rule = Rule.make(layers=layers)
        return [n for seg in select(ckpt, rule, checkpoint_order(ckpt)) for n in seg]


@pytest.mark.parametrize("arch", sorted(CORPUS))
def test_pt_and_safetensors_copies_select_the_same_tensors(tmp_path, arch):
    torch.manual_seed(0)
    pt, st = save_both(CORPUS[arch](), tmp_path, arch)
    for layers in range(1, 9):
        from_pt, from_st = selection(pt, layers), selection(st, layers)
        assert set(from_pt) == set(from_st), (arch, layers)
        # the shallowest layer is the same module, the first in forward order
        first = [n for n in from_pt if n.endswith("weight") and "norm" not in n.lower()][0]
        assert [n for n in from_st if n.endswith("weight") and "norm" not in n.lower()][0] == first


def test_the_head_is_never_the_shallowest_layer_of_a_sorted_file(tmp_path):
    """VGG in sorted order starts with classifier.*; the rules start at features.0."""
    torch.manual_seed(0)
    _, st = save_both(vgg16(), tmp_path, "vgg")
    with open_checkpoint(st) as ckpt:
        assert ckpt.names[0].startswith("classifier.")
    assert selection(st, 5) == [
        f"features.{i}.{p}" for i in (0, 2, 5, 7, 10) for p in ("weight", "bias")
    ]


def test_bert_block_in_forward_order():
    names = [
        "encoder.layer.0.attention.output.LayerNorm.bias",
        "encoder.layer.0.attention.output.dense.weight",
        "encoder.layer.0.attention.self.key.weight",
        "encoder.layer.0.attention.self.query.weight",
        "encoder.layer.0.attention.self.value.weight",
        "encoder.layer.0.intermediate.dense.weight",
        "encoder.layer.0.output.dense.weight",
    ]
    order = rule_order(names, lambda n: n.endswith("weight"))
    assert [n.split("layer.0.")[1] for n in order] == [
        "attention.self.query.weight",
        "attention.self.key.weight",
        "attention.self.value.weight",
        "attention.output.dense.weight",
        "attention.output.LayerNorm.bias",
        "intermediate.dense.weight",
        "output.dense.weight",
    ]


def test_tensors_before_the_first_layer_join_it(tmp_path):
    """A ViT's cls_token, pos_embed and patch embedding do not use up one of the five layers:
    the first layer is its first block with everything before it."""
    torch.manual_seed(0)
    pt, st = save_both(timm_vit(), tmp_path, "vit")
    block = [
        f"blocks.0.{m}.{p}"
        for m in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
        for p in ("weight", "bias")
    ]
    for path in (pt, st):
        assert selection(path, 1) == [
            "cls_token",
            "pos_embed",
            "patch_embed.proj.weight",
            "patch_embed.proj.bias",
            *block,
        ]


def trio_files(tmp_path, model: torch.nn.Module, suffix: str) -> list:
    """std, robust and init copies of `model` (init, and init plus seeded noise)."""
    paths = []
    sd = model.state_dict()
    for role, seed in (("std", 1), ("robust", 2), ("init", 0)):
        g = torch.Generator().manual_seed(seed)
        moved = {
            k: v + 0.01 * seed * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
            for k, v in sd.items()
        }
        path = tmp_path / f"{role}{suffix}"
        if suffix == ".pt":
            torch.save(moved, path)
        else:
            save_file(moved, path)
        paths.append(path)
    return paths


def test_cli_extract_from_safetensors_matches_pt_and_says_where_the_order_came_from(tmp_path):
    torch.manual_seed(0)
    model = vgg16()
    sigs = {}
    for suffix in (".pt", ".safetensors"):
        out = tmp_path / f"sig{suffix}.rws"
        result = CliRunner().invoke(
            main, ["extract", *map(str, trio_files(tmp_path, model, suffix)), "-o", str(out)]
        )
        assert result.exit_code == 0, result.output
        sigs[suffix] = rwsfmt.load(out)
    assert "depth order from naming rules" in " ".join(result.output.split())
    assert "in 5 of 16 layers (features.0, features.2, features.5, features.7, features.10)" in (
        " ".join(result.output.split())
    )
    pt, st = sigs[".pt"], sigs[".safetensors"]
    assert pt.names == st.names
    assert all(torch.equal(pt.tensor(n), st.tensor(n)) for n in pt.names)
    assert pt.provenance["selection"]["depth_order"] == OrderSource.CHECKPOINT
    assert st.provenance["selection"]["depth_order"] == OrderSource.RULES


def test_order_reference_overrides_the_rules(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.ModuleDict(  # registration order z, a, m: no rule can know it
        {"z": torch.nn.Linear(3, 3), "a": torch.nn.Linear(3, 3), "m": torch.nn.Linear(3, 3)}
    )
    st_files = trio_files(tmp_path, model, ".safetensors")
    assert rwsfmt.extract(*st_files, layers=1).names == ["a.weight", "a.bias"]

    torch.save(model.state_dict(), tmp_path / "ref.pt")
    (tmp_path / "names.txt").write_text("# registration order\nz.weight\nz.bias\nm.weight\n")
    for reference in (model, tmp_path / "ref.pt", tmp_path / "names.txt"):
        sig = rwsfmt.extract(*st_files, layers=1, order=reference)
        assert sig.names == ["z.weight", "z.bias"]
        assert sig.provenance["selection"]["depth_order"] == OrderSource.REFERENCE
    listed = rwsfmt.extract(*st_files, layers="all", order=tmp_path / "names.txt")
    assert listed.names == ["z.weight", "z.bias", "m.weight", "a.weight", "a.bias", "m.bias"]
    assert listed.provenance["selection"]["order_unplaced"] == 3

    args = ["extract", *map(str, st_files), "-o", str(tmp_path / "o.rws"), "--layers", "1"]
    result = CliRunner().invoke(main, [*args, "--order", str(tmp_path / "ref.pt")])
    assert result.exit_code == 0, result.output
    assert "reference ref.pt" in " ".join(result.output.split())
    for bad, message in (
        (st_files[0], "stores names sorted"),
        (tmp_path / "other.txt", "shares no tensor name"),
    ):
        if bad.suffix == ".txt":
            bad.write_text("nothing.weight\n")
        result = CliRunner().invoke(main, [*args, "--order", str(bad)])
        assert result.exit_code == 2 and message in result.output, result.output
