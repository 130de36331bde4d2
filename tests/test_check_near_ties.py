"""Tests for qlib.check.near_ties: the accumulators whose requantization float64 gets wrong,
which lab 03's Q9 checks (qlib.check.lab03_requant) use. Moved verbatim from
tests/test_check_lab03_integer.py (same draws).

References: brute force for ``_first_in_window`` (every ``x`` in ``0..mod`` tried in turn: the
smallest with ``lo <= a x mod mod <= hi``); for a near-tie, the exact rational ``acc * m / 2**t``
(``fractions.Fraction``) and TFLite's rounding on Python ints (exact) against IEEE float64
arithmetic on the same numbers (``math.floor(acc * M + 0.5)``), which must round one code too
high; ``qlib.requant.requantize`` must give the exact code on the stored 8-bit cases.
"""

import math
import random
from fractions import Fraction

import pytest
import torch

from qlib import requant
from qlib.check import near_ties as N
from qlib.check.lab03_requant import reference_requantize


def test_first_in_window_is_the_smallest_solution():
    rng = random.Random(torch.randint(2**31, (1,)).item())
    for _ in range(2000):
        mod = rng.randint(2, 300)
        a, lo = rng.randrange(mod), rng.randrange(mod)
        hi = rng.randint(lo, mod - 1)
        want = next((x for x in range(mod + 1) if lo <= a * x % mod <= hi), None)
        assert N._first_in_window(a, mod, lo, hi) == want, (a, mod, lo, hi)


def _exact_and_float64(acc, m, shift):
    t = 31 - shift
    exact = (acc * m + (1 << (t - 1))) >> t                      # Python ints: exact
    return exact, math.floor(acc * (m * 2.0 ** (shift - 31)) + 0.5)  # IEEE float64


@pytest.mark.parametrize("bits", [15, 16])
@pytest.mark.parametrize("sign", [1, -1])
def test_near_ties_are_where_float64_rounds_the_wrong_way(bits, sign):
    rng = random.Random(torch.randint(2**31, (1,)).item())
    acc, m, shift = N.near_tie(rng, bits, sign)
    value = Fraction(acc * m, 2 ** (31 - shift))
    assert -(2**31) <= acc < 2**31 and 2**30 <= m < 2**31 and sign * acc > 0
    assert 2 ** (bits - 2) <= abs(value) < 2 ** (bits - 1)
    assert 0 < math.floor(value) + Fraction(1, 2) - value <= Fraction(64, 2 ** (31 - shift))  # a hair below
    exact, fl = _exact_and_float64(acc, m, shift)
    assert fl == exact + 1 and torch.equal(reference_requantize(torch.tensor([acc]), m, shift, 0, -2**15, 2**15 - 1),
                                           torch.tensor([exact]))


def test_stored_8bit_near_ties():
    """Each stored case: the exact answer rounds down, float64 rounds up, and the value fits 8-bit codes."""
    assert {a > 0 for a, _, _ in N.NEAR_TIES_8BIT} == {True, False}
    for acc, m, shift in N.NEAR_TIES_8BIT:
        exact, fl = _exact_and_float64(acc, m, shift)
        assert fl == exact + 1 and 64 <= abs(Fraction(acc * m, 2 ** (31 - shift))) < 127
        assert torch.equal(requant.requantize(torch.tensor([acc]), m, shift, 128, 0, 255).to(torch.int64),
                           torch.tensor([exact + 128]))
