"""Lab 03's integer-only questions, in one place: Q8 (the zero-point expansion) and Q9
(fixed-point requantization) (lesson 04; Jacob et al. 2018, sections 2.2-2.3).

Idea. A quantized linear layer runs in integers from one layer's codes to the next's, in two
steps, each checked in a module of its own and re-exported here (the lab notebooks and
:mod:`qlib.check.lab03` import from this module):

1. :mod:`qlib.check.lab03_zeropoint` (Q8). The int32 accumulator of output ``n`` of input row
   ``m``, with the zero points expanded so that only one term is left to run time::

       acc[m, n] = sum_k (x_q[m, k] - z_x) (w_q[n, k] - z_w) + b_q[n]
                 = sum_k x_q[m, k] w_q[n, k]  -  z_w sum_k x_q[m, k]             (run time)
                   + b_q[n] - z_x sum_k w_q[n, k] + K z_x z_w                      (offline: offset[n])

   ``zero_point_offset`` / ``int_linear`` (and their ``_hidden`` twins); references
   ``reference_offset``, ``reference_accumulator``.

2. :mod:`qlib.check.lab03_requant` (Q9). The accumulator to the next layer's codes with
   ``M = s_x s_w / s_y`` written as ``m * 2**(shift - 31)``, ``m`` an integer in
   ``[2**30, 2**31)``::

       y_q = clamp(((acc * m + 2**(t - 1)) >> t) + z_y, quant_min, quant_max),   t = 31 - shift

   (one rounding of the exact 64-bit product, ties toward +infinity: TFLite's single rounding).
   ``quantize_multiplier`` / ``requantize`` (and ``_hidden``); references
   ``reference_multiplier_ok``, ``reference_requantize``.

Why integers and not float64 (``acc * m`` needs up to 62 bits, a float64 holds 53), and the
near-ties that show it, are in :mod:`qlib.check.near_ties` (``near_tie``, ``NEAR_TIES_8BIT``).
Every name these modules held when they were one file is importable from here, as before.
Tests: tests/test_check_lab03_integer.py (both questions), tests/test_check_near_ties.py.
"""

from __future__ import annotations

# Q8 and Q9 live in their own modules; every name (private helpers too) importable from here as before.
from .lab03_requant import (_check_multiplier, _check_requantize, _reference_m_shift,  # noqa: F401
                            quantize_multiplier, quantize_multiplier_hidden, reference_multiplier_ok,
                            reference_requantize, requantize, requantize_hidden)
from .lab03_zeropoint import (_cases_offset, _check_int_linear, _check_offset, _offset_hidden_case,  # noqa: F401
                              int_linear, int_linear_hidden, reference_accumulator, reference_offset,
                              zero_point_offset, zero_point_offset_hidden)
from .near_ties import NEAR_TIES_8BIT, _first_in_window, _near_tie_hint, near_tie  # noqa: F401

__all__ = ["reference_offset", "reference_accumulator", "reference_multiplier_ok", "reference_requantize",
           "zero_point_offset", "zero_point_offset_hidden", "int_linear", "int_linear_hidden",
           "quantize_multiplier", "quantize_multiplier_hidden", "requantize", "requantize_hidden", "near_tie",
           "NEAR_TIES_8BIT"]
