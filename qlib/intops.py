"""Integer products: int8 x int8 -> int32 matmul and convolution, with zero points.

This is the arithmetic of Jacob et al. 2018 ("Quantization and Training of Neural Networks
for Efficient Integer-Arithmetic-Only Inference"). With input codes ``x_q`` (zero point
``z_x``) and weight codes ``w_q`` (``z_w``), a quantized layer accumulates in int32::

    acc = sum_k (x_q - z_x) * (w_q - z_w) + b_q

and ``qlib.requant`` turns ``acc`` into the next layer's codes. Two implementations, giving
the same integers (``backend=``):

- ``"reference"``: the teaching version. Codes are widened to int64, the zero points
  subtracted, and every value a real int32 kernel would hold is checked to fit in int32
  (``K * max|x - z_x| * max|w - z_w| < 2**31``, else OverflowError).
- a kernel backend (``None`` picks one; or a name of ``qlib.kernels.BACKENDS``): the product
  runs on int8 codes through ``qlib.kernels.int8_matmul`` (``torch._int_mm``: oneDNN on the
  CPU, cuBLAS on CUDA). uint8 activations do not fit int8, so their codes are shifted by 128
  (``x8 = x_q - 128``, a flip of the top bit) and the zero points with them
  (``z' = z - offset``); the zero points are then taken out *after* the int8 product with the
  expansion of Jacob et al. (sec. 2.3, eq. 7-8)::

      sum_k (x8 - z_x') (w8 - z_w') = sum_k x8 w8  -  z_w' sum_k x8  -  z_x' sum_k w8  +  K z_x' z_w'
                                      int8 GEMM      row sums         (weights only: precomputed, folded into the bias)

  With symmetric weights (``z_w' = 0``) the row sums vanish and the layer is one int8 GEMM
  plus one int32 vector per output channel. The fast path runs only where a bound proves
  that int32 cannot overflow (``K * max|x - z_x| * max|w - z_w| + max|b| < 2**31`` over every
  possible code); elsewhere the reference runs and raises as it does.

Convolutions are matmuls over im2col patches (``Tensor.unfold``: views, no arithmetic);
a grouped one (``int_conv2d_grouped``: depthwise included) is one per group, or an exact
floating-point convolution where no int8 GEMM pays.
The fixed-point pieces (``quantize_multiplier``, ``requantize``...) live in ``qlib.requant``
and are re-exported here; ``IntLinear``/``IntConv2d`` live in ``qlib.intlayers``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .kernels import BACKENDS as KERNEL_BACKENDS
from .kernels import int8_matmul
from .requant import (INT32_MAX, INT32_MIN, _check_int32, _int_tensor, _require_int,  # noqa: F401
                      multiply_by_quantized_multiplier, quantize_multiplier, requantize, requantize_scaled,
                      rounding_divide_by_pot, saturating_rounding_doubling_high_mul)

__all__ = [
    "BACKENDS", "INT32_MIN", "INT32_MAX", "quantize_multiplier", "saturating_rounding_doubling_high_mul",
    "rounding_divide_by_pot", "multiply_by_quantized_multiplier", "requantize", "requantize_scaled",
    "int8_codes", "int_matmul", "im2col", "int_conv2d", "int_conv2d_grouped", "IntLinear", "IntConv2d",
]

BACKENDS = ("reference",) + tuple(KERNEL_BACKENDS)
_OFFSET = {torch.int8: 0, torch.uint8: 128}  # code dtypes the int8 kernels take (after the shift)


def _check_backend(backend) -> None:
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be None or one of {BACKENDS}, got {backend!r}")


def _check_codes(**tensors) -> None:
    """TypeError unless every argument is an integer tensor (codes), named as the caller names it."""
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        _require_int(t, name)


def int8_codes(q: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``(q - offset)`` as int8 and the ``offset``: 0 for int8 codes, 128 for uint8 codes.

    For uint8, ``q - 128`` is ``q`` with its top bit flipped, read as int8 (one cheap pass).
    """
    if q.dtype == torch.int8:
        return q, 0
    if q.dtype == torch.uint8:
        return torch.bitwise_xor(q.view(torch.int8), -128), 128
    raise TypeError(f"int8 kernels take int8 or uint8 codes, got {q.dtype}")


def _fast_ok(a: torch.Tensor, b: torch.Tensor, a_zp, b_zp, bias, backend) -> bool:
    """Whether the int8 kernels apply and int32 provably cannot overflow (else: the reference).

    With ``|x8|, |w8| <= 128``, every partial sum of the expansion is at most
    ``K * (128 + |z_x'|) * (128 + |z_w'|) + max|b|``; that also bounds the reference's own
    check ``K * max|x - z_x| * max|w - z_w|``, so where this holds the reference cannot raise.
    """
    if backend == "reference" or a.dtype not in _OFFSET or b.dtype not in _OFFSET:
        if backend not in (None, "reference"):
            raise TypeError(f"backend {backend!r} needs int8 or uint8 codes, got {a.dtype} and {b.dtype}; "
                            "use backend='reference' for wider codes")
        return False
    za_signed = int(a_zp) - _OFFSET[a.dtype]  # the padding code of a convolution: must fit int8
    za = abs(za_signed)
    zb = int((_int_tensor(b_zp, "b_zp") - _OFFSET[b.dtype]).abs().max())
    bound = b.shape[0] * (128 + za) * (128 + zb)
    if bias is not None and bias.numel():
        bound += int(bias.abs().max())
    ok = bound <= INT32_MAX and -128 <= za_signed <= 127
    if not ok and backend is not None:
        raise OverflowError(f"backend {backend!r}: int32 may overflow (bound {bound}); use backend='reference'")
    return ok


def _reference_matmul(a_q, b_q, a_zp, b_zp, bias) -> torch.Tensor:
    a = _int_tensor(a_q, "a_q")
    b = _int_tensor(b_q, "b_q", a.device)
    a, b = a - _int_tensor(a_zp, "a_zp", a.device), b - _int_tensor(b_zp, "b_zp", a.device)
    bound = b.shape[0] * a.abs().max().clamp(min=1) * b.abs().max().clamp(min=1)
    if a.numel() and b.numel() and bound > INT32_MAX:
        raise OverflowError(f"int32 accumulation may overflow: K * max|a| * max|b| = {int(bound)} >= 2**31")
    if a.device.type == "cpu":
        acc = torch.matmul(a, b)  # int64 holding int32 values (the bound above)
    else:  # no integer matmul on CUDA: float64 is exact, every partial sum is below the bound < 2**53
        acc = torch.matmul(a.double(), b.double()).to(torch.int64)
    if bias is not None:
        acc = _check_int32(acc + _int_tensor(bias, "bias", a.device), "accumulator + bias")
    return acc.to(torch.int32)


def _kernel_matmul(a: torch.Tensor, b: torch.Tensor, a_zp, b_zp, bias, backend) -> torch.Tensor:
    """The zero-point expansion around one int8 GEMM (``a (M, K)``, ``b (K, N)``; see the module docstring)."""
    a8, a_off = int8_codes(a)
    b8, b_off = int8_codes(b)
    za = int(a_zp) - a_off                                                 # z_x'
    zb = _int_tensor(b_zp, "b_zp", b.device) - b_off                       # z_w', () or (N,)
    acc = int8_matmul(a8, b8, backend if backend in KERNEL_BACKENDS else None)  # sum x8 w8, int32
    col = za * b8.sum(0, dtype=torch.int64) - b.shape[0] * za * zb         # weights only
    if bias is not None:
        col = _int_tensor(bias, "bias", b.device) - col                   # b_q - z_x' sum w8 + K z_x' z_w'
    else:
        col = -col
    acc = acc.add_(col.to(torch.int32))  # |every partial sum| <= the bound checked in _fast_ok
    if bool((zb != 0).any()):
        acc = acc.sub_(a8.sum(1, dtype=torch.int32)[:, None] * zb.to(torch.int32))
    return acc


def int_matmul(a_q: torch.Tensor, b_q: torch.Tensor, a_zp=0, b_zp=0, bias=None,
               backend: str | None = None) -> torch.Tensor:
    """``(a_q - a_zp) @ (b_q - b_zp) + bias`` with int32 accumulation: ``(..., K) @ (K, N) -> (..., N)`` int32.

    ``a_zp``: int; ``b_zp``: int or ``(N,)`` (one per column); ``bias``: None or int ``(N,)``.
    ``backend``: ``None`` (int8 kernels when both operands are int8/uint8 codes and int32
    provably cannot overflow, else the reference), ``"reference"`` (int64 emulation with
    int32 checks: OverflowError when ``K * max|a - a_zp| * max|b - b_zp| >= 2**31``, for
    8-bit codes K up to 2**15), or a kernel name (``qlib.kernels.BACKENDS``). All give the
    same integers.
    """
    _check_backend(backend)
    _check_codes(a_q=a_q, b_q=b_q)
    if a_q.dim() < 1 or b_q.dim() != 2 or a_q.shape[-1] != b_q.shape[0]:
        raise ValueError(f"expected a_q (..., K) and b_q (K, N), got {tuple(a_q.shape)} and {tuple(b_q.shape)}")
    if not _fast_ok(a_q, b_q, a_zp, b_zp, bias, backend):
        return _reference_matmul(a_q, b_q, a_zp, b_zp, bias)
    acc = _kernel_matmul(a_q.reshape(-1, a_q.shape[-1]), b_q, a_zp, b_zp, bias, backend)
    return acc.reshape(*a_q.shape[:-1], b_q.shape[1])


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def im2col(x: torch.Tensor, kernel_size, stride=1, padding=0, dilation=1, pad_value=0) -> torch.Tensor:
    """Patches of ``x (N, C, H, W)`` as rows: ``(N, H_out, W_out, C * kh * kw)``, any dtype.

    Padding with ``pad_value``, then ``Tensor.unfold`` views (no arithmetic, so integers stay
    exact); a dilated kernel takes every ``dilation``-th element of a wider window.
    """
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = map(_pair, (kernel_size, stride, padding, dilation))
    x = F.pad(x, (pw, pw, ph, ph), value=pad_value) if ph or pw else x
    span_h, span_w = dh * (kh - 1) + 1, dw * (kw - 1) + 1
    patches = x.unfold(2, span_h, sh).unfold(3, span_w, sw)[..., ::dh, ::dw]  # (N, C, H', W', kh, kw)
    n, c, h_out, w_out = patches.shape[:4]
    return patches.permute(0, 2, 3, 1, 4, 5).reshape(n, h_out, w_out, c * kh * kw)


def _patches_nhwc(x: torch.Tensor, kernel_size, stride, padding, dilation, pad_value) -> torch.Tensor:
    """im2col of channels-last ``x (N, H, W, C)``: ``(N, H_out, W_out, kh * kw * C)``, C fastest.

    The same patches as ``im2col``, columns in ``(kh, kw, C)`` order: copying runs of ``C``
    contiguous codes is much faster than ``im2col``'s runs of ``kw``.
    """
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = map(_pair, (kernel_size, stride, padding, dilation))
    x = F.pad(x, (0, 0, pw, pw, ph, ph), value=pad_value) if ph or pw else x
    patches = x.unfold(1, dh * (kh - 1) + 1, sh).unfold(2, dw * (kw - 1) + 1, sw)[..., ::dh, ::dw]
    n, h_out, w_out = patches.shape[:3]                                   # (N, H', W', C, kh, kw)
    return patches.permute(0, 1, 2, 4, 5, 3).reshape(n, h_out, w_out, -1)


def int_conv2d(x_q: torch.Tensor, w_q: torch.Tensor, x_zp=0, w_zp=0, stride=1, padding=0, dilation=1,
               bias=None, backend: str | None = None) -> torch.Tensor:
    """2-D convolution of codes as an integer matmul over im2col patches (groups = 1).

    ``x_q (N, C, H, W)``, ``w_q (C_out, C, kh, kw)`` -> int32 ``(N, C_out, H_out, W_out)``;
    ``bias``: None or int ``(C_out,)``. A convolution is a matmul: each output pixel is the
    dot product of one input patch (``C * kh * kw`` numbers) with each filter. The padding
    must be a real 0.0, which is the code ``x_zp``: the reference subtracts ``x_zp`` before
    padding with 0; the kernel path pads the codes with ``x_zp`` itself. ``backend``: as
    for ``int_matmul``. The result is the GEMM's ``(N, H', W', C_out)`` seen as
    ``(N, C_out, H', W')`` (channels-last memory: ``.contiguous()`` if you need NCHW memory).
    """
    _check_backend(backend)
    _check_codes(x_q=x_q, w_q=w_q)
    if x_q.dim() != 4 or w_q.dim() != 4 or x_q.shape[1] != w_q.shape[1]:
        raise ValueError(f"expected x_q (N, C, H, W) and w_q (C_out, C, kh, kw), "
                         f"got {tuple(x_q.shape)} and {tuple(w_q.shape)}")
    w2 = w_q.reshape(w_q.shape[0], -1).T  # (C * kh * kw, C_out)
    if _fast_ok(x_q, w2, x_zp, w_zp, bias, backend):
        x8, offset = int8_codes(x_q)
        cols = _patches_nhwc(x8.permute(0, 2, 3, 1), w_q.shape[2:], stride, padding, dilation,
                             pad_value=int(x_zp) - offset)
        w2 = w_q.permute(0, 2, 3, 1).reshape(w_q.shape[0], -1).T  # columns in (kh, kw, C) order
        acc = _kernel_matmul(cols.reshape(-1, cols.shape[-1]), w2, int(x_zp) - offset, w_zp, bias, backend)
        acc = acc.reshape(*cols.shape[:3], -1)
    else:
        x = _int_tensor(x_q, "x_q")
        cols = im2col(x - _int_tensor(x_zp, "x_zp", x.device), w_q.shape[2:], stride, padding, dilation)
        acc = _reference_matmul(cols, w2, 0, w_zp, bias)  # (N, H', W', C_out)
    return acc.permute(0, 3, 1, 2)


def _float32_exact(device: torch.device, bound: int, lo: int, hi: int, z_x: int) -> bool:
    """Whether a float32 convolution gives the exact integers: every number below ``2**24``
    (8-bit depthwise: ``9 * 255 * 128``), and full IEEE float32 arithmetic. Only on the CPU
    with oneDNN at its default precision: cuDNN rounds float32 convolutions to TF32 (10-bit
    mantissa) by default on Ampere and later, so CUDA takes float64."""
    precision = getattr(getattr(torch.backends.mkldnn, "conv", None), "fp32_precision", "none")  # torch >= 2.9
    return (device.type == "cpu" and precision in ("none", "ieee")
            and bound < 2**24 and max(abs(lo), abs(hi), abs(z_x)) < 2**24)


def int_conv2d_grouped(x_q: torch.Tensor, w_q: torch.Tensor, x_zp=0, w_zp=0, stride=1, padding=0, dilation=1,
                       groups: int = 1, bias=None, backend: str | None = None) -> torch.Tensor:
    """Grouped 2-D convolution of codes with int32 accumulation: ``qlib.intops.int_conv2d`` per group.

    ``x_q (N, C, H, W)``, ``w_q (C_out, C / G, kh, kw)``, ``G = groups`` dividing ``C`` and
    ``C_out`` -> int32 ``(N, C_out, H', W')``. Output channel ``o`` belongs to group
    ``g = o // (C_out / G)`` and sees only input channels ``g * C / G ... (g + 1) * C / G - 1``::

        acc[n, o, i, j] = sum_{c in group g, u, v} (x_q[n, c, .., ..] - x_zp) * (w_q[o, c', u, v] - w_zp[o]) + bias[o]

    The input zero point is one number (per-tensor activations); ``w_zp`` is an int or one per
    output channel, so each group takes its own slice of zero points and biases. Depthwise
    (``G = C``, ``w_q (C, 1, 3, 3)``): each output is a 9-term dot product of one channel.

    All backends give the same integers. ``backend``: a kernel name of ``qlib.kernels.BACKENDS``
    runs one ``int_conv2d`` (im2col + int8 GEMM) per group; ``"reference"`` forms the int64
    patches of every group at once (``im2col``) and multiplies them group by group (a batched
    int64 matmul); ``None`` runs ``F.conv2d(groups=G)`` on the zero-point-shifted codes in
    floating point, which is exact: every term and every partial sum is an integer of magnitude
    at most ``bound = K * max|x - x_zp| * max|w - w_zp| < 2**31`` (``K = C / G * kh * kw``,
    checked first: OverflowError otherwise), so float64 (53-bit significand) adds them without
    rounding, in any order; so does float32 (24 bits) when ``bound < 2**24``, which it then uses
    on the CPU (not on CUDA, where cuDNN computes float32 convolutions in TF32 by default). An
    int8 GEMM per group does not pay for depthwise layers: ``K = 9``, one output column.
    """
    _check_backend(backend)
    _check_codes(x_q=x_q, w_q=w_q)
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be an int >= 1, got {groups!r}")
    if (x_q.dim() != 4 or w_q.dim() != 4 or x_q.shape[1] != w_q.shape[1] * groups
            or w_q.shape[0] % groups):
        raise ValueError(f"expected x_q (N, C, H, W) and w_q (C_out, C / groups, kh, kw) with groups={groups} "
                         f"dividing C and C_out, got {tuple(x_q.shape)} and {tuple(w_q.shape)}")
    if groups == 1:
        return int_conv2d(x_q, w_q, x_zp, w_zp, stride, padding, dilation, bias, backend)
    c_out = w_q.shape[0]
    w_zp = _int_tensor(w_zp, "w_zp", w_q.device).reshape(-1).expand(c_out)
    bias = None if bias is None else _int_tensor(bias, "bias", w_q.device).reshape(-1).expand(c_out)
    if backend in KERNEL_BACKENDS:  # one int8 GEMM per group, as asked
        c_in_g, c_out_g = w_q.shape[1], c_out // groups
        parts = [int_conv2d(x_q[:, g * c_in_g:(g + 1) * c_in_g], w_q[g * c_out_g:(g + 1) * c_out_g], x_zp,
                            w_zp[g * c_out_g:(g + 1) * c_out_g], stride, padding, dilation,
                            None if bias is None else bias[g * c_out_g:(g + 1) * c_out_g], backend)
                 for g in range(groups)]
        return torch.cat(parts, dim=1)
    z_x = int(_int_tensor(x_zp, "x_zp"))
    w = _int_tensor(w_q, "w_q") - w_zp.reshape(-1, 1, 1, 1)
    k = w[0].numel()
    bound, lo, hi = 0, 0, 0
    if x_q.numel() and w.numel():
        lo, hi = (int(v) for v in torch.aminmax(x_q))
        bound = k * max(abs(hi - z_x), abs(lo - z_x)) * int(w.abs().max())
    if bound > INT32_MAX:
        raise OverflowError(f"int32 accumulation may overflow: K * max|x - x_zp| * max|w - w_zp| "
                            f"= {bound} >= 2**31")
    if backend == "reference":  # int64 patches (N, H', W', G, K) times the filters (G, C_out / G, K)
        cols = im2col(_int_tensor(x_q, "x_q") - z_x, w.shape[2:], stride, padding, dilation)
        cols = cols.reshape(*cols.shape[:3], groups, k)
        filters = w.reshape(groups, c_out // groups, k)
        if x_q.device.type == "cpu":
            acc = torch.einsum("nhwgk,gok->nhwgo", cols, filters)
        else:  # no integer matmul on CUDA: float64 is exact here (the bound above)
            acc = torch.einsum("nhwgk,gok->nhwgo", cols.double(), filters.double()).to(torch.int64)
        acc = acc.reshape(*acc.shape[:3], c_out).permute(0, 3, 1, 2)
    else:
        dtype = torch.float32 if _float32_exact(x_q.device, bound, lo, hi, z_x) else torch.float64
        acc = F.conv2d(x_q.to(dtype) - z_x, w.to(dtype), None, stride, padding, dilation, groups).to(torch.int64)
    if bias is not None:
        acc = acc + bias.reshape(-1, 1, 1)
    return _check_int32(acc, "accumulator + bias").to(torch.int32)


def __getattr__(name: str):
    """``IntLinear``/``IntConv2d`` moved to ``qlib.intlayers``; importable from here too."""
    if name in ("IntLinear", "IntConv2d"):
        from . import intlayers
        return getattr(intlayers, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
