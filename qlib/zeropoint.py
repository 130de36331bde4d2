"""The zero-point expansion: an affine integer layer as one plain integer GEMM plus cheap terms.

An affine-quantized linear layer (Jacob et al. 2018, sec. 2.3, eq. 7-8) must compute, for
input codes ``x_q (M, K)`` with zero point ``z_x`` and weight codes ``w_q (N, K)`` with zero
point ``z_w`` (a scalar, or one per output channel)::

    acc[m, n] = sum_k (x_q[m, k] - z_x) * (w_q[n, k] - z_w[n]) + b_q[n]

Subtracting the zero points inside the sum widens every operand (``x_q - z_x`` of a uint8 code
needs 9 bits), so the hardware's 8-bit multiply-add units cannot be used, and the
subtractions cost ``2 M N K`` operations. Multiplying out::

    acc = sum_k x_q w_q  -  z_w[n] * sum_k x_q[m, k]  -  z_x * sum_k w_q[n, k]  +  K z_x z_w[n]  +  b_q[n]
          -----------     -----------------------      --------------------------------------------------
          one GEMM on     one row sum per input row,   weights only: computed once, offline,
          the raw codes   M K adds (0 when z_w = 0)    folded into one int32 constant per channel

The ``M N K`` multiply-adds run on the raw 8-bit codes; what the zero points cost at run time
is ``O(M K + M N)``, not ``O(M N K)``. With symmetric weights (``z_w = 0``) the row sums vanish
too: one GEMM plus one constant vector, which is why integer engines want symmetric weights.
``qlib.intops`` uses this expansion around its int8 kernels; this module lays it out step by
step for teaching, with ``direct_accumulate`` (the sum as written, in int64) as its reference.

Shapes: ``x_q (..., K)``, ``w_q (N, K)`` (the layout of ``nn.Linear.weight``), ``w_zp`` an int
or ``(N,)``, ``bias_q`` None or ``(N,)``; results are int64 holding the int32 accumulator,
on ``x_q``'s device. Codes of any integer dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .requant import _check_int32, _int_tensor, _require_int

__all__ = ["ZeroPointTerms", "precompute", "expanded_accumulate", "direct_accumulate", "operation_counts"]


def _check_codes(x_q, w_q) -> None:
    for name, t in (("x_q", x_q), ("w_q", w_q)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of integer codes, got {type(t).__name__}")
        _require_int(t, name)
    if x_q.dim() < 1 or w_q.dim() != 2 or x_q.shape[-1] != w_q.shape[1]:
        raise ValueError(f"expected x_q (..., K) and w_q (N, K), got {tuple(x_q.shape)} and {tuple(w_q.shape)}")


def _int64(t, device):
    """int64 for a CPU integer matmul; float64 on CUDA, which has no int64 matmul (exact while
    every partial sum stays below 2**53, far above the int32 accumulators checked here)."""
    return t.to(torch.int64) if device.type == "cpu" else t.to(torch.float64)


@dataclass(frozen=True)
class ZeroPointTerms:
    """What a converter computes once per layer from the weights alone.

    ``w_q``: the codes (the GEMM's right operand); ``w_zp``: int64 ``(N,)``; ``x_zp``: int;
    ``constant``: int64 ``(N,)`` = ``b_q - z_x * sum_k w_q + K * z_x * z_w`` (one int32 each).
    """

    w_q: torch.Tensor
    w_zp: torch.Tensor
    x_zp: int
    constant: torch.Tensor


def precompute(w_q: torch.Tensor, w_zp=0, x_zp: int = 0, bias_q=None) -> ZeroPointTerms:
    """The weights-only terms of the expansion (module docstring), checked to fit in int32."""
    if not isinstance(w_q, torch.Tensor) or w_q.dim() != 2:
        raise TypeError(f"w_q must be a 2-D tensor of integer codes (N, K), got {getattr(w_q, 'shape', type(w_q))}")
    _require_int(w_q, "w_q")
    n, k = w_q.shape
    zw = _int_tensor(w_zp, "w_zp", w_q.device).reshape(-1).expand(n)
    if isinstance(x_zp, bool) or not isinstance(x_zp, int):
        x_zp = int(_int_tensor(x_zp, "x_zp"))
    col_sum = w_q.to(torch.int64).sum(1)                                   # sum_k w_q[n, k]
    constant = k * x_zp * zw - x_zp * col_sum
    if bias_q is not None:
        constant = constant + _int_tensor(bias_q, "bias_q", w_q.device).reshape(n)
    return ZeroPointTerms(w_q, zw.clone(), x_zp, _check_int32(constant, "precomputed constant"))


def expanded_accumulate(x_q: torch.Tensor, terms: ZeroPointTerms) -> torch.Tensor:
    """``acc (..., N)`` from one GEMM on the raw codes, the input row sums and the constant.

    Steps, as an integer engine runs them: ``core = x_q @ w_q.T`` (the only ``M N K`` part),
    ``row = sum_k x_q`` (only if some ``z_w != 0``), ``acc = core - z_w * row + constant``.
    Every intermediate is checked to fit in int32.
    """
    if not isinstance(terms, ZeroPointTerms):
        raise TypeError(f"terms must come from precompute(), got {type(terms).__name__}")
    _check_codes(x_q, terms.w_q)
    dev = x_q.device
    core = torch.matmul(_int64(x_q, dev), _int64(terms.w_q.to(dev), dev).T).to(torch.int64)
    _check_int32(core, "x_q @ w_q.T")
    acc = core + terms.constant.to(dev)
    if bool((terms.w_zp != 0).any()):
        row = x_q.to(torch.int64).sum(-1, keepdim=True)                    # sum_k x_q[m, k]
        acc = acc - row * terms.w_zp.to(dev)
    return _check_int32(acc, "accumulator")


def direct_accumulate(x_q: torch.Tensor, w_q: torch.Tensor, x_zp=0, w_zp=0, bias_q=None) -> torch.Tensor:
    """The reference: ``sum_k (x_q - z_x)(w_q - z_w) + b_q`` exactly as written, in int64."""
    _check_codes(x_q, w_q)
    dev = x_q.device
    x = x_q.to(torch.int64) - _int_tensor(x_zp, "x_zp", dev)
    w = w_q.to(dev).to(torch.int64) - _int_tensor(w_zp, "w_zp", dev).reshape(-1, 1)
    acc = torch.matmul(_int64(x, dev), _int64(w, dev).T).to(torch.int64)
    if bias_q is not None:
        acc = acc + _int_tensor(bias_q, "bias_q", dev)
    return acc


def operation_counts(m: int, k: int, n: int, weight_zero_point: bool = True) -> dict[str, int]:
    """Integer operations of an ``(m, k) x (k, n)`` layer, written directly vs expanded.

    - ``multiply_adds``: ``m n k``, in both forms (on 9-bit operands directly, 8-bit expanded);
    - ``direct_zero_point_ops``: ``2 m n k`` subtractions inside the inner loop;
    - ``expanded_runtime_ops``: ``m k`` adds (row sums) and ``m n`` multiply-adds for
      ``z_w * row`` when ``weight_zero_point``, plus ``m n`` adds of the constant;
    - ``expanded_offline_ops``: ``n k`` adds (weight sums) and ``2 n`` for the constant, once.
    """
    for name, v in (("m", m), ("k", k), ("n", n)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    runtime = m * n + ((m * k + m * n) if weight_zero_point else 0)
    return {"multiply_adds": m * n * k, "direct_zero_point_ops": 2 * m * n * k,
            "expanded_runtime_ops": runtime, "expanded_offline_ops": n * k + 2 * n}
