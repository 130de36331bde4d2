"""PyTorch's own answers, the references the hidden checks of labs 01 and 04 compare with.

The course promises numerics bit for bit equal to PyTorch's kernels, so where PyTorch has
the operation, a check asks PyTorch rather than qlib:

- :func:`minmax_qparams`: ``torch.ao.quantization.MinMaxObserver`` (``calculate_qparams``),
  affine or symmetric, any width from 2 to 8 bits (a custom ``quant_min``/``quant_max``).
- :func:`fake_quantize`: ``torch.fake_quantize_per_tensor_affine`` (float32 values) and,
  with ``grad_output``, its straight-through gradient.
- :func:`int8_codes`: ``torch.quantize_per_tensor(...).int_repr()`` (8-bit codes only).
- :func:`lsq_scale_grad`: ``torch._fake_quantize_learnable_per_tensor_affine``, the kernel of
  ``torch.ao.quantization._LearnableFakeQuantize`` (LSQ): the gradient for the scale.

PyTorch warns that these APIs are deprecated; that is not the student's concern, so every
call here runs under :func:`qlib.check.core.quiet_deprecations`. Inputs are CPU or CUDA
float32 tensors; ``scale`` and ``zero_point`` are one-element tensors.
"""

from __future__ import annotations

import torch

from .core import quiet_deprecations
from ..qparams import quant_range

__all__ = ["minmax_qparams", "fake_quantize", "int8_codes", "lsq_scale_grad"]


def minmax_qparams(x: torch.Tensor, bits: int, signed: bool, symmetric: bool):
    """``(scale, zero_point)`` of a ``MinMaxObserver`` that has seen ``x``."""
    tq = torch.ao.quantization
    kwargs = {}
    if bits != 8:
        kwargs["quant_min"], kwargs["quant_max"] = quant_range(bits, signed)
    with quiet_deprecations():
        observer = tq.MinMaxObserver(dtype=torch.qint8 if signed else torch.quint8,
                                     qscheme=torch.per_tensor_symmetric if symmetric else torch.per_tensor_affine,
                                     **kwargs)
        observer(x)
        return observer.calculate_qparams()


def fake_quantize(x: torch.Tensor, scale, zero_point, quant_min: int, quant_max: int,
                  grad_output: torch.Tensor | None = None):
    """PyTorch's fake-quantized ``x``; with ``grad_output``: ``(values, d loss / d x)``."""
    zp = torch.as_tensor(zero_point).to(torch.int32)
    if grad_output is None:
        with quiet_deprecations():
            return torch.fake_quantize_per_tensor_affine(x, scale.item(), int(zp), quant_min, quant_max)
    xr = x.detach().clone().requires_grad_(True)
    with quiet_deprecations():
        y = torch.fake_quantize_per_tensor_affine(xr, scale, zp, quant_min, quant_max)
    y.backward(grad_output)
    return y.detach(), xr.grad


def int8_codes(x: torch.Tensor, scale, zero_point, signed: bool) -> torch.Tensor:
    """8-bit codes from ``torch.quantize_per_tensor`` (``qint8`` or ``quint8``), as int64."""
    dtype = torch.qint8 if signed else torch.quint8
    with quiet_deprecations():
        return torch.quantize_per_tensor(x, scale.item(), int(zero_point), dtype).int_repr().to(torch.int64)


def lsq_scale_grad(x, scale, zero_point, quant_min, quant_max, grad_output, grad_factor) -> torch.Tensor:
    """The LSQ gradient for the (single) scale, as a 0-d tensor; the zero point is learned too
    (a float that the kernel rounds and clamps)."""
    s = scale.detach().clone().reshape(1).requires_grad_(True)
    z = zero_point.detach().clone().to(torch.float32).reshape(1).requires_grad_(True)
    with quiet_deprecations():
        y = torch._fake_quantize_learnable_per_tensor_affine(x.detach(), s, z, quant_min, quant_max, grad_factor)
    y.backward(grad_output)
    return s.grad.reshape(())
