"""Keep the generated parts of the course in step with their sources (``make sync``).

1. Every notebook is authored as a jupytext percent-format ``.py`` (readable diffs, linters
   see the code) and paired with an ``.ipynb`` written from it, without outputs.
2. The first cell of every notebook is the Colab setup cell built from ``qlib.runtime``
   (the repository URL lives there only).
3. The README's course map, with an "Open in Colab" badge per notebook, is rebuilt between
   its ``<!-- course-map -->`` markers.

``python tools/sync.py --check`` changes nothing and exits 1 when something is out of date
(``tests/test_sync.py`` runs it).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import jupytext
import nbformat

from qlib import runtime

ROOT = Path(__file__).resolve().parents[1]
SETUP_TAG = "colab-setup"


def sources() -> list[Path]:
    """The percent-format sources of every lesson and solution notebook."""
    return sorted(ROOT.glob("lessons/*.py")) + sorted(ROOT.glob("solutions/*/*.py"))


def build_notebook(py: Path) -> nbformat.NotebookNode:
    nb = jupytext.read(py)
    setup = nbformat.v4.new_code_cell(runtime.setup_cell(), metadata={"tags": [SETUP_TAG]})
    if nb.cells and SETUP_TAG in nb.cells[0].metadata.get("tags", []):
        nb.cells[0].source = setup.source
    else:
        nb.cells.insert(0, setup)
    nb.metadata["kernelspec"] = {"display_name": "Python 3", "language": "python", "name": "python3"}
    nb.metadata["jupytext"] = {"formats": "ipynb,py:percent"}
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"{py.stem[:40]}-{i}".replace("_", "-")
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    return nb


def notebook_text(py: Path) -> str:
    return nbformat.writes(build_notebook(py)) + "\n"


def course_map() -> str:
    rows = ["| notebook | what | open |", "|---|---|---|"]
    lessons = sorted(ROOT.glob("lessons/*.ipynb"))
    labs = sorted(ROOT.glob("labs/*/*.ipynb"))
    for nb_path in lessons + labs:
        rel = nb_path.relative_to(ROOT).as_posix()
        nb = nbformat.read(nb_path, as_version=4)
        title = next((c.source.splitlines()[0].lstrip("# ").strip() for c in nb.cells
                      if c.cell_type == "markdown" and c.source.strip()), nb_path.stem)
        badge = (f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
                 f"({runtime.colab_url(rel)})")
        rows.append(f"| [`{rel}`]({rel}) | {title} | {badge} |")
    return "\n".join(rows)


def readme_text() -> str:
    readme = (ROOT / "README.md").read_text()
    return re.sub(r"<!-- course-map -->.*?<!-- /course-map -->",
                  lambda m: f"<!-- course-map -->\n{course_map()}\n<!-- /course-map -->",
                  readme, flags=re.S)


def main(check: bool) -> int:
    stale = []
    for py in sources():
        target = py.with_suffix(".ipynb")
        text = notebook_text(py)
        if not target.exists() or target.read_text() != text:
            stale.append(target)
            if not check:
                target.write_text(text)
    readme = ROOT / "README.md"
    text = readme_text()
    if readme.read_text() != text:
        stale.append(readme)
        if not check:
            readme.write_text(text)
    for path in stale:
        print(f"{'out of date' if check else 'wrote'}: {path.relative_to(ROOT)}")
    if check and stale:
        print("run `make sync` (and `make release` for labs) to update them")
    return 1 if check and stale else 0


if __name__ == "__main__":
    sys.exit(main(check="--check" in sys.argv))
