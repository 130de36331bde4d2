"""The committed release ``labs/`` equals what nbgrader generates from ``solutions/`` now.

Reference: nbgrader generate_assignment (tools/release.py), run into a temporary copy.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import release  # noqa: E402

pytestmark = pytest.mark.grading


def comparable(path: Path) -> dict:
    nb = json.loads(path.read_text())
    for cell in nb["cells"]:
        cell.pop("id", None)
    return nb


def test_every_solution_has_a_release_and_no_more():
    assert release.labs() == sorted(p.name for p in (ROOT / "labs").iterdir() if p.is_dir())


def test_committed_release_is_in_sync(tmp_path):
    shutil.copy(ROOT / "nbgrader_config.py", tmp_path)
    shutil.copytree(ROOT / "solutions", tmp_path / "solutions",
                    ignore=shutil.ignore_patterns("*.py", ".ipynb_checkpoints"))
    release.generate(tmp_path)
    for lab in release.labs():
        fresh = sorted(p.relative_to(tmp_path / "labs") for p in (tmp_path / "labs" / lab).rglob("*") if p.is_file())
        committed = sorted(p.relative_to(ROOT / "labs") for p in (ROOT / "labs" / lab).rglob("*") if p.is_file())
        assert fresh == committed, f"labs/{lab} files differ: run `make release`"
        for rel in fresh:
            if rel.suffix == ".ipynb":
                assert comparable(tmp_path / "labs" / rel) == comparable(ROOT / "labs" / rel), \
                    f"labs/{rel} is out of sync with solutions/: run `make release`"


def test_release_has_no_answers():
    for path in (ROOT / "labs").rglob("*"):
        assert path.suffix != ".py", f"{path} would leak a solution"
        if path.suffix == ".ipynb":
            text = path.read_text()
            assert "BEGIN SOLUTION" not in text and "BEGIN HIDDEN TESTS" not in text


def test_release_is_not_paired_with_jupytext():
    """A release notebook with jupytext pairing metadata makes every student's save write a
    ``.py`` twin holding the answers; tools/release.py strips it (the sources keep it)."""
    for path in sorted((ROOT / "labs").rglob("*.ipynb")):
        assert "jupytext" not in json.loads(path.read_text())["metadata"], path
    for path in sorted((ROOT / "solutions").rglob("*.ipynb")):
        assert "jupytext" in json.loads(path.read_text())["metadata"], path
