"""Hugging Face model ids (`org/name[@revision]`) read from a real cache layout, offline.

The cache is built as huggingface_hub builds it: `models--org--name/blobs/<etag>` (sha256 for
LFS weight files, the git blob sha1 for the others), `snapshots/<commit>/<file>` relative
symlinks into `blobs/`, and `refs/<branch>` holding the commit. huggingface_hub's own
`scan_cache_dir` and transformers' `from_pretrained(local_files_only=True)` read it back.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import reference_reader
import torch
from architectures import tiny_bert_config
from click.testing import CliRunner
from safetensors.torch import load_file

import rwsfmt
from rwsfmt.extraction import output_label
from rwsfmt.hub import hub_cache
from rwsfmt.io import open_checkpoint
from rwsfmt_cli.main import main

transformers = pytest.importorskip("transformers")
huggingface_hub = pytest.importorskip("huggingface_hub")

ROOT = Path(__file__).resolve().parents[1]
LFS = (".safetensors", ".bin")  # stored with git LFS on the Hub: blobs named by sha256


def tiny_bert(seed: int, shift: float = 0.0) -> torch.nn.Module:
    """A 2-layer BERT of width 32, its weights moved by `shift` x a seeded draw."""
    torch.manual_seed(0)
    config = tiny_bert_config(hidden_size=32, intermediate_size=64, max_position_embeddings=32)
    model = transformers.BertModel(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(shift * torch.randn(p.shape, generator=gen))
    return model


def cache_model(cache: Path, repo_id: str, folder: Path, revision: str = "main") -> str:
    """Put the files of `folder` into the hub cache `cache` as revision `revision` of
    `repo_id`, exactly as huggingface_hub lays a download out; returns the commit hash."""
    storage = cache / f"models--{repo_id.replace('/', '--')}"
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    commit = hashlib.sha1(
        b"".join(p.relative_to(folder).as_posix().encode() + p.read_bytes() for p in files)
    ).hexdigest()
    for file in files:
        data = file.read_bytes()
        if file.name.endswith(LFS):
            etag = hashlib.sha256(data).hexdigest()
        else:
            etag = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        blob = storage / "blobs" / etag
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = storage / "snapshots" / commit / file.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (storage / "refs").mkdir(exist_ok=True)
    (storage / "refs" / revision).write_text(commit)  # no newline, as huggingface_hub writes
    return commit


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A cache holding org/init, org/std and org/robust (sharded safetensors folders saved
    with save_pretrained), pointed to by HF_HUB_CACHE, offline; the local folders too."""
    cache, local = tmp_path / "hf-cache", tmp_path / "saved"
    models = {"init": tiny_bert(0), "std": tiny_bert(1, 0.01), "robust": tiny_bert(2, 0.01)}
    commits = {}
    for name, model in models.items():
        model.save_pretrained(local / name, max_shard_size="20KB")
        commits[name] = cache_model(cache, f"org/{name}", local / name)
    assert (local / "std" / "model.safetensors.index.json").exists()  # sharded
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    return cache, local, commits


def rwsfmt_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`rwsfmt ARGS` as a user runs it, in a fresh process with this environment."""
    return subprocess.run(
        [sys.executable, "-m", "rwsfmt", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=os.environ.copy(),
    )


def run(*args: str) -> tuple[int, str]:
    """`rwsfmt ARGS` in this process: (exit code, stdout and stderr)."""
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


def cache_digest(cache: Path) -> dict[str, str]:
    """Every path of the cache with its link target or bytes' hash."""
    out = {}
    for p in sorted(cache.rglob("*")):
        key = str(p.relative_to(cache))
        if p.is_symlink():
            out[key] = "-> " + os.readlink(p)
        elif p.is_file():
            out[key] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def test_the_cache_layout_is_the_one_huggingface_hub_and_transformers_read(hub):
    cache, local, commits = hub
    info = huggingface_hub.scan_cache_dir(cache)
    assert not info.warnings
    repos = {r.repo_id: r for r in info.repos}
    assert set(repos) == {"org/init", "org/std", "org/robust"}
    (revision,) = repos["org/std"].revisions
    assert revision.commit_hash == commits["std"] and revision.refs == {"main"}
    loaded = transformers.BertModel.from_pretrained(
        "org/std", cache_dir=cache, local_files_only=True
    )
    saved = tiny_bert(1, 0.01).state_dict()
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, saved[name]), name


def test_extract_reads_hub_ids_from_the_cache_as_typed(hub):
    cache, local, commits = hub
    before = cache_digest(cache)
    result = rwsfmt_cli("extract", "org/std", "org/robust", "org/init", "-o", "x.rws")
    assert result.returncode == 0, result.stderr
    by_id = rwsfmt.load("x.rws")
    by_path = rwsfmt.extract(local / "std", local / "robust", local / "init")
    assert by_id.names == by_path.names
    for name in by_id.names:
        assert torch.equal(by_id.tensor(name), by_path.tensor(name)), name
    assert by_id.label == "x"  # the repo name "robust" is generic: -o's stem
    assert output_label("org/robust@main", "fog.rws") == "fog"
    inputs = {r["role"]: r for r in by_id.provenance["inputs"]}
    assert inputs["std"]["name"] == "org/std"
    assert inputs["std"]["hub"] == {
        "repo_id": "org/std",
        "revision": "main",
        "commit": commits["std"],
    }
    assert cache_digest(cache) == before
    schema = json.loads((ROOT / "spec" / "header.schema.json").read_text(encoding="utf-8"))
    header, _ = reference_reader.read("x.rws")
    jsonschema.Draft202012Validator(schema).validate(header)
    result = rwsfmt_cli("inspect", "x.rws")
    assert f"org/std at {commits['std'][:12]}" in result.stdout


def test_hf_home_is_honoured_when_hf_hub_cache_is_unset(hub, monkeypatch, tmp_path):
    cache, local, _ = hub
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert run("inspect", "org/std")[0] == 2  # not under HF_HOME/hub yet
    (tmp_path / "home").mkdir()
    os.rename(cache, tmp_path / "home" / "hub")
    result = rwsfmt_cli("inspect", "org/std", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["path"] == "org/std"


@pytest.mark.parametrize(
    "env",
    [
        {},
        {"HF_HOME": "/x/home"},
        {"XDG_CACHE_HOME": "/x/xdg"},
        {"HF_HOME": "~/hf", "HF_HUB_CACHE": "$SOMEWHERE/hub"},
        {"HUGGINGFACE_HUB_CACHE": "/x/legacy"},
    ],
)
def test_the_cache_folder_is_huggingface_hubs(env, monkeypatch):
    for key in ("HF_HOME", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(key, raising=False)
    for key, value in {**env, "SOMEWHERE": "/x/somewhere"}.items():
        monkeypatch.setenv(key, value)
    theirs = subprocess.run(
        [sys.executable, "-c", "import huggingface_hub.constants as c; print(c.HF_HUB_CACHE)"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert hub_cache() == theirs


def two_revisions(hub) -> tuple[str, str]:
    """org/std gets a tag v1 holding other weights: (main's commit, v1's commit)."""
    cache, local, commits = hub
    tiny_bert(7, 0.05).save_pretrained(local / "std-v1", max_shard_size="20KB")
    return commits["std"], cache_model(cache, "org/std", local / "std-v1", revision="v1")


def test_a_revision_is_read_from_refs_or_given_as_a_commit(hub):
    main, v1 = two_revisions(hub)
    want = tiny_bert(7, 0.05).state_dict()["embeddings.word_embeddings.weight"]
    name = "embeddings.word_embeddings.weight"
    for source, revision in [("org/std@v1", None), ("org/std", "v1"), (f"org/std@{v1}", None)]:
        with open_checkpoint(source, revision=revision) as ckpt:
            assert torch.equal(ckpt.tensor(name), want), (source, revision)
    with open_checkpoint("org/std") as ckpt:
        assert not torch.equal(ckpt.tensor(name), want)
    code, output = run(
        "extract", "org/std", "org/robust", "org/init", "-o", "v1.rws", "--revision", "v1"
    )
    assert code == 2 and "hf download org/robust --revision v1" in output  # only std has v1
    code, output = run(
        "extract", "org/std@v1", "org/robust", "org/init", "-o", "v1.rws", "--layers", "all"
    )
    assert code == 0, output
    inputs = {r["role"]: r for r in rwsfmt.load("v1.rws").provenance["inputs"]}
    assert inputs["std"]["hub"]["commit"] == v1 and inputs["robust"]["hub"]["commit"] != v1


def test_two_different_revisions_are_refused(hub):
    with pytest.raises(rwsfmt.RwsError, match="two revisions"):
        open_checkpoint("org/std@v1", revision="v2")


def test_a_model_missing_from_the_cache_says_how_to_get_it(hub):
    result = rwsfmt_cli("extract", "org/std", "org/nothing", "org/init", "-o", "x.rws")
    assert result.returncode == 2
    assert "org/nothing: no such file or folder, and no Hugging Face model" in result.stderr
    assert "hf download org/nothing" in result.stderr and "--download" in result.stderr
    assert "Traceback" not in result.stderr
    result = rwsfmt_cli(
        "extract", "org/std", "org/nothing", "org/init", "-o", "x.rws", "--download"
    )
    assert result.returncode == 2  # HF_HUB_OFFLINE=1: nothing is downloaded
    assert "HF_HUB_OFFLINE is set" in result.stderr
    assert not Path("x.rws").exists()


def test_download_says_when_the_hub_cannot_be_reached(hub, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # a closed local port: no network
    result = rwsfmt_cli("apply", "org/nothing", "x.rws", "--alpha", "0.8", "--download")
    assert result.returncode == 2, result.stderr
    assert "the Hub could not be reached" in result.stderr
    assert "hf download org/nothing" in result.stderr


def test_without_huggingface_hub_an_id_says_what_to_install(hub, monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # `import` raises ImportError
    with pytest.raises(rwsfmt.RwsError, match=r"pip install 'rwsfmt\[hf\]'"):
        open_checkpoint("org/std")
    with pytest.raises(rwsfmt.RwsError, match="no such file or folder"):
        open_checkpoint("not-an-id.pt")


def test_a_local_path_wins_over_an_id(hub):
    cache, local, _ = hub
    Path("org").mkdir()
    os.symlink(local / "robust", "org/std")  # ./org/std is robust's folder
    with open_checkpoint("org/std") as ckpt:
        name = ckpt.names[0]
        assert torch.equal(ckpt.tensor(name), tiny_bert(2, 0.01).state_dict()[name])


def test_apply_to_an_id_writes_a_new_folder_here_never_into_the_cache(hub, tmp_path):
    cache, local, commits = hub
    assert (
        rwsfmt_cli("extract", "org/std", "org/robust", "org/init", "-o", "fog.rws").returncode == 0
    )
    before = cache_digest(cache)
    result = rwsfmt_cli("apply", "org/std", "fog.rws", "--alpha", "0.8")
    assert result.returncode == 0, result.stderr
    out = tmp_path / "std-fog"
    assert f"wrote {out.name}" in result.stdout
    assert "new name in the current folder (the Hugging Face cache is never" in result.stdout
    assert cache_digest(cache) == before
    patched = transformers.BertModel.from_pretrained(out).state_dict()
    want = rwsfmt.apply(tiny_bert(1, 0.01).state_dict(), [(rwsfmt.load("fog.rws"), 0.8)])
    for name, value in patched.items():
        assert torch.equal(value, want[name]), name
    assert not any(p.is_symlink() for p in out.rglob("*"))  # the blobs' bytes, not links
    shards = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(shards.values())) > 1
    load_file(out / sorted(set(shards.values()))[0])
    # into the cache: refused, whatever the spelling
    snapshot = cache / "models--org--std" / "snapshots" / commits["std"]
    for model, *args in (
        ["org/std", "--in-place"],
        ["org/std", "-o", snapshot],
        ["org/std", "-o", cache / "patched"],
        [snapshot, "--in-place"],
    ):
        code, output = run("apply", model, "fog.rws", "--alpha", "0.8", *args)
        assert code == 2 and "inside the Hugging Face cache" in output, (model, args)
    assert cache_digest(cache) == before


def test_a_snapshot_link_leading_out_of_the_repo_is_refused(hub, tmp_path):
    cache, local, commits = hub
    secret = tmp_path / "secret.txt"
    secret.write_text("not a model file")
    link = cache / "models--org--std" / "snapshots" / commits["std"] / "notes.txt"
    link.symlink_to(secret)
    with pytest.raises(rwsfmt.RwsError, match="outside the model's cache folder"):
        open_checkpoint("org/std")
