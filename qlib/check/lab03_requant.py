"""Checks for lab 03's Q9: fixed-point requantization, int32 accumulators to the next layer's
codes in integers only (lesson 04; Jacob et al. 2018, section 2.2; TFLite's single rounding).

Idea. An accumulator ``acc`` is worth ``s_x s_w acc``; the next layer reads codes of scale
``s_y``, so ``y_q = round(M acc) + z_y`` with the real multiplier ``M = s_x s_w / s_y``. An
integer-only device cannot multiply by a real, so ``M`` is written in Q31 fixed point::

    M = m * 2**(shift - 31),   m an integer in [2**30, 2**31)      (Q9a: quantize_multiplier)

(``m`` is the nearest integer to ``M * 2**(31 - shift)``, a mantissa in ``[0.5, 1)`` times
``2**31``; when rounding reaches ``2**31``, halve it and add one to ``shift``). Then::

    y_q = clamp(((acc * m + 2**(t - 1)) >> t) + z_y, quant_min, quant_max),   t = 31 - shift
                                                                            (Q9b: requantize)

one rounding of the exact 64-bit product, ties toward +infinity (``>>`` floors; adding half
first rounds). Shapes and dtypes: ``acc`` any shape, int32 values (int64 tensor allowed);
``m``, ``shift``, ``z_y``, the range: Python ints; out: integer codes of ``acc``'s shape.

Why integers and not float64: ``acc * m`` needs up to 62 bits, a float64 holds 53, so a value
a hair below a tie rounds onto the tie in float64 and then up: one code too many. Such
near-ties are constructed in :mod:`qlib.check.near_ties` (``near_tie``, ``NEAR_TIES_8BIT``;
``_near_tie_hint`` explains a failure at one).

References, computed here from first principles so that the checks depend on nothing the
student could call: the multiplier from Python's exact :class:`fractions.Fraction` arithmetic
(``reference_multiplier_ok``), the rounding shift on Python ints (``reference_requantize``);
``qlib.requant.quantize_multiplier`` / ``requantize`` are asserted to agree
(tests/test_check_lab03_integer.py). Visible checks cover every stated requirement (M below and
above 1, a multiplier that rounds up to ``2**31``, ties of both signs, clamping, a non-zero
``z_y``, the int32 extremes, near-ties that float64 rounds onto the tie, at 8 and 16 bits);
hidden checks draw fresh multipliers, ranges, accumulators and near-ties. Re-exported by
:mod:`qlib.check.lab03_integer` and :mod:`qlib.check.lab03`.
"""

from __future__ import annotations

import math
import random
from fractions import Fraction
from numbers import Integral

import torch

from .core import CheckFailed, call, expect, expect_pair, expect_tensor, first_difference, run
from .draws import Draw, hidden
from .near_ties import NEAR_TIES_8BIT, _near_tie_hint, near_tie

__all__ = ["reference_multiplier_ok", "reference_requantize", "quantize_multiplier", "quantize_multiplier_hidden",
           "requantize", "requantize_hidden"]


# ------------------------------------------------------------------ references (first principles)
def reference_multiplier_ok(real: float, m, shift) -> str:
    """"" when ``(m, shift)`` is a right Q31 form of ``real``, else what is wrong.

    Right: ``m`` an int in ``[2**30, 2**31)``, ``shift`` an int, and ``m`` the nearest integer to
    ``real * 2**(31 - shift)`` (exactly, in rationals; a tie may go either way).
    """
    if not (isinstance(m, Integral) and isinstance(shift, Integral)) or isinstance(m, bool):
        return f"expected two Python ints (m, shift), got ({m!r}, {shift!r})"
    m, shift = int(m), int(shift)
    if not 2**30 <= m < 2**31:
        return (f"m = {m} is outside [2**30, 2**31) = [{2**30}, {2**31}): m * 2**(shift - 31) must use all "
                f"31 bits of m (a mantissa in [0.5, 1), times 2**31)"
                + (" - rounding reached 2**31: halve m and add one to shift" if m == 2**31 else ""))
    exact = Fraction(real) * Fraction(2) ** (31 - shift)
    if abs(exact - m) > Fraction(1, 2):
        approx = m * 2.0 ** (shift - 31)
        return (f"m * 2**(shift - 31) = {approx!r}, but M = {real!r}"
                + (" (off by a power of two: check shift)" if approx and math.log2(real / approx) % 1 == 0 else
                   " (m should be the nearest integer to M * 2**(31 - shift))"))
    return ""


def _reference_m_shift(real: float) -> tuple[int, int]:
    mantissa, exponent = math.frexp(real)
    m = round(Fraction(mantissa) * 2**31)
    return (m // 2, exponent + 1) if m == 2**31 else (m, exponent)


def reference_requantize(acc: torch.Tensor, m: int, shift: int, z_y: int, quant_min: int, quant_max: int) -> torch.Tensor:
    """``clamp(((acc * m + 2**(t-1)) >> t) + z_y, quant_min, quant_max)``, ``t = 31 - shift``, on
    Python ints (exact at any size), as an int64 tensor of ``acc``'s shape."""
    t = 31 - shift
    out = [min(max(((a * m + (1 << (t - 1))) >> t) + z_y, quant_min), quant_max) for a in acc.flatten().tolist()]
    return torch.tensor(out, dtype=torch.int64).reshape(acc.shape)


# ------------------------------------------------------------------ Q9a quantize_multiplier
def _check_multiplier(fn, real: float, what: str) -> None:
    got = expect_pair(call(fn, real, what="quantize_multiplier"), what, "(m, shift)")
    problem = reference_multiplier_ok(real, *got)
    if problem:
        want = _reference_m_shift(real)
        raise CheckFailed(f"{what}: {problem}. Expected (m, shift) = {want}.")


def quantize_multiplier(fn) -> None:
    """Q9 visible (multiplier): M below and above 1, a power of two, one that rounds up to 2**31."""
    def body():
        for real in [0.5, 0.75, 2.0**-10 * 0.8125, 3.7, 0.0123456789, 1.0 - 2.0**-40, 2.0**-30 * 1.5, 12345.678]:
            _check_multiplier(fn, real, f"quantize_multiplier({real!r})")
    run("quantize_multiplier: worked cases", body)


def quantize_multiplier_hidden(fn) -> None:
    """Q9 hidden (multiplier): random multipliers over the whole stated range."""
    def body(draw: Draw):
        for _ in range(200):
            real = 2.0 ** draw.rng.uniform(-30, 16)
            _check_multiplier(fn, real, f"quantize_multiplier({real!r})")
    hidden("quantize_multiplier: random multipliers", body)


# ------------------------------------------------------------------ Q9b requantize
def _check_requantize(fn, acc, m, shift, z_y, qmin, qmax, what):
    got = expect_tensor(call(fn, acc.clone(), m, shift, z_y, qmin, qmax, what="requantize"), what, acc.shape,
                        kind="a tensor of codes")
    expect(not got.is_floating_point(), f"{what}: expected integer codes, got a {got.dtype} tensor; "
                                        "integer-only means int64 products and shifts")
    want = reference_requantize(acc, m, shift, z_y, qmin, qmax)
    got = got.to(torch.int64)
    if torch.equal(got, want):
        return
    n_bad, i = first_difference(got, want)
    a = acc.flatten()[i].item()
    t = 31 - shift
    exact = Fraction(a * m, 2**t)
    hint = _near_tie_hint(a, m, shift)
    if exact.denominator == 2:
        hint = (f" acc * M = {float(exact)} is exactly halfway: ties round up (toward +infinity), "
                f"so expected {math.floor(exact + Fraction(1, 2))}; torch.round rounds half to even and "
                "Python's round too")
    raise CheckFailed(f"{what}: {n_bad} of {acc.numel()} codes differ. First: acc = {a}, m = {m}, shift = {shift} "
                      f"(acc * M = {float(exact):.6f}), z_y = {z_y}, range [{qmin}, {qmax}]: expected "
                      f"{want.flatten()[i].item()}, got {got.flatten()[i].item()}.{hint}")


def requantize(fn) -> None:
    """Q9 visible (requantize): worked ties of both signs, clamping, z_y, the int32 extremes, random
    accumulators at 8, 4 bits, M above and below 1."""
    def body():
        m, shift = 2**30, 0  # M = 0.5
        acc = torch.tensor([-5, -3, -1, 0, 1, 3, 5, 600, -600])
        _check_requantize(fn, acc, m, shift, 10, 0, 255,
                          "requantize([-5, -3, -1, 0, 1, 3, 5, 600, -600], M = 0.5 (m = 2**30, shift = 0), "
                          "z_y = 10, 0, 255) (ties: -2.5 -> -2, 2.5 -> 3)")
        gen = torch.Generator().manual_seed(93)
        for real, z_y, (qmin, qmax) in [(0.0123456789, 128, (0, 255)), (3.7, -3, (-128, 127)),
                                        (0.7071, 5, (0, 255)), (2.0**-20 * 1.37, 0, (-8, 7))]:
            m, shift = _reference_m_shift(real)
            span = min(2**31 - 1, int((qmax - qmin + 4) / real))
            acc = torch.cat([torch.randint(-span, span + 1, (200,), generator=gen),
                             torch.tensor([2**31 - 1, -2**31])])
            _check_requantize(fn, acc, m, shift, z_y, qmin, qmax,
                              f"requantize(random int32 accumulators, M = {real!r} as (m={m}, shift={shift}), "
                              f"z_y = {z_y}, {qmin}, {qmax})")
        # exact ties at large accumulators (M = 1.5 * 2**-20: acc = 2**20 * odd gives 1.5 * odd)
        m, shift = _reference_m_shift(1.5 * 2.0**-20)
        acc = torch.tensor([2**20 * 33, -(2**20) * 33, 2**20 * 85, -(2**20) * 85])
        _check_requantize(fn, acc, m, shift, 0, -128, 127,
                          f"requantize([2**20 * 33, -2**20 * 33, 2**20 * 85, -2**20 * 85], M = 1.5 * 2**-20 "
                          f"(m={m}, shift={shift}), 0, -128, 127) (acc * M = +-49.5, +-127.5: ties)")
        # near-ties: acc * M a hair below k + 1/2, where float64 rounds onto the tie and then up
        cases = [(case, (128, 0, 255)) for case in NEAR_TIES_8BIT]
        cases += [(near_tie(random.Random(95), 16, sign), (0, -(2**15), 2**15 - 1)) for sign in (1, -1)]
        for (a, m, shift), (z_y, qmin, qmax) in cases:
            _check_requantize(fn, torch.tensor([a]), m, shift, z_y, qmin, qmax,
                              f"requantize([{a}], m={m}, shift={shift}, z_y={z_y}, {qmin}, {qmax}) "
                              f"(acc * M a hair below a tie: float64 cannot tell)")
    run("requantize: worked and random cases", body)


def requantize_hidden(fn) -> None:
    """Q9 hidden (requantize): fresh multipliers, zero points, ranges and accumulators."""
    def body(draw: Draw):
        rng, gen = draw.rng, draw.gen
        for _ in range(8):
            real = 2.0 ** rng.uniform(-30, 8)
            m, shift = _reference_m_shift(real)
            bits, signed = rng.choice([2, 4, 8, 16]), rng.random() < 0.5
            qmin, qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
            z_y = rng.randint(qmin, qmax)
            span = min(2**31 - 1, max(1, int((qmax - qmin + 4) / real)))
            acc = torch.randint(-span, span + 1, (300,), generator=gen)
            _check_requantize(fn, acc, m, shift, z_y, qmin, qmax,
                              f"requantize(random accumulators, M = {real:.6g}, z_y = {z_y}, {qmin}, {qmax})")
        for sign in (1, -1):  # fresh near-ties at 16 and 15 bits, the stored 8-bit ones with fresh zero points
            bits = rng.choice([15, 16])
            a, m, shift = near_tie(rng, bits, sign)
            _check_requantize(fn, torch.tensor([a]), m, shift, 0, -(2 ** (bits - 1)), 2 ** (bits - 1) - 1,
                              f"requantize([{a}], m={m}, shift={shift}, 0, {bits}-bit signed range) "
                              "(acc * M a hair below a tie)")
        for a, m, shift in NEAR_TIES_8BIT:
            z_y = rng.randint(0, 120) if a > 0 else rng.randint(130, 255)
            _check_requantize(fn, torch.tensor([a]), m, shift, z_y, 0, 255,
                              f"requantize([{a}], m={m}, shift={shift}, z_y={z_y}, 0, 255) "
                              "(acc * M a hair below a tie)")
    hidden("requantize: random multipliers and accumulators", body)
