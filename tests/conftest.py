"""Shared test settings: fast mode, quiet progress bars, paths, the venv's commands."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

os.environ.setdefault("QLIB_FAST", "1")
os.environ.setdefault("QLIB_QUIET", "1")
# nbgrader calls alembic as a subprocess: the venv's bin must come first on PATH.
os.environ["PATH"] = str(BIN) + os.pathsep + os.environ.get("PATH", "")


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tiny models run faster on one torch thread (no OpenMP hand-offs), more so on 2 shared cores."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def digits8():
    from qlib import data
    return data.load_digits(8)


@pytest.fixture(scope="session")
def digits16():
    from qlib import data
    return data.load_digits(16)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Print each executed notebook's wall time (tests/test_notebooks.py records them)."""
    times = getattr(config, "notebook_times", {})
    if times:
        terminalreporter.write_sep("-", "notebook execution times (QLIB_FAST=1)")
        for name, seconds in sorted(times.items()):
            terminalreporter.write_line(f"{seconds:7.1f} s  {name}")
        terminalreporter.write_line(f"{sum(times.values()):7.1f} s  total")
