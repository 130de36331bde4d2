"""The instructor workflow end to end, with real nbgrader on a temporary course directory.

Reference: nbgrader 0.9 (generate_assignment, autograde, generate_feedback, export).
Every lab: the solution gets full marks and the untouched release no marks. Lab 00 also:
a wrong answer (partial marks), an infinite loop and two kinds of crash (graded, not lost).
"""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NBGRADER = str(Path(sys.executable).parent / "nbgrader")
LAB = "lab00_warmup"
FULL = 5.0
LABS = sorted(p.name for p in (ROOT / "solutions").iterdir() if p.name.startswith("lab"))

pytestmark = pytest.mark.grading


def nbgrader(course: Path, *args: str) -> subprocess.CompletedProcess:
    out = subprocess.run([NBGRADER, *args], cwd=course, capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, f"nbgrader {' '.join(args)} failed:\n{out.stdout}\n{out.stderr}"
    return out


def answers(nb) -> dict[str, str]:
    return {c.metadata["nbgrader"]["grade_id"]: c.source for c in nb.cells
            if c.metadata.get("nbgrader", {}).get("solution")}


def submission(release_nb, replace: dict[str, str]):
    nb = nbformat.from_dict(release_nb)
    for cell in nb.cells:
        gid = cell.metadata.get("nbgrader", {}).get("grade_id")
        if gid in replace:
            cell.source = replace[gid]
    return nb


def scores(course: Path, lab: str = LAB) -> dict[str, float]:
    with open(course / "grades.csv") as f:
        return {row["student_id"]: float(row["score"]) for row in csv.DictReader(f)
                if row["assignment"] == lab}


def max_score(course: Path, lab: str) -> float:
    with open(course / "grades.csv") as f:
        return next(float(row["max_score"]) for row in csv.DictReader(f) if row["assignment"] == lab)


def write_submission(course: Path, student: str, lab: str, nb) -> None:
    target = course / "submitted" / student / lab
    target.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, target / f"{lab}.ipynb")


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
            sol = nbformat.read(ROOT / "solutions" / lab / f"{lab}.ipynb", as_version=4)
            write_submission(course, "perfect", lab, submission(rel, answers(sol)))
            write_submission(course, "blank", lab, rel)
    release = nbformat.read(course / "labs" / LAB / f"{LAB}.ipynb", as_version=4)
    solution = nbformat.read(ROOT / "solutions" / LAB / f"{LAB}.ipynb", as_version=4)
    good = answers(solution)
    wrong_q2 = "def fp16_cast_error(w):\n    return 0.0\n"
    submissions = {
        "perfect": submission(release, good),
        "blank": submission(release, {}),
        "partial": submission(release, {**good, "q2-answer": wrong_q2}),
        "loops": submission(release, {**good, "q1-answer": "while True:\n    pass\n"}),
        "raises": submission(release, {**good, "q3-answer": "raise RuntimeError('oops')\n"}),
        "kills_kernel": submission(release, {**good, "q2-answer": "import os\nos._exit(1)\n"}),
    }
    for student, nb in submissions.items():
        write_submission(course, student, LAB, nb)
    nbgrader(course, "autograde", LAB, "--create", "--Execute.timeout=20")
    for lab in LABS:
        if lab != LAB:
            nbgrader(course, "autograde", lab, "--create")
        nbgrader(course, "generate_feedback", lab)
    nbgrader(course, "export", "--to", "grades.csv")
    return course


def test_release_hides_solutions_and_hidden_tests(graded_course):
    text = (graded_course / "labs" / LAB / f"{LAB}.ipynb").read_text()
    assert "BEGIN SOLUTION" not in text and "HIDDEN TESTS" not in text
    assert "raise NotImplementedError()" in text
    assert not list((graded_course / "labs" / LAB).glob("*.py"))


def test_solution_gets_full_marks(graded_course):
    assert scores(graded_course)["perfect"] == FULL


def test_untouched_release_gets_no_marks(graded_course):
    assert scores(graded_course)["blank"] == 0.0


def test_wrong_answer_gets_partial_marks(graded_course):
    assert scores(graded_course)["partial"] == FULL - 2  # Q2 is worth 2 points


def test_infinite_loop_is_graded_not_lost(graded_course):
    # Q1's cell is interrupted after the timeout; Q1 scores 0, Q2 and Q3 still count.
    assert scores(graded_course)["loops"] == FULL - 2


def test_crashing_cell_is_graded_not_lost(graded_course):
    assert scores(graded_course)["raises"] == FULL - 1  # Q3 is worth 1 point


def test_dead_kernel_submission_is_graded_not_lost(graded_course):
    # The kernel dies in Q2's answer cell; the submission stays in the gradebook.
    assert "kills_kernel" in scores(graded_course)
    assert scores(graded_course)["kills_kernel"] < FULL


def test_feedback_is_written_for_every_submission(graded_course):
    for student in ["perfect", "blank", "partial", "loops", "raises"]:
        assert (graded_course / "feedback" / student / LAB / f"{LAB}.html").exists()


@pytest.mark.parametrize("lab", LABS)
def test_every_lab_solution_full_marks_release_none(graded_course, lab):
    got = scores(graded_course, lab)
    assert max_score(graded_course, lab) > 0
    assert got["perfect"] == max_score(graded_course, lab)
    assert got["blank"] == 0.0
