"""Lab 07's nbgrader pipeline grades wrong answers with partial marks.

Reference: nbgrader 0.9 (generate_assignment, autograde, export), as in tests/test_grading.py,
which already checks that lab 07's solution gets full marks and its untouched release none.
Here: a fused epilogue that forgets the bias loses Q2's 3 points only, and a per-token
quantizer that divides by 127.5 loses Q3's 2 points only (Q1's Triton K-loop still passes).
"""

from __future__ import annotations

import shutil

import nbformat
import pytest

from test_grading import ROOT, answers, max_score, nbgrader, scores, submission, write_submission

LAB = "lab07_triton_int8"
FULL = 8.0

NO_BIAS = '''@triton.jit
def dequant_epilogue(acc, offs_m, offs_n, M, N, row_scale_ptr, col_scale_ptr, bias_ptr, HAS_BIAS: tl.constexpr):
    row_scale = tl.load(row_scale_ptr + offs_m, mask=offs_m < M, other=0.0)
    col_scale = tl.load(col_scale_ptr + offs_n, mask=offs_n < N, other=0.0)
    return acc.to(tl.float32) * row_scale[:, None] * col_scale[None, :]
'''

DIVISOR_127_5 = '''def quantize_per_token(x):
    x = x.to(torch.float32)
    scale = torch.clamp(x.abs().amax(dim=1) / 127.5, min=torch.finfo(torch.float32).eps)
    return torch.clamp(torch.round(x * (1.0 / scale)[:, None]), -127, 127).to(torch.int8), scale
'''

pytestmark = pytest.mark.grading


@pytest.fixture(scope="module")
def course(tmp_path_factory):
    course = tmp_path_factory.mktemp("course07")
    shutil.copy(ROOT / "nbgrader_config.py", course)
    (course / "solutions").mkdir()
    shutil.copytree(ROOT / "solutions" / LAB, course / "solutions" / LAB,
                    ignore=shutil.ignore_patterns("*.py", ".ipynb_checkpoints"))
    nbgrader(course, "generate_assignment", LAB, "--force")
    release = nbformat.read(course / "labs" / LAB / f"{LAB}.ipynb", as_version=4)
    good = answers(nbformat.read(ROOT / "solutions" / LAB / f"{LAB}.ipynb", as_version=4))
    write_submission(course, "no_bias", LAB, submission(release, {**good, "q2-answer": NO_BIAS}))
    write_submission(course, "divisor", LAB, submission(release, {**good, "q3-answer": DIVISOR_127_5}))
    nbgrader(course, "autograde", LAB, "--create")
    nbgrader(course, "export", "--to", "grades.csv")
    return course


def test_max_score(course):
    assert max_score(course, LAB) == FULL


def test_epilogue_without_bias_loses_q2_only(course):
    assert scores(course, LAB)["no_bias"] == FULL - 3


def test_wrong_divisor_loses_q3_only(course):
    assert scores(course, LAB)["divisor"] == FULL - 2
