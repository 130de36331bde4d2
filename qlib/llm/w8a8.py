"""W8A8: int8 weights *and* int8 activations, per-tensor vs per-token / per-channel.

An int8 matmul computes ``Y = X W^T`` as ``(X_q W_q^T) * s_x * s_w`` with ``X_q W_q^T`` summed
exactly in int32. For that to work the scales must factor out of the sum over the input
channels ``j``: ``s_x`` may depend on the token ``t`` (a row of ``X``) and ``s_w`` on the output
channel ``o`` (a row of ``W``), never on ``j``. So the granularities that run on int8 hardware:

- per-tensor activations: one ``s_x`` for the whole ``X`` (static or, here, dynamic);
- per-token activations: ``s_x[t] = max_j |X[t, j]| / 127.5``, computed at run time;
- per-tensor weights or per-channel weights ``s_w[o] = max_j |W[o, j]| / 127.5``.

Symmetric signed codes ``[-128, 127]`` with PyTorch's convention (``qparams.choose_qparams``,
``symmetric=True``: ``scale = absmax / 127.5``), so the fake quantization below is bit for bit
``torch.fake_quantize_per_tensor_affine`` / ``..._per_channel_affine``. In float32 the
simulation is exact: every product of two codes and their sum over at most 512 channels is an
integer below ``2**24``.

``W8A8Linear`` holds the fake-quantized weight and quantizes its input at every call;
``quantize_model(model, act="tensor" | "token", weight="tensor" | "channel")`` swaps every block
linear. Shapes: ``X`` ``(..., in)``, ``W`` ``(out, in)``; dtype/device follow the inputs.
"""

from __future__ import annotations

import torch
from torch import nn

from ..granularity import PerChannel, PerTensor
from ..qparams import minmax_qparams
from ..quantize import fake_quantize
from .layers import replace_linears

QMIN, QMAX = -128, 127
ACT = ("tensor", "token")
WEIGHT = ("tensor", "channel")


def _check(kind: str, allowed: tuple[str, ...], what: str) -> None:
    if kind not in allowed:
        raise ValueError(f"{what} granularity must be one of {allowed}, got {kind!r}")


def fake_quantize_int8(x: torch.Tensor, granularity: str = "tensor") -> torch.Tensor:
    """Symmetric int8 quantize-dequantize of ``x``: one scale per tensor, or per row.

    ``granularity``: ``"tensor"``; ``"token"`` or ``"channel"`` (one scale per row of the 2-D
    view ``(-1, x.shape[-1])``: per token for activations, per output channel for ``W``).
    """
    if granularity not in ("tensor", "token", "channel"):
        raise ValueError(f"granularity must be 'tensor', 'token' or 'channel', got {granularity!r}")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError("x must be a floating-point tensor")
    if granularity == "tensor":
        scale, zp = minmax_qparams(x, QMIN, QMAX, symmetric=True)
        return fake_quantize(x, scale, zp, QMIN, QMAX)
    rows = x.reshape(-1, x.shape[-1])
    scale, zp = minmax_qparams(rows, QMIN, QMAX, symmetric=True, granularity=PerChannel(0))
    return fake_quantize(rows, scale, zp, QMIN, QMAX, axis=0).reshape(x.shape)


class W8A8Linear(nn.Module):
    """``y = fq(x) @ fq(W)^T + b``: int8 weight stored, input quantized dynamically."""

    def __init__(self, linear: nn.Linear, act: str = "token", weight: str = "channel"):
        super().__init__()
        _check(act, ACT, "activation")
        _check(weight, WEIGHT, "weight")
        self.act, self.weight_granularity = act, weight
        self.weight = nn.Parameter(fake_quantize_int8(linear.weight.detach(), weight), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(),
                                                                  requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(fake_quantize_int8(x, self.act), self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"act={self.act}, weight={self.weight_granularity}"


def quantize_model(model: nn.Module, act: str = "token", weight: str = "channel") -> nn.Module:
    """A copy of ``model`` with every block linear a ``W8A8Linear(act, weight)``."""
    _check(act, ACT, "activation")
    _check(weight, WEIGHT, "weight")
    return replace_linears(model, lambda name, layer: W8A8Linear(layer, act, weight))


__all__ = ["fake_quantize_int8", "W8A8Linear", "quantize_model", "PerTensor"]
