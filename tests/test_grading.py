"""The instructor workflow end to end, with real nbgrader on a temporary course directory.

Reference: nbgrader 0.9 (generate_assignment, autograde, generate_feedback, export) and its
gradebook (``nbgrader.api.Gradebook``), read per question. One real nbgrader run per lab:
every lab's solution gets full marks on every question and its untouched release none. Lab 00
also grades a wrong answer, an infinite loop, two kinds of crash (graded, not lost), and a
submission that passes every visible check but not the hidden ones, which proves that the
hidden tests run. Feedback HTML is read: each question and the failing check's message appear. Each lab is
graded by two processes at once (``qlib.grading.autograde_parallel``, ``make grade JOBS=2``)
into one SQLite gradebook; a separate test has two processes write it at the same moment.
The release must hold no hidden-test code at all (the hidden check calls' text, not only the
markers); that test reads the committed ``labs/`` and runs without nbgrader.
"""

from __future__ import annotations

import csv
import html
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from qlib.grading import SQLITE_WAIT_S, autograde_parallel, shards

ROOT = Path(__file__).resolve().parents[1]
NBGRADER = str(Path(sys.executable).parent / "nbgrader")
LAB = "lab00_warmup"
LABS = sorted(p.name for p in (ROOT / "solutions").iterdir() if p.name.startswith("lab"))
LOOP_TIMEOUT = 20  # seconds per cell for lab 00's autograde, so the looping submission is quick
JOBS = 2  # grading processes, as `make grade` uses by default

grading = pytest.mark.grading

# Lab 00 answers that pass the visible checks only: a table of the worked cases (Q1) and a
# threshold that forgets float16 rounds 65504 < |x| < 65520 down to 65504 (Q3).
VISIBLE_ONLY = {
    "q1-answer": "def size_in_bytes(num_params, bits):\n"
                 "    return {(1000, 32): 4000, (1000, 8): 1000, (1000, 4): 500, (3, 4): 2}[num_params, bits]\n",
    "q3-answer": "def fits_in_float16(x):\n    return x.abs() <= 65504\n",
}
WRONG_Q2 = "def fp16_cast_error(w):\n    return 0.0\n"


def nbgrader(course: Path, *args: str) -> subprocess.CompletedProcess:
    out = subprocess.run([NBGRADER, *args], cwd=course, capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, f"nbgrader {' '.join(args)} failed:\n{out.stdout}\n{out.stderr}"
    return out


def answers(nb) -> dict[str, str]:
    return {c.metadata["nbgrader"]["grade_id"]: c.source for c in nb.cells
            if c.metadata.get("nbgrader", {}).get("solution")}


def points(nb) -> dict[str, float]:
    """{grade_id: points} of the graded cells, read from the notebook's nbgrader metadata."""
    return {c.metadata["nbgrader"]["grade_id"]: float(c.metadata["nbgrader"]["points"])
            for c in nb.cells if c.metadata.get("nbgrader", {}).get("grade")}


def manual(nb) -> set[str]:
    """grade_ids of the answers an instructor grades by hand (nbgrader: grade and solution both
    set, a markdown cell): autograding leaves them at 0 until the Formgrader scores them."""
    return {c.metadata["nbgrader"]["grade_id"] for c in nb.cells
            if c.cell_type == "markdown" and c.metadata.get("nbgrader", {}).get("grade")
            and c.metadata["nbgrader"].get("solution")}


def hidden_lines(nb) -> list[str]:
    """The code lines between ``### BEGIN HIDDEN TESTS`` and ``### END HIDDEN TESTS``."""
    lines = []
    for cell in nb.cells:
        for block in re.findall(r"### BEGIN HIDDEN TESTS\n(.*?)### END HIDDEN TESTS", cell.source, re.S):
            lines += [line.strip() for line in block.splitlines() if line.strip()]
    return lines


def submission(release_nb, replace: dict[str, str]):
    nb = nbformat.from_dict(release_nb)
    for cell in nb.cells:
        gid = cell.metadata.get("nbgrader", {}).get("grade_id")
        if gid in replace:
            cell.source = replace[gid]
    return nb


def totals(course: Path, lab: str = LAB) -> dict[str, float]:
    with open(course / "grades.csv") as f:
        return {row["student_id"]: float(row["score"]) for row in csv.DictReader(f)
                if row["assignment"] == lab}


def question_scores(course: Path, lab: str, student: str) -> dict[str, float]:
    """{grade_id: score} of one submission, from nbgrader's gradebook."""
    from nbgrader.api import Gradebook

    with Gradebook("sqlite:///" + str(course / "gradebook.db")) as gb:
        nb = gb.find_submission_notebook(lab, lab, student)
        return {grade.name: grade.score for grade in nb.grades}


def write_submission(course: Path, student: str, lab: str, nb) -> None:
    target = course / "submitted" / student / lab
    target.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, target / f"{lab}.ipynb")


def graded_lab(course: Path, lab: str, students: dict[str, dict[str, str]], feedback: bool = False) -> Path:
    """A course with one lab: each student's submission is the solution with some answers replaced
    (``{student: {grade_id: source}}``), autograded (with feedback if asked) and exported."""
    shutil.copy(ROOT / "nbgrader_config.py", course)
    (course / "solutions").mkdir()
    shutil.copytree(ROOT / "solutions" / lab, course / "solutions" / lab,
                    ignore=shutil.ignore_patterns("*.py", ".ipynb_checkpoints"))
    nbgrader(course, "generate_assignment", lab, "--force")
    release = nbformat.read(course / "labs" / lab / f"{lab}.ipynb", as_version=4)
    good = answers(solution_nb(lab))
    for student, replace in students.items():
        write_submission(course, student, lab, submission(release, {**good, **replace}))
    autograde_parallel(course, lab, JOBS, nbgrader=NBGRADER, timeout=900)
    if feedback:
        nbgrader(course, "generate_feedback", lab)
    nbgrader(course, "export", "--to", "grades.csv")
    return course


def feedback_text(course: Path, student: str, lab: str = LAB) -> str:
    """The feedback page's text, tags dropped and entities decoded."""
    page = (course / "feedback" / student / lab / f"{lab}.html").read_text()
    return html.unescape(re.sub(r"<[^>]+>", "", page))


def release_nb(lab: str):
    return nbformat.read(ROOT / "labs" / lab / f"{lab}.ipynb", as_version=4)


def solution_nb(lab: str):
    return nbformat.read(ROOT / "solutions" / lab / f"{lab}.ipynb", as_version=4)


@pytest.fixture(scope="module")
def graded_course(tmp_path_factory):
    course = tmp_path_factory.mktemp("course")
    shutil.copy(ROOT / "nbgrader_config.py", course)
    shutil.copytree(ROOT / "solutions", course / "solutions",
                    ignore=shutil.ignore_patterns("*.py", ".ipynb_checkpoints"))
    for lab in LABS:
        nbgrader(course, "generate_assignment", lab, "--force")
        if lab != LAB:  # every other lab: its solution and its untouched release
            rel = nbformat.read(course / "labs" / lab / f"{lab}.ipynb", as_version=4)
            write_submission(course, "perfect", lab, submission(rel, answers(solution_nb(lab))))
            write_submission(course, "blank", lab, rel)
    release = nbformat.read(course / "labs" / LAB / f"{LAB}.ipynb", as_version=4)
    good = answers(solution_nb(LAB))
    submissions = {
        "perfect": submission(release, good),
        "blank": submission(release, {}),
        "partial": submission(release, {**good, "q2-answer": WRONG_Q2}),
        "visible_only": submission(release, {**good, **VISIBLE_ONLY}),
        "loops": submission(release, {**good, "q1-answer": "while True:\n    pass\n"}),
        "raises": submission(release, {**good, "q3-answer": "raise RuntimeError('oops')\n"}),
        "kills_kernel": submission(release, {**good, "q2-answer": "import os\nos._exit(1)\n"}),
    }
    for student, nb in submissions.items():
        write_submission(course, student, LAB, nb)
    # two grading processes per lab (make grade JOBS=2): the same gradebook, written concurrently
    autograde_parallel(course, LAB, JOBS, f"--Execute.timeout={LOOP_TIMEOUT}", nbgrader=NBGRADER, timeout=900)
    for lab in LABS:
        if lab != LAB:
            autograde_parallel(course, lab, JOBS, nbgrader=NBGRADER, timeout=900)
        nbgrader(course, "generate_feedback", lab)
    nbgrader(course, "export", "--to", "grades.csv")
    return course


@pytest.fixture(scope="module")
def lab00_points():
    """{grade_id: points autograding gives a full answer}: the written answer (graded by hand in
    the Formgrader) scores 0 until an instructor grades it."""
    nb = release_nb(LAB)
    return expected(points(nb), manual(nb))


def expected(points: dict[str, float], zero: set[str]) -> dict[str, float]:
    return {gid: 0.0 if gid in zero else p for gid, p in points.items()}


# -------------------------------------------------------------- without nbgrader (fast)

@pytest.mark.parametrize("lab", LABS)
def test_release_holds_no_hidden_test_code(lab):
    """Not only the markers: no line of any hidden test block appears in the release."""
    hidden = hidden_lines(solution_nb(lab))
    assert hidden, f"{lab}: the solution has no hidden tests"
    release = "\n".join(c.source for c in release_nb(lab).cells)
    leaked = [line for line in hidden if line in release]
    assert not leaked, f"{lab}: hidden test code in the release: {leaked}"
    assert "HIDDEN TESTS" not in release and "BEGIN SOLUTION" not in release


def test_hidden_line_finder_sees_a_leak():
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(
        "check.a(f)\n### BEGIN HIDDEN TESTS\ncheck.a_hidden(f)\n### END HIDDEN TESTS")])
    assert hidden_lines(nb) == ["check.a_hidden(f)"]


def test_visible_only_answers_pass_visible_checks_and_fail_hidden_ones():
    """The premise of the visible-only submission, checked directly with qlib.check."""
    from qlib import check

    scope: dict = {}
    for source in VISIBLE_ONLY.values():
        exec(source, scope)
    check.lab00.size_in_bytes(scope["size_in_bytes"])
    check.lab00.fits_fp16(scope["fits_in_float16"])
    with pytest.raises(AssertionError):
        check.lab00.size_in_bytes_hidden(scope["size_in_bytes"])
    with pytest.raises(AssertionError):
        check.lab00.fits_fp16_hidden(scope["fits_in_float16"])


def test_shards_split_a_class_evenly_and_keep_everyone():
    students = [f"s{i:03d}" for i in range(101)]
    groups = shards(students[::-1] + students[:3], 4)
    assert sorted(sum(groups, [])) == students  # everyone once, duplicates dropped
    assert sorted(len(g) for g in groups) == [25, 25, 25, 26]
    assert shards(["a", "b"], 5) == [["a"], ["b"]]
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="jobs"):
            shards(students, bad)


WRITER = """
import sys
from nbgrader.api import Gradebook
url, who, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
with Gradebook(url) as gb:
    for i in range(n):  # one write transaction each, interleaved with the other process's
        gb.update_or_create_student(f"{who}{i}", first_name=who, last_name=str(i))
"""


def test_gradebook_takes_two_writers_at_once(tmp_path):
    """Two processes add students to one SQLite gradebook at the same time, with the lock wait
    that parallel grading uses: every row arrives and neither process fails."""
    from nbgrader.api import Gradebook

    db = tmp_path / "gradebook.db"
    url = f"sqlite:///{db}"
    Gradebook(url).close()  # created once, as `make grade` registers the lab before grading
    waiting = f"{url}?timeout={SQLITE_WAIT_S}"
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, waiting, who, "10"], stderr=subprocess.PIPE, text=True)
             for who in ("a", "b")]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    with Gradebook(url) as gb:
        assert sorted(s.id for s in gb.students) == sorted(f"{w}{i}" for w in "ab" for i in range(10))


# -------------------------------------------------------------- one real nbgrader run per lab

@grading
def test_generated_release_hides_solutions_and_hidden_tests(graded_course):
    nb = nbformat.read(graded_course / "labs" / LAB / f"{LAB}.ipynb", as_version=4)
    text = "\n".join(c.source for c in nb.cells)
    assert "BEGIN SOLUTION" not in text and "HIDDEN TESTS" not in text
    assert not [line for line in hidden_lines(solution_nb(LAB)) if line in text]
    assert "raise NotImplementedError()" in text
    assert not list((graded_course / "labs" / LAB).glob("*.py"))


@grading
def test_solution_gets_full_marks_on_every_question(graded_course, lab00_points):
    assert question_scores(graded_course, LAB, "perfect") == lab00_points
    assert totals(graded_course)["perfect"] == sum(lab00_points.values())


@grading
def test_untouched_release_gets_no_marks(graded_course, lab00_points):
    assert question_scores(graded_course, LAB, "blank") == expected(lab00_points, set(lab00_points))


@grading
def test_wrong_answer_loses_exactly_its_question(graded_course, lab00_points):
    assert question_scores(graded_course, LAB, "partial") == expected(lab00_points, {"q2-test"})


@grading
def test_visible_only_submission_loses_the_hidden_tests(graded_course, lab00_points):
    got = question_scores(graded_course, LAB, "visible_only")
    assert got == expected(lab00_points, {"q1-test", "q3-test"})
    assert totals(graded_course)["visible_only"] < sum(lab00_points.values())


@grading
def test_infinite_loop_is_graded_not_lost(graded_course, lab00_points):
    # Q1's cell is interrupted after the timeout; Q1 scores 0, Q2 and Q3 still count.
    assert question_scores(graded_course, LAB, "loops") == expected(lab00_points, {"q1-test"})


@grading
def test_crashing_cell_is_graded_not_lost(graded_course, lab00_points):
    assert question_scores(graded_course, LAB, "raises") == expected(lab00_points, {"q3-test"})


@grading
def test_dead_kernel_submission_is_graded_not_lost(graded_course, lab00_points):
    # The kernel dies in Q2's answer cell: Q1 (passed before) keeps its points, the rest score 0.
    assert question_scores(graded_course, LAB, "kills_kernel") == expected(lab00_points, {"q2-test", "q3-test"})


@grading
def test_feedback_names_each_question_and_the_failing_message(graded_course, lab00_points):
    for student in ["perfect", "blank", "partial", "visible_only", "loops", "raises", "kills_kernel"]:
        text = feedback_text(graded_course, student)
        for gid in set(lab00_points) - manual(release_nb(LAB)):
            assert gid in text, (student, gid)
    assert "PASS" in feedback_text(graded_course, "perfect")
    assert "FAIL" not in feedback_text(graded_course, "perfect")
    partial = feedback_text(graded_course, "partial")
    assert "FAIL  fp16_cast_error: worked case" in partial and "got 0.0" in partial
    visible_only = feedback_text(graded_course, "visible_only")
    assert "PASS  size_in_bytes: worked cases" in visible_only
    assert "PASS  fits_in_float16: worked case" in visible_only
    assert "FAIL  fits_in_float16: random and edge values" in visible_only
    assert "RuntimeError" in feedback_text(graded_course, "raises")
    assert "KernelDied" in feedback_text(graded_course, "kills_kernel")


@grading
@pytest.mark.parametrize("lab", LABS)
def test_every_lab_solution_full_marks_release_none(graded_course, lab):
    want = points(release_nb(lab))
    assert want and all(p > 0 for p in want.values())
    by_hand = manual(release_nb(lab))  # written answers: 0 until an instructor grades them
    auto = expected(want, by_hand)
    assert question_scores(graded_course, lab, "perfect") == auto
    assert question_scores(graded_course, lab, "blank") == expected(want, set(want))
    got = totals(graded_course, lab)
    assert (got["perfect"], got["blank"]) == (sum(auto.values()), 0.0)
