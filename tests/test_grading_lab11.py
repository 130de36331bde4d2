"""Lab 11 through real nbgrader: the solution gets full marks (but the written answer), the
untouched release none, a wrong answer partial marks.

Reference: nbgrader 0.9 (generate_assignment, autograde, export) as in tests/test_grading.py,
whose helpers this reuses. The wrong answer is round-to-nearest in Q2 (no error propagation:
the GPTQ check fails, 5 points lost). Q3 is a manually graded markdown answer (2 points).
"""

from __future__ import annotations

import pytest
from test_grading import graded_lab, points, solution_nb, totals

LAB = "lab11_gptq"
MANUAL = 2.0

pytestmark = pytest.mark.grading

WRONG_Q2 = """def gptq_layer(W, H, bits, group_size):
    w_q, scale, zero_point = quantize_groups(W, bits, group_size)
    g = group_size
    return ((w_q.reshape(W.shape[0], -1, g) - zero_point[..., None]) * scale[..., None]).reshape(W.shape)
"""


@pytest.fixture(scope="module")
def course(tmp_path_factory):
    return graded_lab(tmp_path_factory.mktemp("course11"), LAB,
                      {"perfect": {}, "wrong": {"q2-answer": WRONG_Q2}})


def test_solution_full_marks_wrong_answer_partial(course):
    got = totals(course, LAB)
    top = sum(points(solution_nb(LAB)).values())
    assert top == 10.0
    assert got["perfect"] == top - MANUAL
    assert got["wrong"] == got["perfect"] - 5.0


def test_written_answer_is_left_for_the_instructor(course):
    from nbgrader.api import Gradebook

    with Gradebook(f"sqlite:///{course / 'gradebook.db'}") as gb:
        grade = gb.find_grade("q3-answer", LAB, LAB, "perfect")
        assert grade.needs_manual_grade and grade.max_score == MANUAL
