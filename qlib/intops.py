"""Integer-only inference: int8 x int8 -> int32, then fixed-point requantization.

This is the arithmetic of Jacob et al. 2018 ("Quantization and Training of Neural Networks
for Efficient Integer-Arithmetic-Only Inference") as implemented by gemmlowp and TFLite.
A quantized layer computes, with input codes ``x_q`` (scale ``s_x``, zero point ``z_x``)
and weight codes ``w_q`` (``s_w``, ``z_w``)::

    acc = sum_k (x_q - z_x) * (w_q - z_w) + b_q          int32 accumulator
    real output  y = s_x * s_w * acc                       (b_q = round(b / (s_x * s_w)))

The next layer wants codes with its own qparams ``(s_y, z_y)``::

    y_q = clamp(round(M * acc) + z_y, quant_min, quant_max),   M = s_x * s_w / s_y

``M`` is a real number, but the chip has no floats: ``M = m * 2**(shift - 31)`` with an
int32 ``m`` in ``[2**30, 2**31)`` (``quantize_multiplier``), and ``M * acc`` becomes an
integer multiply and a rounding right shift. gemmlowp does it in two roundings (keep the
high 32 bits of the product: ``saturating_rounding_doubling_high_mul``; then
``rounding_divide_by_pot``); we default to one rounding of the exact 64-bit product, as
TFLite's newer ``TFLITE_SINGLE_ROUNDING`` does (``multiply_by_quantized_multiplier`` shows
where the two differ).

Emulating int32 with int64: PyTorch tensors hold the values in int64 (so that ``a * b`` of
two int32 values is exact, as in gemmlowp's C++ which widens to int64 inside the multiply);
every value that a real kernel keeps in an int32 register is checked to fit in int32.

``IntLinear``/``IntConv2d`` build these integer layers from a converted fake-quant layer;
``convert_to_integer`` (in ``qlib.intmodel``) runs a whole model on them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .modules import FakeQuantize, QuantConv2d, QuantLinear
from .qparams import PerChannel, PerTensor
from .quantize import code_dtype, quantize

__all__ = [
    "INT32_MIN", "INT32_MAX", "quantize_multiplier", "saturating_rounding_doubling_high_mul",
    "rounding_divide_by_pot", "multiply_by_quantized_multiplier", "requantize", "int_matmul",
    "im2col", "int_conv2d", "IntLinear", "IntConv2d",
]

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


def _check_int32(x: torch.Tensor, what: str) -> torch.Tensor:
    if x.numel() and (x.min() < INT32_MIN or x.max() > INT32_MAX):
        raise OverflowError(f"{what} does not fit in int32 (range [{x.min()}, {x.max()}]): "
                            "a real int32 kernel would overflow here")
    return x


def _int_tensor(x, name: str) -> torch.Tensor:
    x = torch.as_tensor(x)
    if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
        raise TypeError(f"{name} must hold integers, got {x.dtype}")
    return x.to(torch.int64)


def quantize_multiplier(real_multiplier):
    """Write ``real_multiplier >= 0`` as ``multiplier * 2**(shift - 31)`` (Q31 fixed point).

    ``multiplier`` is an int32 value in ``[2**30, 2**31)`` (0 for a zero multiplier) and
    ``shift`` an int: positive means a left shift, negative a right shift. The relative
    error is at most ``2**-31``. Multipliers below ``2**-32`` are flushed to ``(0, 0)``: times
    any int32 they round to 0 anyway. A Python float gives Python ints; a float tensor
    gives two int64 tensors of its shape (one multiplier per channel).
    """
    scalar = not isinstance(real_multiplier, torch.Tensor)
    real = torch.as_tensor(real_multiplier, dtype=torch.float64)
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
    a, b = _int_tensor(a, "a"), _int_tensor(b, "b")
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
    x, exponent = _int_tensor(x, "x"), _int_tensor(exponent, "exponent")
    if (exponent < 0).any() or (exponent > 62).any():
        raise ValueError("exponent must lie in [0, 62]")
    mask = torch.bitwise_left_shift(torch.ones_like(exponent), exponent) - 1
    remainder = x & mask
    threshold = (mask >> 1) + (x < 0).to(torch.int64)
    return (x >> exponent) + (remainder > threshold).to(torch.int64)


def multiply_by_quantized_multiplier(x, multiplier, shift, double_rounding: bool = False) -> torch.Tensor:
    """``round(x * multiplier * 2**(shift - 31))`` in integer arithmetic (TFLite's helper).

    ``multiplier``/``shift``: ints or tensors broadcastable to ``x`` (per-channel
    requantization), as returned by ``quantize_multiplier``. ``x`` holds int32 values.

    Single rounding (default, TFLite's ``TFLITE_SINGLE_ROUNDING``): the exact 64-bit product
    ``x * multiplier`` is shifted right by ``31 - shift`` bits, rounding once.
    Double rounding (``double_rounding=True``, gemmlowp / classic TFLite): left shift
    (saturating), ``saturating_rounding_doubling_high_mul`` rounds to 32 bits, then
    ``rounding_divide_by_pot`` rounds again. The intermediate keeps only ``-shift``
    fractional bits, so the two roundings can add up: with ``M ~ 0.11`` (``shift = -3``,
    three fractional bits kept) ``x * M = 1.4925`` becomes ``11.94 -> 12`` eighths, i.e.
    ``1.5``, then ``2``: one code too many. Rare with 8-bit layers (``M`` ~ 2**-10, many spare bits),
    frequent with 4-bit ones (``M`` ~ 0.1).
    """
    x = _check_int32(_int_tensor(x, "x"), "x")
    shift = _int_tensor(shift, "shift")
    if not double_rounding:
        out = rounding_divide_by_pot(x * _int_tensor(multiplier, "multiplier"), 31 - shift)
        return out.clamp(INT32_MIN, INT32_MAX)
    left, right = shift.clamp(min=0), (-shift).clamp(min=0)
    x = (x * torch.bitwise_left_shift(torch.ones_like(left), left)).clamp(INT32_MIN, INT32_MAX)
    return rounding_divide_by_pot(saturating_rounding_doubling_high_mul(x, multiplier), right)


def requantize(acc, multiplier, shift, out_zero_point, quant_min: int, quant_max: int,
               double_rounding: bool = False) -> torch.Tensor:
    """int32 accumulator -> output codes: ``clamp(round(M * acc) + z_out, quant_min, quant_max)``.

    ``M = multiplier * 2**(shift - 31)`` from ``quantize_multiplier(s_x * s_w / s_out)``; for
    per-channel weights pass one multiplier/shift per channel, shaped to broadcast against
    ``acc`` (``(C,)`` for ``(N, C)``, ``(C, 1, 1)`` for ``(N, C, H, W)``). Rounding is to
    nearest, ties away from zero (``double_rounding``: see ``multiply_by_quantized_multiplier``).
    Returns codes of ``acc.shape`` in the smallest integer dtype holding the range (uint8
    for ``(0, 255)``).
    """
    out = multiply_by_quantized_multiplier(acc, multiplier, shift, double_rounding)
    out = out + _int_tensor(out_zero_point, "out_zero_point")
    return out.clamp(quant_min, quant_max).to(code_dtype(quant_min, quant_max))


def int_matmul(a_q: torch.Tensor, b_q: torch.Tensor, a_zp=0, b_zp=0) -> torch.Tensor:
    """``(a_q - a_zp) @ (b_q - b_zp)`` with int32 accumulation: ``(..., K) @ (K, N) -> (..., N)`` int32.

    ``a_zp``: int; ``b_zp``: int or ``(N,)`` (one per column). Jacob et al. (eq. 7) expand
    the product so the kernel multiplies the raw 8-bit codes and corrects with row/column
    sums; subtracting the zero points first, as here, gives the same integers.
    The int32 matmul cannot overflow when ``K * max|a - a_zp| * max|b - b_zp| < 2**31``
    (for 8-bit codes: K up to 2**15); we check that bound and refuse larger problems.
    """
    a, b = _int_tensor(a_q, "a_q"), _int_tensor(b_q, "b_q")
    if a.dim() < 1 or b.dim() != 2 or a.shape[-1] != b.shape[0]:
        raise ValueError(f"expected a_q (..., K) and b_q (K, N), got {tuple(a.shape)} and {tuple(b.shape)}")
    a, b = a - _int_tensor(a_zp, "a_zp"), b - _int_tensor(b_zp, "b_zp")
    bound = b.shape[0] * a.abs().max().clamp(min=1) * b.abs().max().clamp(min=1)
    if a.numel() and b.numel() and bound > INT32_MAX:
        raise OverflowError(f"int32 accumulation may overflow: K * max|a| * max|b| = {int(bound)} >= 2**31")
    return torch.matmul(a.to(torch.int32), b.to(torch.int32))


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def im2col(x: torch.Tensor, kernel_size, stride=1, padding=0, dilation=1) -> torch.Tensor:
    """Patches of ``x (N, C, H, W)`` as rows: ``(N, H_out, W_out, C * kh * kw)``, any dtype.

    Zero padding, then ``Tensor.unfold`` views (no arithmetic, so integers stay exact);
    a dilated kernel takes every ``dilation``-th element of a wider window.
    """
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = map(_pair, (kernel_size, stride, padding, dilation))
    x = F.pad(x, (pw, pw, ph, ph))
    span_h, span_w = dh * (kh - 1) + 1, dw * (kw - 1) + 1
    patches = x.unfold(2, span_h, sh).unfold(3, span_w, sw)[..., ::dh, ::dw]  # (N, C, H', W', kh, kw)
    n, c, h_out, w_out = patches.shape[:4]
    return patches.permute(0, 2, 3, 1, 4, 5).reshape(n, h_out, w_out, c * kh * kw)


def int_conv2d(x_q: torch.Tensor, w_q: torch.Tensor, x_zp=0, w_zp=0,
               stride=1, padding=0, dilation=1) -> torch.Tensor:
    """2-D convolution of codes as an integer matmul over im2col patches (groups = 1).

    ``x_q (N, C, H, W)``, ``w_q (C_out, C, kh, kw)`` -> int32 ``(N, C_out, H_out, W_out)``.
    A convolution is a matmul: each output pixel is the dot product of one input patch
    (``C * kh * kw`` numbers) with each filter. We subtract the input zero point *before*
    padding, so that the padding is a real 0.0, as in the float convolution.
    """
    x, w = _int_tensor(x_q, "x_q"), _int_tensor(w_q, "w_q")
    if x.dim() != 4 or w.dim() != 4 or x.shape[1] != w.shape[1]:
        raise ValueError(f"expected x_q (N, C, H, W) and w_q (C_out, C, kh, kw), "
                         f"got {tuple(x.shape)} and {tuple(w.shape)}")
    cols = im2col(x - _int_tensor(x_zp, "x_zp"), w.shape[2:], stride, padding, dilation)
    acc = int_matmul(cols, w.reshape(w.shape[0], -1).T, 0, w_zp)   # (N, H', W', C_out)
    return acc.permute(0, 3, 1, 2).contiguous()


class _IntLayer(nn.Module):
    """Shared parts of ``IntLinear``/``IntConv2d``: codes, qparams, bias and requantization.

    Buffers: ``weight_q`` (int8 codes), ``weight_scale`` float32 and ``weight_zero_point``
    int64, one per output channel; ``bias_q`` int32 with scale ``s_x * s_w`` (or None);
    ``input_scale``/``input_zero_point`` and ``input_quant_min``/``input_quant_max`` of the
    input codes this layer expects.
    """

    def _init_from(self, qlayer: nn.Module) -> None:
        in_fq, w_fq = qlayer.input_fq, qlayer.weight_fq
        if getattr(in_fq, "dynamic", False):
            raise ValueError("dynamic quantization has no fixed input qparams to build integer "
                             "layers from; use static PTQ (qlib.ptq.quantize_static)")
        for name, fq in (("input", in_fq), ("weight", w_fq)):
            if not isinstance(fq, FakeQuantize) or fq.observe or not fq.quantize:
                raise ValueError(f"the {name} quantizer of {type(qlayer).__name__} is not frozen: "
                                 "convert the model first (qlib.ptq.convert or quantize_static)")
        if not isinstance(in_fq.granularity, PerTensor):
            raise NotImplementedError("integer inference needs per-tensor activation qparams")
        per_channel = isinstance(w_fq.granularity, PerChannel)
        if not (isinstance(w_fq.granularity, PerTensor)
                or (per_channel and w_fq.granularity.axis % qlayer.weight.dim() == 0)):
            raise NotImplementedError("integer inference needs per-tensor or per-output-channel "
                                      "(PerChannel(0)) weights")
        s_x, z_x = in_fq.qparams()
        s_w, z_w = w_fq.qparams()
        c_out, axis = qlayer.weight.shape[0], (0 if per_channel else None)
        w_q = quantize(qlayer.weight.detach(), s_w, z_w, w_fq.quant_min, w_fq.quant_max, axis=axis)
        self.register_buffer("weight_q", w_q)
        self.register_buffer("weight_scale", s_w.reshape(-1).expand(c_out).to(torch.float32).clone())
        self.register_buffer("weight_zero_point", z_w.reshape(-1).expand(c_out).to(torch.int64).clone())
        self.register_buffer("input_scale", s_x.reshape(()).to(torch.float32))
        self.register_buffer("input_zero_point", z_x.reshape(()).to(torch.int64))
        self.input_quant_min, self.input_quant_max = in_fq.quant_min, in_fq.quant_max
        bias_q = None
        if qlayer.bias is not None:
            bias_q = torch.round(qlayer.bias.detach().double() / self.acc_scale).to(torch.int64)
            bias_q = _check_int32(bias_q, "quantized bias").to(torch.int32)
        self.register_buffer("bias_q", bias_q)

    @property
    def acc_scale(self) -> torch.Tensor:
        """float64 ``(C_out,)``: the real value of one accumulator unit, ``s_x * s_w``."""
        return self.input_scale.double() * self.weight_scale.double()

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """Float input -> the codes this layer expects (the model's entry point)."""
        return quantize(x, self.input_scale, self.input_zero_point, self.input_quant_min, self.input_quant_max)

    def _add_bias(self, acc: torch.Tensor, shape) -> torch.Tensor:
        if self.bias_q is not None:
            acc = _check_int32(acc.to(torch.int64) + self.bias_q.to(torch.int64).reshape(shape), "accumulator")
        return acc.to(torch.int32)

    def requantize(self, acc, scale, zero_point, quant_min: int, quant_max: int) -> torch.Tensor:
        """Accumulator -> codes of the next layer's input qparams ``(scale, zero_point)``."""
        shape = (-1,) + (1,) * (acc.dim() - 2)
        m, shift = quantize_multiplier(self.acc_scale / float(scale))
        return requantize(acc, m.reshape(shape), shift.reshape(shape), zero_point, quant_min, quant_max)

    def dequantize(self, acc: torch.Tensor) -> torch.Tensor:
        """Accumulator -> float32 real values (the end of the integer part of the model)."""
        shape = (-1,) + (1,) * (acc.dim() - 2)
        return (acc.double() * self.acc_scale.reshape(shape)).to(torch.float32)


class IntLinear(_IntLayer):
    """Integer linear layer: input codes ``(N, in)`` -> int32 accumulator ``(N, out)``."""

    @classmethod
    def from_quant(cls, qlinear: nn.Module) -> "IntLinear":
        """Build from a converted (frozen) ``qlib.modules.QuantLinear``."""
        if not isinstance(qlinear, QuantLinear):
            raise TypeError(f"expected a QuantLinear, got {type(qlinear).__name__}")
        layer = cls()
        layer._init_from(qlinear)
        layer.in_features, layer.out_features = qlinear.in_features, qlinear.out_features
        return layer

    def forward(self, x_q: torch.Tensor) -> torch.Tensor:
        acc = int_matmul(x_q, self.weight_q.T, self.input_zero_point, self.weight_zero_point)
        return self._add_bias(acc, (-1,))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class IntConv2d(_IntLayer):
    """Integer 2-D convolution: input codes ``(N, C, H, W)`` -> int32 ``(N, C_out, H', W')``."""

    @classmethod
    def from_quant(cls, qconv: nn.Module) -> "IntConv2d":
        """Build from a converted (frozen) ``qlib.modules.QuantConv2d`` (groups = 1, zero padding)."""
        if not isinstance(qconv, QuantConv2d):
            raise TypeError(f"expected a QuantConv2d, got {type(qconv).__name__}")
        if qconv.groups != 1 or qconv.padding_mode != "zeros" or isinstance(qconv.padding, str):
            raise NotImplementedError("IntConv2d supports groups=1 and numeric zero padding only")
        layer = cls()
        layer._init_from(qconv)
        layer.stride, layer.padding, layer.dilation = qconv.stride, qconv.padding, qconv.dilation
        return layer

    def forward(self, x_q: torch.Tensor) -> torch.Tensor:
        acc = int_conv2d(x_q, self.weight_q, self.input_zero_point, self.weight_zero_point,
                         self.stride, self.padding, self.dilation)
        return self._add_bias(acc, (-1, 1, 1))

    def extra_repr(self) -> str:
        c_out, c_in, kh, kw = self.weight_q.shape
        return f"{c_in}, {c_out}, kernel_size=({kh}, {kw}), stride={self.stride}, padding={self.padding}"
