"""Pick the backend of an exact int8 x int8 -> int32 matrix product, and say which and why.

The product ``C = A @ B`` of int8 ``A (M, K)`` and int8 ``B (K, N)`` accumulates in int32:
each term is at most ``128 * 128 = 2**14`` in magnitude, so the sum is exact while
``K * 2**14 <= 2**31 - 1``, that is ``K <= MAX_K = 131071``; larger K is rejected.

Backends (``BACKENDS``):

- ``"triton"``: qlib's Triton kernel (``gemm.py``). Chosen on a CUDA GPU whose Triton has an
  int8 ``tl.dot`` (compute capability 8.0, Ampere, and later), and on the CPU only when the
  user set ``TRITON_INTERPRET=1`` (the interpreter is exact but slow).
- ``"int_mm"``: ``torch._int_mm``, PyTorch's own int8 GEMM (cuBLAS on CUDA, oneDNN on x86
  CPUs); about fp32 speed on this course's CPU. Chosen on the CPU and on older GPUs such as
  Colab's T4 (sm75: no int8 ``tl.dot`` in Triton); on CUDA it needs ``M > 16`` and ``K``,
  ``N`` multiples of 8.
- ``"int32"``: ``a.int() @ b.int()``, exact where PyTorch has an int32 matmul (the CPU).
- ``"float64"``: the product in float64, exact while ``|C| < 2**53`` (always, for int8 and
  ``K <= MAX_K``); the fallback on CUDA shapes ``_int_mm`` refuses.

``choose_backend(a, b)`` returns the name as a ``BackendChoice`` (a ``str``) whose ``reason``
says why. ``int8_matmul_scaled`` is the W8A8 product with its dequantizing epilogue (fused in
the Triton kernel, a separate float32 step elsewhere); ``quantize_per_token`` quantizes
activations per row (a Triton kernel where the GEMM runs in Triton, PyTorch elsewhere).
"""

from __future__ import annotations

import torch

from .reference import check_epilogue_args, quantize_per_token_reference, scaled_epilogue_reference
from .triton_runtime import triton_status

BACKENDS = ("triton", "int_mm", "int32", "float64")
MAX_K = (2**31 - 1) // (128 * 128)


class BackendChoice(str):
    """A backend name (compares equal to the plain string) with the ``reason`` it was chosen."""

    reason: str

    def __new__(cls, name: str, reason: str):
        obj = super().__new__(cls, name)
        obj.reason = reason
        return obj

    def explain(self) -> str:
        return f"{str(self)}: {self.reason}"


def _check(a: torch.Tensor, b: torch.Tensor) -> None:
    for name, t in (("a", a), ("b", b)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype != torch.int8:
            raise TypeError(f"{name} must be int8, got {t.dtype}")
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
    if a.shape[1] != b.shape[0]:
        raise ValueError(f"inner dimensions differ: a is {tuple(a.shape)}, b is {tuple(b.shape)}")
    if a.device != b.device:
        raise ValueError(f"a and b are on different devices: {a.device} and {b.device}")
    if a.shape[1] > MAX_K:
        raise ValueError(f"K={a.shape[1]} can overflow the int32 accumulator (at most {MAX_K})")


def _int_mm_problem(a: torch.Tensor, b: torch.Tensor) -> str | None:
    """Why ``torch._int_mm`` cannot take these tensors, or None when it can."""
    if not hasattr(torch, "_int_mm"):
        return f"torch {torch.__version__} has no torch._int_mm"
    m, k = a.shape
    n = b.shape[1]
    if m == 0 or k == 0 or n == 0:
        return "an empty dimension"
    if a.device.type == "cuda" and not (m > 16 and k % 8 == 0 and n % 8 == 0):
        return f"on CUDA it needs M > 16 and K, N multiples of 8 (got M={m}, K={k}, N={n})"
    if a.device.type not in ("cuda", "cpu"):
        return f"no int8 GEMM on {a.device.type}"
    return None


def choose_backend(a: torch.Tensor, b: torch.Tensor) -> BackendChoice:
    """The backend ``int8_matmul`` uses for these tensors; ``.reason`` says why."""
    _check(a, b)
    ok, why_triton = triton_status(a.device)
    if ok:
        return BackendChoice("triton", why_triton)
    int_mm_no = _int_mm_problem(a, b)
    if int_mm_no is None:
        return BackendChoice("int_mm", f"torch._int_mm runs on {a.device.type} (Triton not used: {why_triton})")
    if a.device.type == "cpu":
        return BackendChoice("int32", f"torch._int_mm cannot: {int_mm_no}; int32 matmul is exact on the CPU")
    return BackendChoice("float64", f"Triton not used ({why_triton}) and torch._int_mm cannot ({int_mm_no}); "
                                    "float64 is exact for int8 products")


def _resolve(a, b, backend):
    if backend is None:
        return choose_backend(a, b)
    _check(a, b)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def int8_matmul(a: torch.Tensor, b: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """Exact ``a @ b`` of int8 ``a (M, K)`` and ``b (K, N)`` as int32 ``(M, N)``, on their device."""
    chosen = _resolve(a, b, backend)
    if chosen == "triton":
        from .gemm import triton_int8_matmul  # imports Triton (interpreter without CUDA)

        return triton_int8_matmul(a, b)
    if chosen == "int_mm":
        problem = _int_mm_problem(a, b)
        if problem is not None:  # asked for explicitly on shapes it refuses
            raise ValueError(f"backend 'int_mm' cannot multiply these tensors: {problem}")
        # a row-major; b row-major or column-major (a transposed (N, K) weight: no copy, and
        # on this CPU 4x faster than a contiguous copy of it)
        b_ok = b.is_contiguous() or b.t().is_contiguous()
        return torch._int_mm(a.contiguous(), b if b_ok else b.contiguous())
    if chosen == "int32":
        return a.int() @ b.int()
    return (a.double() @ b.double()).to(torch.int32)


def int8_matmul_scaled(a: torch.Tensor, b: torch.Tensor, row_scale: torch.Tensor, col_scale: torch.Tensor,
                       bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float32,
                       backend: str | None = None) -> torch.Tensor:
    """W8A8 product ``(a @ b) * row_scale[:, None] * col_scale[None, :] (+ bias)`` in ``out_dtype``.

    ``a (M, K)``, ``b (K, N)`` int8; ``row_scale (M,)``, ``col_scale (N,)``, ``bias (N,)``
    float32 on the same device. With the Triton backend the epilogue is fused into the GEMM;
    otherwise it follows ``int8_matmul`` (``reference.scaled_epilogue_reference``). Both
    compute in float32 in the same order and round once to ``out_dtype``.
    """
    chosen = _resolve(a, b, backend)
    check_epilogue_args(a.shape[0], b.shape[1], row_scale, col_scale, bias, out_dtype, a.device)
    if chosen == "triton":
        from .gemm import triton_int8_matmul_scaled

        return triton_int8_matmul_scaled(a, b, row_scale, col_scale, bias, out_dtype)
    acc = int8_matmul(a, b, backend=chosen)
    return scaled_epilogue_reference(acc, row_scale, col_scale, bias, out_dtype)


def quantize_per_token(x: torch.Tensor, backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric int8 codes of float ``x (M, K)``: ``(x_q int8, row_scale float32 (M,))``.

    ``backend="triton"`` (the default where ``triton_status`` allows it) runs the Triton
    kernel; any other backend runs the PyTorch reference. Both give the same bits.
    """
    if backend is None:
        backend = "triton" if triton_status(getattr(x, "device", "cpu"))[0] else "torch"
    if backend not in ("triton", "torch"):
        raise ValueError(f"backend must be 'triton' or 'torch', got {backend!r}")
    if backend == "triton":
        from .quantize_kernel import triton_quantize_per_token

        return triton_quantize_per_token(x)
    return quantize_per_token_reference(x)
