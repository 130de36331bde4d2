"""The int8 x int8 -> int32 GEMM in Triton, with a fused dequantizing epilogue.

Importing this module loads Triton (``triton_runtime.load_triton``: the CPU interpreter when
there is no CUDA GPU), so ``qlib.kernels`` imports it only when a Triton backend is used.

**The programming model.** A Triton kernel is written for *one program instance*; the
launch grid says how many run. Here program ``pid`` owns one output tile
``C[m0:m0+BLOCK_M, n0:n0+BLOCK_N]``:

- ``offs_m = pid_m * BLOCK_M + arange(BLOCK_M)``, ``offs_n`` likewise: the tile's rows and
  columns; ``a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak`` is a
  ``(BLOCK_M, BLOCK_K)`` block of *pointers* (pointer arithmetic with strides, so any
  layout, transposed views included, works without a copy);
- the **K-loop** walks the shared dimension in steps of ``BLOCK_K``, loads one block of
  ``A`` and one of ``B`` and accumulates ``acc += tl.dot(a, b)`` in **int32**;
- **masks** make shapes that are not multiples of the blocks safe: a load with
  ``mask=offs < size, other=0`` reads zeros past the edge (zeros add nothing to the dot
  product), a store with a mask writes only the valid part of the tile;
- the **epilogue** runs on the tile while it is still in registers:
  ``out = acc * row_scale[:, None] * col_scale[None, :] (+ bias)`` in float32, rounded once
  to the output dtype. Fusing it saves writing the int32 ``C`` to memory and reading it back
  (4 bytes per element each way) just to dequantize it.

**Exactness.** Each product of two int8 codes is at most ``128 * 128 = 2**14`` in size, so
the int32 accumulator is exact while ``K * 2**14 <= 2**31 - 1``, i.e. ``K <= 131071``
(``dispatch.MAX_K``); ``dispatch._check`` rejects larger K. The epilogue equals
``reference.scaled_epilogue_reference`` bit for bit in the interpreter; on the GPU, kernels
launch with ``enable_fp_fusion=False`` so that no fused multiply-add changes the rounding,
and the float32 -> bfloat16 rounding is done on the bits (round to nearest even, PyTorch's
rule), because Triton 3.8's interpreter truncates in that conversion.

**Program order.** The 1-D grid is mapped to tiles in groups of ``GROUP_M`` rows of tiles
(the "grouped ordering" of Triton's matmul tutorial): programs that run at the same time
share rows of ``A`` and columns of ``B`` in the L2 cache.

**Block sizes** are powers of two (``tl.arange`` needs them). On the GPU ``tl.dot`` needs
blocks of at least 16 and an int8 tensor-core GPU (sm80+); several configurations are tried
by ``triton.autotune`` there (the winner is in ``last_config()``). In the interpreter a
single small configuration is used: autotuning with several configs does not run there.
"""

from __future__ import annotations

import torch

from .reference import check_epilogue_args
from .triton_runtime import check_kernel_device, interpreting, load_triton

triton, tl = load_triton()

GPU_CONFIGS = [
    # (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages): int8 tiles for sm80/sm90
    (128, 256, 128, 8, 8, 3),
    (256, 128, 128, 8, 8, 3),
    (128, 128, 128, 8, 4, 4),
    (128, 128, 64, 8, 4, 4),
    (64, 128, 128, 8, 4, 4),
    (64, 64, 128, 8, 4, 3),
]


def _pow2(n: int, lo: int, hi: int) -> int:
    p = 1
    while p < n:
        p *= 2
    return max(lo, min(hi, p))


def interpreter_blocks(m: int, n: int, k: int) -> dict:
    """Small power-of-two blocks for the interpreter (16 to 32 rows/columns, up to 64 of K)."""
    return {"BLOCK_M": _pow2(m, 16, 32), "BLOCK_N": _pow2(n, 16, 32), "BLOCK_K": _pow2(k, 16, 64), "GROUP_M": 4}


@triton.jit
def int8_gemm_kernel(a_ptr, b_ptr, c_ptr, row_scale_ptr, col_scale_ptr, bias_ptr,
                     M, N, K, stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
                     EPILOGUE: tl.constexpr, HAS_BIAS: tl.constexpr, OUT_BF16: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     GROUP_M: tl.constexpr):
    # which tile: grouped ordering of the 1-D program id
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    in_group = GROUP_M * num_pid_n
    first_m = (pid // in_group) * GROUP_M
    group_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % group_m
    pid_n = (pid % in_group) // group_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k0
        a = tl.load(a_ptrs, mask=(offs_m[:, None] < M) & k_ok[None, :], other=0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & (offs_n[None, :] < N), other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    c_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if EPILOGUE:
        row_scale = tl.load(row_scale_ptr + offs_m, mask=offs_m < M, other=0.0)
        col_scale = tl.load(col_scale_ptr + offs_n, mask=offs_n < N, other=0.0)
        out = acc.to(tl.float32) * row_scale[:, None] * col_scale[None, :]
        if HAS_BIAS:
            out = out + tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0)[None, :]
        if OUT_BF16:  # round to nearest even on the bits, as PyTorch does (the interpreter's cast truncates)
            bits = out.to(tl.uint32, bitcast=True)
            bits = ((bits + (0x7FFF + ((bits >> 16) & 1))) >> 16) << 16
            out = bits.to(tl.float32, bitcast=True)
        tl.store(c_ptrs, out.to(c_ptr.dtype.element_ty), mask=c_mask)
    else:
        tl.store(c_ptrs, acc, mask=c_mask)


if not interpreting():
    _autotuned = triton.autotune(
        configs=[triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": g},
                               num_warps=w, num_stages=s) for bm, bn, bk, g, w, s in GPU_CONFIGS],
        key=["M", "N", "K", "EPILOGUE"])(int8_gemm_kernel)
else:
    _autotuned = None


def last_config() -> dict | None:
    """The block configuration autotuning picked last (GPU only; None in the interpreter)."""
    cfg = getattr(_autotuned, "best_config", None)
    if cfg is None:
        return None
    return {**cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}


def _launch(a, b, c, row_scale, col_scale, bias, epilogue: bool, blocks: dict | None):
    m, k = a.shape
    n = b.shape[1]
    check_kernel_device(a, "a")
    if m == 0 or n == 0:
        return c
    dummy = c  # unused pointer arguments (their branch is compiled out)
    args = (a, b, c, row_scale if epilogue else dummy, col_scale if epilogue else dummy,
            bias if bias is not None else dummy, m, n, k, *a.stride(), *b.stride(), *c.stride())
    flags = {"EPILOGUE": epilogue, "HAS_BIAS": bias is not None, "OUT_BF16": c.dtype == torch.bfloat16}
    if blocks is None and _autotuned is not None:
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
        _autotuned[grid](*args, **flags, enable_fp_fusion=False)
        return c
    blocks = {**interpreter_blocks(m, n, k), **(blocks or {})}
    for name in ("BLOCK_M", "BLOCK_N", "BLOCK_K"):
        v = blocks[name]
        if v < 16 or v & (v - 1):
            raise ValueError(f"{name} must be a power of two >= 16 (tl.dot's smallest tile), got {v}")
    grid = (triton.cdiv(m, blocks["BLOCK_M"]) * triton.cdiv(n, blocks["BLOCK_N"]),)
    int8_gemm_kernel[grid](*args, **flags, **blocks, enable_fp_fusion=False)
    return c


def triton_int8_matmul(a: torch.Tensor, b: torch.Tensor, blocks: dict | None = None) -> torch.Tensor:
    """Exact int32 ``a @ b`` of int8 ``a (M, K)``, ``b (K, N)`` with the Triton kernel.

    ``blocks``: optional ``{"BLOCK_M": 16, "BLOCK_N": 32, ...}`` overriding the configuration
    (powers of two >= 16). Inputs are checked by ``dispatch.int8_matmul``; call that instead.
    """
    c = torch.empty(a.shape[0], b.shape[1], dtype=torch.int32, device=a.device)
    if a.shape[1] == 0:
        return c.zero_()
    return _launch(a, b, c, None, None, None, False, blocks)


def triton_int8_matmul_scaled(a, b, row_scale, col_scale, bias=None, out_dtype=torch.float32,
                              blocks: dict | None = None) -> torch.Tensor:
    """``(a @ b) * row_scale[:, None] * col_scale[None, :] (+ bias)`` fused, in ``out_dtype``."""
    check_epilogue_args(a.shape[0], b.shape[1], row_scale, col_scale, bias, out_dtype, a.device)
    c = torch.empty(a.shape[0], b.shape[1], dtype=out_dtype, device=a.device)
    if a.shape[1] == 0:
        a, b = torch.zeros(a.shape[0], 1, dtype=torch.int8, device=a.device), torch.zeros(
            1, b.shape[1], dtype=torch.int8, device=a.device)
    return _launch(a, b, c, row_scale.contiguous(), col_scale.contiguous(),
                   None if bias is None else bias.contiguous(), True, blocks)
