"""Every lesson and every solution notebook executes top to bottom in fast mode.

Reference: nbclient (the executor JupyterLab and nbgrader use). Each notebook's wall time is
printed (run pytest with -s to see it, or read the durations table).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted(ROOT.glob("lessons/*.ipynb")) + sorted(ROOT.glob("solutions/*/*.ipynb"))
TIMEOUT_PER_CELL = 600


def execute(path: Path) -> float:
    nb = nbformat.read(path, as_version=4)
    env_before = dict(os.environ)
    os.environ.update(QLIB_FAST="1", QLIB_QUIET="1", MPLBACKEND="Agg")
    try:
        client = NotebookClient(nb, timeout=TIMEOUT_PER_CELL, kernel_name="python3",
                                resources={"metadata": {"path": str(path.parent)}})
        start = time.perf_counter()
        client.execute()
        return time.perf_counter() - start
    finally:
        os.environ.clear()
        os.environ.update(env_before)


@pytest.mark.notebook
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.relative_to(ROOT).as_posix() for p in NOTEBOOKS])
def test_notebook_executes(path: Path, request):
    seconds = execute(path)
    rel = path.relative_to(ROOT).as_posix()
    print(f"\n[notebook time] {rel}: {seconds:.1f} s")
    if not hasattr(request.config, "notebook_times"):
        request.config.notebook_times = {}
    request.config.notebook_times[rel] = seconds  # printed at the end by conftest


def test_every_notebook_is_found():
    assert any("lessons" in str(p) for p in NOTEBOOKS)
    assert any("solutions" in str(p) for p in NOTEBOOKS)
