"""Checks for lab 00 (warm-up): model size in bytes, float16 cast error, float16 range.

Each question has a visible check (a few worked cases a student can reason about) and a
hidden one (random cases, fresh for each student and the same at every re-grade, see
:mod:`qlib.check.draws`, and edge cases) that nbgrader runs when grading. The form the text
asks for (an int for Q1, a bool tensor for Q3) is checked visibly. One gap is deliberate: Q3's
visible case does not probe the rounding edge ``65504 < |x| < 65520`` (which float16 rounds
down to 65504), because ``tests/test_grading.py`` uses the answer ``x.abs() <= 65504`` as its
proof that hidden tests run (a visible-only submission).
"""

from __future__ import annotations

import torch

from numbers import Integral

from .core import call, expect, expect_close, expect_equal, expect_tensor, run
from .draws import Draw, hidden
from .. import measure

FP16_MAX = 65504.0


def _size(fn, n: int, bits: int, want: int) -> None:
    got = call(fn, n, bits)
    expect(isinstance(got, Integral) and not isinstance(got, bool),
           f"size_in_bytes({n}, {bits}): expected an int (a count of bytes), got {got!r} ({type(got).__name__}); "
           "use integer arithmetic (//) rather than / or math.ceil of a float")
    expect_equal(got, want, f"size_in_bytes({n}, {bits})")


def size_in_bytes(fn) -> None:
    """Q1 visible: bytes of ``num_params`` numbers stored at ``bits`` bits, packed (an int)."""
    def body():
        for n, bits, want in [(1000, 32, 4000), (1000, 8, 1000), (1000, 4, 500), (3, 4, 2)]:
            _size(fn, n, bits, want)
    run("size_in_bytes: worked cases", body)


def size_in_bytes_hidden(fn) -> None:
    """Q1 hidden: random sizes and every bit width from 1 to 32 (odd counts need rounding up)."""
    def body(draw: Draw):
        for _ in range(50):
            n, bits = draw.rng.randint(0, 10**7), draw.rng.randint(1, 32)
            _size(fn, n, bits, measure.tensor_bytes(n, bits))
    hidden("size_in_bytes: random cases", body)


def cast_error(fn) -> None:
    """Q2 visible: largest absolute error of float32 -> float16 -> float32."""
    def body():
        w = torch.tensor([0.1, 1.0 / 3.0, 1000.1, -2.5])
        expect_close(call(fn, w), measure.cast_error(w), "fp16_cast_error on [0.1, 1/3, 1000.1, -2.5]",
                     rtol=0, atol=0)
    run("fp16_cast_error: worked case", body)


def cast_error_hidden(fn) -> None:
    """Q2 hidden: random tensors of several shapes and scales."""
    def body(draw: Draw):
        for shape, scale in [((64,), 1.0), ((16, 16), 100.0), ((3, 4, 5), 1e-3)]:
            w = torch.randn(shape, generator=draw.gen) * scale
            got = call(fn, w)
            expect(isinstance(got, (float, int)) or (isinstance(got, torch.Tensor) and got.numel() == 1),
                   f"fp16_cast_error should return one number, got {type(got).__name__}")
            expect_close(float(got), measure.cast_error(w), f"fp16_cast_error on randn{shape}*{scale}",
                         rtol=0, atol=0)
    hidden("fp16_cast_error: random tensors", body)


def _fits(fn, x: torch.Tensor, want: torch.Tensor, what: str) -> None:
    got = expect_tensor(call(fn, x), what, shape=x.shape, dtype=torch.bool, kind="a bool tensor")
    expect_equal(got, want, what)


def fits_fp16(fn) -> None:
    """Q3 visible: which values float16 can hold without overflowing to infinity (a bool tensor)."""
    def body():
        x = torch.tensor([1.0, -60000.0, 70000.0, 65504.0, -1e6])
        want = torch.tensor([True, True, False, True, False])
        _fits(fn, x, want, "fits_in_float16([1, -60000, 70000, 65504, -1e6])")
    run("fits_in_float16: worked case", body)


def fits_fp16_hidden(fn) -> None:
    """Q3 hidden: random magnitudes around the float16 limit, and the rounding edge."""
    def body(draw: Draw):
        x = (torch.rand(200, generator=draw.gen) * 2 - 1) * 1.5e5
        edge = torch.tensor([65519.0, 65520.0, -65519.0, -65520.0, 0.0])
        for values in (x, edge):
            _fits(fn, values, torch.isfinite(values.to(torch.float16)), "fits_in_float16 on values near +-65504")
    hidden("fits_in_float16: random and edge values", body)
