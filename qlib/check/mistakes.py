"""Typical wrong answers to the course's formulas, each with the hint that explains it.

A check compares a student's answer with the reference first; only when they differ does it
ask this module which typical mistake the answer equals, so that the message can say *why*
("clamp the codes", "round ties to even") rather than only print the expected values.

- Quantizing (labs 01 and 04). The right quantizer, as PyTorch computes it::

      q = clamp(round_half_even(x * (1 / scale)) + zero_point, quant_min, quant_max)

  with ``1 / scale`` in float32. :func:`wrong_codes` gives the codes of each mistake named in
  :data:`HINTS`; :func:`fake_quantize_mistakes` the dequantized values; :func:`scale_hint` and
  :func:`zero_point_hint` explain wrong qparams; :func:`division_traps` builds inputs where
  ``x / scale`` and ``x * (1 / scale)`` round apart, so that mistake cannot pass by luck.
- Gradients (lab 04): :func:`ste_gradient_mistakes` (the straight-through clamp mask),
  :func:`lsq_terms`, :func:`lsq_gradient_mistakes` and :func:`lsq_gradient_hint` (LSQ's
  gradient for the step size).
- Calibration (lab 02): :func:`percentile_hint`, :func:`quant_mse_hint`.
- Batch-norm folding (lab 03): :func:`fold_weight_hint`, :func:`fold_bias_hint`.

Shapes: every tensor has the shape of ``x``; codes are float32 (integer-valued), so that a lab
can compare them with its own dtype or dequantize them. A ``*_hint`` returns ``""`` when no
typical mistake matches.
"""

from __future__ import annotations

import torch

__all__ = ["HINTS", "TIES", "wrong_codes", "dequantized", "division_traps", "scale_hint", "zero_point_hint",
           "unclamped_codes", "fake_quantize_mistakes", "ste_gradient_mistakes", "lsq_terms",
           "lsq_gradient_mistakes", "lsq_gradient_hint", "percentile_hint", "quant_mse_hint",
           "fold_weight_hint", "fold_bias_hint"]

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


# ------------------------------------------------------------------ gradients (lab 04)
def unclamped_codes(x, scale, zero_point):
    """``round(x * (1/scale)) + zero_point`` before clamping (float32): which inputs are clipped."""
    return torch.round(x * (1.0 / scale)) + zero_point.to(torch.float32)


def fake_quantize_mistakes(x, scale, zero_point, quant_min, quant_max) -> list[tuple[str, torch.Tensor]]:
    """Typical wrong fake quantizations (float32 values, as ``FakeQuantSTE.forward``), with hints."""
    wrong = wrong_codes(x, scale, zero_point, quant_min, quant_max)
    right = wrong["no_clamp"].clamp(quant_min, quant_max)
    ties = TIES.replace("torch.round:", "torch.round (2.5 -> 2);")
    return [
        ("clamp the codes to [quant_min, quant_max] before dequantizing: values outside are clipped",
         dequantized(wrong["no_clamp"], scale, zero_point)),
        ("return the dequantized value (q - zero_point) * scale, not the integer codes q", right),
        ("subtract the zero_point again when dequantizing: (q - zero_point) * scale", right * scale),
        ("add the zero_point after rounding, and clamp the sum", dequantized(wrong["no_zero_point"], scale, zero_point)),
        ("multiply by the float32 reciprocal, x * (1.0 / scale), as PyTorch does: x / scale can round differently",
         dequantized(wrong["divides"], scale, zero_point)),
        (ties, dequantized(wrong["ties_away"], scale, zero_point)),
        (ties, dequantized(wrong["floor_half"], scale, zero_point)),
    ]


def ste_gradient_mistakes(x, scale, zero_point, quant_min, quant_max, grad_output):
    """Typical wrong straight-through gradients ``d loss / d x``, each with its hint.

    The right one: ``grad_output`` where ``quant_min <= unclamped_codes(x) <= quant_max``, else 0.
    """
    q = unclamped_codes(x, scale, zero_point)
    inside = (q >= quant_min) & (q <= quant_max)
    z = zero_point.to(torch.float32)
    lo, hi = (quant_min - z) * scale, (quant_max - z) * scale
    return [
        ("no clamp mask: the gradient must be 0 where the code round(x/scale) + zero_point falls outside "
         "[quant_min, quant_max] (those inputs are clipped; the output does not move with them)", grad_output),
        ("the straight-through estimator passes grad_output where the code is in range: "
         "return grad_output * mask, not the mask alone", inside.to(grad_output.dtype)),
        ("d round(v)/dv is 0 almost everywhere, which is why nothing would train: the STE passes "
         "grad_output instead (times the clamp mask)", torch.zeros_like(grad_output)),
        ("test the rounded code, not x: inputs up to half a step beyond the outermost levels are rounded "
         "onto them and keep their gradient (mask = quant_min <= round(x/scale) + zero_point <= quant_max)",
         grad_output * ((x >= lo) & (x <= hi))),
        ("the outermost codes quant_min and quant_max are in range: use <= and >=, not < and >",
         grad_output * ((q > quant_min) & (q < quant_max))),
    ]


def lsq_terms(x, scale, zero_point, quant_min, quant_max, round_zero_point=True):
    """Elementwise d x_fq / d s (the formula of lesson 05) and the pieces wrong answers use."""
    z = zero_point.to(torch.float32)
    z = torch.clamp(torch.round(z), quant_min, quant_max) if round_zero_point else z
    v = x * (1.0 / scale)
    q = torch.round(v) + z
    inside = (q >= quant_min) & (q <= quant_max)
    below = q < quant_min
    rounding = torch.round(v) - v
    term = torch.where(inside, rounding, torch.where(below, quant_min - z, quant_max - z))
    return term, inside, below, rounding, z


def lsq_gradient_mistakes(x, scale, zero_point, quant_min, quant_max, grad_output, grad_factor):
    """Typical wrong LSQ scale gradients (summed over elements), each with its hint.

    The right one: ``grad_factor * sum(grad_output * term)``, ``term`` from :func:`lsq_terms`.
    """
    term, inside, below, rounding, z = lsq_terms(x, scale, zero_point, quant_min, quant_max)
    g = grad_factor
    ends = torch.where(below, torch.full_like(x, float(quant_min)), torch.full_like(x, float(quant_max)))
    return [
        ("multiply the summed gradient by grad_factor (LSQ's gradient scale 1/sqrt(N * quant_max))",
         (grad_output * term).sum()),
        ("multiply by grad_output (chain rule) before summing", g * term.sum()),
        ("inside the range, d x_fq / d scale = round(x/scale) - x/scale (= (x_fq - x) / scale); the sign is flipped",
         g * (grad_output * torch.where(inside, -rounding, term)).sum()),
        ("clipped values: d x_fq / d scale = quant_min - zero_point below the range and quant_max - zero_point "
         "above (x_fq = (q_clamped - zero_point) * scale); you forgot the zero_point",
         g * (grad_output * torch.where(inside, rounding, ends)).sum()),
        ("clipped values do move with the scale: below the range x_fq = (quant_min - zero_point) * scale, "
         "so their gradient is quant_min - zero_point, not 0",
         g * (grad_output * torch.where(inside, rounding, torch.zeros_like(x))).sum()),
        ("the rounding term counts too: inside the range the gradient is round(x/scale) - x/scale, not 0",
         g * (grad_output * torch.where(inside, torch.zeros_like(x), term)).sum()),
        ("round and clamp the learned zero point first: z = clamp(round(zero_point), quant_min, quant_max)",
         g * (grad_output * lsq_terms(x, scale, zero_point, quant_min, quant_max, round_zero_point=False)[0]).sum()),
    ]


def lsq_gradient_hint(got: float, want: float, tol: float, x, scale, zero_point, quant_min, quant_max,
                      grad_output, grad_factor) -> str:
    """The hint for a wrong LSQ scale gradient: a typical mistake it equals (within ``tol``),
    or a factor (grad_factor, 1/N, sqrt(N)...) it is off by; "" when neither."""
    for hint, v in lsq_gradient_mistakes(x, scale, zero_point, quant_min, quant_max, grad_output, grad_factor):
        v = float(v)
        if v == v and abs(got - v) <= max(tol, 1e-4 * abs(v)):
            return hint
    if abs(want) > tol and abs(got) > tol:
        n = x.numel()
        factors = {"grad_factor": grad_factor, "1 / grad_factor": 1 / grad_factor, "1/N": 1 / n,
                   "1/sqrt(N)": n ** -0.5, "sqrt(N)": n ** 0.5}
        ratio = got / want
        label = next((k for k, f in factors.items() if abs(f - 1) > 1e-3 and abs(ratio / f - 1) < 1e-3), None)
        if label:
            return (f"your value is {ratio:.4g} = {label} (N = {n} elements) times the expected one: multiply the "
                    "sum (not the mean) by the grad_factor you are given, once")
    return ""


# ------------------------------------------------------------------ calibration (lab 02)
def percentile_hint(got, want, x: torch.Tensor, p: float, close) -> str:
    """Why ``got = (lo, hi)`` is not ``want = (P_{100-p}(x), P_p(x))``, when a typical mistake
    explains it ("" if none); ``close(a, b)`` is the check's tolerance."""
    if close(got[0], want[1]) and close(got[1], want[0]):
        return " (lo and hi are swapped: lo is the (100 - p)-th percentile)"
    if close(got[1], want[1]):
        return " (hi is right; lo should be the (100 - p)-th percentile, not the p-th of -x or of |x|)"
    s = x.float().flatten().sort().values
    rank = [s[round(q * (s.numel() - 1))].item() for q in (1 - p / 100, p / 100)]
    if close(got[0], rank[0]) and close(got[1], rank[1]):
        return " (that is the nearest sorted value: interpolate between the two neighbours)"
    return ""


def quant_mse_hint(got: float, want: float, x: torch.Tensor, lo: float, hi: float, bits: int, close) -> str:
    """Why a quantization MSE on ``[lo, hi]`` (affine, unsigned ``bits``-bit codes) is wrong,
    when a typical mistake explains it: no clamp, symmetric qparams, the root of the MSE."""
    from ..qparams import choose_qparams, quant_range
    from ..quantize import fake_quantize

    qmin, qmax = quant_range(bits, signed=False)
    scale, zp = choose_qparams(torch.tensor(float(lo)), torch.tensor(float(hi)), qmin, qmax)
    noclamp = ((torch.round(x * (1.0 / scale)) + zp - zp) * scale - x).pow(2).mean().item()
    s_min, s_max = quant_range(bits, signed=True)
    s_scale, s_zp = choose_qparams(torch.tensor(float(lo)), torch.tensor(float(hi)), s_min, s_max, symmetric=True)
    symmetric = (fake_quantize(x, s_scale, s_zp, s_min, s_max) - x).pow(2).mean().item()
    if close(got, noclamp):
        return " (looks like the codes are not clamped to [quant_min, quant_max]: values outside the range must clip)"
    if close(got, symmetric):
        return (" (looks like symmetric quantization: use affine qparams for [lo, hi], "
                "choose_qparams(lo, hi, *quant_range(bits, signed=False)))")
    if close(got, want ** 0.5):
        return " (that is the root of the MSE: return the mean of the squared errors)"
    return ""


# ------------------------------------------------------------------ batch-norm folding (lab 03)
def fold_weight_hint(w: torch.Tensor, weight: torch.Tensor, bn) -> str:
    """Why a folded weight is not ``weight * gamma / sqrt(var + eps)`` (per output channel),
    when a typical mistake explains it: the variance, no eps, no scaling at all."""
    gamma = bn.weight if bn.weight is not None else torch.ones_like(bn.running_mean)
    shape = (-1,) + (1,) * (weight.dim() - 1)
    with torch.no_grad():
        if torch.allclose(w, weight * (gamma / (bn.running_var + bn.eps)).reshape(shape), rtol=1e-5):
            return " (divide by the standard deviation sqrt(var + eps), not by the variance)"
        if torch.allclose(w, weight * (gamma / bn.running_var.sqrt()).reshape(shape), rtol=1e-5):
            return " (add eps inside the square root: sqrt(var + eps))"
        if torch.allclose(w, weight, rtol=1e-5, atol=1e-6):
            return " (the weight is unchanged: multiply each output channel by gamma / sqrt(var + eps))"
    return ""


def fold_bias_hint(b: torch.Tensor, bias, bn) -> str:
    """Why a folded bias is not ``(bias - mean) * gamma / sqrt(var + eps) + beta``, when a
    typical mistake explains it: the mean left unscaled, beta forgotten."""
    factor = (bn.weight if bn.weight is not None else 1) / torch.sqrt(bn.running_var + bn.eps)
    beta = bn.bias if bn.bias is not None else 0
    bb = bias if bias is not None else 0
    with torch.no_grad():
        if torch.allclose(b, bb * factor + beta - bn.running_mean, rtol=1e-5, atol=1e-6):
            return " (the mean is scaled too: b' = (b - mean) * gamma / sqrt(var + eps) + beta)"
        if torch.allclose(b, (bb - bn.running_mean) * factor, rtol=1e-5, atol=1e-6):
            return " (add beta)"
    return ""
