"""W8A8: int8 weights *and* int8 activations, per-tensor vs per-token / per-channel.

An int8 matmul computes ``Y = X W^T`` as ``(X_q W_q^T) * s_x * s_w`` with ``X_q W_q^T`` summed
exactly in int32. For that to work the scales must factor out of the sum over the input
channels ``j``: ``s_x`` may depend on the token ``t`` (a row of ``X``) and ``s_w`` on the output
channel ``o`` (a row of ``W``), never on ``j``. So the granularities that run on int8 hardware:

- per-tensor activations, *dynamic* (``act="tensor"``): one ``s_x = max |X| / 127.5`` for the
  whole ``X``, recomputed at every call (a reduction over ``X`` before the matmul);
- per-tensor activations, *static* (``act="static"``): one ``s_x`` fixed once from
  calibration data, ``s_x = max_calib |X| / 127`` (codes ``[-127, 127]``: the calibrated range
  ``[-max, max]`` is exactly the representable one). Nothing is computed at run time, which
  is what integer engines (TensorRT, ONNX Runtime's QDQ models) and SmoothQuant's O3 setting
  run; an input beyond the calibrated range is *clipped* to ``+-127 s_x``, not rescaled;
- per-token activations: ``s_x[t] = max_j |X[t, j]| / 127.5``, computed at run time;
- per-tensor weights or per-channel weights ``s_w[o] = max_j |W[o, j]| / 127.5``.

Dynamic and weight scales: symmetric signed codes ``[-128, 127]`` with PyTorch's convention (``qparams.choose_qparams``,
``symmetric=True``: ``scale = absmax / 127.5``), so the fake quantization below is bit for bit
``torch.fake_quantize_per_tensor_affine`` / ``..._per_channel_affine``. In float32 the
simulation is exact: every product of two codes and their sum over at most 512 channels is an
integer below ``2**24``.

The static scale uses the ``127`` divisor of SmoothQuant's code and of TensorRT's symmetric
int8 (restricted range ``[-127, 127]``); it is still bit for bit
``torch.fake_quantize_per_tensor_affine(x, s_x, 0, -127, 127)``.

``W8A8Linear`` holds the fake-quantized weight and quantizes its input at every call;
``quantize_model(model, act="tensor" | "token" | "static", weight="tensor" | "channel",
tokens=...)`` swaps every block linear (``act="static"`` calibrates each layer's ``s_x`` on
``tokens`` with ``static_scales``). Shapes: ``X`` ``(..., in)``, ``W`` ``(out, in)``;
dtype/device follow the inputs.
"""

from __future__ import annotations

import torch
from torch import nn

from ..granularity import PerChannel, PerTensor
from ..qparams import minmax_qparams
from ..quantize import fake_quantize
from .layers import capture_inputs, replace_linears

QMIN, QMAX = -128, 127
STATIC_QMAX = 127                     # static activations: codes [-127, 127], scale = absmax / 127
ACT = ("tensor", "token", "static")
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


def static_scale(x_calib: torch.Tensor) -> torch.Tensor:
    """The static per-tensor activation scale ``max |x_calib| / 127`` (0-d, on ``x_calib``'s device).

    ``x_calib``: what the layer reads on calibration data, any shape. The scale is float32 (the
    dtype of PyTorch's qparams) and at least ``1e-8`` so an all-zero calibration stays finite.
    """
    if not isinstance(x_calib, torch.Tensor) or not x_calib.is_floating_point():
        raise TypeError("x_calib must be a floating-point tensor of calibration activations")
    if x_calib.numel() == 0:
        raise ValueError("x_calib is empty: a static scale needs calibration activations")
    if not torch.isfinite(x_calib).all():
        raise ValueError("x_calib holds NaN or infinite values")
    absmax = x_calib.detach().abs().max().float()
    return torch.clamp(absmax / STATIC_QMAX, min=1e-8)


def fake_quantize_static(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``clamp(round(x / scale), -127, 127) * scale`` with a fixed ``scale`` (no run-time max).

    Values beyond ``127 * scale`` (the calibrated absmax) are clipped to it. Bit for bit
    ``torch.fake_quantize_per_tensor_affine(x, scale, 0, -127, 127)``.
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError("x must be a floating-point tensor")
    scale = torch.as_tensor(scale, dtype=torch.float32, device=x.device)
    if scale.numel() != 1 or not bool(scale > 0):
        raise ValueError(f"a static scale must be one positive number, got {scale}")
    return fake_quantize(x, scale.reshape(()), torch.zeros((), dtype=torch.int64, device=x.device),
                         -STATIC_QMAX, STATIC_QMAX)


class W8A8Linear(nn.Module):
    """``y = fq(x) @ fq(W)^T + b``: int8 weight stored, input quantized at every call.

    ``act="tensor"``/``"token"``: dynamic scales from ``x`` itself; ``act="static"``: the fixed
    ``act_scale`` (a buffer, from ``static_scale`` on calibration inputs; required then).
    """

    def __init__(self, linear: nn.Linear, act: str = "token", weight: str = "channel",
                 act_scale: torch.Tensor | None = None):
        super().__init__()
        _check(act, ACT, "activation")
        _check(weight, WEIGHT, "weight")
        if (act == "static") != (act_scale is not None):
            raise ValueError("act='static' needs act_scale (w8a8.static_scale of calibration inputs), "
                             "and only it takes one")
        self.act, self.weight_granularity = act, weight
        self.weight = nn.Parameter(fake_quantize_int8(linear.weight.detach(), weight), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(),
                                                                  requires_grad=False)
        scale = None if act_scale is None else torch.as_tensor(act_scale, dtype=torch.float32,
                                                               device=linear.weight.device).reshape(())
        self.register_buffer("act_scale", scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_q = fake_quantize_static(x, self.act_scale) if self.act == "static" else fake_quantize_int8(x, self.act)
        return nn.functional.linear(x_q, self.weight, self.bias)

    def extra_repr(self) -> str:
        static = "" if self.act_scale is None else f", act_scale={self.act_scale.item():.4g}"
        return f"act={self.act}, weight={self.weight_granularity}{static}"


def static_scales(model: nn.Module, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{layer name: static_scale(X)}`` of every block linear's input on calibration ``tokens``."""
    return {name: static_scale(x) for name, x in capture_inputs(model, tokens).items()}


def quantize_model(model: nn.Module, act: str = "token", weight: str = "channel",
                   tokens: torch.Tensor | None = None) -> nn.Module:
    """A copy of ``model`` with every block linear a ``W8A8Linear(act, weight)``.

    ``act="static"`` needs calibration ``tokens`` (``(batch, T)`` int64 windows): each layer's
    scale is ``max |X| / 127`` of what it reads in the float ``model`` on them.
    """
    _check(act, ACT, "activation")
    _check(weight, WEIGHT, "weight")
    if act == "static":
        if tokens is None:
            raise ValueError("act='static' needs calibration tokens to fix the activation scales")
        scales = static_scales(model, tokens)
        return replace_linears(model, lambda name, layer: W8A8Linear(layer, act, weight, scales[name]))
    return replace_linears(model, lambda name, layer: W8A8Linear(layer, act, weight))


__all__ = ["fake_quantize_int8", "fake_quantize_static", "static_scale", "static_scales", "W8A8Linear",
           "quantize_model", "PerTensor"]
