"""qlib.check.lab00: right answers pass; answers that break a requirement the lab states fail
the *visible* check (an int from size_in_bytes, a bool tensor from fits_in_float16).

Reference: qlib.measure.tensor_bytes / cast_error and torch.isfinite(x.to(torch.float16)).
The one deliberate gap: Q3's visible case leaves float16's rounding edge (65504 < |x| < 65520)
to the hidden check, whose failure tests/test_grading.py uses to prove that hidden tests run.
"""

from __future__ import annotations

import math

import pytest
import torch

from qlib.check import lab00


def test_right_answers_pass(capsys):
    lab00.size_in_bytes(lambda n, b: (n * b + 7) // 8)
    lab00.size_in_bytes_hidden(lambda n, b: (n * b + 7) // 8)
    lab00.fits_fp16(lambda x: torch.isfinite(x.half()))
    lab00.fits_fp16_hidden(lambda x: torch.isfinite(x.half()))
    assert capsys.readouterr().out.count("PASS") == 4


@pytest.mark.parametrize("wrong, message", [
    (lambda n, b: math.ceil(n * b / 8) * 1.0, r"expected an int .* got 4000.0 \(float\)"),
    (lambda n, b: torch.tensor((n * b + 7) // 8), r"expected an int"),
    (lambda n, b: n * b // 8, r"size_in_bytes\(3, 4\): expected 2, got 1"),
])
def test_size_in_bytes_form_and_rounding_fail_visibly(wrong, message):
    with pytest.raises(AssertionError, match=message):
        lab00.size_in_bytes(wrong)


@pytest.mark.parametrize("wrong, message", [
    (lambda x: torch.isfinite(x.half()).int(), r"expected a bool tensor, got torch.int32"),
    (lambda x: torch.isfinite(x.half()).tolist(), r"expected a bool tensor, got list"),
    (lambda x: x.abs() < 65504, r"values differ"),
])
def test_fits_in_float16_form_and_limit_fail_visibly(wrong, message):
    with pytest.raises(AssertionError, match=message):
        lab00.fits_fp16(wrong)


def test_the_rounding_edge_is_left_to_the_hidden_check():
    threshold = lambda x: x.abs() <= 65504  # noqa: E731 (test_grading's visible-only answer)
    lab00.fits_fp16(threshold)
    with pytest.raises(AssertionError, match="near"):
        lab00.fits_fp16_hidden(threshold)


def test_the_written_answers_model_numbers_hold():
    """Q4's model answer: the absolute error scales with the values, the error relative to the
    largest value is about 2**-12 for normal numbers, and explodes where values are subnormal."""
    gen = torch.Generator().manual_seed(0)
    rows = {}
    for size in (1e3, 1.0, 1e-3, 1e-6):
        w = torch.randn(10000, generator=gen) * size
        err = (w.half().float() - w).abs()
        rows[size] = (err.max().item() / w.abs().max().item(), (err / w.abs()).max().item())
    assert all(2e-4 < rows[s][0] < 3.5e-4 for s in (1e3, 1.0, 1e-3))
    assert rows[1e3][1] < 2**-11 and rows[1.0][1] < 2**-11
    assert rows[1e-3][1] > 0.1 and rows[1e-6][1] == 1.0 and rows[1e-6][0] > 5e-3
