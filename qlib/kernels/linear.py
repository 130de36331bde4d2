"""``Int8Linear``: a W8A8 linear layer on int8 kernels (per-channel weights, per-token activations).

``Int8Linear.from_float(linear)`` quantizes the weight ``W (out, in)`` once, one scale per
output channel (``weight_scale (out,)``, symmetric, zero_point 0, codes in
``[quant_min, quant_max] = [-127, 127]``):

    weight_scale[n] = max(absmax(W[n, :]) / 127, eps),  weight_q = round(W / weight_scale)

At run time ``forward(x)`` for ``x (..., in)`` in float16, bfloat16 or float32:

1. ``x_q, x_scale = quantize_per_token(x.reshape(-1, in))``: one scale per token (dynamic);
2. ``y = int8_matmul_scaled(x_q, weight_q.T, x_scale, weight_scale, bias, out_dtype=x.dtype)``:
   the int8 GEMM with the dequantizing epilogue ``acc * x_scale[:, None] * weight_scale[None, :] + bias``.

So ``y ~= x @ W.T + bias``, with two rounding errors: the weights' (fixed) and the
activations' (per token). This is the W8A8 scheme of LLM.int8 (without its outlier split)
and SmoothQuant. The backend follows ``dispatch.choose_backend``: Triton kernels on a GPU of
compute capability 8.0 or later, ``torch._int_mm`` and PyTorch elsewhere. Buffers move with
``.to(device)``; the bias is kept in float32.
"""

from __future__ import annotations

import torch
from torch import nn

from ..qparams import choose_qparams_symmetric_qmax
from ..quantize import quantize
from .dispatch import int8_matmul_scaled, quantize_per_token
from .reference import OUT_DTYPES, QUANT_MAX, QUANT_MIN


class Int8Linear(nn.Module):
    """W8A8 linear layer; build it with ``Int8Linear.from_float(nn.Linear)``."""

    def __init__(self, weight_q: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None = None,
                 backend: str | None = None):
        super().__init__()
        if not isinstance(weight_q, torch.Tensor) or weight_q.dtype != torch.int8 or weight_q.dim() != 2:
            raise TypeError(f"weight_q must be a 2-D int8 tensor (out, in), got "
                            f"{getattr(weight_q, 'dtype', type(weight_q).__name__)}")
        out_features, in_features = weight_q.shape
        if not isinstance(weight_scale, torch.Tensor) or weight_scale.shape != (out_features,):
            raise ValueError(f"weight_scale must have shape ({out_features},), got "
                             f"{tuple(getattr(weight_scale, 'shape', ()))}")
        if bias is not None and bias.shape != (out_features,):
            raise ValueError(f"bias must have shape ({out_features},), got {tuple(bias.shape)}")
        self.in_features, self.out_features = in_features, out_features
        self.quant_min, self.quant_max = QUANT_MIN, QUANT_MAX
        self.backend = backend
        self.register_buffer("weight_q", weight_q)
        self.register_buffer("weight_scale", weight_scale.to(torch.float32))
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.float32))

    @property
    def zero_point(self) -> torch.Tensor:
        """Symmetric quantization: all zero points are 0."""
        return torch.zeros_like(self.weight_scale, dtype=torch.int64)

    @classmethod
    def from_float(cls, linear: nn.Linear, backend: str | None = None) -> "Int8Linear":
        """Per-channel symmetric int8 copy of ``linear`` (its float weights are left unchanged)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_float expects an nn.Linear, got {type(linear).__name__}")
        w = linear.weight.detach().to(torch.float32)
        if not torch.isfinite(w).all():
            raise ValueError("the linear layer's weight contains NaN or infinite values")
        scale, zero_point = choose_qparams_symmetric_qmax(w.amin(dim=1), w.amax(dim=1), QUANT_MAX)
        weight_q = quantize(w, scale, zero_point, QUANT_MIN, QUANT_MAX, axis=0, dtype=torch.int8)
        return cls(weight_q, scale, linear.bias, backend=backend)

    def dequantized_weight(self) -> torch.Tensor:
        """``weight_q * weight_scale[:, None]`` in float32: the weight this layer really uses."""
        return self.weight_q.to(torch.float32) * self.weight_scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dtype not in OUT_DTYPES:
            raise TypeError(f"Int8Linear expects a float16, bfloat16 or float32 tensor, got "
                            f"{getattr(x, 'dtype', type(x).__name__)}")
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"expected input (..., {self.in_features}), got shape {tuple(x.shape)}")
        rows = x.reshape(-1, self.in_features)
        quant_backend = "triton" if self.backend == "triton" else (None if self.backend is None else "torch")
        x_q, x_scale = quantize_per_token(rows.contiguous(), backend=quant_backend)
        y = int8_matmul_scaled(x_q, self.weight_q.t(), x_scale, self.weight_scale, self.bias,
                               out_dtype=x.dtype, backend=self.backend)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"quant_min={self.quant_min}, quant_max={self.quant_max}, backend={self.backend or 'auto'}")
