"""Packaging: pyproject.toml lists every package of the library (setuptools' explicit
`packages` does not include subpackages by itself); the wheel and sdist built from this tree
ship the license, the metadata, and what the README links and the tests read; the wheel,
installed on its own, runs."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]
# what a build must not see: VCS data, environments, earlier builds, caches, the dev symlink
_NOT_SOURCE = shutil.ignore_patterns(
    ".git",
    ".venv",
    "build",
    "dist",
    "*.egg-info",
    "__pycache__",
    ".*_cache",
    ".hypothesis",
    "*-output",
    "rwsfmt_cli",
    "*.whl",
)


def test_every_library_package_is_listed():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = {
        ".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "rwsfmt").rglob("__init__.py")
    }
    assert found <= set(config["packages"])


@pytest.fixture(scope="module")
def dists(tmp_path_factory) -> tuple[list[str], list[str], str, Path]:
    """(the wheel's member names, the sdist's member names relative to its top folder, the
    wheel's METADATA, the wheel's path), built from a copy of this tree by setuptools."""
    src = tmp_path_factory.mktemp("build") / "rwsfmt"
    shutil.copytree(ROOT, src, ignore=_NOT_SOURCE)
    build = "from setuptools import build_meta as b; b.build_sdist('dist'); b.build_wheel('dist')"
    subprocess.run([sys.executable, "-c", build], cwd=src, check=True, capture_output=True)
    (wheel,) = (src / "dist").glob("*.whl")
    (sdist,) = (src / "dist").glob("*.tar.gz")
    with zipfile.ZipFile(wheel) as z:
        wheel_names = z.namelist()
        metadata = z.read(next(n for n in wheel_names if n.endswith(".dist-info/METADATA")))
    with tarfile.open(sdist) as t:
        sdist_names = [m.name.partition("/")[2] for m in t.getmembers() if m.isfile()]
    return wheel_names, sdist_names, metadata.decode("utf-8"), wheel


def readme_links() -> list[str]:
    """The README's relative link targets (anchors within the README left out)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    targets = re.findall(r"\]\(([^)\s]+)\)", text)
    return [t.split("#")[0] for t in targets if not re.match(r"[a-z]+:|#", t)]


def present(link: str, names: list[str]) -> bool:
    """Whether `link` (a file, or a folder ending in '/') is among the member `names`."""
    return link in names or (link.endswith("/") and any(n.startswith(link) for n in names))


def test_the_wheel_ships_the_spec_the_license_and_the_metadata(dists):
    wheel, _, metadata, _ = dists
    for name in ["rwsfmt/spec/rws-format.md", "rwsfmt/spec/header.schema.json"]:
        assert name in wheel
    golden = sorted(n for n in (ROOT / "spec" / "vectors").iterdir() if n.suffix == ".rws")
    assert golden and all(f"rwsfmt/spec/vectors/{g.name}" in wheel for g in golden)
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in wheel)
    assert not [n for n in wheel if n.startswith(("tests/", "spec/", "benchmarks/"))]
    for field in [
        "License-Expression: Apache-2.0",
        "License-File: LICENSE",
        "Author: The rwsfmt maintainers",
        "Project-URL: ",
        "Provides-Extra: hf",
    ]:
        assert field in metadata, field
    spec_links = [link for link in readme_links() if link.startswith("spec/")]
    assert spec_links  # the README's spec links resolve in the installed package, rwsfmt/spec/
    assert all(present(f"rwsfmt/{link}", wheel) for link in spec_links)


def test_the_sdist_holds_what_the_readme_links_and_the_tests_read(dists):
    _, sdist, _, _ = dists
    assert {"LICENSE", "README.md", "pyproject.toml", "tests/conftest.py"} <= set(sdist)
    tracked = [p.relative_to(ROOT).as_posix() for p in (ROOT / "spec").rglob("*") if p.is_file()]
    assert set(tracked) <= set(sdist)
    missing = [link for link in readme_links() if not present(link, sdist)]
    assert not missing
    assert "LICENSE" in sdist and "Apache License" in (ROOT / "LICENSE").read_text()


def test_the_installed_wheel_runs_on_its_own(dists, tmp_path):
    *_, wheel = dists
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index"]
        + ["--no-compile", "--target", str(site), str(wheel)],
        check=True,
        capture_output=True,
    )
    env = {**os.environ, "PYTHONPATH": str(site)}  # the installed copy, not this tree

    def run(*args: str) -> str:
        result = subprocess.run(
            [str(a) for a in args], capture_output=True, text=True, env=env, cwd=tmp_path
        )
        assert result.returncode == 0, result.stderr
        return result.stdout

    rwsfmt = site / "bin" / "rwsfmt"
    assert "extract" in run(rwsfmt, "--help")
    golden = site / "rwsfmt" / "spec" / "vectors" / "mixed.rws"
    assert json.loads(run(rwsfmt, "inspect", golden, "--json"))["tensor_count"] > 0
    where = run(
        sys.executable,
        "-c",
        "import importlib.resources as r, rwsfmt, rwsfmt_cli; "
        "print(rwsfmt.__file__, rwsfmt_cli.__file__, r.files('rwsfmt') / 'spec' / 'rws-format.md')",
    ).split()
    assert all(Path(p).is_relative_to(site) for p in where) and Path(where[2]).is_file()
