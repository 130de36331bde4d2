"""Typical wrong ways to quantize, shared by the checks of lab 01 (``quantize``) and lab 04
(the straight-through ``FakeQuantSTE``), and the inputs that expose them.

The right quantizer, as PyTorch computes it (``torch.quantize_per_tensor``)::

    q = clamp(round_half_even(x * (1 / scale)) + zero_point, quant_min, quant_max)

with ``1 / scale`` taken in float32. :func:`wrong_codes` computes the codes each typical
mistake gives on the same inputs; when a student's answer equals one of them exactly, the
check names that mistake (:data:`HINTS`) instead of only printing the expected values.
:func:`division_traps` builds inputs where ``x / scale`` and ``x * (1 / scale)`` round to
different integers, so the division mistake cannot pass by luck.

Shapes: every tensor has the shape of ``x``; codes are float32 (integer-valued) so that a
lab can compare them with its own dtype or dequantize them.
"""

from __future__ import annotations

import torch

__all__ = ["HINTS", "TIES", "wrong_codes", "dequantized", "division_traps", "scale_hint", "zero_point_hint"]

EPS = torch.finfo(torch.float32).eps

TIES = ("round ties to even with torch.round: floor(v + 0.5) or round-half-away differ at "
        "exact halves")

HINTS = {
    "no_clamp": "clamp the codes to [quant_min, quant_max]: values outside the range must be clipped",
    "no_zero_point": "add the zero_point (after rounding)",
    "divides": "multiply by the reciprocal, x * (1.0 / scale), as PyTorch does: x / scale can round "
               "differently",
    "ties_away": TIES,
    "floor_half": TIES,
    "zero_point_before_rounding": "round first, then add the zero_point: round(v + zero_point) differs "
                                  "at ties",
    "truncates": "round to the nearest integer: .to(int) truncates toward zero",
}
"""The hint for each mistake of :func:`wrong_codes` (labs may phrase their own)."""


def wrong_codes(x: torch.Tensor, scale, zero_point, quant_min: int,
                quant_max: int) -> dict[str, torch.Tensor]:
    """``{mistake: the codes it gives}`` for the mistakes named in :data:`HINTS`."""
    z = torch.as_tensor(zero_point, device=x.device).to(torch.float32)
    v = x * (1.0 / scale)

    def clamp(q):
        return torch.clamp(q, quant_min, quant_max)

    return {
        "no_clamp": torch.round(v) + z,
        "no_zero_point": clamp(torch.round(v)),
        "divides": clamp(torch.round(x / scale) + z),
        "ties_away": clamp(torch.sign(v) * torch.floor(v.abs() + 0.5) + z),
        "floor_half": clamp(torch.floor(v + 0.5) + z),
        "zero_point_before_rounding": clamp(torch.round(v + z)),
        "truncates": clamp(torch.trunc(v) + z),
    }


def dequantized(codes: torch.Tensor, scale, zero_point) -> torch.Tensor:
    """``(codes - zero_point) * scale``: what fake quantization returns for those codes."""
    return (codes - torch.as_tensor(zero_point, device=codes.device).to(torch.float32)) * scale


def division_traps(scale: torch.Tensor) -> torch.Tensor:
    """Inputs near ties where ``x / scale`` and ``x * (1/scale)`` round to different integers.

    ``x = (k + 0.5) * scale`` for ``k`` in ``[-300, 300)``, kept where the two roundings differ
    (a few dozen values for most float32 scales; none for powers of two).
    """
    scale = torch.as_tensor(scale, dtype=torch.float32)
    x = (torch.arange(-300, 300, dtype=torch.float32, device=scale.device) + 0.5) * scale
    return x[torch.round(x / scale) != torch.round(x * (1.0 / scale))]


def scale_hint(got: float, lo: float, hi: float, qmin: int, qmax: int, symmetric: bool, want: float) -> str:
    """Name the typical mistake a wrong scale comes from (empty string if none matches)."""
    def near(a, b):
        return abs(a - b) <= 1e-5 * max(abs(b), 1e-30)
    amax = max(abs(lo), abs(hi))
    if want == EPS and got != EPS:
        return (" Hint: for a range of width 0 (a constant tensor) the scale would be 0; PyTorch uses "
                "max(scale, eps) with eps = torch.finfo(torch.float32).eps.")
    if symmetric and near(got, amax / qmax):
        return " Hint: divide by (quant_max - quant_min) / 2 (127.5 for 8 bits), not by quant_max."
    if not symmetric and near(got, (hi - lo) / (qmax - qmin)) and not near(got, want):
        return (" Hint: the range must contain 0 so that 0.0 is exact: use min(min_val, 0) and "
                "max(max_val, 0).")
    if near(got, want):
        return (" Hint: almost; your scale differs only in the last bits. Compute it exactly as the "
                "formula is written, with torch operations on float32 tensors (Python floats are "
                "float64 and round differently).")
    return ""


def zero_point_hint(got: int, want: int, lo: float, qmin: int, qmax: int, symmetric: bool) -> str:
    """Name the typical mistake a wrong zero point comes from (the formula when none matches)."""
    hint = ""
    if symmetric:
        hint = " Hint: symmetric quantization (signed codes) has zero_point 0."
    elif min(lo, 0.0) == 0.0 and want == qmin:
        hint = " Hint: when min_val >= 0 the range starts at 0, whose code is quant_min."
    elif not qmin <= got <= qmax:
        hint = " Hint: clamp the zero_point into [quant_min, quant_max]."
    elif abs(got - want) == 1:
        hint = (" Hint: off by one. Compute round(min_neg / scale) with torch.round on float32 "
                "tensors: float64 (Python) arithmetic or rounding ties away from zero can land on "
                "the other integer.")
    if not symmetric:
        hint += " (zero_point = quant_min - round(min_neg / scale), then clamped.)"
    return hint
