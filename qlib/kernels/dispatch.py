"""Pick the backend of an exact int8 x int8 -> int32 matrix product, and say which.

The product ``C = A @ B`` of int8 ``A (M, K)`` and int8 ``B (K, N)`` accumulates in int32:
each term is at most ``128 * 128 = 2**14`` in magnitude, so the sum is exact while
``K * 2**14 < 2**31``, that is ``K <= 131071``.

Backends, in the order they are tried:

- ``"int_mm"``: ``torch._int_mm``, PyTorch's own int8 GEMM (cuBLAS on CUDA, oneDNN on x86
  CPUs); it works on this course's CPU at about fp32 speed. On CUDA it requires
  ``M > 16`` and ``K``, ``N`` multiples of 8.
- ``"int32"``: ``a.int() @ b.int()``, exact everywhere PyTorch has an int32 matmul (the CPU).
- ``"float64"``: the product in float64, exact while ``|C| < 2**53`` (always, for int8 and
  ``K <= 131071``); the fallback on devices without an integer matmul.
"""

from __future__ import annotations

import torch

BACKENDS = ("int_mm", "int32", "float64")
MAX_K = (2**31 - 1) // (128 * 128)


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


def _int_mm_ok(a: torch.Tensor, b: torch.Tensor) -> bool:
    if not hasattr(torch, "_int_mm"):
        return False
    m, k = a.shape
    n = b.shape[1]
    if a.device.type == "cuda":
        return m > 16 and k % 8 == 0 and n % 8 == 0
    return a.device.type == "cpu" and m > 0 and k > 0 and n > 0


def choose_backend(a: torch.Tensor, b: torch.Tensor) -> str:
    """The backend ``int8_matmul`` uses for these tensors (one of ``BACKENDS``)."""
    _check(a, b)
    if _int_mm_ok(a, b):
        return "int_mm"
    if a.device.type == "cpu":
        return "int32"
    return "float64"


def int8_matmul(a: torch.Tensor, b: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """Exact ``a @ b`` of int8 ``a (M, K)`` and ``b (K, N)`` as int32 ``(M, N)``, on their device."""
    chosen = backend or choose_backend(a, b)
    if backend is not None:
        _check(a, b)
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if chosen == "int_mm":
        return torch._int_mm(a.contiguous(), b.contiguous())
    if chosen == "int32":
        return a.int() @ b.int()
    return (a.double() @ b.double()).to(torch.int32)
