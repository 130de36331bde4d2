"""qlib.check.lab03_integer (Q8: qlib.check.lab03_zeropoint, Q9: qlib.check.lab03_requant, both
re-exported by lab03_integer and lab03): right answers pass; wrong ones fail the visible check
with a hint. The near-tie search (qlib.check.near_ties) has its own tests: tests/test_check_near_ties.py.

Reference: the zero-point expansion of Jacob et al. 2018 (section 2.3) written directly
(``(x_q - z_x) @ (w_q - z_w).T + b``), TFLite's single-rounding requantization on Python
integers, and ``qlib.requant`` (``quantize_multiplier``, ``requantize``), which the checks'
own references must agree with bit for bit. Float64 answers must fail Q9 at the near-ties.
"""

from __future__ import annotations

import math

import pytest
import torch

from qlib import requant
from qlib.check import lab03, lab03_integer as L


# ------------------------------------------------------------------ right answers
def offset(w_q, z_x, z_w, bias_q):
    w = w_q.to(torch.int64)
    c = -z_x * w.sum(1) + w.shape[1] * z_x * z_w
    return c if bias_q is None else c + bias_q.to(torch.int64)


def int_linear(x_q, w_q, z_w, off):
    x = x_q.to(torch.int64)
    return x @ w_q.to(torch.int64).T - z_w * x.sum(1, keepdim=True) + off


def quantize_multiplier(M):
    mantissa, exponent = math.frexp(M)
    m = round(mantissa * 2**31)
    return (m // 2, exponent + 1) if m == 2**31 else (m, exponent)


def requantize(acc, m, shift, z_y, qmin, qmax):
    t = 31 - shift
    return torch.clamp(((acc.to(torch.int64) * m + (1 << (t - 1))) >> t) + z_y, qmin, qmax)


def test_right_answers_and_qlib_pass_every_check(capsys):
    lab03.zero_point_offset(offset)
    lab03.zero_point_offset_hidden(offset)
    lab03.int_linear(int_linear)
    lab03.int_linear_hidden(int_linear)
    lab03.quantize_multiplier(quantize_multiplier)
    lab03.quantize_multiplier_hidden(quantize_multiplier)
    lab03.quantize_multiplier_hidden(requant.quantize_multiplier)
    lab03.requantize(requantize)
    lab03.requantize_hidden(requantize)
    lab03.requantize(lambda acc, m, s, z, lo, hi: requant.requantize(acc, m, s, z, lo, hi))
    assert capsys.readouterr().out.count("PASS") == 10


def test_references_agree_with_qlib_on_fresh_draws():
    gen = torch.Generator().manual_seed(5)
    acc = torch.randint(-2**31, 2**31, (500,), generator=gen)
    for real in [2.0**-30, 1e-4, 0.3, 0.999999999, 7.5, 2.0**15]:
        m, shift = requant.quantize_multiplier(real)
        assert L.reference_multiplier_ok(real, m, shift) == ""
        assert torch.equal(L.reference_requantize(acc, m, shift, 3, -128, 127),
                           requant.requantize(acc, m, shift, 3, -128, 127).to(torch.int64))
    x = torch.randint(0, 256, (4, 9), generator=gen).to(torch.uint8)
    w = torch.randint(0, 16, (3, 9), generator=gen).to(torch.uint8)
    b = torch.randint(-100, 100, (3,), generator=gen).to(torch.int32)
    from qlib.intops import int_matmul
    assert torch.equal(L.reference_accumulator(x, w, 7, 8, b),
                       int_matmul(x, w.T.contiguous(), 7, 8, b, backend="reference").to(torch.int64))
    assert torch.equal(int_linear(x, w, 8, L.reference_offset(w, 7, 8, b)), L.reference_accumulator(x, w, 7, 8, b))


def test_every_name_is_still_importable_from_lab03_integer():
    """Q8 and Q9 moved to lab03_zeropoint and lab03_requant (the near-tie search to near_ties);
    lab03_integer re-exports every name it held (the same objects), as the notebooks import it."""
    from qlib.check import lab03_requant, lab03_zeropoint, near_ties
    moved = {lab03_zeropoint: ["reference_offset", "reference_accumulator", "zero_point_offset",
                               "zero_point_offset_hidden", "int_linear", "int_linear_hidden", "_check_offset",
                               "_cases_offset", "_offset_hidden_case", "_check_int_linear"],
             lab03_requant: ["reference_multiplier_ok", "reference_requantize", "quantize_multiplier",
                             "quantize_multiplier_hidden", "requantize", "requantize_hidden", "_reference_m_shift",
                             "_check_multiplier", "_check_requantize"],
             near_ties: ["near_tie", "NEAR_TIES_8BIT", "_first_in_window", "_near_tie_hint"]}
    for module, names in moved.items():
        assert [n for n in names if getattr(L, n, None) is not getattr(module, n)] == [], module.__name__
    assert set(L.__all__) <= set(lab03_zeropoint.__all__) | set(lab03_requant.__all__) | set(near_ties.__all__)
    assert all(getattr(lab03, n) is getattr(L, n) for n in ("zero_point_offset", "int_linear", "requantize"))


# ------------------------------------------------------------------ visible-only wrong answers
def test_offset_mistakes_fail_the_visible_check_with_a_hint():
    def no_k_term(w_q, z_x, z_w, bias_q):
        return offset(w_q, z_x, 0, bias_q)

    def no_bias(w_q, z_x, z_w, bias_q):
        return offset(w_q, z_x, z_w, None)

    def in_8_bits(w_q, z_x, z_w, bias_q):  # sums the codes in their own dtype: wraps around
        c = -z_x * w_q.sum(1, dtype=w_q.dtype).to(torch.int64) + w_q.shape[1] * z_x * z_w
        return c if bias_q is None else c + bias_q.to(torch.int64)
    with pytest.raises(AssertionError, match=r"K \* z_x \* z_w"):
        lab03.zero_point_offset(no_k_term)
    with pytest.raises(AssertionError, match="bias is missing"):
        lab03.zero_point_offset(no_bias)
    with pytest.raises(AssertionError, match="offsets differ"):
        lab03.zero_point_offset(in_8_bits)
    with pytest.raises(AssertionError, match="expected integers"):
        lab03.zero_point_offset(lambda w, zx, zw, b: offset(w, zx, zw, b).float())


def test_int_linear_mistakes_fail_the_visible_check_with_a_hint():
    def no_zw_term(x_q, w_q, z_w, off):  # right whenever z_w = 0 (int8 weights)
        return x_q.to(torch.int64) @ w_q.to(torch.int64).T + off

    def uint8_matmul(x_q, w_q, z_w, off):  # multiplies 8-bit codes in 8 bits
        return (x_q @ w_q.to(x_q.dtype).T).to(torch.int64) - z_w * x_q.to(torch.int64).sum(1, keepdim=True) + off
    with pytest.raises(AssertionError, match=r"z_w \* sum_k x_q"):
        lab03.int_linear(no_zw_term)
    with pytest.raises(AssertionError, match="convert to int64"):
        lab03.int_linear(uint8_matmul)
    with pytest.raises(AssertionError, match="offset .* is not added"):
        lab03.int_linear(lambda x, w, zw, off: int_linear(x, w, zw, off) - off)


def test_multiplier_mistakes_fail_the_visible_check():
    def no_carry(M):  # forgets that rounding can reach 2**31
        mantissa, exponent = math.frexp(M)
        return round(mantissa * 2**31), exponent

    def truncates(M):
        mantissa, exponent = math.frexp(M)
        return int(mantissa * 2**31), exponent

    def floats(M):
        mantissa, exponent = math.frexp(M)
        return mantissa * 2**31, exponent
    with pytest.raises(AssertionError, match="halve m and add one to shift"):
        lab03.quantize_multiplier(no_carry)
    with pytest.raises(AssertionError, match="nearest integer"):
        lab03.quantize_multiplier(truncates)
    with pytest.raises(AssertionError, match="two Python ints"):
        lab03.quantize_multiplier(floats)


def test_requantize_mistakes_fail_the_visible_check_with_a_hint():
    def half_even(acc, m, shift, z_y, qmin, qmax):
        M = m * 2.0 ** (shift - 31)
        return torch.clamp(torch.round(acc.double() * M).to(torch.int64) + z_y, qmin, qmax)

    def no_rounding(acc, m, shift, z_y, qmin, qmax):  # shifts without adding half
        return torch.clamp(((acc.to(torch.int64) * m) >> (31 - shift)) + z_y, qmin, qmax)

    def no_clamp(acc, m, shift, z_y, qmin, qmax):
        t = 31 - shift
        return ((acc.to(torch.int64) * m + (1 << (t - 1))) >> t) + z_y
    with pytest.raises(AssertionError, match="ties round up"):
        lab03.requantize(half_even)
    with pytest.raises(AssertionError, match="codes differ"):
        lab03.requantize(no_rounding)
    with pytest.raises(AssertionError, match="codes differ"):
        lab03.requantize(no_clamp)


# ------------------------------------------------------------------ float64 is not integer-only
def float64_ties_up(acc, m, shift, z_y, qmin, qmax):
    """Round half up in float64: right on every exact tie, wrong a hair below one."""
    M = m * 2.0 ** (shift - 31)  # exact: m has 31 bits
    return torch.clamp(torch.floor(acc.double() * M + 0.5).to(torch.int64) + z_y, qmin, qmax)


def float64_shift(acc, m, shift, z_y, qmin, qmax):
    """The integer formula, but ``acc * m`` taken in float64 (62 bits into 53)."""
    t = 31 - shift
    y = torch.floor((acc.double() * m + 2.0 ** (t - 1)) / 2.0**t).to(torch.int64)
    return torch.clamp(y + z_y, qmin, qmax)


@pytest.mark.parametrize("wrong", [float64_ties_up, float64_shift])
def test_float64_requantize_fails_visible_and_hidden_with_a_hint(wrong):
    """Regression: both float64 versions passed every requantize check (random accumulators
    almost never land within float64's error of a tie)."""
    with pytest.raises(AssertionError, match="just below a tie.*float64 holds 53"):
        lab03.requantize(wrong)
    from qlib.check.draws import seeded
    for base in ("a", "b"):
        with seeded(base), pytest.raises(AssertionError, match="just below a tie"):
            lab03.requantize_hidden(wrong)
