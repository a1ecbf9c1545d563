"""The import contract (.importlinter): kept by the tree, broken by one planted upward import
or by a module no layer names, as `launch/check_imports.py` (run before the suite) reports."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "launch" / "check_imports.py"
SOURCES = ("megalora", "train", "data", "parallel", "export")


def _check(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), str(root)], capture_output=True, text=True, timeout=300)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A copy of the package sources, pyproject.toml and the contract."""
    for name in SOURCES:
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__", "assets"))
    for name in ("pyproject.toml", ".importlinter"):
        shutil.copy(ROOT / name, tmp_path / name)
    return tmp_path


def test_the_tree_keeps_the_contract() -> None:
    result = _check(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Layers import only downwards KEPT" in result.stdout


def test_an_upward_import_breaks_it(tree: Path) -> None:
    assert _check(tree).returncode == 0  # the copy alone keeps it: the planted line is what breaks it
    config = tree / "megalora" / "config.py"
    config.write_text(config.read_text() + "\nfrom megalora.train.recipe import train  # noqa: E402\n")
    result = _check(tree)
    assert result.returncode != 0
    assert "Layers import only downwards BROKEN" in result.stdout
    assert "megalora.config -> megalora.train.recipe" in result.stdout


def test_a_module_in_no_layer_breaks_it(tree: Path) -> None:
    (tree / "train" / "stray.py").write_text('"""A new file that no layer names."""\n')
    result = _check(tree)
    assert result.returncode != 0
    assert "modules in no layer of .importlinter: megalora.train.stray" in result.stderr
