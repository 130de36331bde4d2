"""Where the course runs: fast mode, quiet progress bars, Colab, and the repository URL.

- ``QLIB_FAST=1`` makes notebooks and benchmarks small (fewer epochs, fewer samples) while
  taking the same code paths; tests set it. ``pick(full, fast)`` chooses a number by mode.
- ``QLIB_QUIET=1`` hides tqdm progress bars (tests set it).
- ``benchmark_result(name)`` reads a saved benchmark JSON (``benchmarks/results/NAME.json``)
  for a lesson that quotes its numbers; where the file is absent it says how to make it.
- ``REPO_URL`` is the one place the course's repository address is written; the first cell
  of every notebook and the README's Colab badges are generated from it (``tools/sync.py``).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

REPO_URL = "https://github.com/qdm-course/quantization-course"
"""The course repository. Change it here, then run ``make sync`` to update notebooks and README."""

REPO_BRANCH = "main"


def fast() -> bool:
    """True when ``QLIB_FAST=1``: notebooks and benchmarks run their small version."""
    return os.environ.get("QLIB_FAST", "0") == "1"


def autograding() -> bool:
    """True while nbgrader autogrades this notebook (it sets ``NBGRADER_EXECUTION=autograde``):
    a lab can skip a locked, ungraded study cell that only informs a written answer."""
    return os.environ.get("NBGRADER_EXECUTION") == "autograde"


def quiet() -> bool:
    """True when ``QLIB_QUIET=1``: progress bars stay hidden."""
    return os.environ.get("QLIB_QUIET", "0") == "1"


def pick(full, fast_value):
    """``fast_value`` in fast mode, else ``full``: ``epochs = pick(40, 3)``."""
    return fast_value if fast() else full


def on_colab() -> bool:
    """True inside Google Colab."""
    return "google.colab" in sys.modules


def colab_url(path: str) -> str:
    """The "Open in Colab" address of a notebook at ``path`` in the repository."""
    repo = REPO_URL.removeprefix("https://github.com/")
    return f"https://colab.research.google.com/github/{repo}/blob/{REPO_BRANCH}/{path}"


def setup_cell() -> str:
    """The source of every notebook's first cell: on Colab it installs qlib, elsewhere nothing.

    pip keeps the torch that Colab ships, since qlib asks for a range, not a pin.
    """
    return (
        "# Setup: on Google Colab this installs qlib from the course repository;\n"
        "# anywhere else (JupyterLab from `make lab`) it does nothing.\n"
        "import subprocess, sys\n"
        f"REPO = \"{REPO_URL}@{REPO_BRANCH}\"\n"
        "if \"google.colab\" in sys.modules:\n"
        "    r = subprocess.run([sys.executable, \"-m\", \"pip\", \"install\", \"-q\", \"qlib @ git+\" + REPO],\n"
        "                       capture_output=True, text=True)\n"
        "    if r.returncode != 0:\n"
        "        raise RuntimeError(\"Could not install qlib from \" + REPO + \" (is the repository public, and is \"\n"
        "                           \"this its address?). For a fork: run `make sync REPO=owner/name` and commit, \"\n"
        "                           \"or edit REPO in this cell.\\n\" + r.stderr[-800:])"
    )


def benchmark_candidates(name: str) -> list[Path]:
    """Where ``benchmarks/results/NAME.json`` may be: next to the installed qlib (a clone of the
    repository), then ``../benchmarks/results`` seen from the current folder (a lesson's folder)."""
    if not isinstance(name, str) or not name or "/" in name or "\\" in name:
        raise ValueError(f"name must be a benchmark name such as 'ptq' or 'ptq.json', got {name!r}")
    file = name if name.endswith(".json") else name + ".json"
    repo = Path(__file__).resolve().parents[1]
    return [repo / "benchmarks" / "results" / file, Path.cwd().parent / "benchmarks" / "results" / file]


def benchmark_result(name: str) -> dict | None:
    """The saved result of benchmark ``name`` (``"ptq"`` reads ``benchmarks/results/ptq.json``) as a dict.

    Lessons quote measured numbers from these files instead of typing them in. On Colab or a
    pip install the file is not there: this prints one line saying how to produce it
    (``python benchmarks/NAME.py`` from the repository root) and returns ``None``, so the
    lesson carries on without the table.
    """
    candidates = benchmark_candidates(name)
    found = next((p for p in candidates if p.is_file()), None)
    if found is None:
        stem = candidates[0].stem
        print(f"benchmarks/results/{stem}.json not found (e.g. on Colab or a pip install): "
              f"run `python benchmarks/{stem}.py` from the repository root to create it")
        return None
    return json.loads(found.read_text())
