"""Keep the generated parts of the course in step with their sources (``make sync``).

1. Every notebook is authored as a jupytext percent-format ``.py`` (readable diffs, linters
   see the code) and paired with an ``.ipynb`` written from it, without outputs.
2. The first cell of every notebook is the Colab setup cell built from ``qlib.runtime``
   (the repository URL lives there only).
3. The README's course map, with an "Open in Colab" badge per notebook, is rebuilt between
   its ``<!-- course-map -->`` markers.

``python tools/sync.py --check`` changes nothing and exits 1 when something is out of date
(``tests/test_sync.py`` runs it).

A fork that students open on Colab: ``python tools/sync.py --repo owner/name`` (``make sync
REPO=owner/name``) first rewrites ``REPO_URL`` in ``qlib/runtime.py`` (the one place the
address lives), then every setup cell (lessons, solutions and the released ``labs/``) and
every Colab badge of the README points at ``github.com/owner/name``.
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


REPO_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]{0,38}/[A-Za-z0-9._-]{1,100}")
REPO_LINE = re.compile(r'^REPO_URL = "[^"]*"$', re.M)


def set_repo(repo: str, root: Path = ROOT) -> None:
    """Point the course at the GitHub repository ``owner/name``: rewrite ``REPO_URL`` in
    ``qlib/runtime.py`` (and in the loaded module, so this run generates with it)."""
    if not isinstance(repo, str) or not REPO_NAME.fullmatch(repo):
        raise ValueError(f"expected a GitHub repository as owner/name (e.g. alice/quantization-course), "
                         f"got {repo!r}")
    url = f"https://github.com/{repo}"
    path = root / "qlib" / "runtime.py"
    text = path.read_text()
    if len(REPO_LINE.findall(text)) != 1:
        raise ValueError(f"expected one line `REPO_URL = \"...\"` in {path}")
    path.write_text(REPO_LINE.sub(f'REPO_URL = "{url}"', text))
    runtime.REPO_URL = url


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


SETUP_BLOCK = re.compile(r'(^# %% tags=\["colab-setup"\]\n)(.*?)(?=^# %%)', re.S | re.M)


def source_setup_stale(py: Path) -> str | None:
    """The ``.py`` source with its setup cell made the current one (None when in step).

    The ``.ipynb`` gets the cell from ``build_notebook``; the paired ``.py`` must carry the same
    cell, or jupytext (JupyterLab, ``make lab``) reports the pair as different, and a student
    whose checkout left the ``.py`` newer sees the old cell.
    """
    text = py.read_text()
    match = SETUP_BLOCK.search(text)
    if match is None:
        return None
    body = runtime.setup_cell().rstrip("\n") + "\n\n"
    if match.group(2) == body:
        return None
    return text[:match.start(2)] + body + text[match.end(2):]


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


def release_setup_stale(path: Path) -> nbformat.NotebookNode | None:
    """A released lab whose setup cell is not the current one, updated (None when in step).

    ``make release`` would write the same cell from ``solutions/``; only this cell changes.
    """
    nb = nbformat.read(path, as_version=nbformat.NO_CONVERT)
    if not nb.cells or SETUP_TAG not in nb.cells[0].metadata.get("tags", []):
        return None
    if nb.cells[0].source == runtime.setup_cell():
        return None
    nb.cells[0].source = runtime.setup_cell()
    return nb


def main(check: bool, repo: str | None = None) -> int:
    if repo is not None and not check:
        set_repo(repo)
    stale = []
    for py in sources():
        updated = source_setup_stale(py)
        if updated is not None:
            stale.append(py)
            if not check:
                py.write_text(updated)
        target = py.with_suffix(".ipynb")
        text = notebook_text(py)
        if not target.exists() or target.read_text() != text:
            stale.append(target)
            if not check:
                target.write_text(text)
    for target in sorted(ROOT.glob("labs/*/*.ipynb")):
        updated = release_setup_stale(target)
        if updated is not None:
            stale.append(target)
            if not check:
                nbformat.write(updated, target)
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


def parse(argv: list[str]) -> tuple[bool, str | None]:
    """``[--check] [--repo owner/name]`` (``--repo=owner/name`` too)."""
    check, repo, args = False, None, list(argv)
    while args:
        arg = args.pop(0)
        if arg == "--check":
            check = True
        elif arg == "--repo" and args:
            repo = args.pop(0)
        elif arg.startswith("--repo="):
            repo = arg.split("=", 1)[1]
        else:
            raise SystemExit(f"usage: tools/sync.py [--check] [--repo owner/name]; got {arg!r}")
    return check, repo


if __name__ == "__main__":
    sys.exit(main(*parse(sys.argv[1:])))
