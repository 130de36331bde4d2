"""Checks for lab 03's integer-only questions: the zero-point expansion and fixed-point
requantization (lesson 04; Jacob et al. 2018, sections 2.2-2.3).

A quantized linear layer accumulates, for output ``n`` of input row ``m``::

    acc[m, n] = sum_k (x_q[m, k] - z_x) (w_q[n, k] - z_w) + b_q[n]
              = sum_k x_q[m, k] w_q[n, k]  -  z_w sum_k x_q[m, k]                (run time)
                + b_q[n] - z_x sum_k w_q[n, k] + K z_x z_w                         (offline: offset[n])

and requantizes it to the next layer's codes with ``M = s_x s_w / s_y`` written as
``m * 2**(shift - 31)``, ``m`` an integer in ``[2**30, 2**31)``::

    y_q = clamp(((acc * m + 2**(t - 1)) >> t) + z_y, quant_min, quant_max),   t = 31 - shift

(one rounding of the exact 64-bit product, ties toward +infinity: TFLite's single rounding).

Why integers and not float64 (``acc * m`` needs up to 62 bits, a float64 holds 53), and the
near-ties that show it, are in :mod:`qlib.check.near_ties` (``near_tie``, ``NEAR_TIES_8BIT``;
re-exported here).

References, computed here from first principles so that the checks depend on nothing the
student could call: the direct sum ``(x_q - z_x) @ (w_q - z_w).T + b_q`` in int64, the
multiplier from Python's exact :class:`fractions.Fraction` arithmetic, the rounding shift on
Python ints; ``qlib.requant.requantize`` is asserted to agree (tests/test_check_lab03_integer.py).
Visible checks cover every stated requirement (uint8 and int8 codes, a non-zero weight zero
point, no bias, a multiplier that rounds up to ``2**31``, ties of both signs, the int32
extremes, near-ties that float64 rounds onto the tie, at 8 and 16 bits); hidden checks draw
fresh shapes, codes, scales and near-ties.
"""

from __future__ import annotations

import math
import random
from fractions import Fraction
from numbers import Integral

import torch

from .core import CheckFailed, call, expect, expect_pair, expect_tensor, first_difference, run
from .draws import Draw, hidden
from .near_ties import NEAR_TIES_8BIT, _first_in_window, _near_tie_hint, near_tie  # noqa: F401

__all__ = ["reference_offset", "reference_accumulator", "reference_multiplier_ok", "reference_requantize",
           "zero_point_offset", "zero_point_offset_hidden", "int_linear", "int_linear_hidden",
           "quantize_multiplier", "quantize_multiplier_hidden", "requantize", "requantize_hidden", "near_tie",
           "NEAR_TIES_8BIT"]


# ------------------------------------------------------------------ references (first principles)
def reference_offset(w_q: torch.Tensor, z_x: int, z_w: int, bias_q: torch.Tensor | None) -> torch.Tensor:
    """``offset[n] = b_q[n] - z_x * sum_k w_q[n, k] + K * z_x * z_w`` as int64 ``(N,)``."""
    w = w_q.to(torch.int64)
    b = torch.zeros(w.shape[0], dtype=torch.int64) if bias_q is None else bias_q.to(torch.int64)
    return b - z_x * w.sum(1) + w.shape[1] * z_x * z_w


def reference_accumulator(x_q, w_q, z_x: int, z_w: int, bias_q) -> torch.Tensor:
    """``(x_q - z_x) @ (w_q - z_w).T + b_q`` in int64: the accumulator, written directly."""
    acc = (x_q.to(torch.int64) - z_x) @ (w_q.to(torch.int64) - z_w).T
    return acc if bias_q is None else acc + bias_q.to(torch.int64)


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


# ------------------------------------------------------------------ Q8a zero_point_offset
def _check_offset(fn, w_q, z_x, z_w, bias_q, what):
    got = expect_tensor(call(fn, w_q.clone(), z_x, z_w, None if bias_q is None else bias_q.clone(),
                             what="zero_point_offset"), what, (w_q.shape[0],), kind="a tensor of N integers")
    expect(not got.is_floating_point(), f"{what}: expected integers, got a {got.dtype} tensor "
                                        "(an offset is an int32 constant: no floats)")
    want = reference_offset(w_q, z_x, z_w, bias_q)
    got = got.to(torch.int64)
    if torch.equal(got, want):
        return
    n_bad, i = first_difference(got, want)
    diff = (got - want)[i].item()
    k = w_q.shape[1]
    hint = ""
    if diff == -k * z_x * z_w or diff == k * z_x * z_w:
        hint = (f" Your offsets are off by K * z_x * z_w = {k} * {z_x} * {z_w} = {k * z_x * z_w}: expanding "
                "the product gives that term once, with a plus sign")
    elif bias_q is not None and torch.equal(got, want - bias_q.to(torch.int64)):
        hint = " The bias is missing: it is part of the constant"
    elif torch.equal(got, want + 2 * z_x * w_q.to(torch.int64).sum(1)):
        hint = " The z_x * sum_k w term has the wrong sign"
    raise CheckFailed(f"{what}: {n_bad} of {w_q.shape[0]} offsets differ. First: channel {i}: expected "
                      f"{want[i].item()}, got {got[i].item()}.{hint}")


def _cases_offset(gen, k_codes):
    """(w_q, z_x, z_w, bias_q, what) cases: int8 weights z_w = 0 with bias; uint4 weights z_w = 8 without."""
    w8 = torch.randint(-128, 128, (6, 20), generator=gen, dtype=torch.int64).to(torch.int8)
    b = torch.randint(-5000, 5000, (6,), generator=gen, dtype=torch.int64).to(torch.int32)
    w4 = torch.randint(0, 16, (5, k_codes), generator=gen, dtype=torch.int64).to(torch.uint8)
    return [(w8, 131, 0, b, "int8 weights (6, 20), z_x = 131, z_w = 0, int32 bias"),
            (w4, 3, 8, None, f"4-bit unsigned weights (5, {k_codes}) as uint8, z_x = 3, z_w = 8, no bias")]


def zero_point_offset(fn) -> None:
    """Q8 visible (offset): a worked case, int8 weights with a bias, 4-bit weights with z_w != 0."""
    def body():
        w = torch.tensor([[1, 2, 3], [-1, 0, 4]], dtype=torch.int8)
        _check_offset(fn, w, 2, 1, torch.tensor([10, -10], dtype=torch.int32),
                      "zero_point_offset([[1, 2, 3], [-1, 0, 4]], z_x=2, z_w=1, bias=[10, -10]) "
                      "(want [10 - 2*6 + 3*2*1, -10 - 2*3 + 3*2*1] = [4, -10])")
        gen = torch.Generator().manual_seed(81)
        for w_q, z_x, z_w, b, what in _cases_offset(gen, 33):
            _check_offset(fn, w_q, z_x, z_w, b, f"zero_point_offset({what})")
    run("zero_point_offset: worked and random cases", body)


def zero_point_offset_hidden(fn) -> None:
    """Q8 hidden (offset): fresh shapes, codes and zero points."""
    def body(draw: Draw):
        for _ in range(6):
            _offset_hidden_case(fn, draw)
    hidden("zero_point_offset: random layers", body)


def _offset_hidden_case(fn, draw: Draw) -> None:
    rng, gen = draw.rng, draw.gen
    n, k = rng.randint(1, 40), rng.randint(1, 300)
    signed = rng.random() < 0.5
    lo, hi = (-128, 127) if signed else (0, 255)
    w_q = torch.randint(lo, hi + 1, (n, k), generator=gen).to(torch.int8 if signed else torch.uint8)
    z_w = 0 if signed else rng.randint(0, 255)
    z_x = rng.randint(0, 255)
    b = torch.randint(-2**20, 2**20, (n,), generator=gen).to(torch.int32) if rng.random() < 0.7 else None
    _check_offset(fn, w_q, z_x, z_w, b, f"zero_point_offset(random ({n}, {k}), z_x={z_x}, z_w={z_w}, "
                                        f"bias={'yes' if b is not None else 'None'})")


# ------------------------------------------------------------------ Q8b int_linear
def _check_int_linear(fn, x_q, w_q, z_x, z_w, bias_q, what):
    offset = reference_offset(w_q, z_x, z_w, bias_q)
    got = expect_tensor(call(fn, x_q.clone(), w_q.clone(), z_w, offset.clone(), what="int_linear"), what,
                        (x_q.shape[0], w_q.shape[0]), kind="an (M, N) tensor of integers")
    expect(not got.is_floating_point(), f"{what}: expected integers, got a {got.dtype} tensor; "
                                        "keep everything in int64")
    want = reference_accumulator(x_q, w_q, z_x, z_w, bias_q)
    got = got.to(torch.int64)
    if torch.equal(got, want):
        return
    n_bad, i = first_difference(got, want)
    r, c = divmod(i, want.shape[1])
    row_sum = x_q.to(torch.int64).sum(1)
    hint = ""
    if z_w and torch.equal(got, want + z_w * row_sum[:, None]):
        hint = (f" Every output of input row m is off by z_w * sum_k x_q[m, k] (z_w = {z_w}): "
                "that run-time term depends on the input, it cannot be in the offset")
    elif torch.equal(got, want - offset[None, :]):
        hint = " The offset (the precomputed constant of each output channel) is not added"
    elif x_q.dtype == torch.uint8 or w_q.dtype in (torch.int8, torch.uint8):
        hint = (f" The codes come as {x_q.dtype} and {w_q.dtype}: a product or a sum of 8-bit integers "
                "wraps around in 8 bits; convert to int64 before multiplying")
    raise CheckFailed(f"{what}: {n_bad} of {want.numel()} accumulators differ. First: [{r}, {c}]: expected "
                      f"{want[r, c].item()} = sum_k (x_q - z_x)(w_q - z_w) + b, got {got[r, c].item()}.{hint}")


def int_linear(fn) -> None:
    """Q8 visible (accumulator): uint8 inputs with int8 weights and a bias; 4-bit weights with z_w != 0."""
    def body():
        x = torch.tensor([[3, 0, 5]], dtype=torch.uint8)
        w = torch.tensor([[1, 2, 3], [-1, 0, 4]], dtype=torch.int8)
        _check_int_linear(fn, x, w, 2, 1, torch.tensor([10, -10], dtype=torch.int32),
                          "int_linear([[3, 0, 5]], [[1, 2, 3], [-1, 0, 4]], z_w=1, offset) with z_x=2, "
                          "bias [10, -10] (want [[1*0 + (-2)*1 + 3*2 + 10, 1*(-2) + (-2)*(-1) + 3*3 - 10]] = [[14, -1]])")
        gen = torch.Generator().manual_seed(82)
        for w_q, z_x, z_w, b, what in _cases_offset(gen, 33):
            x = torch.randint(0, 256, (7, w_q.shape[1]), generator=gen).to(torch.uint8)
            _check_int_linear(fn, x, w_q, z_x, z_w, b, f"int_linear(uint8 inputs (7, {w_q.shape[1]}), {what})")
    run("int_linear: worked and random cases", body)


def int_linear_hidden(fn) -> None:
    """Q8 hidden (accumulator): fresh shapes, signed and unsigned codes, zero points."""
    def body(draw: Draw):
        rng, gen = draw.rng, draw.gen
        for _ in range(6):
            m, n, k = rng.randint(1, 20), rng.randint(1, 30), rng.randint(1, 200)
            xs, ws = rng.random() < 0.3, rng.random() < 0.5
            x = torch.randint(-128 if xs else 0, 128 if xs else 256, (m, k), generator=gen)
            w = torch.randint(-128 if ws else 0, 128 if ws else 256, (n, k), generator=gen)
            x, w = x.to(torch.int8 if xs else torch.uint8), w.to(torch.int8 if ws else torch.uint8)
            z_x = rng.randint(-128, 127) if xs else rng.randint(0, 255)
            z_w = 0 if ws else rng.randint(0, 255)
            b = torch.randint(-2**20, 2**20, (n,), generator=gen).to(torch.int32) if rng.random() < 0.7 else None
            _check_int_linear(fn, x, w, z_x, z_w, b, f"int_linear(random x {x.dtype} ({m}, {k}), w {w.dtype} "
                                                     f"({n}, {k}), z_x={z_x}, z_w={z_w})")
    hidden("int_linear: random layers", body)


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
