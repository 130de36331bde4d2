"""Quantization parameters: integer ranges, ``scale`` and ``zero_point``.

Affine (asymmetric) quantization maps a real interval ``[min_val, max_val]`` onto the
integers ``[quant_min, quant_max]``::

    x_q  = clamp(round(x / scale) + zero_point, quant_min, quant_max)    # quantize.py
    x_dq = (x_q - zero_point) * scale

This module answers the question *which* ``scale`` and ``zero_point``. The formulas are
PyTorch's (``torch.ao.quantization`` observers, ``_calculate_qparams``), bit for bit:

affine::

    min_neg = min(min_val, 0)            # the range must contain 0.0 ...
    max_pos = max(max_val, 0)            # ... so that zero (padding, ReLU) is exact
    scale = max((max_pos - min_neg) / (quant_max - quant_min), eps)
    zero_point = clamp(quant_min - round(min_neg / scale), quant_min, quant_max)

symmetric::

    scale = max(max(-min_neg, max_pos) / ((quant_max - quant_min) / 2), eps)   # 127.5 for 8 bits
    zero_point = 0 for a signed range, the middle of the range for an unsigned one

Granularity says how many (scale, zero_point) pairs a tensor gets: ``PerTensor()``,
``PerChannel(axis)`` (torchao's ``PerAxis``) or ``PerGroup(group_size, axis)``; the classes
and the row view live in ``granularity.py`` and are re-exported here.

One vocabulary for the whole library:

* ``bits`` is an int in ``[2, 16]`` (:func:`check_bits`, which :func:`quant_range` calls);
  a custom ``(quant_min, quant_max)`` may reach int32 (accumulators, biases).
* ``signed=None`` means signed codes for symmetric and unsigned codes for affine schemes
  (PyTorch's defaults: qint8 weights, quint8 activations); pass a bool to override.
* Device: results live on the device of the input tensors.
"""

from __future__ import annotations

import math

import torch

from .granularity import (PerAxis, PerChannel, PerGroup, PerTensor, _check_int,  # noqa: F401
                          check_granularity, qparams_shape, rows_to_qparams, to_rows)

__all__ = [
    "PerTensor", "PerChannel", "PerAxis", "PerGroup", "check_bits", "resolve_signed", "quant_range",
    "check_quant_range", "check_granularity", "check_tensor", "to_rows", "qparams_shape",
    "rows_to_qparams", "minmax", "choose_qparams", "choose_qparams_symmetric_qmax",
    "minmax_qparams", "qparams_for",
]

MIN_BITS, MAX_BITS = 2, 16


def check_bits(bits, name: str = "bits") -> int:
    """The one rule for code widths: ``bits`` is an int (not a bool) in ``[2, 16]``.

    1 bit gives only two codes, and affine quantization spends one of them on the
    zero_point, so it cannot represent both signs (binary networks use ``sign(x)``);
    above 16 bits float is cheaper. Returns ``bits``; raises TypeError/ValueError.
    """
    _check_int(bits, name)
    if not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(
            f"{name} must be in [{MIN_BITS}, {MAX_BITS}], got {bits}: 1 bit gives only two codes, and "
            "affine quantization spends one of them on the zero_point, so it cannot represent "
            "both signs (binary networks use sign(x) instead); above 16 bits float is cheaper"
        )
    return bits


def resolve_signed(signed, symmetric) -> bool:
    """The one default: ``signed=None`` -> signed when ``symmetric``, unsigned when affine."""
    if signed is not None and not isinstance(signed, bool):
        raise TypeError(f"signed must be True, False or None, got {signed!r}")
    if not isinstance(symmetric, bool):
        raise TypeError(f"symmetric must be True or False, got {symmetric!r}")
    return symmetric if signed is None else signed


def quant_range(bits: int, signed: bool = True, narrow: bool = False) -> tuple[int, int]:
    """The integer range ``(quant_min, quant_max)`` of a ``bits``-bit code.

    signed: ``(-2**(bits-1), 2**(bits-1) - 1)``, e.g. ``(-128, 127)``;
    unsigned: ``(0, 2**bits - 1)``, e.g. ``(0, 255)``.
    ``narrow=True`` (signed only) drops the lone most negative code: ``(-127, 127)``,
    the symmetric "restricted range" of TensorRT and TFLite weights.
    ``bits`` follows :func:`check_bits` (2..16).
    """
    check_bits(bits)
    if not isinstance(signed, bool) or not isinstance(narrow, bool):
        raise TypeError(f"signed and narrow must be True or False, got {signed!r}, {narrow!r}")
    if narrow and not signed:
        raise ValueError("narrow=True is a signed-range convention; use signed=True")
    if signed:
        return -(2 ** (bits - 1)) + int(narrow), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def check_quant_range(quant_min: int, quant_max: int) -> None:
    """Raise unless ``quant_min < quant_max`` are ints (codes are integers) within int32.

    Ranges from :func:`quant_range` have at most 16 bits; wider custom ranges (int32 bias
    or accumulator codes) are allowed, and ``quantize`` computes them exactly in float64.
    """
    _check_int(quant_min, "quant_min"), _check_int(quant_max, "quant_max")
    if quant_min >= quant_max:
        raise ValueError(f"quant_min must be < quant_max, got ({quant_min}, {quant_max})")
    if quant_min < -(2**31) or quant_max > 2**31 - 1:
        raise ValueError(f"({quant_min}, {quant_max}) does not fit in int32 codes")


def check_tensor(x, name: str = "x", floating: bool = True) -> None:
    """Raise unless ``x`` is a non-empty tensor (floating and finite if ``floating``)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)}): nothing to quantize")
    if floating:
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
        if not torch.isfinite(x).all():
            raise ValueError(f"{name} contains NaN or infinite values")



def _rows_minmax(x: torch.Tensor, granularity):
    """``(rows, min_val, max_val)``: float32 rows of ``x`` and their qparams-shaped extremes."""
    check_tensor(x)
    rows = to_rows(x.detach().to(torch.float32), granularity)
    lo, hi = torch.aminmax(rows, dim=1)
    return rows, rows_to_qparams(lo, x.shape, granularity), rows_to_qparams(hi, x.shape, granularity)


def minmax(x: torch.Tensor, granularity=PerTensor()) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-granularity ``(min_val, max_val)`` of ``x`` (float32, :func:`qparams_shape`)."""
    return _rows_minmax(x, granularity)[1:]


def _symmetric_zero_point(quant_min: int, quant_max: int) -> int:
    # PyTorch: 0 for signed dtypes; 128 for its built-in quint8 (0, 255) and 2**15 for
    # uint16 (0, 65535); the rounded-down midpoint for custom unsigned ranges.
    if quant_min < 0:
        return 0
    return {(0, 255): 128, (0, 65535): 2**15}.get((quant_min, quant_max), (quant_min + quant_max) // 2)


def _min_max_tensors(min_val, max_val):
    """Float32 tensors on one device (the tensor argument's); Python numbers are accepted."""
    device = next((v.device for v in (max_val, min_val) if isinstance(v, torch.Tensor)), None)
    out = []
    for name, v in (("min_val", min_val), ("max_val", max_val)):
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            v = torch.tensor(float(v), device=device)
        check_tensor(v, name)
        out.append(v.detach().to(device=device, dtype=torch.float32))
    min_val, max_val = out
    if min_val.shape != max_val.shape:
        raise ValueError(f"min_val {tuple(min_val.shape)} and max_val {tuple(max_val.shape)} differ in shape")
    if (min_val > max_val).any():
        raise ValueError("min_val must be <= max_val (elementwise)")
    return min_val, max_val


def _check_eps(eps) -> None:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"eps must be a float, got {type(eps).__name__}")
    if not 0 < eps < math.inf:
        raise ValueError(f"eps must be > 0 and finite, got {eps}")


def choose_qparams(min_val, max_val, quant_min: int, quant_max: int, symmetric: bool = False,
                   eps: float = torch.finfo(torch.float32).eps) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, zero_point)`` mapping ``[min_val, max_val]`` onto ``[quant_min, quant_max]``.

    ``min_val``/``max_val``: tensors of one shape, 0-d (per-tensor), 1-D (per-channel) or
    grouped (per-group); the formulas (module docstring) apply elementwise.
    Returns ``scale`` float32 and ``zero_point`` int64, of that same shape. Equal bit for
    bit to PyTorch's observers (which return shape ``(1,)`` for per-tensor and an int32
    zero_point for affine schemes). One documented difference: for a *custom* unsigned
    range ``(0, 255)`` PyTorch's symmetric zero_point is 127; qlib gives 128 for (0, 255)
    always, as PyTorch does for its default quint8.
    """
    min_val, max_val = _min_max_tensors(min_val, max_val)
    check_quant_range(quant_min, quant_max)
    if not quant_min <= 0 <= quant_max:
        raise ValueError(f"the range ({quant_min}, {quant_max}) must contain 0 so that 0.0 is exact")
    if not isinstance(symmetric, bool):
        raise TypeError(f"symmetric must be True or False, got {symmetric!r}")
    _check_eps(eps)
    eps_t = torch.tensor(eps, dtype=torch.float32, device=min_val.device)
    min_neg = torch.minimum(min_val, torch.zeros_like(min_val))
    max_pos = torch.maximum(max_val, torch.zeros_like(max_val))
    if symmetric:
        scale = torch.maximum(-min_neg, max_pos) / (float(quant_max - quant_min) / 2)
        scale = torch.maximum(scale, eps_t)
        zero_point = torch.full_like(scale, _symmetric_zero_point(quant_min, quant_max), dtype=torch.int64)
    else:
        scale = torch.maximum((max_pos - min_neg) / float(quant_max - quant_min), eps_t)
        zero_point = affine_zero_point(min_neg, scale, quant_min, quant_max)
    return scale, zero_point


def affine_zero_point(min_neg: torch.Tensor, scale: torch.Tensor, quant_min: int, quant_max: int) -> torch.Tensor:
    """``clamp(quant_min - round(min_neg / scale), quant_min, quant_max)`` as int64.

    The code that ``min_neg`` (the range's minimum, at most 0) maps to is ``quant_min``; the
    zero point is where real 0.0 lands. ``round`` is half to even, as in PyTorch's observers.
    """
    zero_point = quant_min - torch.round(min_neg / scale).to(torch.int64)
    return torch.clamp(zero_point, quant_min, quant_max)


def choose_qparams_symmetric_qmax(min_val, max_val, quant_max: int,
                                  eps: float = torch.finfo(torch.float32).eps):
    """Teaching variant: symmetric scale with the ``quant_max`` divisor (127, not 127.5).

    ``scale = max(|min_val|, |max_val|) / quant_max``, ``zero_point = 0``: the TensorRT /
    TFLite convention, used with the narrow range ``quant_range(bits, narrow=True)``.
    The largest magnitude maps to the code ``quant_max``; PyTorch's ``/ 127.5`` maps it to
    the edge ``127.5`` between codes, using all 256 codes (-128 included) instead.
    """
    min_val, max_val = _min_max_tensors(min_val, max_val)
    _check_int(quant_max, "quant_max")
    if quant_max < 1:
        raise ValueError(f"quant_max must be >= 1 (the largest positive code), got {quant_max}")
    check_quant_range(-quant_max, quant_max)
    _check_eps(eps)
    scale = torch.maximum(min_val.abs(), max_val.abs()) / float(quant_max)
    scale = torch.maximum(scale, torch.tensor(eps, dtype=torch.float32, device=scale.device))
    return scale, torch.zeros_like(scale, dtype=torch.int64)


def minmax_qparams(x: torch.Tensor, quant_min: int, quant_max: int, symmetric: bool = False,
                   granularity=PerTensor()) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max ``(scale, zero_point)`` of ``x`` for the range ``[quant_min, quant_max]``.

    ``choose_qparams(*minmax(x, granularity), quant_min, quant_max, symmetric)``: the one
    place where "min-max qparams of a tensor" is computed (weights at every forward in
    fake-quant modules, QAT's clip ratio, :func:`qparams_for`).
    """
    min_val, max_val = minmax(x, granularity)
    return choose_qparams(min_val, max_val, quant_min, quant_max, symmetric=symmetric)


def qparams_for(x: torch.Tensor, bits: int = 8, symmetric: bool = False,
                granularity=PerTensor(), signed: bool | None = None):
    """Min-max ``(scale, zero_point)`` for tensor ``x`` in one call.

    ``signed=None`` means signed codes for symmetric and unsigned for affine
    (:func:`resolve_signed`: PyTorch's defaults, qint8 weights, quint8 activations).
    Shapes: PerTensor ``()``; PerChannel(axis) ``(x.shape[axis],)``; PerGroup(group_size,
    axis) the shape of ``x`` with ``x.shape[axis]`` replaced by ``x.shape[axis] // group_size``.
    Pair it with ``quant_range(bits, signed)`` to quantize.
    """
    quant_min, quant_max = quant_range(bits, resolve_signed(signed, symmetric))
    return minmax_qparams(x, quant_min, quant_max, symmetric, granularity)
