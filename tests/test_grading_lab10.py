"""Lab 10 through real nbgrader: a wrong answer gets partial marks; the written answer waits
for the instructor.

Reference: nbgrader 0.9 (generate_assignment, autograde, export) as in tests/test_grading.py,
whose helpers this reuses. The wrong answer is round-to-nearest in Q1 (biased: the
unbiasedness check fails, 3 points lost). Q5 is a manually graded markdown answer (2
points): autograde leaves it at 0 and flags it for manual grading, so a perfect submission
scores the maximum minus 2 until the instructor grades it.
"""

from __future__ import annotations


import pytest
from test_grading import graded_lab, points, solution_nb, totals

LAB = "lab10_federated"
MANUAL = 2.0

pytestmark = pytest.mark.grading

WRONG_Q1 = """def encode_stochastic(d, bits, generator):
    qmax = 2 ** (bits - 1) - 1
    scale = d.abs().max() / qmax
    return torch.round(d / scale).clamp(-qmax, qmax).to(torch.int8), scale
"""


@pytest.fixture(scope="module")
def course(tmp_path_factory):
    return graded_lab(tmp_path_factory.mktemp("course10"), LAB,
                      {"perfect": {}, "wrong": {"q1-answer": WRONG_Q1}})


def test_wrong_answer_gets_partial_marks(course):
    got = totals(course, LAB)
    top = sum(points(solution_nb(LAB)).values())
    assert top == 10.0
    assert got["perfect"] == top - MANUAL  # everything but the written answer, which waits
    assert got["wrong"] == got["perfect"] - 3.0


def test_written_answer_is_left_for_the_instructor(course):
    from nbgrader.api import Gradebook

    with Gradebook(f"sqlite:///{course / 'gradebook.db'}") as gb:
        grade = gb.find_grade("q5-answer", LAB, LAB, "perfect")
        assert grade.needs_manual_grade and grade.max_score == MANUAL
