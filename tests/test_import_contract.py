"""The import contract (pyproject.toml [tool.importlinter], run by .ci/run as ``lint-imports``)
holds on lensattr, and fails when a lower layer imports a higher one or a cycle comes back:
checked on a copy of the package with one such import added."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("importlinter", reason="import-linter is in the dev extra")


def _lint(tree: Path) -> subprocess.CompletedProcess:
    code = ("import sys; from importlinter.cli import lint_imports_command; "
            "sys.argv = ['lint-imports', '--no-cache']; lint_imports_command()")
    return subprocess.run([sys.executable, "-c", code], cwd=tree, capture_output=True,
                          text=True, env={"PYTHONPATH": str(tree), "PATH": ""}, timeout=300)


def _copy(tmp_path: Path) -> Path:
    tree = tmp_path / "tree"
    tree.mkdir()
    shutil.copytree(ROOT / "lensattr", tree / "lensattr",
                    ignore=shutil.ignore_patterns("weights", "__pycache__", "*.safetensors"))
    shutil.copy(ROOT / "pyproject.toml", tree / "pyproject.toml")
    return tree


def _append(path: Path, line: str) -> None:
    path.write_text(path.read_text() + "\n" + line + "\n")


def test_contract_is_kept(tmp_path):
    got = _lint(_copy(tmp_path))
    assert got.returncode == 0, got.stdout[-2000:] + got.stderr[-2000:]
    assert "2 kept, 0 broken" in got.stdout


def test_a_lower_layer_importing_a_higher_one_breaks_it(tmp_path):
    tree = _copy(tmp_path)
    _append(tree / "lensattr/evidence/sweeps.py", "from ..compare import judge  # noqa")
    got = _lint(tree)
    assert got.returncode != 0
    assert "BROKEN" in got.stdout and "lensattr.evidence.sweeps -> lensattr.compare" in got.stdout


def test_a_cycle_between_siblings_breaks_it(tmp_path):
    tree = _copy(tmp_path)  # stats.selection imports stats.inference; add the way back
    _append(tree / "lensattr/stats/inference.py", "from . import selection  # noqa")
    got = _lint(tree)
    assert got.returncode != 0
    assert "No cycles are allowed in lensattr.stats" in got.stdout
