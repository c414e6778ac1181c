"""pyproject.toml lists every package of the library, so a regular (not editable) install
ships them all: setuptools' explicit `packages` does not include subpackages by itself."""

from __future__ import annotations

from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]


def test_every_library_package_is_listed():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = {
        ".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "rwsfmt").rglob("__init__.py")
    }
    assert found <= set(config["packages"])
