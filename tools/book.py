"""Build the course website (``make book``): a static Jupyter Book of lessons and student labs.

What goes in, and what never does:

* every lesson (``lessons/*.ipynb``), **executed in fast mode** so its printed results, tables
  and matplotlib figures are on the page (a widget shows its last rendered output only: a static
  site has no kernel to move a slider);
* every lab as students receive it: the nbgrader release in ``labs/`` (answers left as
  ``raise NotImplementedError()``, no hidden tests), not executed;
* a home page with the course map (from the README's ``<!-- course-map -->`` table) and a
  search box (Sphinx's search index, built with the site, works offline);
* never ``solutions/``: :func:`check_no_solutions` fails the build if any solution-only line,
  solution marker or hidden-test code reaches a page.

Executing 17 lessons is the expensive part. ``tests/test_notebooks.py`` executes every lesson
anyway; it stores each executed copy in ``_build/executed/`` keyed by the SHA-256 of the source
notebook (:func:`store_executed`), and the book reuses a copy whose key still matches the
source (:func:`executed_lesson`), executing only the lessons that changed since.

Usage: ``python tools/book.py [--out _build/book]``; the site is ``<out>/_build/html/index.html``.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "_build" / "executed"
# Lessons run with the kernel's inline backend, so each plt.show() leaves a PNG on the page
# (the solutions' runs in tests/test_notebooks.py use Agg and draw nothing).
INLINE = "module://matplotlib_inline.backend_inline"
OUT = ROOT / "_build" / "book"
TITLE = "Quantization of Deep Models"
SOURCE_KEY = "qlib_source_sha256"
SOLUTION_MARKERS = ("### BEGIN SOLUTION", "### END SOLUTION", "BEGIN HIDDEN TESTS",
                    "END HIDDEN TESTS", "BEGIN MARK SCHEME")


def source_sha(path: Path) -> str:
    """SHA-256 of a notebook file's bytes: the key of its executed copy."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def store_executed(path: Path, nb, cache: Path = CACHE) -> Path:
    """Save the executed notebook ``nb`` of the source ``path`` under ``cache``, keyed by the
    source's SHA-256 (a later edit of the source makes the copy stale)."""
    cache.mkdir(parents=True, exist_ok=True)
    nb = nbformat.from_dict(nb)
    nb.metadata[SOURCE_KEY] = source_sha(path)
    target = cache / Path(path).name
    tmp = target.with_suffix(".tmp")
    nbformat.write(nb, tmp)
    tmp.replace(target)  # atomic: a reader never sees half a notebook
    return target


def executed_lesson(path: Path, cache: Path = CACHE, timeout: int | None = None):
    """The executed copy of lesson ``path``: from ``cache`` when its key matches the source, else
    executed now in fast mode (per-cell ``timeout``, the grading timeout by default) and stored."""
    path = Path(path)
    copy = cache / path.name
    if copy.exists():
        nb = nbformat.read(copy, as_version=4)
        if nb.metadata.get(SOURCE_KEY) == source_sha(path):
            return nb
    sys.path.insert(0, str(ROOT))
    from qlib.grading import config_timeout, execute_notebook

    nb = nbformat.read(path, as_version=4)
    execute_notebook(nb, path.parent, timeout or config_timeout(ROOT),
                     QLIB_FAST="1", QLIB_QUIET="1", MPLBACKEND=INLINE)
    store_executed(path, nb, cache)
    return nb


def course_map(readme: str) -> list[tuple[str, str]]:
    """``[(notebook path, title)]`` from the README's course map table, in course order."""
    block = re.search(r"<!-- course-map -->(.*?)<!-- /course-map -->", readme, re.S)
    if not block:
        raise ValueError("README.md has no <!-- course-map --> table: run tools/sync.py")
    rows = re.findall(r"^\| \[`([^`]+\.ipynb)`\]\([^)]*\) \| ([^|]+) \|", block.group(1), re.M)
    if not rows:
        raise ValueError("README.md's course map has no notebook rows")
    return [(path, title.strip()) for path, title in rows]


def _page(path: str) -> str:
    """Book-relative document name of a course notebook: lessons/x, labs/labNN."""
    p = Path(path)
    return f"lessons/{p.stem}" if p.parts[0] == "lessons" else f"labs/{p.stem}"


def write_sources(src: Path, root: Path = ROOT, cache: Path = CACHE) -> list[str]:
    """Lay out the book's sources in ``src``; returns the documents in course order."""
    if src.exists():
        shutil.rmtree(src)
    (src / "lessons").mkdir(parents=True)
    (src / "labs").mkdir()
    entries = course_map((root / "README.md").read_text())
    docs = []
    for path, _ in entries:
        doc = _page(path)
        if doc.startswith("lessons/"):
            nb = executed_lesson(root / path, cache)
        else:
            nb = nbformat.read(root / path, as_version=4)
        nbformat.write(nb, src / f"{doc}.ipynb")
        docs.append(doc)
    lines = [f"# {TITLE}", "",
             "Lessons build each idea, check it against PyTorch and measure it; labs are graded "
             "exercises (open them in JupyterLab or Colab to work on them).", "",
             "| notebook | what |", "|---|---|"]
    lines += [f"| [{Path(p).stem}]({_page(p)}.ipynb) | {t} |" for p, t in entries]
    (src / "intro.md").write_text("\n".join(lines) + "\n")
    lessons = [d for d in docs if d.startswith("lessons/")]
    labs = [d for d in docs if d.startswith("labs/")]
    toc = ["format: jb-book", "root: intro", "parts:",
           "  - caption: Lessons", "    chapters:"]
    toc += [f"      - file: {d}" for d in lessons]
    toc += ["  - caption: Labs", "    chapters:"] + [f"      - file: {d}" for d in labs]
    (src / "_toc.yml").write_text("\n".join(toc) + "\n")
    (src / "_config.yml").write_text(
        f"title: {TITLE}\n"
        "only_build_toc_files: true\n"
        "execute:\n  execute_notebooks: 'off'\n"  # lessons arrive executed; labs stay blank
        "html:\n  use_repository_button: false\n"
        "sphinx:\n  config:\n    nb_merge_streams: true\n    html_show_copyright: false\n")
    return docs


def solution_lines(root: Path = ROOT) -> list[str]:
    """Code lines that appear in a lab's solution but in no release notebook (the answers and
    hidden tests), ignoring short or generic lines."""
    released = set()
    for nb_path in (root / "labs").glob("*/*.ipynb"):
        for cell in nbformat.read(nb_path, as_version=4).cells:
            released.update(line.strip() for line in cell.source.splitlines())
    secret = []
    for nb_path in (root / "solutions").glob("*/*.ipynb"):
        for cell in nbformat.read(nb_path, as_version=4).cells:
            for line in cell.source.splitlines():
                line = line.strip()
                if len(line) >= 25 and line not in released and not line.startswith("#"):
                    secret.append(line)
    return secret


def page_text(page: Path) -> str:
    """A built page's text: tags dropped, entities decoded."""
    import html

    return html.unescape(re.sub(r"<[^>]+>", "", Path(page).read_text(errors="replace")))


def check_no_solutions(html_dir: Path, root: Path = ROOT) -> None:
    """Raise if a page holds a solution or hidden-test marker, or a lab page holds a line of its
    solution that the release does not have. (Lesson pages are the lessons as written: a lesson
    may show the formula that a lab then asks for, as lesson 00 and lab 00 do.)"""
    secret = set(solution_lines(root))
    leaks = []
    for page in Path(html_dir).rglob("*.html"):
        text = page_text(page)
        leaks += [f"{page.name}: {m}" for m in SOLUTION_MARKERS if m in text]
        if page.parent.name == "labs":
            lines = {line.strip() for line in text.splitlines()}
            leaks += [f"{page.name}: {line}" for line in secret & lines]
    if leaks:
        raise RuntimeError("solutions reached the website:\n" + "\n".join(leaks[:20]))


def build(out: Path = OUT, root: Path = ROOT, cache: Path = CACHE) -> Path:
    """Write the sources and run Jupyter Book; returns the HTML folder (``index.html`` inside)."""
    out = Path(out)
    src = out / "src"
    write_sources(src, root, cache)
    jb = Path(sys.executable).parent / "jupyter-book"
    if not jb.exists():
        raise RuntimeError("jupyter-book is not installed: run `make setup` (the `book` extra)")
    run = subprocess.run([str(jb), "build", str(src), "--path-output", str(out), "--warningiserror",
                          "--quiet"], capture_output=True, text=True)
    if run.returncode:
        raise RuntimeError(f"jupyter-book build failed:\n{run.stdout[-4000:]}\n{run.stderr[-4000:]}")
    html_dir = out / "_build" / "html"
    check_no_solutions(html_dir, root)
    return html_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT, help="output folder (default _build/book)")
    args = parser.parse_args(argv)
    html_dir = build(args.out)
    print(f"website: {html_dir / 'index.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
