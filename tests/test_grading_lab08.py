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


import pytest
from test_grading import feedback_text, graded_lab, nbgrader, points, solution_nb, totals

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


@pytest.fixture(scope="module")
def course(tmp_path_factory):
    return graded_lab(tmp_path_factory.mktemp("course08"), LAB,
                      {"wrong_q1": {"q1-answer": WRONG_Q1}, "wrong_q2": {"q2-answer": WRONG_Q2}}, feedback=True)


def test_max_score_counts_the_written_answer():
    assert sum(points(solution_nb(LAB)).values()) == AUTO_POINTS + MANUAL_POINTS


def test_wrong_order_in_q2_loses_q2_only(course):
    assert totals(course, LAB)["wrong_q2"] == AUTO_POINTS - 3
    assert "plain re-calibration" in feedback_text(course, "wrong_q2", LAB)   # the check's hint reaches the student


def test_batch_mean_in_q1_loses_q1_only(course):
    assert totals(course, LAB)["wrong_q1"] == AUTO_POINTS - 2
    assert "mean of each image" in feedback_text(course, "wrong_q1", LAB)


def test_written_answer_waits_for_the_instructor_then_counts(course):
    from nbgrader.api import Gradebook

    db = f"sqlite:///{course / 'gradebook.db'}"
    with Gradebook(db) as gb:
        grade = gb.find_grade("q4-answer", LAB, LAB, "wrong_q2")
        assert grade.needs_manual_grade and grade.auto_score is None
        grade.manual_score = MANUAL_POINTS
        gb.db.commit()
    nbgrader(course, "export", "--to", "grades.csv")
    assert totals(course, LAB)["wrong_q2"] == AUTO_POINTS - 3 + MANUAL_POINTS
