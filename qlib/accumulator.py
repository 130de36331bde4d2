"""The integer tensor between two layers: an ``Accumulator``, and the exact rules that replace
the float operations of a model on it (``qlib.intmodel`` walks the graph and calls them).

Idea. A quantized layer outputs int32 sums ``acc``, worth ``real = acc * s_x * s_w`` (one scale
per output channel). Instead of turning them back into floats, the integer model carries them on
as an ``Accumulator``: ``values`` int32 ``(N, C, ...)``, ``scale`` float64 broadcastable to
``values.shape[1:]`` (``(C, 1, 1)`` after a convolution, ``(C,)`` after a linear layer), with::

    real = values * scale        (then at most act_max, a ReLU6's pending 6)

and every operation between layers becomes an operation on ``values`` that keeps this equation
true, exactly or within a stated error:

- ReLU: ``max(values, 0)`` (scales are positive). Exact;
- ReLU6 (MobileNet's ``min(max(x, 0), 6)``): ``max(values, 0)`` now, and the 6 kept on the
  accumulator (``act_max``) until the next requantization, which clamps the *output codes*
  to ``[q(0), q(6)]`` (``to_codes``; below). Exact;
- max-pool: max-pool of ``values`` (one positive scale per channel). Exact;
- average-pool, mean: the integer sum; ``1 / count`` goes into the scale, hence into the
  next requantization multiplier. Exact (the sum must fit in int32);
- flatten, view, reshape: reshape ``values`` and ``scale`` alike (batch dim kept). Exact;
- ``a + b`` (residual connections): both rescaled to the coarser of the two scales with a
  fixed-point multiplier <= 1 (``qlib.requant``), then an integer add. Within half a unit;
- Identity, Dropout: nothing.

``_MODULE_RULES``, ``_FUNCTION_RULES`` and ``_METHOD_RULES`` map PyTorch's modules, functions
and tensor methods to these rules. ``to_codes`` ends an accumulator's life: the next quantized
layer's input codes, ``requantize_scaled(values, scale, s_y, z_y, ...)``.

ReLU6 is fused into that requantization, as TFLite fuses an activation into a convolution
(``output_activation_min/max``, applied to the requantized codes) and as PyTorch's quantized
``ReLU6`` / fused ``conv + relu6`` clamp codes of the output qparams to ``[z, q(6)]``::

    y_q = clamp(requantize(acc), q(0), q(6)),   q(v) = clamp(round(v / s_y) + z_y, quant_min, quant_max)

with ``q`` the quantizer of the next layer's input (``qlib.quantize``, PyTorch's rounding;
``activation_code``), so ``q(0) = z_y`` and ``q(6)`` is the code the fake-quant model gives to
a clipped 6.0. Why this is exact: requantization ``R`` is non-decreasing, and a non-decreasing
map commutes with a clamp, ``R(clamp(v, 0, 6)) = clamp(R(v), R(0), R(6))``. The fake-quant
model computes the left side (ReLU6 in float, then quantize); the integer model the right side,
with ``R(6) = q(6)``. It holds only because the clamp comes *after* the one requantization into
the codes the next layer reads: clamping an int32 accumulator at 6 would need ``6 / s_acc``,
not an integer (a floor moves it by up to one accumulator unit), and clamping the codes of
some other grid and requantizing them afterwards rounds 6 twice (``round(s_a * round(6 /
s_a) / s_y)`` need not be ``round(6 / s_y)``). Where the 6 cannot wait for a requantization
(average pooling, means, adds), the accumulator is clamped at ``floor(6 / scale)``
(``Accumulator.materialized``): within one accumulator unit, far below a code; at the output
the float is clamped at 6 (exact).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .intlayers import IntConv2d, IntLinear
from .quantize import quantize
from .requant import INT32_MAX, _check_int32, multiply_by_quantized_multiplier, quantize_multiplier, requantize_scaled

__all__ = ["Accumulator", "activation_code", "to_codes"]


@dataclass
class Accumulator:
    """Integers with a scale: ``real = values * scale``, then at most ``act_max``.

    ``values``: int32 tensor ``(N, ...)``, or int64 holding int32 numbers (checked);
    ``scale``: float64 tensor broadcastable to ``values.shape[1:]`` (one per channel);
    ``act_max``: None, or a real upper clamp still to apply (ReLU6's 6), fused into the next
    requantization (``to_codes``) or applied by ``materialized``/``dequantize``.
    """

    values: torch.Tensor
    scale: torch.Tensor
    act_max: float | None = None

    def __post_init__(self):
        values = self.values if self.values.dtype == torch.int32 else self.values.to(torch.int64)
        self.values = _check_int32(values, "accumulator")

    def dequantize(self) -> torch.Tensor:
        real = (self.values.double() * self.scale).to(torch.float32)
        return real if self.act_max is None else real.clamp(max=self.act_max)

    def materialized(self) -> "Accumulator":
        """The pending clamp applied to the integers: ``min(values, floor(act_max / scale))``.

        The largest accumulator values whose real value is at most ``act_max``: within one
        accumulator unit (``scale``) of ``min(real, act_max)``.
        """
        if self.act_max is None:
            return self
        top = torch.floor(self.act_max / self.full_scale()).clamp(max=INT32_MAX).to(torch.int64)
        return Accumulator(torch.minimum(self.values.to(torch.int64), top), self.scale)

    def full_scale(self) -> torch.Tensor:
        return self.scale.expand(self.values.shape[1:])


def to_codes(x, layer: IntLinear | IntConv2d) -> torch.Tensor:
    """The codes ``layer`` expects: quantize a float input, requantize an accumulator
    (``qlib.requant.requantize_scaled``, with the layer's ``double_rounding``), then clamp
    the codes at ``q(act_max)`` when a ReLU6 is pending (fused: see the module docstring)."""
    if isinstance(x, Accumulator):
        codes = requantize_scaled(x.values, x.scale, layer.input_scale, layer.input_zero_point,
                                  layer.input_quant_min, layer.input_quant_max, layer.double_rounding)
        if x.act_max is not None:
            top = activation_code(x.act_max, layer.input_scale, layer.input_zero_point,
                                  layer.input_quant_min, layer.input_quant_max)
            codes = torch.minimum(codes, top.to(codes.dtype))
        return codes
    return layer.quantize_input(x)


def activation_code(v: float, scale, zero_point, quant_min: int, quant_max: int) -> torch.Tensor:
    """``q(v) = clamp(round(v / scale) + zero_point, quant_min, quant_max)``: the code of the real
    ``v`` (``qlib.quantize``: PyTorch's ``quantize_val``, with which its quantized ReLU6 computes
    the code of 6), a 0-dim int64 tensor on ``scale``'s device."""
    scale = torch.as_tensor(scale, dtype=torch.float32)
    real = torch.as_tensor(v, dtype=torch.float32, device=scale.device)
    return quantize(real, scale, zero_point, quant_min, quant_max).to(torch.int64)


def _relu(a: Accumulator) -> Accumulator:
    """``max(values, 0)``: exact (0 is an integer in every scale); a pending clamp stays pending."""
    return Accumulator(a.values.clamp_min(0), a.scale, a.act_max)


def _relu6(a: Accumulator) -> Accumulator:
    """ReLU now, the 6 pending until the next requantization (fused: see the module docstring)."""
    top = 6.0 if a.act_max is None else min(a.act_max, 6.0)
    return Accumulator(a.values.clamp_min(0), a.scale, top)


def _per_channel(a: Accumulator) -> Accumulator:
    """``a`` with a scale of shape ``(C, 1, 1)``: pooling mixes pixels, so they must share it."""
    s = a.full_scale()
    if not torch.equal(s, s[..., :1, :1].expand_as(s)):
        raise NotImplementedError("pooling needs one scale per channel (not per pixel)")
    return Accumulator(a.values, s[..., :1, :1], a.act_max)


def _common_scale(a: Accumulator, dims: list[int]) -> Accumulator:
    """Rescale ``a`` so its scale is constant along ``dims`` (the coarsest one; multipliers <= 1)."""
    scale = a.full_scale()
    common = scale.amax(dim=[d - 1 for d in dims], keepdim=True)
    if torch.equal(scale, common.expand_as(scale)):
        return Accumulator(a.values, common)
    return Accumulator(multiply_by_quantized_multiplier(a.values, *quantize_multiplier(scale / common)), common)


def _pooled(a: Accumulator, pool_sum, count: int) -> Accumulator:
    """Average = integer sum, with ``1 / count`` moved into the scale (exact)."""
    a = _per_channel(a.materialized())
    return Accumulator(pool_sum(a.values.double()).round().to(torch.int64), a.scale / count)


def _avg_pool(a: Accumulator, kernel, stride=None, padding=0, ceil_mode=False,
              count_include_pad=True, divisor_override=None) -> Accumulator:
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    pad = padding if isinstance(padding, int) else max(padding)
    if divisor_override is None and (ceil_mode or (pad and not count_include_pad)):
        raise NotImplementedError("integer average pooling needs windows of one size: "
                                  "no ceil_mode, and count_include_pad=True when padding")
    count = divisor_override or kh * kw
    return _pooled(a, lambda v: F.avg_pool2d(v, kernel, stride, padding, ceil_mode,
                                             count_include_pad, divisor_override=1), count)


def _adaptive_avg_pool(a: Accumulator, output_size) -> Accumulator:
    h, w = a.values.shape[-2:]
    oh, ow = (output_size, output_size) if isinstance(output_size, int) else output_size
    oh, ow = oh or h, ow or w
    if h % oh or w % ow:
        raise NotImplementedError(f"adaptive average pooling {h}x{w} -> {oh}x{ow} has windows of "
                                  "different sizes; integer inference needs equal windows")
    return _avg_pool(a, (h // oh, w // ow), (h // oh, w // ow))


def _mean(a: Accumulator, dim=None, keepdim=False) -> Accumulator:
    if dim is None:
        raise NotImplementedError("integer inference cannot average over the batch dimension")
    dims = sorted(d % a.values.dim() for d in ((dim,) if isinstance(dim, int) else dim))
    if 0 in dims:
        raise NotImplementedError("integer inference cannot average over the batch dimension")
    a = _common_scale(a.materialized(), dims)  # e.g. a mean across channels with per-channel scales
    count = 1
    for d in dims:
        count *= a.values.shape[d]
    scale = a.scale if keepdim else a.scale.squeeze([d - 1 for d in dims])
    return Accumulator(a.values.sum(dims, keepdim=keepdim), scale / count)


def _reshape(a: Accumulator, values: torch.Tensor) -> Accumulator:
    if values.shape[0] != a.values.shape[0]:
        raise NotImplementedError("integer inference needs reshapes that keep the batch dimension")
    return Accumulator(values, a.full_scale().reshape(values.shape[1:]), a.act_max)


def _add(a, b) -> Accumulator:
    if not (isinstance(a, Accumulator) and isinstance(b, Accumulator)):
        raise NotImplementedError("integer inference adds two integer tensors, not a number")
    a, b = a.materialized(), b.materialized()
    common = torch.maximum(a.scale, b.scale)  # coarser scale: multipliers <= 1, no overflow

    def rescale(t: Accumulator) -> torch.Tensor:
        return multiply_by_quantized_multiplier(t.values, *quantize_multiplier(t.scale / common))
    return Accumulator(rescale(a) + rescale(b), common)


def _monotone(a: Accumulator, fn) -> Accumulator:
    """Max-pooling: on the integers where PyTorch has the kernel (CPU), else in float64 (exact).

    A pending clamp stays pending: the max of clamped values is the clamped max.
    """
    a = _per_channel(a)
    if a.values.device.type == "cpu" and not isinstance(fn, nn.AdaptiveMaxPool2d):
        return Accumulator(fn(a.values), a.scale, a.act_max)
    return Accumulator(fn(a.values.double()).to(torch.int64), a.scale, a.act_max)


_MODULE_RULES = {
    nn.ReLU: lambda m, a: _relu(a),
    nn.ReLU6: lambda m, a: _relu6(a),
    nn.Identity: lambda m, a: a,
    nn.Dropout: lambda m, a: a,
    nn.MaxPool2d: lambda m, a: _monotone(a, m),
    nn.AdaptiveMaxPool2d: lambda m, a: _monotone(a, m),
    nn.AvgPool2d: lambda m, a: _avg_pool(a, m.kernel_size, m.stride, m.padding, m.ceil_mode,
                                         m.count_include_pad, m.divisor_override),
    nn.AdaptiveAvgPool2d: lambda m, a: _adaptive_avg_pool(a, m.output_size),
    nn.Flatten: lambda m, a: _reshape(a, a.values.flatten(m.start_dim, m.end_dim)),
}
_FUNCTION_RULES = {
    F.relu: lambda a, *r, **k: _relu(a),
    torch.relu: lambda a, *r, **k: _relu(a),
    F.relu6: lambda a, *r, **k: _relu6(a),
    operator.add: _add, operator.iadd: _add, torch.add: _add,
    torch.flatten: lambda a, *r, **k: _reshape(a, torch.flatten(a.values, *r, **k)),
    torch.reshape: lambda a, *r, **k: _reshape(a, torch.reshape(a.values, *r, **k)),
    torch.mean: _mean,
    F.max_pool2d: lambda a, *r, **k: _monotone(a, lambda v: F.max_pool2d(v, *r, **k)),
    F.avg_pool2d: _avg_pool,
    F.adaptive_avg_pool2d: _adaptive_avg_pool,
}
_METHOD_RULES = {
    "relu": _FUNCTION_RULES[F.relu], "add": _add, "mean": _mean,
    "flatten": lambda a, *r, **k: _reshape(a, a.values.flatten(*r, **k)),
    "view": lambda a, *r, **k: _reshape(a, a.values.reshape(*r, **k)),  # values may be channels-last
    "reshape": lambda a, *r, **k: _reshape(a, a.values.reshape(*r, **k)),
    "size": lambda a, *r, **k: a.values.size(*r, **k),
    "dim": lambda a: a.values.dim(),
    "contiguous": lambda a: a,
}
