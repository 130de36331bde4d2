"""Generated course files are in step with their sources; notebooks are committed clean.

Reference: tools/sync.py (jupytext pairs, Colab setup cell, README course map).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from qlib import runtime

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted(ROOT.glob("lessons/*.ipynb")) + sorted(ROOT.glob("solutions/*/*.ipynb")) \
    + sorted(ROOT.glob("labs/*/*.ipynb"))


def test_sync_check_passes():
    out = subprocess.run([sys.executable, "tools/sync.py", "--check"], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.relative_to(ROOT).as_posix() for p in NOTEBOOKS])
def test_notebook_is_clean_and_starts_with_the_setup_cell(path):
    nb = nbformat.read(path, as_version=4)
    assert nb.cells[0].source == runtime.setup_cell()
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.outputs, "commit notebooks without outputs"


def test_setup_cell_does_nothing_off_colab():
    namespace = {}
    exec(runtime.setup_cell(), namespace)  # would pip install only on Colab
    assert "google.colab" not in sys.modules


def test_repository_url_lives_in_one_place():
    hits = subprocess.run(["git", "grep", "-l", runtime.REPO_URL.split("//")[1]], cwd=ROOT,
                          capture_output=True, text=True).stdout.split()
    allowed = {"qlib/runtime.py", "README.md"}  # README: generated badges
    generated = {p for p in hits if p.endswith((".ipynb", ".py")) and p.startswith(
        ("lessons/", "solutions/", "labs/"))}
    assert set(hits) - generated <= allowed


def test_readme_links_every_notebook_with_a_colab_badge():
    readme = (ROOT / "README.md").read_text()
    for path in sorted(ROOT.glob("lessons/*.ipynb")) + sorted(ROOT.glob("labs/*/*.ipynb")):
        rel = path.relative_to(ROOT).as_posix()
        assert runtime.colab_url(rel) in readme, rel
