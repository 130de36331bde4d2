"""Near-ties: accumulators whose requantization float64 gets wrong, for lab 03's Q9 checks.

Requantization multiplies an int32 accumulator by ``M = m * 2**(shift - 31)`` (``m`` an integer
in ``[2**30, 2**31)``) and rounds, ties toward +infinity, with ``t = 31 - shift``::

    y = (acc * m + 2**(t - 1)) >> t        = floor(acc * M + 1/2), exactly

The product ``acc * m`` needs up to 62 bits and a float64 holds 53, so ``floor(acc * M + 0.5)``
in float64 rounds the product first. Where ``acc * M`` lies within that rounding error *below*
a tie (``k + 1/2 - 2**-50``, say), float64 lands on the tie and rounds up: one code too many.
Such near-ties are rare in random draws (about 2**-38 of them at 16-bit codes, 2**-46 at 8
bits), so the checks construct them.

The search (``near_tie``): ``acc * M`` is just below a tie exactly when the remainder
``r = acc * m mod 2**t`` lies in a window just below ``2**(t - 1)`` (for a negative ``acc``:
``|acc| * m mod 2**t`` just above it). For a drawn ``m``, the
smallest ``acc`` above a start whose remainder falls in a window ``[lo, hi]`` is found without
trying the accumulators one by one (``_first_in_window``: the same reduction as Euclid's
algorithm, ``(a, mod) -> (mod % a, a)``, so a few dozen steps). ``_near_tie_hint`` tells a
student whose float64 answer went wrong at such a point what happened. All on Python ints
(exact at any size); numbers in, numbers out: ``(acc, m, shift)`` triples.
"""

from __future__ import annotations

import math
import random
from fractions import Fraction

__all__ = ["near_tie", "NEAR_TIES_8BIT"]


def _first_in_window(a: int, mod: int, lo: int, hi: int) -> int | None:
    """The smallest ``x >= 0`` with ``lo <= (a * x) % mod <= hi`` (``0 <= lo <= hi < mod``), or None.

    Euclid-like: either a multiple of ``a`` lies in ``[lo, hi]``, or the problem reduces to the
    same one for ``(mod % a, a)`` (the wrap-arounds ``y`` of ``a * x = lo.. + mod * y``).
    """
    a %= mod
    if lo == 0:
        return 0
    if a == 0:
        return None
    k = (lo + a - 1) // a
    if a * k <= hi:
        return k
    y = _first_in_window(mod % a, a, (a - hi % a) % a, (a - lo % a) % a)
    return None if y is None else (lo + mod * y + a - 1) // a


def near_tie(rng: random.Random, bits: int, sign: int = 1, max_tries: int = 200_000) -> tuple[int, int, int]:
    """``(acc, m, shift)``: an int32 ``acc`` and a Q31 multiplier with ``acc * M`` just *below* a
    tie (``k + 1/2`` minus at most ``64 / 2**t``, ``t = 31 - shift = 62 - bits``) and
    ``2**(bits - 2) <= |acc * M| < 2**(bits - 1)`` (so it fits signed ``bits``-bit codes).

    The exact answer rounds down; float64 rounds ``acc * M`` onto the tie (its error there is up
    to ``2**(bits - 2 - 53)`` = 64 units of ``2**-t``) and then up. Expected tries: about
    ``2**(26.5 - bits)`` (a few ms at 16 bits, seconds at 8: those are precomputed).
    """
    t = 62 - bits
    mod, tie, slack = 2**t, 2 ** (t - 1), 64
    v_lo, v_hi = 2 ** (bits - 2), 2 ** (bits - 1) - 2
    # acc * m mod 2**t just below the tie for a positive acc; just above it for |acc| of a negative one
    lo_r, hi_r = (tie - slack, tie - 1) if sign > 0 else (tie + 1, tie + slack)
    for _ in range(max_tries):
        m = rng.randrange(2**30, 2**31)
        a_lo, a_hi = -(-v_lo * mod // m), min(v_hi * mod // m, 2**31 - 1)
        off = a_lo * m % mod
        lo, hi = (lo_r - off) % mod, (hi_r - off) % mod
        found = [x for x in ((_first_in_window(m, mod, lo, hi),) if lo <= hi else
                             (_first_in_window(m, mod, lo, mod - 1), _first_in_window(m, mod, 0, hi)))
                 if x is not None]
        if found and a_lo + min(found) <= a_hi:
            return sign * (a_lo + min(found)), m, 31 - t
    raise RuntimeError(f"no near-tie found in {max_tries} tries")  # pragma: no cover - about e**-100


# 8-bit near-ties, seconds each to find, so stored: for seed in (11, 12): rng = random.Random(seed);
# near_tie(rng, 8, 1), near_tie(rng, 8, -1)
NEAR_TIES_8BIT = [(619308738, 1934346195, -23), (-1374522794, 1317145891, -23),
                  (683319090, 1832234332, -23), (-1003773766, 1157560342, -23)]


def _near_tie_hint(acc: int, m: int, shift: int) -> str:
    """What a float64 implementation got wrong at a near-tie, or "" when ``acc * M`` is not one."""
    t = 31 - shift
    exact = Fraction(acc * m, 2**t)
    below = exact - (math.floor(exact) + Fraction(1, 2))  # negative: below the tie
    if exact.denominator == 2 or not (-abs(exact) * Fraction(1, 2**52) < below < 0):
        return ""
    k = math.floor(exact)
    return (f" acc * M = {k} + 1/2 - {float(-below):.3g}: just below a tie, so the answer rounds down "
            f"to {k}. acc * m = {acc * m} needs {abs(acc * m).bit_length()} bits and a float64 holds 53: "
            f"in float64 the product lands exactly on {k}.5, which rounds up. Integer-only means "
            "(acc * m + 2**(t - 1)) >> t on int64 tensors (exact), no floats")
