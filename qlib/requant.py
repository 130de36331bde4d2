"""Fixed-point requantization: an int32 accumulator times a real multiplier, in integers only.

A quantized layer ends with an int32 accumulator ``acc`` whose real value is
``acc * s_acc`` (``s_acc = s_x * s_w``). The next layer wants codes with its own qparams
``(s_y, z_y)``::

    y_q = clamp(round(M * acc) + z_y, quant_min, quant_max),   M = s_acc / s_y

``M`` is a real number, but an integer-only chip has no floats: ``M = m * 2**(shift - 31)``
with an int32 ``m`` in ``[2**30, 2**31)`` (``quantize_multiplier``), and ``M * acc``
becomes an integer multiply and a rounding right shift (``multiply_by_quantized_multiplier``).
Two conventions exist, both here and both tested against their reference formulas:

- **single rounding** (default), TFLite's ``TFLITE_SINGLE_ROUNDING``: the exact 64-bit
  product is shifted right once, after adding half of the last kept bit::

      total_shift = 31 - shift
      y = (x * m + (1 << (total_shift - 1))) >> total_shift      # int64, arithmetic shift

  ``>>`` rounds toward minus infinity, so this is round-to-nearest with **ties rounded up**
  (toward +inf): ``x * M = -0.5`` gives 0, ``+0.5`` gives 1.
- **double rounding** (``double_rounding=True``), gemmlowp and classic TFLite: keep the
  high 32 bits of the doubled product (``saturating_rounding_doubling_high_mul``, rounding
  once), then divide by a power of two (``rounding_divide_by_pot``, rounding again); both
  round ties away from zero. The two roundings can add up to one code more than the
  exact result (see ``multiply_by_quantized_multiplier``).

Emulating int32 with int64: tensors hold the values in int64 (so that ``x * m`` of two int32
values is exact, as in the C++ which widens to int64 inside the multiply); every value that a
real kernel keeps in an int32 register is checked to fit in int32.

``requantize`` applies ``M`` given as ``(m, shift)``; ``requantize_scaled`` is the one place
where two real scales become that multiplier (the integer layers and ``qlib.intmodel`` both
requantize through it).

``requantized_add`` adds two code tensors of *different* qparams into a third (a residual
connection between int8 tensors), as TFLite's ADD kernel does: both inputs are moved to a
common finer grid with fixed-point multipliers, added in int32, and requantized once.
"""

from __future__ import annotations

import torch

from .quantize import code_dtype

__all__ = [
    "INT32_MIN", "INT32_MAX", "quantize_multiplier", "saturating_rounding_doubling_high_mul",
    "rounding_divide_by_pot", "multiply_by_quantized_multiplier", "requantize", "requantize_scaled",
    "add_multipliers", "requantized_add",
]

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
_NARROW = (torch.int8, torch.uint8, torch.int16, torch.int32)  # fit in int32 by their dtype


def _check_int32(x: torch.Tensor, what: str) -> torch.Tensor:
    """``x`` unchanged, or OverflowError when a value would not fit an int32 register."""
    if x.dtype in _NARROW or not x.numel():
        return x
    if x.min() < INT32_MIN or x.max() > INT32_MAX:
        raise OverflowError(f"{what} does not fit in int32 (range [{x.min()}, {x.max()}]): "
                            "a real int32 kernel would overflow here")
    return x


def _require_int(x: torch.Tensor, name: str) -> torch.Tensor:
    if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
        raise TypeError(f"{name} must hold integers, got {x.dtype}")
    return x


def _int_tensor(x, name: str, device=None) -> torch.Tensor:
    """``x`` as an int64 tensor (on ``device`` when given); TypeError for non-integers."""
    return _require_int(torch.as_tensor(x, device=device), name).to(torch.int64)


def quantize_multiplier(real_multiplier):
    """Write ``real_multiplier >= 0`` as ``multiplier * 2**(shift - 31)`` (Q31 fixed point).

    ``multiplier`` is an int32 value in ``[2**30, 2**31)`` (0 for a zero multiplier) and
    ``shift`` an int in ``[-31, 31]``: positive means a left shift, negative a right shift.
    The relative error is at most ``2**-31``. Multipliers below ``2**-32`` are flushed to
    ``(0, 0)``: times any int32 they round to 0 anyway. A Python float gives Python ints; a
    float tensor gives two int64 tensors of its shape and device (one multiplier per channel).
    """
    scalar = not isinstance(real_multiplier, torch.Tensor)
    real = (real_multiplier.to(torch.float64) if not scalar
            else torch.tensor(real_multiplier, dtype=torch.float64))
    if not torch.isfinite(real).all() or (real < 0).any():
        raise ValueError("real_multiplier must be finite and >= 0")
    mantissa, exponent = torch.frexp(real)              # real = mantissa * 2**exponent, mantissa in [0.5, 1)
    m = torch.round(mantissa * 2.0**31).to(torch.int64)  # Q31 mantissa in [2**30, 2**31]
    shift = exponent.to(torch.int64)
    carry = m == 2**31                                   # rounding reached 1.0: renormalize
    m, shift = torch.where(carry, m // 2, m), shift + carry.to(torch.int64)
    tiny = (real == 0) | (shift < -31)
    m, shift = torch.where(tiny, 0, m), torch.where(tiny, 0, shift)
    if (shift > 31).any():
        raise ValueError("real_multiplier >= 2**31 cannot be applied to int32 values")
    return (int(m), int(shift)) if scalar else (m, shift)


def saturating_rounding_doubling_high_mul(a, b) -> torch.Tensor:
    """``round(a * b / 2**31)`` for int32 ``a, b``, as gemmlowp's ``SaturatingRoundingDoublingHighMul``.

    The 64-bit product is nudged by ``2**30`` (``1 - 2**30`` if negative) and divided by
    ``2**31`` truncating toward zero, i.e. rounded to nearest, ties away from zero. The one
    overflow case, ``a = b = -2**31``, saturates to ``2**31 - 1``. Returns int64 (int32 values).
    """
    a = _int_tensor(a, "a")
    b = _int_tensor(b, "b", a.device)
    _check_int32(a, "a"), _check_int32(b, "b")
    ab = a * b
    nudge = torch.where(ab >= 0, 2**30, 1 - 2**30)
    high = torch.div(ab + nudge, 2**31, rounding_mode="trunc")
    return torch.where((a == INT32_MIN) & (b == INT32_MIN), INT32_MAX, high)


def rounding_divide_by_pot(x, exponent) -> torch.Tensor:
    """``round(x / 2**exponent)``, ties away from zero, with shifts only (gemmlowp's ``RoundingDivideByPOT``).

    ``x >> exponent`` rounds toward minus infinity; adding 1 when the discarded bits
    (``x & mask``) exceed half (``mask >> 1``, plus one for negative ``x``) makes it round
    to nearest. ``exponent``: int or int tensor broadcastable to ``x``, in ``[0, 62]``.
    """
    x = _int_tensor(x, "x")
    exponent = _int_tensor(exponent, "exponent", x.device)
    if (exponent < 0).any() or (exponent > 62).any():
        raise ValueError("exponent must lie in [0, 62]")
    mask = torch.bitwise_left_shift(torch.ones_like(exponent), exponent) - 1
    remainder = x & mask
    threshold = (mask >> 1) + (x < 0).to(torch.int64)
    return (x >> exponent) + (remainder > threshold).to(torch.int64)


def _check_multiplier(multiplier, shift, device) -> tuple[torch.Tensor, torch.Tensor]:
    m = _int_tensor(multiplier, "multiplier", device)
    shift = _int_tensor(shift, "shift", device)
    if (m < 0).any() or (m > INT32_MAX).any():
        raise ValueError("multiplier must lie in [0, 2**31) (from quantize_multiplier)")
    if (shift < -31).any() or (shift > 31).any():
        raise ValueError("shift must lie in [-31, 31] (from quantize_multiplier)")
    return m, shift


def multiply_by_quantized_multiplier(x, multiplier, shift, double_rounding: bool = False) -> torch.Tensor:
    """``round(x * multiplier * 2**(shift - 31))`` in integer arithmetic (TFLite's helper).

    ``x``: int32 values (any integer dtype); ``multiplier``/``shift``: ints or tensors
    broadcastable to ``x`` (per-channel requantization), as returned by ``quantize_multiplier``.
    Returns int64 holding int32 values (saturated).

    Single rounding (default, TFLite's ``TFLITE_SINGLE_ROUNDING``)::

        (x * multiplier + (1 << (total_shift - 1))) >> total_shift,   total_shift = 31 - shift

    one rounding of the exact 64-bit product, ties toward +inf (``-0.5 -> 0``, ``0.5 -> 1``).
    Double rounding (``double_rounding=True``, gemmlowp / classic TFLite): left shift
    (saturating), ``saturating_rounding_doubling_high_mul`` rounds to 32 bits, then
    ``rounding_divide_by_pot`` rounds again. The intermediate keeps only ``-shift``
    fractional bits, so the two roundings can add up: with ``M ~ 0.11`` (``shift = -3``,
    three fractional bits kept) ``x * M = 1.4925`` becomes ``11.94 -> 12`` eighths, i.e.
    ``1.5``, then ``2``: one code too many. Rare with 8-bit layers (``M`` ~ 2**-10, many spare
    bits), frequent with 4-bit ones (``M`` ~ 0.1).
    """
    x = _check_int32(_require_int(torch.as_tensor(x), "x"), "x")
    m, shift = _check_multiplier(multiplier, shift, x.device)
    if not double_rounding:
        total_shift = 31 - shift
        half = torch.bitwise_left_shift(torch.ones_like(total_shift), total_shift) >> 1  # 0 if no shift
        y = x.to(torch.int64) * m  # int64: the exact product of two int32 values
        return y.add_(half).bitwise_right_shift_(total_shift).clamp_(INT32_MIN, INT32_MAX)
    left, right = shift.clamp(min=0), (-shift).clamp(min=0)
    x = (x * torch.bitwise_left_shift(torch.ones_like(left), left)).clamp(INT32_MIN, INT32_MAX)
    return rounding_divide_by_pot(saturating_rounding_doubling_high_mul(x, m), right)


def requantize(acc, multiplier, shift, out_zero_point, quant_min: int, quant_max: int,
               double_rounding: bool = False) -> torch.Tensor:
    """int32 accumulator -> output codes: ``clamp(round(M * acc) + z_out, quant_min, quant_max)``.

    ``M = multiplier * 2**(shift - 31)`` from ``quantize_multiplier(s_acc / s_out)``; for
    per-channel weights pass one multiplier/shift per channel, shaped to broadcast against
    ``acc`` (``(C,)`` for ``(N, C)``, ``(C, 1, 1)`` for ``(N, C, H, W)``). The rounding is
    ``multiply_by_quantized_multiplier``'s (single: ties up; ``double_rounding``: gemmlowp's).
    Returns codes of ``acc.shape`` in the smallest integer dtype holding the range (uint8
    for ``(0, 255)``), on ``acc``'s device.

    With single rounding the zero point rides along in the rounding constant, as a fused
    kernel would do it: ``(x*m + half + (z << t)) >> t == ((x*m + half) >> t) + z`` exactly,
    because ``z << t`` is a multiple of ``2**t`` (``t = 31 - shift``). That saves two passes
    over ``acc``, and applies where the sum provably fits in int64 (else the plain formula runs).
    """
    z = _int_tensor(out_zero_point, "out_zero_point", torch.as_tensor(acc).device)
    if not double_rounding:
        x = _check_int32(_require_int(torch.as_tensor(acc), "acc"), "acc")
        m, shift = _check_multiplier(multiplier, shift, x.device)
        total_shift = 31 - shift
        half = torch.bitwise_left_shift(torch.ones_like(total_shift), total_shift) >> 1
        z_high = int(z.abs().max()) << int(total_shift.max())  # Python ints: no overflow here
        if z_high < 2**61 and quant_min - int(z.max()) >= INT32_MIN and quant_max - int(z.min()) <= INT32_MAX:
            # |x*m| < 2**62, half <= 2**61, |z << t| < 2**61: no int64 overflow; and the int32
            # saturation of the product cannot change the clamp to [quant_min, quant_max]
            y = x * m if x.dtype == torch.int64 or m.dim() else x.to(torch.int64) * m
            y = y.add_(half + torch.bitwise_left_shift(z, total_shift)).bitwise_right_shift_(total_shift)
            return y.clamp_(quant_min, quant_max).to(code_dtype(quant_min, quant_max))
    out = multiply_by_quantized_multiplier(acc, multiplier, shift, double_rounding)
    return out.add_(z).clamp_(quant_min, quant_max).to(code_dtype(quant_min, quant_max))


def requantize_scaled(acc, acc_scale, out_scale, out_zero_point, quant_min: int, quant_max: int,
                      double_rounding: bool = False) -> torch.Tensor:
    """Requantize ``acc`` (real value ``acc * acc_scale``) to codes of qparams ``(out_scale, out_zero_point)``.

    The real multiplier ``M = acc_scale / out_scale`` is formed in float64 (as a converter
    does offline, once per layer) and turned into ``(m, shift)`` by ``quantize_multiplier``;
    everything applied to ``acc`` is integer (``requantize``). ``acc_scale``: a scalar or a
    tensor broadcastable to ``acc`` (per-channel, e.g. ``(C, 1, 1)``); ``out_scale``: a scalar.
    """
    real = torch.as_tensor(acc_scale, device=acc.device).double() / torch.as_tensor(
        out_scale, device=acc.device).double()
    m, shift = quantize_multiplier(real)
    return requantize(acc, m, shift, out_zero_point, quant_min, quant_max, double_rounding)


def add_multipliers(a_scale: float, b_scale: float, out_scale: float, left_shift: int = 20):
    """The fixed-point parameters of ``requantized_add`` (TFLite's ``PrepareGeneralSubOp``).

    With ``t = 2 * max(s_a, s_b)``: ``M_a = s_a / t`` and ``M_b = s_b / t`` (both <= 1/2) bring
    each input onto the common grid of step ``t / 2**left_shift``; ``M_out = t / (2**left_shift * s_out)``
    brings the sum to the output grid. Returns ``((m_a, shift_a), (m_b, shift_b), (m_out, shift_out))``
    from ``quantize_multiplier`` (all shifts <= 0: every multiplier is below 1). Scales: positive
    Python floats (a converter's offline arithmetic, in float64).
    """
    for name, v in (("a_scale", a_scale), ("b_scale", b_scale), ("out_scale", out_scale)):
        v = float(v)
        if not (v > 0 and v < float("inf")):
            raise ValueError(f"{name} must be a finite float > 0, got {v!r}")
    if isinstance(left_shift, bool) or not isinstance(left_shift, int) or not 0 <= left_shift <= 24:
        raise ValueError(f"left_shift must be an int in [0, 24] (TFLite: 20 for int8, 15 for int16), got {left_shift!r}")
    twice_max = 2 * max(float(a_scale), float(b_scale))
    real_out = twice_max / (2**left_shift * float(out_scale))
    if real_out >= 1:
        raise ValueError(f"out_scale {float(out_scale):.3g} is too fine for left_shift {left_shift}: the output "
                         f"multiplier {real_out:.3g} must be < 1 (use a smaller left_shift)")
    return (quantize_multiplier(float(a_scale) / twice_max), quantize_multiplier(float(b_scale) / twice_max),
            quantize_multiplier(real_out))


def requantized_add(a_q, a_scale, a_zero_point, b_q, b_scale, b_zero_point, out_scale, out_zero_point,
                    quant_min: int = -128, quant_max: int = 127, left_shift: int = 20,
                    double_rounding: bool = False) -> torch.Tensor:
    """``a + b`` for code tensors of different qparams, into codes of ``(out_scale, out_zero_point)``.

    The real sum ``s_a (a_q - z_a) + s_b (b_q - z_b)`` in integers only (TFLite's ADD, the
    reference ``AddElementwise``)::

        a' = (a_q - z_a) << left_shift             (room for the fractional bits of the rescaling)
        a'' = round(a' * M_a)                       M_a = s_a / (2 max(s_a, s_b)), fixed point
        b'' = round(((b_q - z_b) << left_shift) * M_b)
        out = clamp(round((a'' + b'') * M_out) + z_out, quant_min, quant_max)

    ``a_q``/``b_q``: integer code tensors (broadcastable); scales positive floats; zero points
    ints. ``left_shift``: 20 for 8-bit codes (TFLite), so that ``(a_q - z_a) << 20`` still fits
    in int32. ``double_rounding``: gemmlowp's two roundings in each multiply (classic TFLite,
    ``MultiplyByQuantizedMultiplierSmallerThanOneExp``) instead of single rounding
    (``TFLITE_SINGLE_ROUNDING``, qlib's default). The result is within one code of the exactly
    rounded real sum. Returns codes in the smallest dtype holding ``[quant_min, quant_max]``.
    """
    a = _check_int32(_require_int(torch.as_tensor(a_q), "a_q"), "a_q")
    b = _check_int32(_require_int(torch.as_tensor(b_q, device=a.device), "b_q"), "b_q")
    (ma, sa), (mb, sb), (mo, so) = add_multipliers(a_scale, b_scale, out_scale, left_shift)
    a = (a.to(torch.int64) - int(a_zero_point)) * 2**left_shift
    b = (b.to(torch.int64) - int(b_zero_point)) * 2**left_shift
    _check_int32(a, "a_q - z_a shifted left"), _check_int32(b, "b_q - z_b shifted left")
    total = (multiply_by_quantized_multiplier(a, ma, sa, double_rounding)
             + multiply_by_quantized_multiplier(b, mb, sb, double_rounding))
    out = multiply_by_quantized_multiplier(_check_int32(total, "a'' + b''"), mo, so, double_rounding)
    return out.add_(int(out_zero_point)).clamp_(quant_min, quant_max).to(code_dtype(quant_min, quant_max))
