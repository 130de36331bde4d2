"""Regenerate the student release ``labs/`` from ``solutions/`` (``make release``).

Runs ``nbgrader generate_assignment`` for every lab in ``solutions/``: answers between
``### BEGIN SOLUTION`` and ``### END SOLUTION`` become ``raise NotImplementedError()``,
hidden tests are removed, outputs are cleared. ``tests/test_release.py`` regenerates into a
temporary directory and fails when the committed ``labs/`` differs.

The sources in ``solutions/`` are jupytext pairs (``.ipynb`` + ``.py``), and nbgrader copies
their notebook metadata into the release. A released notebook carrying
``"jupytext": {"formats": "ipynb,py:percent"}`` makes JupyterLab (with jupytext installed)
write a ``.py`` twin holding the student's answers next to it at every save, so
:func:`strip_pairing` removes that metadata from every notebook in ``labs/``: a student's
save writes the ``.ipynb`` only.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]


def labs(root: Path = ROOT) -> list[str]:
    return sorted(p.name for p in (root / "solutions").iterdir()
                  if p.is_dir() and p.name.startswith("lab"))


def nbgrader_env() -> dict[str, str]:
    """nbgrader runs alembic as a subprocess: put this Python's bin first on PATH."""
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


def strip_pairing(notebook: Path) -> bool:
    """Remove jupytext's pairing metadata from one ``.ipynb``; True when it was there.

    The file is rewritten by nbformat, as nbgrader wrote it, so only the ``jupytext`` key
    changes.
    """
    nb = nbformat.read(notebook, as_version=nbformat.NO_CONVERT)
    if "jupytext" not in nb.metadata:
        return False
    del nb.metadata["jupytext"]
    nbformat.write(nb, notebook)
    return True


def generate(root: Path = ROOT) -> None:
    for lab in labs(root):
        subprocess.run([str(Path(sys.executable).parent / "nbgrader"), "generate_assignment",
                        lab, "--force", "--log-level=WARN"],
                       cwd=root, env=nbgrader_env(), check=True)
        for notebook in sorted((root / "labs" / lab).rglob("*.ipynb")):
            strip_pairing(notebook)
        print(f"released labs/{lab}")


if __name__ == "__main__":
    generate()
