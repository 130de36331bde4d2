"""Tests for qlib.requant (fixed-point requantization).

References, written out here in Python's exact integers:
- TFLite's ``MultiplyByQuantizedMultiplier`` with ``TFLITE_SINGLE_ROUNDING``
  (tensorflow/lite/kernels/internal/common.cc)::

      total_shift = 31 - shift
      result = (x * M + (1 << (total_shift - 1))) >> total_shift      # int64

- gemmlowp's ``SaturatingRoundingDoublingHighMul`` and ``RoundingDivideByPOT``
  (gemmlowp/fixedpoint/fixedpoint.h), and classic TFLite's double-rounding
  ``MultiplyByQuantizedMultiplier`` built from them;
- exact rational arithmetic (``fractions.Fraction``) for what the roundings approximate;
- TFLite's int8 ADD (tensorflow/lite/kernels/add.cc ``PrepareGeneralSubOp`` and
  reference_ops ``AddElementwise``), written out per element for ``requantized_add``,
  and the float sum it approximates.

Torch draws use generators seeded from ``QLIB_TEST_SEED`` (default 0).
"""

import os
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qlib.requant import (INT32_MAX, INT32_MIN, add_multipliers, multiply_by_quantized_multiplier,
                          quantize_multiplier, requantize, requantize_scaled, requantized_add,
                          rounding_divide_by_pot, saturating_rounding_doubling_high_mul)

SEED = int(os.environ.get("QLIB_TEST_SEED", "0"))
int32s = st.integers(INT32_MIN, INT32_MAX)


def gen(offset: int) -> torch.Generator:
    return torch.Generator().manual_seed(SEED * 1000 + offset)


# ----------------------------------------------------------------- reference formulas
def tflite_single_rounding(x: int, m: int, shift: int) -> int:
    """TFLite, TFLITE_SINGLE_ROUNDING (shift in [-31, 30])."""
    total_shift = 31 - shift
    return (x * m + (1 << (total_shift - 1))) >> total_shift


def c_div(a: int, b: int) -> int:
    """C/C++ integer division: truncates toward zero."""
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b > 0) else -q


def gemmlowp_srdhm(a: int, b: int) -> int:
    """gemmlowp SaturatingRoundingDoublingHighMul (int32)."""
    if a == b == INT32_MIN:
        return INT32_MAX
    ab = a * b
    nudge = (1 << 30) if ab >= 0 else 1 - (1 << 30)
    return c_div(ab + nudge, 1 << 31)


def gemmlowp_rdbpot(x: int, exponent: int) -> int:
    """gemmlowp RoundingDivideByPOT."""
    mask = (1 << exponent) - 1
    remainder = x & mask
    threshold = (mask >> 1) + (1 if x < 0 else 0)
    return (x >> exponent) + (1 if remainder > threshold else 0)


def tflite_double_rounding(x: int, m: int, shift: int) -> int:
    """Classic TFLite MultiplyByQuantizedMultiplier (x << left_shift must fit in int32)."""
    left, right = max(shift, 0), max(-shift, 0)
    return gemmlowp_rdbpot(gemmlowp_srdhm(x * (1 << left), m), right)


def round_half_away(fr: Fraction) -> int:
    n = (abs(fr.numerator) * 2 + fr.denominator) // (2 * fr.denominator)
    return n if fr >= 0 else -n


# ----------------------------------------------------------------- quantize_multiplier
@settings(deadline=None)
@given(st.floats(2.0**-31, 2.0**30, allow_nan=False, allow_infinity=False))
def test_quantize_multiplier_reproduces_the_real_multiplier(real):
    m, shift = quantize_multiplier(real)
    assert 2**30 <= m < 2**31 and -31 <= shift <= 31
    assert abs(Fraction(m) * Fraction(2) ** (shift - 31) - Fraction(real)) <= Fraction(real) * Fraction(1, 2**31)


def test_quantize_multiplier_vectorized_and_edge_cases():
    reals = torch.rand(50, dtype=torch.float64, generator=gen(1)) * torch.logspace(-9, 3, 50, dtype=torch.float64)
    m, shift = quantize_multiplier(reals)
    assert m.dtype == shift.dtype == torch.int64 and m.shape == (50,)
    assert [(int(a), int(b)) for a, b in zip(m, shift)] == [quantize_multiplier(float(r)) for r in reals]
    assert quantize_multiplier(0.0) == (0, 0)
    assert quantize_multiplier(2.0**-40) == (0, 0)  # times any int32 it rounds to 0
    assert quantize_multiplier(1.0) == (2**30, 1)
    for bad in (-0.5, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            quantize_multiplier(bad)
    with pytest.raises(ValueError, match="2\\*\\*31"):
        quantize_multiplier(2.0**33)


# ----------------------------------------------------------------- gemmlowp pieces
@settings(deadline=None)
@given(int32s, int32s)
def test_srdhm_matches_gemmlowp(a, b):
    got = int(saturating_rounding_doubling_high_mul(a, b))
    assert got == gemmlowp_srdhm(a, b)
    if not a == b == INT32_MIN:
        assert got == round_half_away(Fraction(a * b, 2**31))


@settings(deadline=None)
@given(st.integers(-(2**40), 2**40), st.integers(0, 40))
def test_rounding_divide_by_pot_matches_gemmlowp(x, exponent):
    got = int(rounding_divide_by_pot(x, exponent))
    assert got == gemmlowp_rdbpot(x, exponent) == round_half_away(Fraction(x, 2**exponent))


def test_rounding_divide_by_pot_rejects_bad_input():
    with pytest.raises(ValueError, match="exponent"):
        rounding_divide_by_pot(5, -1)
    with pytest.raises(TypeError, match="integers"):
        rounding_divide_by_pot(torch.tensor([1.5]), 1)


# ----------------------------------------------------------------- multiply_by_quantized_multiplier
def test_single_rounding_ties_go_up_as_in_tflite():
    """Regression: qlib rounded x * M = -0.5 to -1 (ties away from zero); TFLite gives 0."""
    m, shift = quantize_multiplier(0.5)
    x = torch.tensor([-5, -3, -1, 1, 3, 5])  # x * M = -2.5, -1.5, -0.5, 0.5, 1.5, 2.5
    got = multiply_by_quantized_multiplier(x, m, shift)
    assert got.tolist() == [tflite_single_rounding(int(v), m, shift) for v in x] == [-2, -1, 0, 1, 2, 3]


@settings(max_examples=300, deadline=None)
@given(int32s, st.floats(2.0**-31, 2.0**30))
def test_single_rounding_matches_tflite(x, real):
    m, shift = quantize_multiplier(real)
    if shift > 30:  # outside TFLite's DCHECK range; covered by the exact test below
        return
    got = int(multiply_by_quantized_multiplier(x, m, shift))
    want = max(INT32_MIN, min(INT32_MAX, tflite_single_rounding(x, m, shift)))
    assert got == want


@settings(max_examples=300, deadline=None)
@given(int32s, st.floats(2.0**-31, 2.0**30))
def test_double_rounding_matches_gemmlowp(x, real):
    m, shift = quantize_multiplier(real)
    if not INT32_MIN <= x * 2 ** max(shift, 0) <= INT32_MAX:  # TFLite wraps there; qlib saturates
        x = x >> max(shift, 0)
    got = int(multiply_by_quantized_multiplier(x, m, shift, double_rounding=True))
    assert got == tflite_double_rounding(x, m, shift)
    exact = Fraction(x) * Fraction(m) * Fraction(2) ** (shift - 31)
    assert abs(got - exact) <= 1  # two roundings: off by at most one


def test_double_rounding_example_from_the_docstring():
    m, shift = quantize_multiplier(0.1148)
    assert shift == -3
    x = 13  # x * 0.1148 = 1.4924
    assert int(multiply_by_quantized_multiplier(x, m, shift)) == 1
    assert int(multiply_by_quantized_multiplier(x, m, shift, double_rounding=True)) == 2


def test_multiplier_input_checks():
    with pytest.raises(ValueError, match="multiplier"):
        multiply_by_quantized_multiplier(3, 2**31, 0)
    with pytest.raises(ValueError, match="shift"):
        multiply_by_quantized_multiplier(3, 2**30, 40)
    with pytest.raises(TypeError, match="integers"):
        multiply_by_quantized_multiplier(torch.tensor([1.0]), 2**30, 0)
    with pytest.raises(OverflowError, match="int32"):
        multiply_by_quantized_multiplier(torch.tensor([2**33]), 2**30, 0)


# ----------------------------------------------------------------- requantize
def reference_requantize(acc, m, shift, zp, qmin, qmax, double_rounding):
    f = tflite_double_rounding if double_rounding else tflite_single_rounding
    return [[max(qmin, min(qmax, f(int(a), int(mc), int(sc)) + zp)) for a, mc, sc in zip(row, m, shift)]
            for row in acc.tolist()]


@pytest.mark.parametrize("double_rounding", [False, True])
@pytest.mark.parametrize("bits", [4, 8])
def test_requantize_is_exactly_the_reference_formula(double_rounding, bits):
    """Per channel, with exact ties and 4-bit-sized multipliers where the two roundings differ.

    Kills a ``requantize`` that ignores ``double_rounding`` or computes ``round(acc * M)``
    in float (round-half-even at the ties, and float64 cannot hold ``acc * m``)."""
    g = gen(10 + bits)
    qmin, qmax = 0, 2**bits - 1
    reals = torch.rand(16, dtype=torch.float64, generator=g) * (0.2 if bits == 4 else 2.0**-9) + 2.0**-12
    reals[:4] = torch.tensor([0.5, 0.25, 0.125, 2.0**-10], dtype=torch.float64)  # exact ties for odd acc
    m, shift = quantize_multiplier(reals)
    acc = torch.randint(-(2**15), 2**15, (256, 16), generator=g)
    acc[:, :4] = torch.randint(-20, 20, (256, 4), generator=g) * 2 + 1
    q = requantize(acc, m, shift, 3, qmin, qmax, double_rounding=double_rounding)
    assert q.dtype == (torch.uint8 if bits == 8 else torch.int8) and q.shape == acc.shape
    assert q.tolist() == reference_requantize(acc, m, shift, 3, qmin, qmax, double_rounding)
    other = requantize(acc, m, shift, 3, qmin, qmax, double_rounding=not double_rounding)
    assert not torch.equal(q, other)  # the two conventions differ on these inputs


def test_requantize_per_channel_conv_shape_and_signed_codes():
    g = gen(20)
    acc = torch.randint(-5000, 5000, (2, 3, 4, 4), generator=g, dtype=torch.int32)
    real = torch.tensor([0.01, 0.02, 0.03], dtype=torch.float64)
    m, shift = quantize_multiplier(real)
    q = requantize(acc, m.reshape(3, 1, 1), shift.reshape(3, 1, 1), 0, -128, 127)
    assert q.dtype == torch.int8 and q.shape == acc.shape
    flat = acc.permute(0, 2, 3, 1).reshape(-1, 3)
    want = torch.tensor(reference_requantize(flat, m, shift, 0, -128, 127, False))
    assert torch.equal(q.permute(0, 2, 3, 1).reshape(-1, 3).long(), want)


def test_requantize_scaled_forms_the_multiplier_from_the_scales():
    g = gen(30)
    acc = torch.randint(-(2**20), 2**20, (8, 5, 3, 3), generator=g)
    acc_scale = (torch.rand(5, 1, 1, dtype=torch.float64, generator=g) + 0.5) * 1e-4
    out_scale = torch.tensor(0.02)
    m, shift = quantize_multiplier(acc_scale / out_scale.double())
    for dr in (False, True):
        got = requantize_scaled(acc, acc_scale, out_scale, 7, 0, 255, double_rounding=dr)
        assert torch.equal(got, requantize(acc, m, shift, 7, 0, 255, double_rounding=dr))


@pytest.mark.parametrize("real,zp,qmin,qmax", [
    (2.0**-31, 100, 0, 255),                   # total shift 62: z << 62 would overflow int64
    (0.75, 2**30, INT32_MIN, INT32_MAX),         # int32 codes: the product saturates before z is added
    (3.0, -(2**30), INT32_MIN, INT32_MAX),
    (2.0**-10, -7, -128, 127),
])
def test_requantize_extreme_multipliers_and_zero_points(real, zp, qmin, qmax):
    g = gen(40)
    acc = torch.randint(INT32_MIN, INT32_MAX, (64,), generator=g, dtype=torch.int64)
    acc[:4] = torch.tensor([INT32_MIN, INT32_MAX, 0, -1])
    m, shift = quantize_multiplier(real)
    for dr in (False, True):
        f = tflite_double_rounding if dr else tflite_single_rounding
        if dr:  # TFLite's x << left_shift wraps where qlib saturates: compare where it fits
            acc = acc >> max(shift, 0)
        want = [max(qmin, min(qmax, max(INT32_MIN, min(INT32_MAX, f(int(a), m, shift))) + zp)) for a in acc]
        assert requantize(acc, m, shift, zp, qmin, qmax, double_rounding=dr).tolist() == want


# ----------------------------------------------------------------- requantized add (TFLite ADD)
def tflite_quantize_multiplier(real: float) -> tuple[int, int]:
    """TFLite QuantizeMultiplier: frexp, Q31 mantissa, renormalize on a carry."""
    import math
    if real == 0:
        return 0, 0
    q, shift = math.frexp(real)
    q_fixed = round(q * (1 << 31))  # TFRound: half away from zero; q > 0 here
    if q_fixed == 1 << 31:
        q_fixed //= 2
        shift += 1
    return q_fixed, shift


def tflite_add(a: int, b: int, sa, za, sb, zb, so, zo, qmin, qmax, double_rounding, left_shift=20) -> int:
    """One element of TFLite's int8 ADD, in Python integers."""
    twice_max = 2 * max(sa, sb)
    ma, sha = tflite_quantize_multiplier(sa / twice_max)
    mb, shb = tflite_quantize_multiplier(sb / twice_max)
    mo, sho = tflite_quantize_multiplier(twice_max / ((1 << left_shift) * so))
    mul = tflite_double_rounding if double_rounding else tflite_single_rounding
    scaled_a = mul((a - za) * (1 << left_shift), ma, sha)
    scaled_b = mul((b - zb) * (1 << left_shift), mb, shb)
    raw = mul(scaled_a + scaled_b, mo, sho) + zo
    return min(qmax, max(qmin, raw))


@pytest.mark.parametrize("double_rounding", [False, True])
@pytest.mark.parametrize("case", range(4))
def test_requantized_add_is_tflites_add_and_close_to_the_float_sum(double_rounding, case):
    g = gen(300 + case)
    sa, sb = (torch.rand(2, generator=g) * 0.2 + 0.005).tolist()
    so = (sa + sb) * float(torch.rand(1, generator=g) * 0.6 + 0.7)
    za, zb, zo = torch.randint(-20, 21, (3,), generator=g).tolist()
    a = torch.randint(-128, 128, (300,), generator=g, dtype=torch.int8)
    b = torch.randint(-128, 128, (300,), generator=g, dtype=torch.int8)
    out = requantized_add(a, sa, za, b, sb, zb, so, zo, -128, 127, double_rounding=double_rounding)
    assert out.dtype == torch.int8
    ref = [tflite_add(int(x), int(y), sa, za, sb, zb, so, zo, -128, 127, double_rounding)
           for x, y in zip(a.tolist(), b.tolist())]
    assert out.tolist() == ref
    real = (sa * (a.double() - za) + sb * (b.double() - zb)) / so
    exact = torch.clamp(torch.round(real) + zo, -128, 127)
    diff = (out.double() - exact).abs()
    assert diff.max() <= 1 and diff.mean() < 0.05  # a tie-breaking code at most, rarely


def test_requantized_add_of_equal_qparams_is_the_plain_sum():
    """Same scale in and out, zero points 0: a + b exactly (saturated)."""
    a = torch.arange(-60, 60, dtype=torch.int8)
    b = torch.flip(a, [0]) // 2
    out = requantized_add(a, 0.05, 0, b, 0.05, 0, 0.05, 0)
    assert torch.equal(out.long(), (a.long() + b.long()).clamp(-128, 127))


def test_add_multipliers_match_tflite_and_reject_bad_scales():
    (ma, sa), (mb, sb), (mo, so) = add_multipliers(0.1, 0.05, 0.12)
    assert (ma, sa) == tflite_quantize_multiplier(0.5) and (mb, sb) == tflite_quantize_multiplier(0.25)
    assert (mo, so) == tflite_quantize_multiplier(0.2 / (2**20 * 0.12))
    with pytest.raises(ValueError, match="a_scale"):
        add_multipliers(0.0, 0.1, 0.1)
    with pytest.raises(ValueError, match="too fine"):
        add_multipliers(1.0, 1.0, 1e-9)
    with pytest.raises(ValueError, match="left_shift"):
        add_multipliers(0.1, 0.1, 0.1, left_shift=40)
