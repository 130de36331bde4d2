"""Lab 08 through real nbgrader: a wrong answer gets partial marks, the written answer is graded by hand.

Reference: nbgrader 0.9 (generate_assignment, autograde, export, the gradebook API). The
solution's full marks and the untouched release's zero are checked for every lab by
``tests/test_grading.py``. Here:

- a submission whose Q2 re-calibrates without re-estimating the BN statistics (the wrong
  order) loses exactly Q2's 3 points, and its feedback says why;
- a submission whose Q1 takes the mean over the whole batch loses exactly Q1's 2 points;
- Q4 (the written answer, 2 points) is left to the instructor: autograde flags it for manual
  grading and gives it nothing, and once the instructor enters a score in the gradebook the
  export includes it.
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
LAB = "lab08_domain_shift"
AUTO_POINTS = 7.0     # Q1 2 + Q2 3 + Q3 2
MANUAL_POINTS = 2.0   # Q4

pytestmark = pytest.mark.grading

WRONG_Q1 = """def contrast(x, factor, bounds):
    lo, hi = bounds
    u = ((x - lo) / (hi - lo)).clamp(0, 1)
    mean = u.mean()                       # the whole batch: wrong
    return lo + (mean + factor * (u - mean)).clamp(0, 1) * (hi - lo)
"""

WRONG_Q2 = """def adabn_then_quantize(model, target, config):
    return quantize_static(model, target, config)   # re-calibrates only: no AdaBN
"""


def nbgrader(course: Path, *args: str) -> subprocess.CompletedProcess:
    out = subprocess.run([NBGRADER, *args], cwd=course, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, f"nbgrader {' '.join(args)} failed:\n{out.stdout}\n{out.stderr}"
    return out


def scores(course: Path) -> dict[str, float]:
    with open(course / "grades.csv") as f:
        return {row["student_id"]: float(row["score"]) for row in csv.DictReader(f) if row["assignment"] == LAB}


def max_score(course: Path) -> float:
    with open(course / "grades.csv") as f:
        return next(float(row["max_score"]) for row in csv.DictReader(f) if row["assignment"] == LAB)


@pytest.fixture(scope="module")
def course(tmp_path_factory):
    course = tmp_path_factory.mktemp("course08")
    shutil.copy(ROOT / "nbgrader_config.py", course)
    (course / "solutions").mkdir()
    shutil.copytree(ROOT / "solutions" / LAB, course / "solutions" / LAB,
                    ignore=shutil.ignore_patterns("*.py", ".ipynb_checkpoints"))
    nbgrader(course, "generate_assignment", LAB, "--force")
    release = nbformat.read(course / "labs" / LAB / f"{LAB}.ipynb", as_version=4)
    solution = nbformat.read(ROOT / "solutions" / LAB / f"{LAB}.ipynb", as_version=4)
    good = {c.metadata["nbgrader"]["grade_id"]: c.source for c in solution.cells
            if c.metadata.get("nbgrader", {}).get("solution")}
    for student, replace in {"wrong_q1": {**good, "q1-answer": WRONG_Q1},
                             "wrong_q2": {**good, "q2-answer": WRONG_Q2}}.items():
        nb = nbformat.from_dict(release)
        for cell in nb.cells:
            gid = cell.metadata.get("nbgrader", {}).get("grade_id")
            if gid in replace:
                cell.source = replace[gid]
        target = course / "submitted" / student / LAB
        target.mkdir(parents=True)
        nbformat.write(nb, target / f"{LAB}.ipynb")
    nbgrader(course, "autograde", LAB, "--create")
    nbgrader(course, "generate_feedback", LAB)
    nbgrader(course, "export", "--to", "grades.csv")
    return course


def test_max_score_counts_the_written_answer(course):
    assert max_score(course) == AUTO_POINTS + MANUAL_POINTS


def test_wrong_order_in_q2_loses_q2_only(course):
    assert scores(course)["wrong_q2"] == AUTO_POINTS - 3
    feedback = (course / "feedback" / "wrong_q2" / LAB / f"{LAB}.html").read_text()
    assert "plain re-calibration" in feedback   # the check's hint reaches the student


def test_batch_mean_in_q1_loses_q1_only(course):
    assert scores(course)["wrong_q1"] == AUTO_POINTS - 2
    feedback = (course / "feedback" / "wrong_q1" / LAB / f"{LAB}.html").read_text()
    assert "mean of each image" in feedback


def test_written_answer_waits_for_the_instructor_then_counts(course):
    from nbgrader.api import Gradebook

    db = f"sqlite:///{course / 'gradebook.db'}"
    with Gradebook(db) as gb:
        grade = gb.find_grade("q4-answer", LAB, LAB, "wrong_q2")
        assert grade.needs_manual_grade and grade.auto_score is None
        grade.manual_score = MANUAL_POINTS
        gb.db.commit()
    nbgrader(course, "export", "--to", "grades.csv")
    assert scores(course)["wrong_q2"] == AUTO_POINTS - 3 + MANUAL_POINTS
