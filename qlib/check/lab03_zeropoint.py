"""Checks for lab 03's Q8: the zero-point expansion of an integer linear layer (lesson 04;
Jacob et al. 2018, section 2.3).

Idea. With affine codes ``x = s_x (x_q - z_x)`` and ``w = s_w (w_q - z_w)``, a linear layer's
output is ``s_x s_w acc`` with the int32 accumulator, for output ``n`` of input row ``m``::

    acc[m, n] = sum_k (x_q[m, k] - z_x) (w_q[n, k] - z_w) + b_q[n]
              = sum_k x_q[m, k] w_q[n, k]  -  z_w sum_k x_q[m, k]                (run time)
                + b_q[n] - z_x sum_k w_q[n, k] + K z_x z_w                         (offline: offset[n])

Expanding the product leaves one integer matrix product of the raw codes, one row sum of the
input codes (zero when ``z_w = 0``: symmetric int8 weights), and a constant per output channel
that depends only on the weights, the bias and ``z_x``: ``offset`` ``(N,)``, computed once when
the model is converted. Shapes: ``x_q`` ``(M, K)`` uint8 or int8, ``w_q`` ``(N, K)`` int8 or
uint8 (4-bit codes in a uint8 container), ``b_q`` ``(N,)`` int32 or None; every sum in int64
(8-bit codes wrap around in their own dtype).

Q8a ``zero_point_offset(w_q, z_x, z_w, bias_q) -> offset`` ``(N,)`` integers; Q8b
``int_linear(x_q, w_q, z_w, offset) -> acc`` ``(M, N)`` integers. References, from first
principles so that the checks depend on nothing the student could call: ``reference_offset``
(the formula above, int64) and ``reference_accumulator`` (the direct sum ``(x_q - z_x) @ (w_q -
z_w).T + b_q`` in int64, before any expansion); ``qlib.intops.int_matmul`` is asserted to agree
(tests/test_check_lab03_integer.py). Visible checks: a worked case, uint8 inputs with int8
weights and a bias, 4-bit unsigned weights with ``z_w != 0`` and no bias; a wrong answer gets a
hint naming the missing term (``K z_x z_w``, the bias, a sign, the run-time ``z_w`` row sum, 8-bit
overflow). Hidden checks draw fresh shapes, codes and zero points. Re-exported by
:mod:`qlib.check.lab03_integer` and :mod:`qlib.check.lab03`.
"""

from __future__ import annotations

import torch

from .core import CheckFailed, call, expect, expect_tensor, first_difference, run
from .draws import Draw, hidden

__all__ = ["reference_offset", "reference_accumulator", "zero_point_offset", "zero_point_offset_hidden",
           "int_linear", "int_linear_hidden"]


# ------------------------------------------------------------------ references (first principles)
def reference_offset(w_q: torch.Tensor, z_x: int, z_w: int, bias_q: torch.Tensor | None) -> torch.Tensor:
    """``offset[n] = b_q[n] - z_x * sum_k w_q[n, k] + K * z_x * z_w`` as int64 ``(N,)``."""
    w = w_q.to(torch.int64)
    b = torch.zeros(w.shape[0], dtype=torch.int64) if bias_q is None else bias_q.to(torch.int64)
    return b - z_x * w.sum(1) + w.shape[1] * z_x * z_w


def reference_accumulator(x_q, w_q, z_x: int, z_w: int, bias_q) -> torch.Tensor:
    """``(x_q - z_x) @ (w_q - z_w).T + b_q`` in int64: the accumulator, written directly."""
    acc = (x_q.to(torch.int64) - z_x) @ (w_q.to(torch.int64) - z_w).T
    return acc if bias_q is None else acc + bias_q.to(torch.int64)


# ------------------------------------------------------------------ Q8a zero_point_offset
def _check_offset(fn, w_q, z_x, z_w, bias_q, what):
    got = expect_tensor(call(fn, w_q.clone(), z_x, z_w, None if bias_q is None else bias_q.clone(),
                             what="zero_point_offset"), what, (w_q.shape[0],), kind="a tensor of N integers")
    expect(not got.is_floating_point(), f"{what}: expected integers, got a {got.dtype} tensor "
                                        "(an offset is an int32 constant: no floats)")
    want = reference_offset(w_q, z_x, z_w, bias_q)
    got = got.to(torch.int64)
    if torch.equal(got, want):
        return
    n_bad, i = first_difference(got, want)
    diff = (got - want)[i].item()
    k = w_q.shape[1]
    hint = ""
    if diff == -k * z_x * z_w or diff == k * z_x * z_w:
        hint = (f" Your offsets are off by K * z_x * z_w = {k} * {z_x} * {z_w} = {k * z_x * z_w}: expanding "
                "the product gives that term once, with a plus sign")
    elif bias_q is not None and torch.equal(got, want - bias_q.to(torch.int64)):
        hint = " The bias is missing: it is part of the constant"
    elif torch.equal(got, want + 2 * z_x * w_q.to(torch.int64).sum(1)):
        hint = " The z_x * sum_k w term has the wrong sign"
    raise CheckFailed(f"{what}: {n_bad} of {w_q.shape[0]} offsets differ. First: channel {i}: expected "
                      f"{want[i].item()}, got {got[i].item()}.{hint}")


def _cases_offset(gen, k_codes):
    """(w_q, z_x, z_w, bias_q, what) cases: int8 weights z_w = 0 with bias; uint4 weights z_w = 8 without."""
    w8 = torch.randint(-128, 128, (6, 20), generator=gen, dtype=torch.int64).to(torch.int8)
    b = torch.randint(-5000, 5000, (6,), generator=gen, dtype=torch.int64).to(torch.int32)
    w4 = torch.randint(0, 16, (5, k_codes), generator=gen, dtype=torch.int64).to(torch.uint8)
    return [(w8, 131, 0, b, "int8 weights (6, 20), z_x = 131, z_w = 0, int32 bias"),
            (w4, 3, 8, None, f"4-bit unsigned weights (5, {k_codes}) as uint8, z_x = 3, z_w = 8, no bias")]


def zero_point_offset(fn) -> None:
    """Q8 visible (offset): a worked case, int8 weights with a bias, 4-bit weights with z_w != 0."""
    def body():
        w = torch.tensor([[1, 2, 3], [-1, 0, 4]], dtype=torch.int8)
        _check_offset(fn, w, 2, 1, torch.tensor([10, -10], dtype=torch.int32),
                      "zero_point_offset([[1, 2, 3], [-1, 0, 4]], z_x=2, z_w=1, bias=[10, -10]) "
                      "(want [10 - 2*6 + 3*2*1, -10 - 2*3 + 3*2*1] = [4, -10])")
        gen = torch.Generator().manual_seed(81)
        for w_q, z_x, z_w, b, what in _cases_offset(gen, 33):
            _check_offset(fn, w_q, z_x, z_w, b, f"zero_point_offset({what})")
    run("zero_point_offset: worked and random cases", body)


def zero_point_offset_hidden(fn) -> None:
    """Q8 hidden (offset): fresh shapes, codes and zero points."""
    def body(draw: Draw):
        for _ in range(6):
            _offset_hidden_case(fn, draw)
    hidden("zero_point_offset: random layers", body)


def _offset_hidden_case(fn, draw: Draw) -> None:
    rng, gen = draw.rng, draw.gen
    n, k = rng.randint(1, 40), rng.randint(1, 300)
    signed = rng.random() < 0.5
    lo, hi = (-128, 127) if signed else (0, 255)
    w_q = torch.randint(lo, hi + 1, (n, k), generator=gen).to(torch.int8 if signed else torch.uint8)
    z_w = 0 if signed else rng.randint(0, 255)
    z_x = rng.randint(0, 255)
    b = torch.randint(-2**20, 2**20, (n,), generator=gen).to(torch.int32) if rng.random() < 0.7 else None
    _check_offset(fn, w_q, z_x, z_w, b, f"zero_point_offset(random ({n}, {k}), z_x={z_x}, z_w={z_w}, "
                                        f"bias={'yes' if b is not None else 'None'})")


# ------------------------------------------------------------------ Q8b int_linear
def _check_int_linear(fn, x_q, w_q, z_x, z_w, bias_q, what):
    offset = reference_offset(w_q, z_x, z_w, bias_q)
    got = expect_tensor(call(fn, x_q.clone(), w_q.clone(), z_w, offset.clone(), what="int_linear"), what,
                        (x_q.shape[0], w_q.shape[0]), kind="an (M, N) tensor of integers")
    expect(not got.is_floating_point(), f"{what}: expected integers, got a {got.dtype} tensor; "
                                        "keep everything in int64")
    want = reference_accumulator(x_q, w_q, z_x, z_w, bias_q)
    got = got.to(torch.int64)
    if torch.equal(got, want):
        return
    n_bad, i = first_difference(got, want)
    r, c = divmod(i, want.shape[1])
    row_sum = x_q.to(torch.int64).sum(1)
    hint = ""
    if z_w and torch.equal(got, want + z_w * row_sum[:, None]):
        hint = (f" Every output of input row m is off by z_w * sum_k x_q[m, k] (z_w = {z_w}): "
                "that run-time term depends on the input, it cannot be in the offset")
    elif torch.equal(got, want - offset[None, :]):
        hint = " The offset (the precomputed constant of each output channel) is not added"
    elif x_q.dtype == torch.uint8 or w_q.dtype in (torch.int8, torch.uint8):
        hint = (f" The codes come as {x_q.dtype} and {w_q.dtype}: a product or a sum of 8-bit integers "
                "wraps around in 8 bits; convert to int64 before multiplying")
    raise CheckFailed(f"{what}: {n_bad} of {want.numel()} accumulators differ. First: [{r}, {c}]: expected "
                      f"{want[r, c].item()} = sum_k (x_q - z_x)(w_q - z_w) + b, got {got[r, c].item()}.{hint}")


def int_linear(fn) -> None:
    """Q8 visible (accumulator): uint8 inputs with int8 weights and a bias; 4-bit weights with z_w != 0."""
    def body():
        x = torch.tensor([[3, 0, 5]], dtype=torch.uint8)
        w = torch.tensor([[1, 2, 3], [-1, 0, 4]], dtype=torch.int8)
        _check_int_linear(fn, x, w, 2, 1, torch.tensor([10, -10], dtype=torch.int32),
                          "int_linear([[3, 0, 5]], [[1, 2, 3], [-1, 0, 4]], z_w=1, offset) with z_x=2, "
                          "bias [10, -10] (want [[1*0 + (-2)*1 + 3*2 + 10, 1*(-2) + (-2)*(-1) + 3*3 - 10]] = [[14, -1]])")
        gen = torch.Generator().manual_seed(82)
        for w_q, z_x, z_w, b, what in _cases_offset(gen, 33):
            x = torch.randint(0, 256, (7, w_q.shape[1]), generator=gen).to(torch.uint8)
            _check_int_linear(fn, x, w_q, z_x, z_w, b, f"int_linear(uint8 inputs (7, {w_q.shape[1]}), {what})")
    run("int_linear: worked and random cases", body)


def int_linear_hidden(fn) -> None:
    """Q8 hidden (accumulator): fresh shapes, signed and unsigned codes, zero points."""
    def body(draw: Draw):
        rng, gen = draw.rng, draw.gen
        for _ in range(6):
            m, n, k = rng.randint(1, 20), rng.randint(1, 30), rng.randint(1, 200)
            xs, ws = rng.random() < 0.3, rng.random() < 0.5
            x = torch.randint(-128 if xs else 0, 128 if xs else 256, (m, k), generator=gen)
            w = torch.randint(-128 if ws else 0, 128 if ws else 256, (n, k), generator=gen)
            x, w = x.to(torch.int8 if xs else torch.uint8), w.to(torch.int8 if ws else torch.uint8)
            z_x = rng.randint(-128, 127) if xs else rng.randint(0, 255)
            z_w = 0 if ws else rng.randint(0, 255)
            b = torch.randint(-2**20, 2**20, (n,), generator=gen).to(torch.int32) if rng.random() < 0.7 else None
            _check_int_linear(fn, x, w, z_x, z_w, b, f"int_linear(random x {x.dtype} ({m}, {k}), w {w.dtype} "
                                                     f"({n}, {k}), z_x={z_x}, z_w={z_w})")
    hidden("int_linear: random layers", body)
