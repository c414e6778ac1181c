"""One signature, three forms: transformers models as users have them.

transformers 5 stores some architectures under legacy names on disk (`save_pretrained`) and
renames them in memory (`from_pretrained`, `state_dict()`). Tiny models of seven types are
saved both ways; a signature extracted from either form must patch or apply to the other and
change exactly the tensors it holds, by exactly alpha times the signature (Eq. 1, computed
here independently in float64). Tensors transformers fuses or splits are refused by name.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

torch = pytest.importorskip("torch")
T = pytest.importorskip("transformers")
pytest.importorskip("transformers.conversion_mapping")  # transformers 5

import rwsfmt  # noqa: E402
from rwsfmt.errors import RwsError  # noqa: E402
from rwsfmt_cli.main import main  # noqa: E402

ALPHA = 0.5
INCLUDE = r"attn|attention"  # the tensors transformers renames in ViT, Dinov2 and Swin


def _configs() -> dict[str, tuple[type, object]]:
    """Model type -> (class, tiny config); everything builds in milliseconds."""
    vision = dict(num_hidden_layers=2, num_attention_heads=2, image_size=8, patch_size=4)
    text = dict(vocab_size=50, num_hidden_layers=2, num_attention_heads=2)
    return {
        "vit": (
            T.ViTForImageClassification,
            T.ViTConfig(hidden_size=16, intermediate_size=32, num_labels=3, **vision),
        ),
        "clip_vision": (
            T.CLIPVisionModel,
            T.CLIPVisionConfig(hidden_size=16, intermediate_size=32, **vision),
        ),
        "swin": (
            T.SwinForImageClassification,
            T.SwinConfig(
                image_size=8,
                patch_size=2,
                embed_dim=8,
                depths=[1, 1],
                num_heads=[1, 2],
                window_size=2,
                num_labels=3,
            ),
        ),
        "dinov2": (T.Dinov2Model, T.Dinov2Config(hidden_size=16, mlp_ratio=2, **vision)),
        "bert": (
            T.BertForSequenceClassification,
            T.BertConfig(hidden_size=16, intermediate_size=32, max_position_embeddings=16, **text),
        ),
        "gpt2": (  # lm_head.weight is tied to transformer.wte.weight, in memory only
            T.GPT2LMHeadModel,
            T.GPT2Config(
                vocab_size=50,
                n_embd=16,
                n_layer=2,
                n_head=2,
                n_positions=16,
                bos_token_id=0,
                eos_token_id=0,
            ),
        ),
        "llama": (
            T.LlamaForCausalLM,
            T.LlamaConfig(
                hidden_size=16,
                intermediate_size=32,
                num_key_value_heads=1,
                max_position_embeddings=16,
                **text,
            ),
        ),
    }


CONFIGS = _configs()


def _trio(cls: type, config: object, root: Path) -> dict[str, dict]:
    """init, std and robust models (std and robust: init plus seeded noise in the module),
    each saved as a save_pretrained folder and as a torch.save(state_dict()) file."""
    torch.manual_seed(0)
    init = cls(config).eval()
    out = {}
    for seed, role in enumerate(["init", "std", "robust"]):
        model = cls(config).eval()
        model.load_state_dict(init.state_dict())
        if role != "init":
            g = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.02 * torch.randn(p.shape, generator=g))
        folder, file = root / role, root / f"{role}.pt"
        model.save_pretrained(folder)
        torch.save(model.state_dict(), file)
        out[role] = {"folder": folder, "file": file, "state": model.state_dict()}
    return out


def _expected(trio: dict[str, dict], include: str | None) -> dict[str, torch.Tensor]:
    """The std state dict (module names) patched at ALPHA by Eq. 1, in float64 from the
    modules' own tensors; tensors not selected are std's."""
    import re

    std, robust, init = (trio[r]["state"] for r in ("std", "robust", "init"))
    out = {}
    for name, s in std.items():
        if not s.is_floating_point() or (include and not re.search(include, name)):
            out[name] = s
            continue
        v_base = (s.double() - init[name].double()).flatten()
        v_c = (robust[name].double() - init[name].double()).flatten()
        bb = float(v_base @ v_base)
        rws = v_c - (float(v_c @ v_base) / bb) * v_base if bb else v_c
        out[name] = (s.double() + ALPHA * rws.view(s.shape)).to(s.dtype)
    return out


def _assert_state(actual: dict, expected: dict, std: dict) -> int:
    """`actual` equals `expected` (float32 rounding); the tensors `expected` keeps as std's
    are std's bit for bit. Returns how many tensors changed."""
    assert set(actual) == set(expected)
    changed = 0
    for name, want in expected.items():
        got = actual[name]
        if want is std.get(name):
            assert torch.equal(got, want), f"{name} was changed"
        else:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=name)
            changed += 1
    return changed


def _disk_names(folder: Path) -> set[str]:
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return set(f.keys())


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_one_signature_three_forms(kind: str, tmp_path: Path) -> None:
    cls, config = CONFIGS[kind]
    trio = _trio(cls, config, tmp_path)
    std = trio["std"]["state"]
    renamed = len(set(std) - _disk_names(trio["std"]["folder"]))
    include = INCLUDE if kind in ("vit", "swin", "dinov2") else None
    expected = _expected(trio, include)

    def args(form: str) -> list[Path]:
        return [trio[r][form] for r in ("std", "robust", "init")]

    # extracted from the folders: names on disk
    from_folders = rwsfmt.extract(*args("folder"), include=include, layers="all", bits=32)
    naming = from_folders.provenance["naming"]
    assert naming["kind"] == "transformers-disk" and naming["architecture"] == cls.__name__

    # ... patches the from_pretrained model exactly, and removes bit for bit
    live = cls.from_pretrained(trio["std"]["folder"]).eval()
    before = {k: v.clone() for k, v in live.state_dict().items()}
    handle = rwsfmt.patch(live, from_folders, alpha=ALPHA)
    (m,) = handle.matches
    assert m.architecture == "same"
    assert (m.translated is not None) == (renamed > 0 and kind not in ("gpt2",))
    if m.translated:
        assert m.translated.startswith(f"{renamed} of ") or "names translated" in m.translated
    patched = {k: v.clone() for k, v in live.state_dict().items()}
    changed = _assert_state(patched, expected, std)
    assert changed == len(from_folders.names) + (kind == "gpt2")  # lm_head shares wte
    handle.remove()
    assert all(torch.equal(v, before[k]) for k, v in live.state_dict().items())

    # ... and applies to a torch.save(state_dict()) file (the recorded naming says how)
    rwsfmt.apply_checkpoint(trio["std"]["file"], from_folders, tmp_path / "out.pt", alpha=ALPHA)
    _assert_state(torch.load(tmp_path / "out.pt", weights_only=True), patched, patched)

    # extracted from state_dict() files: names in memory, no naming recorded
    from_files = rwsfmt.extract(*args("file"), include=include, layers="all", bits=32)
    assert "naming" not in from_files.provenance
    sig_path = tmp_path / "from_files.rws"
    rwsfmt.save(from_files, sig_path)

    # ... applies to the folder (its config.json says how), which loads to the live result
    report = rwsfmt.apply_checkpoint(
        trio["std"]["folder"], sig_path, tmp_path / "out_folder", alpha=ALPHA
    )
    assert report.matches[0].architecture == "same"
    assert (report.matches[0].translated is not None) == (m.translated is not None)
    loaded = cls.from_pretrained(tmp_path / "out_folder").state_dict()
    _assert_state(loaded, patched, patched)

    # mixed forms extract too, read under std's names: std a folder, robust a state_dict()
    # file, init a live model
    init_live = cls.from_pretrained(trio["init"]["folder"])
    mixed = rwsfmt.extract(
        trio["std"]["folder"],
        trio["robust"]["file"],
        init_live,
        include=include,
        layers="all",
        bits=32,
    )
    assert mixed.names == from_folders.names
    assert all(torch.equal(mixed.tensor(n), from_folders.tensor(n)) for n in mixed.names)
    notes = [i.get("names") for i in mixed.provenance["inputs"]]
    assert notes[0] is None and (notes[1] is not None) == (m.translated is not None), notes

    # ... and patches the live model the same way (no translation needed)
    with rwsfmt.patched(live, from_files, alpha=ALPHA):
        _assert_state(live.state_dict(), patched, patched)


def test_cli_apply_says_what_was_translated(tmp_path: Path) -> None:
    cls, config = CONFIGS["vit"]
    trio = _trio(cls, config, tmp_path)
    sig = rwsfmt.extract(
        trio["std"]["file"], trio["robust"]["file"], trio["init"]["file"], layers="all"
    )
    rwsfmt.save(sig, tmp_path / "fog.rws")
    out = tmp_path / "patched"
    args = [trio["std"]["folder"], tmp_path / "fog.rws", "--alpha", ALPHA, "-o", out]
    run = CliRunner().invoke(main, ["apply", *map(str, args)])
    assert run.exit_code == 0, run.output
    lines = [line for line in run.output.splitlines() if "names translated" in line]
    assert len(lines) == 1, run.output
    assert (
        "32 of 40 names translated from ViTForImageClassification's names in memory" in (lines[0])
    )
    assert "transformers 5" in lines[0]
    cli = cls.from_pretrained(out).state_dict()
    api = rwsfmt.apply(trio["std"]["state"], sig, alpha=ALPHA)
    _assert_state(cli, api, {})

    dry = CliRunner().invoke(main, ["apply", *map(str, args[:4]), "--dry-run", "--json"])
    assert json.loads(dry.output)["matches"][0]["translated"] == lines[0].strip()

    folders = [trio[r]["folder"] for r in ("std", "robust", "init")]
    rwsfmt.save(rwsfmt.extract(*folders), tmp_path / "from_folders.rws")
    shown = CliRunner().invoke(main, ["inspect", str(tmp_path / "from_folders.rws")])
    assert "transformers' names on disk (save_pretrained) of ViTForImageClassification" in (
        " ".join(shown.output.split())
    )


def _fused_trio(kind: str, tmp_path: Path) -> tuple[type, dict[str, dict]]:
    if kind == "dinov2_swiglu":  # gate and up: one tensor on disk, two in memory (Chunk)
        cls, config = (
            T.Dinov2Model,
            T.Dinov2Config(
                hidden_size=16,
                num_hidden_layers=1,
                num_attention_heads=2,
                mlp_ratio=2,
                image_size=8,
                patch_size=4,
                use_swiglu_ffn=True,
            ),
        )
    else:  # experts: one tensor per expert on disk, one 3-D tensor in memory
        cls, config = (
            T.MixtralForCausalLM,
            T.MixtralConfig(
                vocab_size=50,
                hidden_size=16,
                intermediate_size=32,
                num_hidden_layers=1,
                num_attention_heads=2,
                num_key_value_heads=1,
                num_local_experts=2,
                num_experts_per_tok=1,
                max_position_embeddings=16,
            ),
        )
    return cls, _trio(cls, config, tmp_path)


@pytest.mark.parametrize(("kind", "fused"), [("dinov2_swiglu", "weights_in"), ("mixtral", "w1")])
def test_fused_tensors_are_refused_by_name(kind: str, fused: str, tmp_path: Path) -> None:
    cls, trio = _fused_trio(kind, tmp_path)
    folders = [trio[r]["folder"] for r in ("std", "robust", "init")]
    files = [trio[r]["file"] for r in ("std", "robust", "init")]
    live = cls.from_pretrained(trio["std"]["folder"])
    before = {k: v.clone() for k, v in live.state_dict().items()}

    sig = rwsfmt.extract(*folders, include="experts|mlp", layers="all")
    with pytest.raises(RwsError) as info:
        rwsfmt.patch(live, sig, alpha=ALPHA)
    message = str(info.value)
    assert fused in message and "fused or split differently" in message
    assert "--exclude" in message or "exclude=" in message
    assert all(torch.equal(v, before[k]) for k, v in live.state_dict().items())

    sig = rwsfmt.extract(*files, include="experts|mlp", layers="all")
    with pytest.raises(RwsError, match="fused or split differently"):
        rwsfmt.apply_checkpoint(trio["std"]["folder"], sig, tmp_path / "out", alpha=ALPHA)
    assert not (tmp_path / "out").exists()

    # what is not fused still translates
    sig = rwsfmt.extract(*folders, include="attn|attention", layers="all")
    with rwsfmt.patched(live, sig, alpha=ALPHA) as handle:
        assert handle.names


def test_without_transformers_names_stay_as_they_are(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No conversion mapping to import (transformers absent or 4.x): rwsfmt matches names as
    before, and the error says what would translate them."""
    cls, config = CONFIGS["vit"]
    trio = _trio(cls, config, tmp_path)
    sig = rwsfmt.extract(*(trio[r]["folder"] for r in ("std", "robust", "init")), layers="all")
    live = cls.from_pretrained(trio["std"]["folder"])
    monkeypatch.setitem(sys.modules, "transformers.conversion_mapping", None)
    with pytest.raises(RwsError, match=r"is missing from the model") as info:
        rwsfmt.patch(live, sig, alpha=ALPHA)
    assert "pip install 'rwsfmt[hf]'" in str(info.value)
