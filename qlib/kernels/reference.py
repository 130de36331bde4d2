"""PyTorch references for the int8 kernels: per-token quantization and the dequantizing epilogue.

W8A8 inference of a linear layer ``y = x @ W.T + bias`` (LLM.int8, SmoothQuant) in three steps:

1. **per-token activation quantization**: each row ``x[m, :]`` (one token) gets its own scale
   ``row_scale[m] = max(absmax(x[m, :]) / 127, eps)`` and codes
   ``x_q[m, k] = clamp(round_half_even(x[m, k] * (1 / row_scale[m])), -127, 127)`` (int8);
2. **the int8 GEMM** ``acc = x_q @ W_q.T`` accumulated in int32 (``dispatch.int8_matmul``);
   ``W_q`` has one scale per output channel, ``col_scale[n]`` (per-channel weights);
3. **the epilogue** ``y[m, n] = acc[m, n] * row_scale[m] * col_scale[n] (+ bias[n])``,
   computed in float32 (``(acc * row_scale) * col_scale + bias``, in that order) and
   rounded once to the output dtype (float16, bfloat16 or float32).

Both scale conventions are qlib's: ``choose_qparams_symmetric_qmax`` (divisor 127, the
narrow range ``quant_range(8, narrow=True) = (-127, 127)``, zero_point 0) and
``quantize`` (float32 reciprocal, then multiply, ties to even). The Triton kernels
(``gemm.py``, ``quantize_kernel.py``) equal these references bit for bit in the interpreter.

Shapes: ``x (M, K)`` float; ``x_q (M, K)`` int8; ``row_scale (M,)``, ``col_scale (N,)``,
``bias (N,)`` float32; ``acc (M, N)`` int32; output ``(M, N)`` in ``out_dtype``.
"""

from __future__ import annotations

import torch

from ..qparams import choose_qparams_symmetric_qmax, quant_range
from ..quantize import quantize

QUANT_MIN, QUANT_MAX = quant_range(8, narrow=True)
"""Codes of per-token activations and per-channel weights: the symmetric range (-127, 127)."""
OUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_float_2d(x, name: str = "x") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in OUT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16 or float32, got {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D (tokens, features), got shape {tuple(x.shape)}")
    if x.numel() and not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or infinite values")


def quantize_per_token_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric int8 codes of ``x (M, K)``: ``(x_q int8 (M, K), row_scale float32 (M,))``."""
    check_float_2d(x)
    x = x.to(torch.float32)
    if x.shape[1] == 0:
        raise ValueError("x has no columns: a row of zero features has no absmax")
    scale, zero_point = choose_qparams_symmetric_qmax(x.amin(dim=1), x.amax(dim=1), QUANT_MAX)
    x_q = quantize(x, scale, zero_point, QUANT_MIN, QUANT_MAX, axis=0, dtype=torch.int8)
    return x_q, scale


def check_epilogue_args(m: int, n: int, row_scale, col_scale, bias, out_dtype, device) -> None:
    """Scales and bias: float32 vectors of the right length on the GEMM's device."""
    for name, t, length in (("row_scale", row_scale, m), ("col_scale", col_scale, n), ("bias", bias, n)):
        if t is None and name == "bias":
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype != torch.float32:
            raise TypeError(f"{name} must be float32, got {t.dtype}")
        if t.shape != (length,):
            raise ValueError(f"{name} must have shape ({length},), got {tuple(t.shape)}")
        if t.device != device:
            raise ValueError(f"{name} is on {t.device}, the int8 operands on {device}")
    if out_dtype not in OUT_DTYPES:
        raise TypeError(f"out_dtype must be one of {OUT_DTYPES}, got {out_dtype!r}")


def scaled_epilogue_reference(acc: torch.Tensor, row_scale: torch.Tensor, col_scale: torch.Tensor,
                              bias: torch.Tensor | None = None,
                              out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``((acc * row_scale[:, None]) * col_scale[None, :] + bias[None, :]).to(out_dtype)`` in float32."""
    if not isinstance(acc, torch.Tensor) or acc.dtype != torch.int32 or acc.dim() != 2:
        raise TypeError(f"acc must be a 2-D int32 tensor, got {getattr(acc, 'dtype', type(acc).__name__)}")
    check_epilogue_args(acc.shape[0], acc.shape[1], row_scale, col_scale, bias, out_dtype, acc.device)
    out = acc.to(torch.float32) * row_scale[:, None] * col_scale[None, :]
    if bias is not None:
        out = out + bias[None, :]
    return out.to(out_dtype)


def scaled_matmul_float64(a: torch.Tensor, b: torch.Tensor, row_scale, col_scale, bias=None) -> torch.Tensor:
    """The exact real-number result, for tests: every step in float64."""
    out = (a.double() @ b.double()) * row_scale.double()[:, None] * col_scale.double()[None, :]
    return out if bias is None else out + bias.double()[None, :]
