"""Generated course files are in step with their sources; notebooks are committed clean.

Reference: tools/sync.py (jupytext pairs, Colab setup cell, README course map, ``--repo`` for
a fork).
"""

from __future__ import annotations

import os
import shutil
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


def _copy_course(dest: Path) -> Path:
    skip = shutil.ignore_patterns("__pycache__", ".ipynb_checkpoints", "*.pt")
    for part in ("lessons", "solutions", "labs", "qlib", "tools"):
        shutil.copytree(ROOT / part, dest / part, ignore=skip)
    shutil.copy(ROOT / "README.md", dest)
    return dest


def test_sync_repo_points_every_badge_and_setup_cell_at_a_fork(tmp_path):
    """``make sync REPO=owner/name``: one setting (``REPO_URL`` in qlib/runtime.py, rewritten)
    and every notebook's setup cell, the released labs' included, and every README badge
    follow it; afterwards ``--check`` finds nothing stale."""
    course = _copy_course(tmp_path / "course")
    env = dict(os.environ, PYTHONPATH=str(course))
    out = subprocess.run([sys.executable, "tools/sync.py", "--repo", "alice/q-fork"], cwd=course,
                         env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    fork = "https://github.com/alice/q-fork"
    assert f'REPO_URL = "{fork}"' in (course / "qlib" / "runtime.py").read_text()
    old = runtime.REPO_URL.split("//")[1]
    notebooks = sorted(course.glob("lessons/*.ipynb")) + sorted(course.glob("solutions/*/*.ipynb")) \
        + sorted(course.glob("labs/*/*.ipynb"))
    assert len(notebooks) == len(NOTEBOOKS)
    for path in notebooks:
        first = nbformat.read(path, as_version=4).cells[0].source
        assert f'REPO = "{fork}@' in first, path
        assert old not in path.read_text(), path
    readme = (course / "README.md").read_text()
    assert old not in readme.split("<!-- course-map -->")[1]
    assert readme.count("colab.research.google.com/github/alice/q-fork/blob/") == \
        len(list(course.glob("lessons/*.ipynb"))) + len(list(course.glob("labs/*/*.ipynb")))
    again = subprocess.run([sys.executable, "tools/sync.py", "--check"], cwd=course, env=env,
                           capture_output=True, text=True)
    assert again.returncode == 0, again.stdout + again.stderr


def test_sync_repo_rejects_what_is_not_owner_slash_name(tmp_path):
    course = _copy_course(tmp_path / "course")
    before = (course / "qlib" / "runtime.py").read_text()
    out = subprocess.run([sys.executable, "tools/sync.py", "--repo", "https://github.com/alice"],
                         cwd=course, env=dict(os.environ, PYTHONPATH=str(course)),
                         capture_output=True, text=True)
    assert out.returncode != 0 and "expected a GitHub repository as owner/name" in out.stderr
    assert (course / "qlib" / "runtime.py").read_text() == before


def test_setup_cell_says_what_to_change_when_the_repository_cannot_be_installed(monkeypatch):
    """On "Colab" (a stand-in google.colab module), an address pip cannot reach: a clear error."""
    import types

    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    src = runtime.setup_cell().replace(runtime.REPO_URL, "https://127.0.0.1:9/nobody/nothing")
    with pytest.raises(RuntimeError, match=r"make sync REPO=owner/name"):
        exec(src, {})


def test_each_source_and_its_notebook_hold_the_same_cells():
    """jupytext pairs each .py with its .ipynb (JupyterLab opens either): their cells must be the
    same text, setup cell included, or JupyterLab reports "File Load Error" when the .ipynb is
    the newer file, and shows the .py's old cells when the .py is (both happen on a checkout).
    This held for every cell but the setup cell, which sync wrote into the .ipynb only."""
    import jupytext

    for py in sorted(ROOT.glob("lessons/*.py")) + sorted(ROOT.glob("solutions/*/*.py")):
        paired = [c.source for c in jupytext.read(py).cells]
        written = [c.source for c in nbformat.read(py.with_suffix(".ipynb"), as_version=4).cells]
        assert paired == written, f"{py.relative_to(ROOT)} and its .ipynb differ: run `make sync`"
