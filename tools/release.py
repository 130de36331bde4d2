"""Regenerate the student release ``labs/`` from ``solutions/`` (``make release``).

Runs ``nbgrader generate_assignment`` for every lab in ``solutions/``: answers between
``### BEGIN SOLUTION`` and ``### END SOLUTION`` become ``raise NotImplementedError()``,
hidden tests are removed, outputs are cleared. ``tests/test_release.py`` regenerates into a
temporary directory and fails when the committed ``labs/`` differs.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def labs(root: Path = ROOT) -> list[str]:
    return sorted(p.name for p in (root / "solutions").iterdir()
                  if p.is_dir() and p.name.startswith("lab"))


def nbgrader_env() -> dict[str, str]:
    """nbgrader runs alembic as a subprocess: put this Python's bin first on PATH."""
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


def generate(root: Path = ROOT) -> None:
    for lab in labs(root):
        subprocess.run([str(Path(sys.executable).parent / "nbgrader"), "generate_assignment",
                        lab, "--force", "--log-level=WARN"],
                       cwd=root, env=nbgrader_env(), check=True)
        print(f"released labs/{lab}")


if __name__ == "__main__":
    generate()
