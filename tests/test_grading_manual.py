"""Manual grading of a written answer in the Formgrader workflow, end to end with real nbgrader.

Reference: nbgrader 0.9's Formgrader, whose API handlers (``GradeHandler.put`` and
``CommentHandler.put`` in ``nbgrader/server_extensions/formgrader/apihandlers.py``) do exactly
this on the gradebook: ``Gradebook.find_grade(...)``, set ``manual_score`` and
``needs_manual_grade = False``; ``Gradebook.find_comment(...)``, set ``manual_comment``; commit.

One small lab (lab 06, about half a minute to autograde), one submission: the solution with a
student's own written answer. Autograding scores every code question and leaves the written
answer at 0, flagged "needs manual grade"; the instructor's manual score and comment then show
in the gradebook total, in ``nbgrader export`` and in the ``generate_feedback`` page.
"""

from __future__ import annotations

import pytest

from test_grading import feedback_text, graded_lab, manual, nbgrader, points, release_nb, totals

LAB = "lab06_distillation"
STUDENT = "ada"
WRITTEN = ("Distillation on noise gains only a point once the weight scales are MSE-chosen: "
           "most of the old gain was a weight-scale repair.")
SCORE = 1.5
COMMENT = "Right decomposition; quote the seeds' spread next time."


def formgrader_grade(course, lab: str, student: str, cell: str, score: float, comment: str) -> None:
    """What the Formgrader's Manual Grading page does when the instructor types a score and a comment."""
    from nbgrader.api import Gradebook

    with Gradebook("sqlite:///" + str(course / "gradebook.db")) as gb:
        grade = gb.find_grade(cell, lab, lab, student)
        grade.manual_score = score
        grade.needs_manual_grade = False
        gb.find_comment(cell, lab, lab, student).manual_comment = comment
        gb.db.commit()


@pytest.mark.grading
def test_written_answer_graded_by_hand_reaches_total_export_and_feedback(tmp_path):
    release = release_nb(LAB)
    written = manual(release)
    assert written, f"{LAB} has no manually graded written answer"
    cell = sorted(written)[0]
    want = points(release)
    auto_total = sum(p for gid, p in want.items() if gid not in written)
    course = graded_lab(tmp_path, LAB, {STUDENT: {cell: WRITTEN}}, feedback=True)
    assert COMMENT not in feedback_text(course, STUDENT, LAB)

    from nbgrader.api import Gradebook

    with Gradebook("sqlite:///" + str(course / "gradebook.db")) as gb:
        grade = gb.find_grade(cell, LAB, LAB, STUDENT)
        assert grade.auto_score is None and grade.needs_manual_grade  # autograde leaves it to the instructor
        assert grade.score == 0.0 and grade.max_score == want[cell]
        assert gb.find_submission(LAB, STUDENT).score == auto_total
    assert totals(course, LAB)[STUDENT] == auto_total

    formgrader_grade(course, LAB, STUDENT, cell, SCORE, COMMENT)
    with Gradebook("sqlite:///" + str(course / "gradebook.db")) as gb:
        grade = gb.find_grade(cell, LAB, LAB, STUDENT)
        assert (grade.score, grade.needs_manual_grade) == (SCORE, False)
        assert gb.find_submission(LAB, STUDENT).score == auto_total + SCORE
        assert not gb.find_submission(LAB, STUDENT).needs_manual_grade

    nbgrader(course, "export", "--to", "grades.csv")
    assert totals(course, LAB)[STUDENT] == auto_total + SCORE
    nbgrader(course, "generate_feedback", LAB, "--force")  # as the README's instructor guide says
    page = feedback_text(course, STUDENT, LAB)
    assert WRITTEN in page and COMMENT in page
    assert f"Score: {auto_total + SCORE:g}" in page.replace(".0 ", " ") or f"{auto_total + SCORE}" in page
    assert f"{SCORE}" in page
