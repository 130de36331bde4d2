"""qlib.check: self-checks pass right answers, and explain wrong ones without crashing.

Reference: the lab00 questions' written answers.
"""

from __future__ import annotations

import pytest
import torch

from qlib import check


def test_right_answers_pass(capsys):
    check.lab00.size_in_bytes(lambda n, b: (n * b + 7) // 8)
    check.lab00.size_in_bytes_hidden(lambda n, b: (n * b + 7) // 8)
    check.lab00.cast_error(lambda w: (w.half().float() - w).abs().max().item())
    check.lab00.cast_error_hidden(lambda w: (w.half().float() - w).abs().max().item())
    check.lab00.fits_fp16(lambda x: torch.isfinite(x.half()))
    check.lab00.fits_fp16_hidden(lambda x: torch.isfinite(x.half()))
    assert capsys.readouterr().out.count("PASS") == 6


def test_wrong_answer_says_what_was_expected():
    with pytest.raises(AssertionError, match=r"size_in_bytes\(3, 4\): expected 2, got 1"):
        check.lab00.size_in_bytes(lambda n, b: n * b // 8)
    with pytest.raises(AssertionError, match="65504"):
        check.lab00.fits_fp16(lambda x: x.abs() < 65504)


def test_student_exception_is_reported_not_crashed():
    def broken(n, b):
        return n / 0
    with pytest.raises(check.CheckFailed, match="raised ZeroDivisionError"):
        check.lab00.size_in_bytes(broken)


def test_unimplemented_says_so():
    with pytest.raises(check.CheckFailed, match="not implemented yet"):
        check.lab00.cast_error(check.not_implemented)


def test_expect_close_and_equal_messages():
    with pytest.raises(check.CheckFailed, match="expected shape"):
        check.expect_close(torch.zeros(2), torch.zeros(3), "x")
    with pytest.raises(check.CheckFailed, match="expected a torch.Tensor"):
        check.expect_equal([1, 2], torch.tensor([1, 2]), "x")
    check.expect_close(1.0 + 1e-9, 1.0, "x")
