"""The course website (``make book``, tools/book.py) builds, shows every lesson with its figures,
has a search index, and publishes no solution.

Reference: Jupyter Book 1 (Sphinx + MyST-NB), whose HTML pages and ``searchindex.js`` are read
back here. The lessons are executed in fast mode: ``tests/test_notebooks.py`` stores each executed
lesson keyed by its source's SHA-256, and this module is ordered last (tests/conftest.py), so the
build reuses the lessons already run and executes only the others.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("book", ROOT / "tools" / "book.py")
book = importlib.util.module_from_spec(spec)
spec.loader.exec_module(book)

LESSONS = sorted(ROOT.glob("lessons/*.ipynb"))
LABS = sorted(ROOT.glob("labs/*/*.ipynb"))
pytestmark = pytest.mark.notebook  # it executes every lesson a previous test did not


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    return book.build(tmp_path_factory.mktemp("book"))


def pngs(nb) -> int:
    return sum("image/png" in out.get("data", {}) for cell in nb.cells if cell.cell_type == "code"
               for out in cell.get("outputs", []))


def test_every_lesson_page_shows_its_figures(site):
    for lesson in LESSONS:
        page = site / "lessons" / f"{lesson.stem}.html"
        assert page.exists(), f"no page for {lesson.name}"
        figures = pngs(book.executed_lesson(lesson))
        shown = re.findall(r'<img[^>]+src="\.\./_images/[^"]+\.png"', page.read_text())
        assert len(shown) >= figures, f"{lesson.stem}: {figures} figures executed, {len(shown)} on the page"
        assert all((site / "_images" / Path(re.search(r'_images/([^"]+)', s).group(1)).name).exists()
                   for s in shown)
    # the course has figures at all (a build that dropped every output would pass the loop)
    assert sum(pngs(book.executed_lesson(p)) for p in LESSONS) >= len(LESSONS)


def test_every_lab_page_is_the_student_release(site):
    for lab in LABS:
        text = book.page_text(site / "labs" / f"{lab.stem}.html")
        assert "NotImplementedError" in text, f"{lab.stem}: the release's blank answers are missing"
    assert not list(site.rglob("*solution*.html"))


def test_home_page_has_the_course_map_and_a_search_box(site):
    home = (site / "intro.html").read_text()
    for lesson in LESSONS:
        assert f"lessons/{lesson.stem}.html" in home
    assert 'action="search.html"' in home or "search-button" in home
    index = (site / "searchindex.js").read_text()
    assert "quantiz" in index and "calibr" in index


def test_no_solution_reaches_the_site(site):
    book.check_no_solutions(site)  # the build ran it too; explicit here
    text = "\n".join(book.page_text(p) for p in site.rglob("*.html"))
    assert "BEGIN SOLUTION" not in text and "HIDDEN TESTS" not in text


def test_leak_check_sees_a_planted_solution(tmp_path):
    """The guard itself can fail: a lab page holding a solution-only line is caught."""
    line = book.solution_lines(ROOT)[0]
    (tmp_path / "labs").mkdir()
    (tmp_path / "labs" / "lab99.html").write_text(f"<pre>{line}</pre>\n")
    with pytest.raises(RuntimeError, match="solutions reached the website"):
        book.check_no_solutions(tmp_path)


def test_executed_copy_is_reused_only_while_the_source_is_unchanged(tmp_path):
    src = tmp_path / "x.ipynb"
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("print(6 * 7)")])
    nbformat.write(nb, src)
    done = book.executed_lesson(src, tmp_path / "cache", timeout=60)
    assert done.cells[0].outputs[0]["text"] == "42\n"
    marked = nbformat.read(tmp_path / "cache" / "x.ipynb", as_version=4)
    marked.cells[0].outputs[0]["text"] = "cached\n"
    nbformat.write(marked, tmp_path / "cache" / "x.ipynb")
    assert book.executed_lesson(src, tmp_path / "cache").cells[0].outputs[0]["text"] == "cached\n"
    nb.cells[0].source = "print(6 * 9)"
    nbformat.write(nb, src)
    assert book.executed_lesson(src, tmp_path / "cache", timeout=60).cells[0].outputs[0]["text"] == "54\n"
