"""Quantize, dequantize and fake-quantize: the arithmetic of affine quantization.

Given ``scale`` and ``zero_point`` (see ``qparams.py``)::

    x_q  = clamp(round_half_even(x * (1 / scale)) + zero_point, quant_min, quant_max)
    x_dq = (x_q - zero_point) * scale
    fake_quantize(x) = x_dq, computed in float, with a straight-through gradient

The details match PyTorch's CPU kernels bit for bit: the reciprocal ``1 / scale`` is
taken in float32 and then *multiplied* (``x / scale`` can round differently), ties round
to even (``torch.round``, C's ``nearbyint``), the zero_point is added after rounding.

Granularity is chosen by arguments: ``axis=None`` per-tensor (``scale`` a float or a
0-d/1-element tensor); ``axis=k`` per-channel (``scale`` 1-D of length ``x.shape[k]``);
``group_size=g`` per-group along ``axis`` (default -1; ``scale`` shaped like ``x`` with
``x.shape[axis]`` replaced by ``x.shape[axis] // g``).

Codes are stored in the smallest of int8/uint8/int16/int32 that holds the range: torch
has no int4 storage, so 4-bit codes live in int8 (real kernels pack two per byte).
"""

from __future__ import annotations

import torch

from .qparams import check_quant_range, check_tensor

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


def _qparams(x: torch.Tensor, scale, zero_point, axis, group_size, quant_range=None):
    """Validate scale/zero_point and return them broadcastable to ``x``.

    Returns float32 ``scale`` and int64 ``zero_point`` of shape ``(1,)*ndim`` (per-tensor),
    ``(1,..,C,..,1)`` (per-channel) or ``x.shape`` (per-group, repeated along ``axis``).
    """
    scale = torch.as_tensor(scale).detach()
    zero_point = torch.as_tensor(zero_point).detach()
    if not scale.is_floating_point():
        raise TypeError(f"scale must be floating point, got {scale.dtype}")
    if not _is_integer(zero_point.dtype):
        raise TypeError(f"zero_point must be an integer tensor or int, got {zero_point.dtype}")
    scale, zero_point = scale.to(torch.float32, copy=True), zero_point.to(torch.int64, copy=True)
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


def _codes_unclamped(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """``round_half_even(x * (1/scale)) + zero_point`` in float32, before clamping."""
    inv_scale = 1.0 / scale  # float32 reciprocal, as PyTorch's kernels
    return torch.round(x.to(torch.float32) * inv_scale) + zero_point.to(torch.float32)


def quantize(x: torch.Tensor, scale, zero_point, quant_min: int, quant_max: int,
             axis: int | None = None, dtype: torch.dtype | None = None,
             group_size: int | None = None) -> torch.Tensor:
    """Integer codes ``x_q = clamp(round(x * (1/scale)) + zero_point, quant_min, quant_max)``.

    ``x``: float tensor. Returns ``x_q`` of ``x.shape`` in ``dtype`` (default
    :func:`code_dtype`: int8 for signed <= 8 bits, uint8 for (0, 255), ...).
    Equal to ``torch.quantize_per_tensor(...).int_repr()`` for 8-bit ranges.
    """
    check_tensor(x)
    check_quant_range(quant_min, quant_max)
    dtype = code_dtype(quant_min, quant_max) if dtype is None else dtype
    if not isinstance(dtype, torch.dtype) or not _is_integer(dtype):
        raise TypeError(f"dtype must be an integer torch.dtype, got {dtype!r}")
    info = torch.iinfo(dtype)
    if quant_min < info.min or quant_max > info.max:
        raise ValueError(f"{dtype} cannot hold codes in [{quant_min}, {quant_max}]")
    scale, zero_point = _qparams(x, scale, zero_point, axis, group_size, (quant_min, quant_max))
    q = torch.clamp(_codes_unclamped(x, scale, zero_point), quant_min, quant_max)
    return q.to(dtype)


def dequantize(x_q: torch.Tensor, scale, zero_point, axis: int | None = None,
               group_size: int | None = None) -> torch.Tensor:
    """Float32 ``x_dq = (x_q - zero_point) * scale`` from integer codes ``x_q``.

    (PyTorch's own ``Tensor.dequantize`` may fuse this into ``x_q*scale - zp*scale``,
    which can differ in the last bit; ``fake_quantize`` uses this exact form.)
    """
    check_tensor(x_q, "x_q", floating=False)
    if not _is_integer(x_q.dtype):
        raise TypeError(f"x_q must hold integer codes (int8, uint8, int16, int32, int64), got {x_q.dtype}")
    scale, zero_point = _qparams(x_q, scale, zero_point, axis, group_size)
    return (x_q.to(torch.int64) - zero_point).to(torch.float32) * scale


def _fake_quantize_with_mask(x, scale, zero_point, quant_min, quant_max):
    q = _codes_unclamped(x, scale, zero_point)
    mask = (q >= quant_min) & (q <= quant_max)  # where the gradient passes
    x_dq = (torch.clamp(q, quant_min, quant_max) - zero_point.to(torch.float32)) * scale
    return x_dq.to(x.dtype), mask


class FakeQuantizeSTE(torch.autograd.Function):
    """Quantize-dequantize in float; the backward pass is the straight-through estimator.

    ``round`` has zero gradient almost everywhere, so training through it would stall.
    The STE pretends ``round`` is the identity: ``d x_dq / d x = 1`` where the code
    ``round(x/scale) + zero_point`` lies in ``[quant_min, quant_max]``, 0 where it is clipped.
    Arguments are already broadcastable (see :func:`fake_quantize`).
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
                  axis: int | None = None, group_size: int | None = None) -> torch.Tensor:
    """``dequantize(quantize(x))`` in one differentiable step (straight-through gradient).

    Same shape and dtype as ``x`` (computed in float32). Values and gradients are bit for
    bit those of ``torch.fake_quantize_per_tensor_affine`` (``axis=None``) and
    ``torch.fake_quantize_per_channel_affine`` (``axis=k``) on float32 input.
    """
    check_tensor(x)
    check_quant_range(quant_min, quant_max)
    scale, zero_point = _qparams(x, scale, zero_point, axis, group_size, (quant_min, quant_max))
    return FakeQuantizeSTE.apply(x, scale, zero_point, quant_min, quant_max)


def fake_quantize_per_group(x: torch.Tensor, scale, zero_point, quant_min: int, quant_max: int,
                            group_size: int, axis: int = -1) -> torch.Tensor:
    """Per-group fake quantization: each run of ``group_size`` elements along ``axis``
    has its own qparams; ``scale``/``zero_point`` have the shape of ``x`` with
    ``x.shape[axis]`` replaced by ``x.shape[axis] // group_size`` (``qparams_for`` with
    ``PerGroup(group_size, axis)`` returns exactly that)."""
    return fake_quantize(x, scale, zero_point, quant_min, quant_max, axis=axis, group_size=group_size)


def quantize_round_half_away(x: torch.Tensor, scale, zero_point, quant_min: int, quant_max: int,
                             axis: int | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Teaching variant: like :func:`quantize` but ties round *away from zero*.

    ``round_half_away(v) = sign(v) * floor(|v| + 0.5)``: 2.5 -> 3, -2.5 -> -3 (school
    rounding, C's ``round``, TFLite's reference kernels); PyTorch rounds 2.5 -> 2 (to even),
    which is unbiased on average. The two differ only at exact ties.
    """
    check_tensor(x)
    check_quant_range(quant_min, quant_max)
    dtype = code_dtype(quant_min, quant_max) if dtype is None else dtype
    scale, zero_point = _qparams(x, scale, zero_point, axis, None, (quant_min, quant_max))
    v = x.to(torch.float32) * (1.0 / scale)
    t = torch.trunc(v)  # floor(|v| + 0.5) in float can round 0.49999997 up: test the fraction
    q = torch.where((v - t).abs() >= 0.5, t + torch.sign(v), t) + zero_point.to(torch.float32)
    return torch.clamp(q, quant_min, quant_max).to(dtype)
