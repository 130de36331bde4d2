"""Shared test settings: fast mode, quiet progress bars, paths, seeds, hypothesis profiles.

Seeds: every test starts with torch, numpy and ``random`` seeded (autouse fixture
``seed_everything``) from a base seed and the test's id, so a failure reproduces on its own
(``pytest path::test``) and does not depend on which tests ran before it. The base seed is
``QLIB_TEST_SEED`` (default 0: the same draws on every run, as CI needs); set it to another
integer, or to ``random`` for a fresh one per session, to explore other draws. The base seed is
printed in the header, and a failing test's report names both seeds.

Hypothesis: profile ``ci`` (loaded unless ``HYPOTHESIS_PROFILE`` says otherwise) derandomizes
(examples derived from the test itself, so a failure reproduces) and has no deadline (a loaded
2-core machine makes timings meaningless); ``HYPOTHESIS_PROFILE=dev`` draws fresh examples.
"""

from __future__ import annotations

import os
import random
import sys
import zlib
from pathlib import Path

import pytest
from hypothesis import settings

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

os.environ.setdefault("QLIB_FAST", "1")
os.environ.setdefault("QLIB_QUIET", "1")
# nbgrader calls alembic as a subprocess: the venv's bin must come first on PATH.
os.environ["PATH"] = str(BIN) + os.pathsep + os.environ.get("PATH", "")

SEED_ENV = "QLIB_TEST_SEED"

settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
settings.register_profile("dev", deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def base_seed() -> int:
    """The session's base seed: ``QLIB_TEST_SEED`` (an integer, or ``random``), default 0."""
    value = os.environ.get(SEED_ENV, "0").strip()
    if value == "random":
        value = os.environ[SEED_ENV] = str(random.SystemRandom().randrange(2**31))
    try:
        return int(value)
    except ValueError:
        raise pytest.UsageError(f"{SEED_ENV} must be an integer or 'random', got {value!r}") from None


def test_seed(nodeid: str, base: int) -> int:
    """One test's seed: its id mixed with the base seed (stable whatever runs before it)."""
    return zlib.crc32(f"{base}:{nodeid}".encode()) % 2**31


test_seed.__test__ = False  # a helper, not a test


def pytest_configure(config):
    config.qlib_base_seed = base_seed()
    # Triton first, through qlib: on a machine without an int8-capable GPU, qlib turns on Triton's
    # CPU interpreter, which must happen before anything (torch.fx, ao passes) imports triton.
    # Without this, the kernel tests failed when a QAT test that imports triton ran before them
    # in the same process (an order pytest-xdist can produce).
    try:
        from qlib.kernels import load_triton
        load_triton()
    except ImportError:
        pass  # no Triton (macOS, Windows): the kernel tests skip


def pytest_report_header(config):
    return (f"{SEED_ENV}={config.qlib_base_seed} (torch/numpy/random seeded per test); "
            f"hypothesis profile {settings.get_current_profile_name()}")


@pytest.fixture(autouse=True)
def seed_everything(request):
    """Seed torch (every device), numpy and ``random`` for this test; the seed is reported on failure."""
    import numpy as np
    import torch

    seed = test_seed(request.node.nodeid, request.config.qlib_base_seed)
    request.node.qlib_seed = seed
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    yield seed


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)  # fixtures read it (test_browser's screenshot)
    seed = getattr(item, "qlib_seed", None)
    if report.failed and seed is not None:
        report.sections.append((
            "seeds", f"{SEED_ENV}={item.config.qlib_base_seed}: this test ran with torch/numpy/random "
                     f"seeded {seed}. Reproduce: {SEED_ENV}={item.config.qlib_base_seed} "
                     f"python -m pytest '{item.nodeid}'"))


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
def fast_benchmark(tmp_path_factory):
    """``run(name, timeout=900) -> (result dict, stdout)``: ``benchmarks/<name>.py --fast`` in a
    subprocess (as a user runs it), its JSON written to a temporary file; a non-zero exit fails
    with the benchmark's output."""
    import json
    import subprocess

    def run(name: str, timeout: int = 900):
        out = tmp_path_factory.mktemp("bench") / f"{name}.json"
        proc = subprocess.run([sys.executable, f"benchmarks/{name}.py", "--fast", "--out", str(out)], cwd=ROOT,
                              capture_output=True, text=True, timeout=timeout)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return json.loads(out.read_text()), proc.stdout
    return run


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


def pytest_collection_modifyitems(config, items):
    """The website's tests come last: under `make test` (pytest-xdist, --dist loadfile: each test
    module on one worker, so its module fixtures run once) they then find most lessons already
    executed by test_notebooks.py (tools/book.py reuses them) and execute only the rest."""
    book = [item for item in items if item.path.name == "test_book.py"]
    if book:
        items[:] = [item for item in items if item.path.name != "test_book.py"] + book
