"""Quantize, dequantize and fake-quantize: the arithmetic of affine quantization.

Given ``scale`` and ``zero_point`` (see ``qparams.py``)::

    x_q  = clamp(round_half_even(x * (1 / scale)) + zero_point, quant_min, quant_max)
    x_dq = (x_q - zero_point) * scale
    fake_quantize(x) = x_dq, computed in float, with a straight-through gradient

The details match PyTorch's CPU kernels bit for bit: the reciprocal ``1 / scale`` is
taken in float32 and then *multiplied* (``x / scale`` can round differently), ties round
to even (``torch.round``, C's ``nearbyint``), the zero_point is added after rounding.

Granularity: ``granularity=PerTensor() | PerChannel(axis) | PerGroup(group_size, axis)``
(the objects of ``qparams.py``), or the equivalent ``axis=``/``group_size=`` arguments:
``axis=None`` per-tensor (``scale`` a float or a 1-element tensor); ``axis=k`` per-channel
(``scale`` 1-D of length ``x.shape[k]``); ``group_size=g`` per-group along ``axis``
(default -1; ``scale`` shaped like ``x`` with ``x.shape[axis]`` replaced by ``x.shape[axis] // g``).

Devices and dtypes: ``scale``/``zero_point`` (floats, ints or tensors on any device) are
moved to ``x``'s device. The arithmetic dtype follows PyTorch's kernels: float16, bfloat16
and float32 inputs are computed in float32 (exact: they are all float32 values), float64
inputs in float64 (with the same float32 reciprocal ``1/scale``); ``fake_quantize`` returns
``x.dtype`` (the float32 number ``(q - zero_point) * scale``, as torch's per-tensor kernel;
its per-channel kernel keeps float64 input's product unrounded), ``dequantize`` float32. Ranges wider than 16 bits (int32 bias or accumulator
codes) are computed in float64, where ``x * (1/scale)`` of float32 values is exact: float32
cannot hold every integer above 2**24 (``quantize(1e10, 1.0, 0, -2**31, 2**31-1)`` once
gave -2**31 instead of 2**31 - 1).

Codes are stored in the smallest of int8/uint8/int16/int32 that holds the range: torch
has no int4 storage, so 4-bit codes live in int8 (real kernels pack two per byte).
"""

from __future__ import annotations

import sys
import types

import torch

from .qparams import PerChannel, PerTensor, check_granularity, check_quant_range, check_tensor

__all__ = [
    "quantize", "dequantize", "fake_quantize", "fake_quantize_per_group", "FakeQuantizeSTE",
    "code_dtype", "quantize_round_half_away",
]

_CODE_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32)


def _is_integer(dtype: torch.dtype) -> bool:
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


def code_dtype(quant_min: int, quant_max: int) -> torch.dtype:
    """Smallest of int8, uint8, int16, int32 holding ``[quant_min, quant_max]``."""
    check_quant_range(quant_min, quant_max)
    for dtype in _CODE_DTYPES:
        info = torch.iinfo(dtype)
        if info.min <= quant_min and quant_max <= info.max:
            return dtype
    raise AssertionError("unreachable: check_quant_range bounds the range to int32")


def _out_dtype(dtype, quant_min: int, quant_max: int) -> torch.dtype:
    """``dtype`` (default :func:`code_dtype`) after checking that it holds the range."""
    dtype = code_dtype(quant_min, quant_max) if dtype is None else dtype
    if not isinstance(dtype, torch.dtype) or not _is_integer(dtype):
        raise TypeError(f"dtype must be an integer torch.dtype, got {dtype!r}")
    info = torch.iinfo(dtype)
    if quant_min < info.min or quant_max > info.max:
        raise ValueError(f"{dtype} cannot hold codes in [{quant_min}, {quant_max}]")
    return dtype


def _compute_dtype(x: torch.Tensor, quant_min: int, quant_max: int) -> torch.dtype:
    """float64 for float64 input or a range wider than 16 bits, else float32 (module docstring)."""
    wide = quant_min < -(2**15) or quant_max > 2**16 - 1
    return torch.float64 if wide or x.dtype == torch.float64 else torch.float32


def _layout(granularity, axis, group_size):
    """``granularity=`` or ``axis=``/``group_size=`` -> ``(axis, group_size)``."""
    if granularity is None:
        return axis, group_size
    if axis is not None or group_size is not None:
        raise ValueError("give either granularity= or axis=/group_size=, not both")
    check_granularity(granularity)
    if isinstance(granularity, PerTensor):
        return None, None
    if isinstance(granularity, PerChannel):
        return granularity.axis, None
    return granularity.axis, granularity.group_size


def _as_tensor(v, name: str, device, floating: bool) -> torch.Tensor:
    if isinstance(v, torch.Tensor):
        ok = v.is_floating_point() if floating else _is_integer(v.dtype)
        if not ok:
            raise TypeError(f"{name} must be {'a floating-point' if floating else 'an integer'} tensor, got {v.dtype}")
        return v.detach().to(device=device, dtype=torch.float32 if floating else torch.int64, copy=True)
    kinds = (int, float) if floating else (int,)
    if isinstance(v, bool) or not isinstance(v, kinds):
        want = "a float (a number or a floating-point tensor)" if floating else "an integer (an int or an integer tensor)"
        raise TypeError(f"{name} must be {want}, got {type(v).__name__} {v!r}")
    return torch.tensor(v, dtype=torch.float32 if floating else torch.int64, device=device)


def _qparams(x: torch.Tensor, scale, zero_point, axis, group_size, quant_range=None):
    """Validate scale/zero_point, move them to ``x.device``, make them broadcastable to ``x``.

    Returns float32 ``scale`` and int64 ``zero_point`` of shape ``(1,)*ndim`` (per-tensor),
    ``(1,..,C,..,1)`` (per-channel) or ``x.shape`` (per-group, repeated along ``axis``).
    """
    scale = _as_tensor(scale, "scale", x.device, floating=True)
    zero_point = _as_tensor(zero_point, "zero_point", x.device, floating=False)
    if not (torch.isfinite(scale).all() and (scale > 0).all()):
        raise ValueError("scale must be finite and > 0 everywhere")
    if quant_range is not None and ((zero_point < quant_range[0]) | (zero_point > quant_range[1])).any():
        raise ValueError(f"zero_point must lie in [quant_min, quant_max] = {list(quant_range)}")
    nd = x.dim()
    if axis is None:
        if group_size is not None:
            axis = -1
        else:
            for name, t in (("scale", scale), ("zero_point", zero_point)):
                if t.numel() != 1:
                    raise ValueError(f"axis=None means per-tensor: {name} must hold 1 value, "
                                     f"got shape {tuple(t.shape)} (pass axis=k for per-channel)")
            return scale.reshape((1,) * nd), zero_point.reshape((1,) * nd)
    if isinstance(axis, bool) or not isinstance(axis, int):
        raise TypeError(f"axis must be an int or None, got {type(axis).__name__}")
    if not -nd <= axis < nd:
        raise ValueError(f"axis {axis} is out of range for a tensor with {nd} dims")
    axis %= nd
    if group_size is None:
        for name, t in (("scale", scale), ("zero_point", zero_point)):
            if t.dim() != 1 or t.numel() != x.shape[axis]:
                raise ValueError(f"per-channel {name} must be 1-D of length x.shape[{axis}] = "
                                 f"{x.shape[axis]}, got shape {tuple(t.shape)}")
        view = [1] * nd
        view[axis] = -1
        return scale.reshape(view), zero_point.reshape(view)
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if x.shape[axis] % group_size:
        raise ValueError(f"x.shape[{axis}] = {x.shape[axis]} is not divisible by group_size {group_size}")
    want = tuple(s // group_size if d == axis else s for d, s in enumerate(x.shape))
    for name, t in (("scale", scale), ("zero_point", zero_point)):
        if tuple(t.shape) != want:
            raise ValueError(f"per-group {name} must have shape {want}, got {tuple(t.shape)}")
    return scale.repeat_interleave(group_size, axis), zero_point.repeat_interleave(group_size, axis)


def _scaled(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x * (1/scale)`` in ``dtype``; the reciprocal in float32, as PyTorch's kernels."""
    return x.to(dtype) * (1.0 / scale).to(dtype)


def _codes_unclamped(x, scale, zero_point, dtype) -> torch.Tensor:
    """``round_half_even(x * (1/scale)) + zero_point`` in ``dtype``, before clamping."""
    return torch.round(_scaled(x, scale, dtype)) + zero_point.to(dtype)


def _check_call(x, quant_min, quant_max, granularity, axis, group_size):
    check_tensor(x)
    check_quant_range(quant_min, quant_max)
    return _layout(granularity, axis, group_size)


def quantize(x: torch.Tensor, scale, zero_point, quant_min: int, quant_max: int,
             axis: int | None = None, dtype: torch.dtype | None = None,
             group_size: int | None = None, *, granularity=None) -> torch.Tensor:
    """Integer codes ``x_q = clamp(round(x * (1/scale)) + zero_point, quant_min, quant_max)``.

    ``x``: float tensor (any float dtype, any device). Returns ``x_q`` of ``x.shape`` on
    ``x.device`` in ``dtype`` (default :func:`code_dtype`: int8 for signed <= 8 bits, uint8
    for (0, 255), ...). Equal to ``torch.quantize_per_tensor(...).int_repr()`` (and
    ``quantize_per_channel``) for float32 input and ranges of at most 16 bits.
    """
    axis, group_size = _check_call(x, quant_min, quant_max, granularity, axis, group_size)
    dtype = _out_dtype(dtype, quant_min, quant_max)
    scale, zero_point = _qparams(x, scale, zero_point, axis, group_size, (quant_min, quant_max))
    q = _codes_unclamped(x, scale, zero_point, _compute_dtype(x, quant_min, quant_max))
    return torch.clamp(q, quant_min, quant_max).to(dtype)


def dequantize(x_q: torch.Tensor, scale, zero_point, axis: int | None = None,
               group_size: int | None = None, *, granularity=None) -> torch.Tensor:
    """Float32 ``x_dq = (x_q - zero_point) * scale`` from integer codes ``x_q`` (on its device).

    (PyTorch's own ``Tensor.dequantize`` may fuse this into ``x_q*scale - zp*scale``,
    which can differ in the last bit; ``fake_quantize`` uses this exact form.) Codes beyond
    2**24 are multiplied in float64 and rounded once to float32.
    """
    check_tensor(x_q, "x_q", floating=False)
    if not _is_integer(x_q.dtype):
        raise TypeError(f"x_q must hold integer codes (int8, uint8, int16, int32, int64), got {x_q.dtype}")
    axis, group_size = _layout(granularity, axis, group_size)
    scale, zero_point = _qparams(x_q, scale, zero_point, axis, group_size)
    diff = x_q.to(torch.int64) - zero_point
    return _times_scale(diff, scale, wide=bool(diff.abs().max() > 2**24))


def _times_scale(diff: torch.Tensor, scale: torch.Tensor, wide: bool) -> torch.Tensor:
    """float32 ``diff * scale``, rounded once: in float32 when ``|diff| <= 2**24`` (exact
    operands), else (``wide``) in float64: a 32-bit ``diff`` would be rounded on its way to float32."""
    if not wide:
        return diff.to(torch.float32) * scale
    return (diff.to(torch.float64) * scale.to(torch.float64)).to(torch.float32)


def _fake_quantize_with_mask(x, scale, zero_point, quant_min, quant_max):
    dtype = _compute_dtype(x, quant_min, quant_max)
    q = _codes_unclamped(x, scale, zero_point, dtype)
    mask = (q >= quant_min) & (q <= quant_max)  # where the gradient passes
    diff = torch.clamp(q, quant_min, quant_max) - zero_point.to(dtype)  # exact integers
    return _times_scale(diff, scale, wide=quant_max - quant_min > 2**24).to(x.dtype), mask


class FakeQuantizeSTE(torch.autograd.Function):
    """Quantize-dequantize in float; the backward pass is the straight-through estimator.

    ``round`` has zero gradient almost everywhere, so training through it would stall.
    The STE pretends ``round`` is the identity: ``d x_dq / d x = 1`` where the code
    ``round(x/scale) + zero_point`` lies in ``[quant_min, quant_max]``, 0 where it is clipped.
    Arguments are already broadcastable and on ``x``'s device (see :func:`fake_quantize`).
    """

    @staticmethod
    def forward(ctx, x, scale, zero_point, quant_min, quant_max):
        x_dq, mask = _fake_quantize_with_mask(x, scale, zero_point, quant_min, quant_max)
        ctx.save_for_backward(mask)
        return x_dq

    @staticmethod
    def backward(ctx, grad_output):
        (mask,) = ctx.saved_tensors
        return grad_output * mask, None, None, None, None


def fake_quantize(x: torch.Tensor, scale, zero_point, quant_min: int, quant_max: int,
                  axis: int | None = None, group_size: int | None = None, *,
                  granularity=None) -> torch.Tensor:
    """``dequantize(quantize(x))`` in one differentiable step (straight-through gradient).

    Same shape, dtype and device as ``x``. Values and gradients are bit for bit those of
    ``torch.fake_quantize_per_tensor_affine`` (per-tensor) and
    ``torch.fake_quantize_per_channel_affine`` (``axis=k``) on float16, bfloat16 and float32
    input; on float64 input per-tensor too, per-channel up to torch's unrounded product.
    """
    axis, group_size = _check_call(x, quant_min, quant_max, granularity, axis, group_size)
    scale, zero_point = _qparams(x, scale, zero_point, axis, group_size, (quant_min, quant_max))
    return FakeQuantizeSTE.apply(x, scale, zero_point, quant_min, quant_max)


def fake_quantize_per_group(x: torch.Tensor, scale, zero_point, quant_min: int, quant_max: int,
                            group_size: int, axis: int = -1) -> torch.Tensor:
    """``fake_quantize(..., granularity=PerGroup(group_size, axis))`` (same argument order
    as ``PerGroup``): each run of ``group_size`` elements along ``axis`` has its own
    qparams, of the shape of ``x`` with ``x.shape[axis]`` replaced by
    ``x.shape[axis] // group_size`` (what ``qparams_for`` with ``PerGroup`` returns)."""
    return fake_quantize(x, scale, zero_point, quant_min, quant_max, axis=axis, group_size=group_size)


def quantize_round_half_away(x: torch.Tensor, scale, zero_point, quant_min: int, quant_max: int,
                             axis: int | None = None, dtype: torch.dtype | None = None,
                             group_size: int | None = None, *, granularity=None) -> torch.Tensor:
    """Teaching variant: like :func:`quantize` but ties round *away from zero*.

    ``round_half_away(v) = sign(v) * floor(|v| + 0.5)``: 2.5 -> 3, -2.5 -> -3 (school
    rounding, C's ``round``, TFLite's reference kernels); PyTorch rounds 2.5 -> 2 (to even),
    which is unbiased on average. The two differ only at exact ties. Same arguments,
    checks, dtypes and devices as :func:`quantize`.
    """
    axis, group_size = _check_call(x, quant_min, quant_max, granularity, axis, group_size)
    dtype = _out_dtype(dtype, quant_min, quant_max)
    scale, zero_point = _qparams(x, scale, zero_point, axis, group_size, (quant_min, quant_max))
    compute = _compute_dtype(x, quant_min, quant_max)
    v = _scaled(x, scale, compute)
    t = torch.trunc(v)  # floor(|v| + 0.5) in float can round 0.49999997 up: test the fraction
    q = torch.where((v - t).abs() >= 0.5, t + torch.sign(v), t) + zero_point.to(compute)
    return torch.clamp(q, quant_min, quant_max).to(dtype)


class _CallableModule(types.ModuleType):
    """``qlib.quantize`` is this module *and* calls :func:`quantize`: ``qlib.quantize(x, s,
    z, qmin, qmax)`` and ``qlib.quantize.dequantize(...)`` both work (no importlib needed)."""

    def __call__(self, *args, **kwargs):
        return quantize(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
