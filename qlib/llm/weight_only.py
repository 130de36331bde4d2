"""Weight-only int4 / int3 with groups: round-to-nearest (RTN), the baseline of GPTQ and AWQ.

LLM inference at batch 1 is limited by reading the weights from memory, not by arithmetic, so
storing ``W`` in 4 bits (and dequantizing on the fly to multiply with float activations) makes
it up to 4x faster and smaller while the activations stay in float. Four bits give only 16
levels, so one scale per output channel is too coarse: each row of ``W`` (``(out, in)``) is cut
into groups of ``group_size`` consecutive input channels (32, 64, 128), each with its own
``scale`` and ``zero_point`` (``PerGroup(group_size)``; qparams of shape ``(out, in // g)``).

The convention is torchao's ``choose_qparams_affine`` + ``quantize_affine`` with an integer
zero point (``ZeroPointDomain.INT``), which is also PyTorch's and qlib's (``qparams``):

- symmetric: signed codes ``[-2**(b-1), 2**(b-1) - 1]``,
  ``scale = max(|min|, |max|) / ((qmax - qmin) / 2)``, ``zero_point = 0``;
- asymmetric: unsigned codes ``[0, 2**b - 1]``, ``scale = (max_pos - min_neg) / (qmax - qmin)``,
  ``zero_point = clamp(qmin - round(min_neg / scale), qmin, qmax)``;
- ``x_q = clamp(round(x * (1 / scale)) + zero_point, qmin, qmax)``,
  ``x_dq = (x_q - zero_point) * scale`` (round half to even; min and max taken over the group,
  widened to include 0).

``group_size=None`` means one group per row (per-channel). Size: ``model_size_bytes`` counts
``bits`` per weight plus a float16 scale (and, asymmetric, an 8-bit zero point) per group.
"""

from __future__ import annotations

import torch
from torch import nn

from ..granularity import PerGroup
from ..qparams import quant_range, qparams_for
from ..quantize import dequantize, quantize
from .layers import FakeQuantWeightLinear, linear_layers, replace_linears

GROUP_SIZES = (32, 64, 128)


def weight_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """``(quant_min, quant_max)``: signed for symmetric, unsigned for asymmetric (torchao's)."""
    if bits not in (2, 3, 4, 5, 6, 7, 8):
        raise ValueError(f"bits must be an int in 2..8 for weight-only quantization, got {bits!r}")
    return quant_range(bits, signed=symmetric)


def group_width(w: torch.Tensor, group_size: int | None) -> int:
    """The number of columns per group of the ``(out, in)`` weight ``w`` (``None``: all ``in``)."""
    if not isinstance(w, torch.Tensor) or not w.is_floating_point() or w.dim() != 2:
        raise TypeError("w must be a floating-point (out, in) weight matrix")
    g = w.shape[1] if group_size is None else group_size
    if not isinstance(g, int) or g < 1 or w.shape[1] % g:
        raise ValueError(f"group_size must divide in_features {w.shape[1]}, got {group_size!r}")
    return g


def group_qparams(w: torch.Tensor, bits: int = 4, group_size: int | None = 128,
                  symmetric: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max ``(scale, zero_point)`` per group, each of shape ``(out, in // group_size)``."""
    g = group_width(w, group_size)
    weight_range(bits, symmetric)
    return qparams_for(w, bits, symmetric, PerGroup(g), signed=symmetric)


def quantize_groups(w: torch.Tensor, bits: int = 4, group_size: int | None = 128,
                    symmetric: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(w_q, scale, zero_point)``: integer codes of ``w`` (shape ``(out, in)``) and qparams."""
    g = group_width(w, group_size)
    scale, zp = group_qparams(w, bits, g, symmetric)
    qmin, qmax = weight_range(bits, symmetric)
    return quantize(w, scale, zp, qmin, qmax, axis=-1, group_size=g), scale, zp


def dequantize_groups(w_q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                      group_size: int | None = 128) -> torch.Tensor:
    """``(w_q - zero_point) * scale`` with one qparam per group (float32)."""
    g = w_q.shape[1] if group_size is None else group_size
    return dequantize(w_q, scale, zero_point, axis=-1, group_size=g)


def fake_quantize_groups(w: torch.Tensor, bits: int = 4, group_size: int | None = 128,
                         symmetric: bool = False) -> torch.Tensor:
    """Round-to-nearest quantize-dequantize of ``w`` in groups (the RTN baseline)."""
    w_q, scale, zp = quantize_groups(w, bits, group_size, symmetric)
    return dequantize_groups(w_q, scale, zp, group_width(w, group_size)).to(w.dtype)


def quantize_model(model: nn.Module, bits: int = 4, group_size: int | None = 128,
                   symmetric: bool = False) -> nn.Module:
    """RTN: a copy of ``model`` whose block linears hold group-quantized weights."""
    weight_range(bits, symmetric)
    info = {"bits": bits, "group_size": group_size, "symmetric": symmetric}
    return replace_linears(model, lambda name, layer: FakeQuantWeightLinear(
        fake_quantize_groups(layer.weight.detach(), bits, group_size, symmetric), layer.bias, info))


def model_size_bytes(model: nn.Module, bits: int | None = None, group_size: int | None = 128,
                     symmetric: bool = False) -> int:
    """Bytes to store ``model`` with its block-linear weights in ``bits`` (``None``: float32).

    Quantized weights: ``bits`` per element, a float16 scale per group and, asymmetric, an
    8-bit zero point per group. Everything else (embeddings, head, LayerNorms, biases): float32.
    """
    total = sum(p.numel() for p in model.parameters()) * 4
    if bits is None:
        return total
    for layer in linear_layers(model).values():
        out_f, in_f = layer.weight.shape
        groups = out_f * (in_f // (in_f if group_size is None else group_size))
        total -= layer.weight.numel() * 4
        total += (layer.weight.numel() * bits + 7) // 8 + groups * (2 if symmetric else 3)
    return total
