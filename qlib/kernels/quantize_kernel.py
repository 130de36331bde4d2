"""Row-wise (per-token) symmetric int8 quantization in Triton.

One program instance per row ``m`` of ``x (M, K)``:

1. pass 1 over the row in blocks of ``BLOCK`` columns: ``absmax = max |x[m, :]|``;
2. ``scale = max(absmax / 127, eps)`` (float32 division, correctly rounded: ``div_rn``);
3. pass 2: ``x_q = clamp(round_half_even(x * (1 / scale)), -127, 127)`` stored as int8,
   ``scale`` stored in ``row_scale[m]``.

It equals ``reference.quantize_per_token_reference`` (qlib's ``choose_qparams_symmetric_qmax``
and ``quantize``) bit for bit. Rounding uses the float32 "magic number" ``1.5 * 2**23``:
for ``|v| < 2**22``, ``(v + 12582912.0) - 12582912.0`` is ``v`` rounded half to even, because
the sum has no bits below 1 and the hardware rounds the addition to nearest even. Here
``|v| <= 127.5``. Kernels launch with ``enable_fp_fusion=False`` so that ``x * inv + magic``
is not fused into one multiply-add (which would round only once).

Why per token: the activations of a transformer differ by orders of magnitude from one token
to the next; one scale per row keeps each token's resolution. The scale is computed on the
fly (dynamic quantization), so this kernel runs before every int8 GEMM.
"""

from __future__ import annotations

import torch

from .reference import QUANT_MAX, check_float_2d
from .triton_runtime import check_kernel_device, load_triton

triton, tl = load_triton()

EPS = float(torch.finfo(torch.float32).eps)


@triton.jit
def quantize_per_token_kernel(x_ptr, q_ptr, scale_ptr, K, stride_xm, stride_xk, stride_qm, stride_qk,
                              QMAX: tl.constexpr, EPS: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    absmax = tl.zeros((BLOCK,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK):
        cols = k0 + offs
        x = tl.load(x_ptr + row * stride_xm + cols * stride_xk, mask=cols < K, other=0.0).to(tl.float32)
        absmax = tl.maximum(absmax, tl.abs(x))
    scale = tl.maximum(tl.math.div_rn(tl.max(absmax, axis=0), QMAX * 1.0), EPS)
    inv_scale = tl.math.div_rn(1.0, scale)
    for k0 in range(0, K, BLOCK):
        cols = k0 + offs
        x = tl.load(x_ptr + row * stride_xm + cols * stride_xk, mask=cols < K, other=0.0).to(tl.float32)
        v = x * inv_scale
        v = (v + 12582912.0) - 12582912.0  # round half to even
        v = tl.minimum(tl.maximum(v, -QMAX * 1.0), QMAX * 1.0)
        tl.store(q_ptr + row * stride_qm + cols * stride_qk, v.to(tl.int8), mask=cols < K)
    tl.store(scale_ptr + row, scale)


def triton_quantize_per_token(x: torch.Tensor, block: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_q int8 (M, K), row_scale float32 (M,))`` of float ``x (M, K)``, on ``x``'s device."""
    check_float_2d(x)
    check_kernel_device(x, "x")
    m, k = x.shape
    if k == 0:
        raise ValueError("x has no columns: a row of zero features has no absmax")
    if block is None:
        block = min(1024, triton.next_power_of_2(k))
    if block < 1 or block & (block - 1):
        raise ValueError(f"block must be a power of two, got {block}")
    x_q = torch.empty(m, k, dtype=torch.int8, device=x.device)
    scale = torch.empty(m, dtype=torch.float32, device=x.device)
    if m:
        quantize_per_token_kernel[(m,)](x, x_q, scale, k, *x.stride(), *x_q.stride(),
                                        QMAX=QUANT_MAX, EPS=EPS, BLOCK=block, enable_fp_fusion=False)
    return x_q, scale
