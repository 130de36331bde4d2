"""Lab 09 through real nbgrader: a wrong answer gets partial marks, the written answer waits
for the instructor. Also the lab's checks themselves: the reference answers (qlib.mixed,
qlib.export) pass and typical wrong answers fail.

Reference: nbgrader 0.9 (generate_assignment, autograde, export), qlib.check.lab09.
"""

from __future__ import annotations

import shutil

import nbformat
import pytest
import torch
from test_grading import ROOT, answers, nbgrader, points, solution_nb, submission, totals, write_submission

from qlib.check import CheckFailed, lab09
from qlib.mixed import greedy_allocate, ilp_allocate

LAB = "lab09_mixed_precision"
MANUAL = 2.0  # Q4, the written answer

GREEDY = '''def allocate(sensitivity, sizes, budget_bits):
    from qlib.mixed import greedy_allocate
    return greedy_allocate(sensitivity, sizes, budget_bits)
'''


# ------------------------------------------------------------------ the checks, without nbgrader
def test_reference_answers_pass():
    def trace(loss_fn, weight, samples, seed):
        w = weight.detach().clone().requires_grad_(True)
        g = torch.autograd.grad(loss_fn(w), w, create_graph=True)[0]
        gen = torch.Generator().manual_seed(seed)
        total = 0.0
        for _ in range(samples):
            v = (torch.randint(0, 2, w.shape, generator=gen) * 2 - 1).to(w.dtype)
            total += float((v * torch.autograd.grad(g, w, grad_outputs=v, retain_graph=True)[0]).sum())
        return total / samples

    lab09.hessian_trace(trace)
    lab09.hessian_trace_hidden(trace)
    lab09.allocate(ilp_allocate)
    lab09.allocate_hidden(ilp_allocate)


def test_wrong_answers_fail_with_a_message():
    with pytest.raises(CheckFailed, match="greedy lowering is not optimal"):
        lab09.allocate_hidden(greedy_allocate)
    with pytest.raises(CheckFailed, match="over the budget"):
        lab09.allocate(lambda sens, sizes, budget: {n: 8 for n in sizes})
    with pytest.raises(CheckFailed, match="diagonal Hessian"):
        lab09.hessian_trace(lambda loss_fn, w, samples, seed: float(w.numel()))
    with pytest.raises(CheckFailed, match="agreement"):
        lab09.verify_onnx(lambda qmodel, x: {"agreement": 0.5, "max_abs_diff": 0.0})
    with pytest.raises(CheckFailed, match="not implemented"):
        lab09.verify_onnx(lambda qmodel, x: (_ for _ in ()).throw(NotImplementedError()))


# ------------------------------------------------------------------ nbgrader end to end
@pytest.mark.grading
def test_wrong_allocation_gets_partial_marks(tmp_path):
    course = tmp_path
    shutil.copy(ROOT / "nbgrader_config.py", course)
    shutil.copytree(ROOT / "solutions" / LAB, course / "solutions" / LAB, ignore=shutil.ignore_patterns("*.py"))
    nbgrader(course, "generate_assignment", LAB, "--force")
    release = nbformat.read(course / "labs" / LAB / f"{LAB}.ipynb", as_version=4)
    good = answers(solution_nb(LAB))
    write_submission(course, "perfect", LAB, submission(release, good))
    write_submission(course, "greedy", LAB, submission(release, {**good, "q2-answer": GREEDY}))
    nbgrader(course, "autograde", LAB, "--create")
    nbgrader(course, "export", "--to", "grades.csv")
    full = sum(points(solution_nb(LAB)).values())
    assert full == 2 + 3 + 2 + MANUAL
    perfect, greedy = totals(course, LAB)["perfect"], totals(course, LAB)["greedy"]
    assert greedy == perfect - 3  # Q2 is worth 3 points; the hidden case defeats greedy
    assert perfect == full - MANUAL  # every autograded point; the written answer waits for the instructor
