"""Checks for lab 07 (Triton int8 kernels): the GEMM's K-loop with masks, the fused
dequantizing epilogue, and per-token int8 quantization in PyTorch.

The student's Triton functions are launched by the lab's own (locked) launchers, which the
checks call: ``int8_gemm(a, b, block_m, block_n, block_k)`` and
``int8_gemm_dequant(a, b, row_scale, col_scale, bias, out_dtype, block_m, block_n, block_k)``.
Inputs live on ``qlib.kernels.kernel_device()``: the CPU when Triton interprets (no GPU, or
one without int8 ``tl.dot``), the GPU otherwise.

References: ``a.long() @ b.long()`` (exact) for Q1; the float64 product
``(a @ b) * row_scale[:, None] * col_scale[None, :] + bias`` for Q2, within float32 rounding
(``4 * eps32 * (|acc * row_scale * col_scale| + |bias|)``, any order of the products is
accepted) and, for float16 outputs, within float16's rounding on top (relative ``eps16`` for normal
numbers, one subnormal step ``2**-24`` below ``6.1e-5``);
``qlib.kernels.quantize_per_token_reference`` bit for bit for Q3.
Shapes are small (the interpreter runs each program instance in NumPy) and odd. The hidden checks
draw their cases through ``qlib.check.draws.hidden``: fresh per submission, the same at a re-grade.
"""

from __future__ import annotations

import torch

from . import CheckFailed, expect, run
from .draws import Draw, hidden
from ..kernels import kernel_device, quantize_per_token_reference
from ..kernels.reference import QUANT_MAX


def _not_implemented(err: BaseException) -> bool:
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, NotImplementedError) or "NotImplementedError" in str(err)[:40]:
            return True
        err = err.__cause__ or err.__context__
    return False


def _call(fn, *args, what: str, **kwargs):
    expect(callable(fn), f"{what}: expected a function, got {type(fn).__name__}")
    try:
        return fn(*args, **kwargs)
    except CheckFailed:
        raise
    except Exception as err:  # noqa: BLE001: the student's kernel, reported
        if _not_implemented(err):
            raise CheckFailed(f"{what}: not implemented yet: replace `raise NotImplementedError()` "
                              "with your code (and re-run the cell that defines the kernel)") from None
        raise CheckFailed(f"{what} raised {type(err).__name__}: {str(err)[:600]}") from None


def _codes(gen: torch.Generator, shape, fill: str = "random") -> torch.Tensor:
    if fill == "min":
        return torch.full(shape, -128, dtype=torch.int8)
    if fill == "extremes":
        pick = torch.randint(0, 2, shape, generator=gen)
        return torch.where(pick == 1, 127, -128).to(torch.int8)
    return torch.randint(-128, 128, shape, generator=gen, dtype=torch.int8)


# ------------------------------------------------------------------ Q1 K-loop with masks
def _check_gemm(fn, a: torch.Tensor, b: torch.Tensor, blocks: tuple[int, int, int], label: str) -> None:
    dev = kernel_device()
    bm, bn, bk = blocks
    m, k = a.shape
    n = b.shape[1]
    what = f"int8_gemm({label} a {m}x{k}, b {k}x{n}, blocks M/N/K = {bm}/{bn}/{bk})"
    got = _call(fn, a.to(dev), b.to(dev), bm, bn, bk, what=what)
    expect(isinstance(got, torch.Tensor) and got.shape == (m, n),
           f"{what}: expected a ({m}, {n}) tensor, got {getattr(got, 'shape', type(got).__name__)}")
    expect(got.dtype == torch.int32, f"{what}: expected int32 (the accumulator), got {got.dtype}; "
                                     "start from tl.zeros(..., dtype=tl.int32)")
    want = a.long() @ b.long()
    got = got.cpu().long()
    if torch.equal(got, want):
        return
    bad = (got != want).nonzero()
    i, j = bad[0].tolist()
    hint = ""
    first = a[:, :bk].long() @ b[:bk, :].long()
    if k > bk and torch.equal(got, first):
        hint = " Hint: only the first BLOCK_K columns were summed: loop over k0 in range(0, K, BLOCK_K)."
    elif k % bk and torch.equal(got[:, :], (a[:, : k - k % bk].long() @ b[: k - k % bk, :].long())):
        hint = (" Hint: the last, partial block of K is missing: the loop must also run for it, with a mask "
                "k < K on the loads (other=0).")
    elif k % bk or m % bm or n % bn:
        hint = (" Hint: K, M or N is not a multiple of its block: mask the loads (offs_m < M, k < K, offs_n < N, "
                "other=0) so that values past the edge count as zeros.")
    raise CheckFailed(f"{what}: {len(bad)} of {m * n} entries differ, e.g. C[{i}, {j}] = {got[i, j].item()}, "
                      f"expected {want[i, j].item()}.{hint}")


def int8_gemm(fn) -> None:
    """Q1 visible: fixed shapes (single tile, odd sizes, K not a multiple of BLOCK_K, extremes)."""
    def body():
        gen = torch.Generator().manual_seed(0)
        cases = [((16, 16, 16), (16, 16, 16), "random", "one tile"),
                 ((16, 48, 16), (16, 16, 16), "random", "three K-blocks"),
                 ((5, 7, 3), (16, 16, 16), "random", "smaller than a tile"),
                 ((37, 53, 29), (16, 16, 16), "random", "odd sizes"),
                 ((20, 70, 18), (16, 32, 32), "random", "K not a multiple of BLOCK_K"),
                 ((9, 300, 6), (16, 16, 64), "min", "all -128")]
        for (m, k, n), blocks, fill, label in cases:
            _check_gemm(fn, _codes(gen, (m, k), fill), _codes(gen, (k, n), fill), blocks, label + ":")
    run("int8_gemm: K-loop with masks, exact int32 products", body)


def int8_gemm_hidden(fn) -> None:
    """Q1 hidden: fresh random shapes, blocks and values; a transposed (column-major) b."""
    def body(draw: Draw):
        rng, gen = draw.rng, draw.gen
        for _ in range(6):
            m, k, n = (rng.randint(1, 70) for _ in range(3))
            blocks = tuple(rng.choice((16, 32)) for _ in range(3))
            fill = rng.choice(("random", "random", "extremes"))
            _check_gemm(fn, _codes(gen, (m, k), fill), _codes(gen, (k, n), fill), blocks, "random:")
        w = _codes(gen, (23, 45))
        _check_gemm(fn, _codes(gen, (11, 45)), w.t(), (16, 16, 16), "b = w.T (strided):")
    hidden("int8_gemm: fresh random shapes and values", body)


# ------------------------------------------------------------------ Q2 fused epilogue
def _check_dequant(fn, m, k, n, with_bias: bool, out_dtype, gen, blocks=(16, 16, 16)) -> None:
    dev = kernel_device()
    a, b = _codes(gen, (m, k)), _codes(gen, (k, n))
    rs = torch.rand(m, generator=gen) / 64 + 1e-3
    cs = torch.rand(n, generator=gen) / 64 + 1e-3
    bias = torch.randn(n, generator=gen) if with_bias else None
    what = (f"int8_gemm_dequant(a {m}x{k}, b {k}x{n}, {'with' if with_bias else 'no'} bias, "
            f"out_dtype={str(out_dtype).replace('torch.', '')})")
    got = _call(fn, a.to(dev), b.to(dev), rs.to(dev), cs.to(dev), None if bias is None else bias.to(dev),
                out_dtype, *blocks, what=what)
    expect(isinstance(got, torch.Tensor) and got.shape == (m, n) and got.dtype == out_dtype,
           f"{what}: expected a ({m}, {n}) {out_dtype} tensor, got "
           f"{getattr(got, 'shape', type(got).__name__)} {getattr(got, 'dtype', '')}")
    got = got.cpu().double()
    acc = a.double() @ b.double()
    prod = acc * rs.double()[:, None] * cs.double()[None, :]
    want = prod + (0 if bias is None else bias.double()[None, :])
    tol = 4 * torch.finfo(torch.float32).eps * (prod.abs() + (0 if bias is None else bias.double().abs()))
    # the output's own rounding: eps relative for normal numbers, one subnormal step
    # (smallest_normal * eps: 2**-24 for float16) below the smallest normal number
    fi = torch.finfo(out_dtype)
    tol = tol + fi.eps * want.abs() + fi.smallest_normal * fi.eps
    if ((got - want).abs() <= tol).all():
        return
    hint = ""
    close = lambda x: bool(((got - x).abs() <= tol + 1e-3 * x.abs()).all())  # noqa: E731
    if bias is not None and close(prod):
        hint = " Hint: the bias is missing: add it when HAS_BIAS (one value per column n, bias[None, :])."
    elif close(acc * rs.double()[:, None] + (0 if bias is None else bias.double())):
        hint = " Hint: the column (weight) scale is missing: multiply by col_scale[None, :] too."
    elif close(acc * cs.double()[None, :] + (0 if bias is None else bias.double())):
        hint = " Hint: the row (token) scale is missing: multiply by row_scale[:, None] too."
    elif close(acc):
        hint = " Hint: return the dequantized tile acc * row_scale[:, None] * col_scale[None, :] (+ bias)."
    i, j = ((got - want).abs() > tol).nonzero()[0].tolist()
    raise CheckFailed(f"{what}: out[{i}, {j}] = {got[i, j].item():.6g}, expected {want[i, j].item():.6g} "
                      f"(acc {acc[i, j].item():.0f}, row_scale {rs[i].item():.4g}, col_scale {cs[j].item():.4g}"
                      + ("" if bias is None else f", bias {bias[j].item():.4g}") + f").{hint}")


def dequant_epilogue(fn) -> None:
    """Q2 visible: the fused W8A8 product with and without bias, float32 and float16 outputs."""
    def body():
        gen = torch.Generator().manual_seed(1)
        _check_dequant(fn, 16, 16, 16, True, torch.float32, gen)
        _check_dequant(fn, 21, 40, 19, True, torch.float32, gen)
        _check_dequant(fn, 13, 24, 30, False, torch.float32, gen)
        _check_dequant(fn, 18, 33, 17, True, torch.float16, gen)
    run("int8_gemm_dequant: fused epilogue acc * row_scale * col_scale + bias", body)


def dequant_epilogue_hidden(fn) -> None:
    """Q2 hidden: fresh shapes, blocks, scales and biases."""
    def body(draw: Draw):
        rng, gen = draw.rng, draw.gen
        for _ in range(5):
            m, k, n = (rng.randint(1, 60) for _ in range(3))
            blocks = tuple(rng.choice((16, 32)) for _ in range(3))
            _check_dequant(fn, m, k, n, rng.random() < 0.7, rng.choice((torch.float32, torch.float16)), gen, blocks)
    hidden("int8_gemm_dequant: fresh random shapes and scales", body)


# ------------------------------------------------------------------ Q3 per-token quantization
def _check_quant(fn, x: torch.Tensor, label: str) -> None:
    what = f"quantize_per_token({label}: x of shape {tuple(x.shape)}, {str(x.dtype).replace('torch.', '')})"
    got = _call(fn, x.clone(), what=what)
    expect(isinstance(got, tuple) and len(got) == 2, f"{what}: expected a tuple (x_q, scale), got {type(got).__name__}")
    x_q, scale = got
    want_q, want_scale = quantize_per_token_reference(x)
    m = x.shape[0]
    expect(isinstance(scale, torch.Tensor) and scale.shape == (m,) and scale.dtype == torch.float32,
           f"{what}: scale must be a float32 tensor of shape ({m},), got "
           f"{getattr(scale, 'shape', type(scale).__name__)} {getattr(scale, 'dtype', '')}")
    expect(isinstance(x_q, torch.Tensor) and x_q.dtype == torch.int8 and x_q.shape == x.shape,
           f"{what}: x_q must be an int8 tensor of shape {tuple(x.shape)}, got "
           f"{getattr(x_q, 'shape', type(x_q).__name__)} {getattr(x_q, 'dtype', '')}")
    if not torch.equal(scale, want_scale):
        absmax = x.float().abs().amax(dim=1)
        eps = torch.finfo(torch.float32).eps
        hint = ""
        if torch.allclose(scale, torch.clamp(absmax / 127.5, min=eps)):
            hint = " Hint: divide by 127 (the narrow range [-127, 127]), not 127.5."
        elif bool(((absmax == 0) & (scale != eps)).any()):
            hint = " Hint: an all-zero row needs a positive scale: clamp it to at least float32's eps."
        i = (scale != want_scale).nonzero()[0].item()
        raise CheckFailed(f"{what}: scale[{i}] = {scale[i].item():.8g}, expected {want_scale[i].item():.8g} "
                          f"(absmax of the row / {QUANT_MAX}).{hint}")
    if not torch.equal(x_q, want_q):
        i, j = (x_q != want_q).nonzero()[0].tolist()
        v = x[i, j].float() * (1.0 / want_scale[i])
        hint = ""
        if (v - torch.floor(v)).item() == 0.5:
            hint = " Hint: ties go to the even integer: use torch.round, not floor(v + 0.5)."
        elif x_q.min() < -QUANT_MAX:
            hint = f" Hint: clamp to [-{QUANT_MAX}, {QUANT_MAX}]."
        else:
            hint = " Hint: multiply by the float32 reciprocal 1 / scale (as PyTorch's kernels do) instead of dividing."
        raise CheckFailed(f"{what}: x_q[{i}, {j}] = {x_q[i, j].item()}, expected {want_q[i, j].item()} "
                          f"(x = {x[i, j].item():.8g}, scale {want_scale[i].item():.8g}).{hint}")


def quantize_per_token(fn) -> None:
    """Q3 visible: a worked row, an all-zero row, random float32 and float16 tokens."""
    def body():
        _check_quant(fn, torch.tensor([[127.0, 0.5, -1.5, 63.5], [-254.0, 1.0, 3.0, 0.0], [0.0, 0.0, 0.0, 0.0]]),
                     "worked rows")
        gen = torch.Generator().manual_seed(2)
        _check_quant(fn, torch.randn(8, 33, generator=gen) * 3, "random")
        _check_quant(fn, (torch.randn(5, 16, generator=gen) * 0.01).half(), "float16")
    run("quantize_per_token: per-row int8 codes and scales, bit for bit", body)


def quantize_per_token_hidden(fn) -> None:
    """Q3 hidden: fresh tokens over many magnitudes, with outlier columns."""
    def body(draw: Draw):
        rng, gen = draw.rng, draw.gen
        for _ in range(10):
            x = torch.randn(rng.randint(1, 20), rng.randint(1, 80), generator=gen) * 10 ** rng.uniform(-4, 3)
            if rng.random() < 0.5:
                x[:, rng.randrange(x.shape[1])] *= 50  # an outlier feature, as in LLM activations
            x = x.to(rng.choice((torch.float32, torch.float32, torch.bfloat16)))
            _check_quant(fn, x, "random")
    hidden("quantize_per_token: fresh random tokens", body)
