"""Tests for qlib.intops (integer matmul and convolution with zero points, every backend).

Reference: the same products in float64 of the centered codes, ``(a - a_zp) @ (b - b_zp)``
and ``F.conv2d(x - x_zp, w - w_zp)`` (exact: every partial sum is an integer below 2**53);
``torch.nn.functional.unfold`` for im2col; Jacob et al. 2018, sec. 2.3 for the zero-point
expansion the kernel backends use; for grouped (depthwise) convolutions, the per-group sum
written out in int64. Every backend must give exactly the reference's integers
(``torch.equal``), including uint8 activations (shifted by 128) and asymmetric weights.
Torch draws use generators seeded from ``QLIB_TEST_SEED`` (default 0).
"""

import os

import pytest
import torch
import torch.nn.functional as F

from qlib.intops import BACKENDS, _patches_nhwc, im2col, int8_codes, int_conv2d, int_conv2d_grouped, int_matmul

SEED = int(os.environ.get("QLIB_TEST_SEED", "0"))


def gen(offset: int) -> torch.Generator:
    return torch.Generator().manual_seed(SEED * 1000 + offset)


def codes(shape, dtype, g):
    info = torch.iinfo(dtype)
    return torch.randint(info.min, info.max + 1, shape, generator=g, dtype=torch.int64).to(dtype)


def test_int8_codes_shift_uint8_by_128():
    u = torch.arange(256, dtype=torch.int64).to(torch.uint8)
    s, off = int8_codes(u)
    assert off == 128 and s.dtype == torch.int8 and torch.equal(s.long(), u.long() - 128)
    i = torch.arange(-128, 128).to(torch.int8)
    assert int8_codes(i) == (i, 0)
    with pytest.raises(TypeError, match="int8 or uint8"):
        int8_codes(torch.zeros(3, dtype=torch.int32))


CASES = [  # a dtype, a_zp, b dtype, b_zp kind: symmetric int8 weights, uint8 activations, asymmetric weights
    (torch.uint8, 117, torch.int8, "zero"),
    (torch.uint8, 0, torch.int8, "per_column"),
    (torch.uint8, 255, torch.uint8, "per_column_uint8"),
    (torch.int8, -128, torch.int8, "scalar"),
    (torch.int8, 5, torch.uint8, "zero"),
]


def zero_points(kind, n, g):
    if kind == "zero":
        return 0
    if kind == "scalar":
        return -3
    if kind == "per_column":
        return torch.randint(-128, 128, (n,), generator=g)
    return torch.randint(0, 256, (n,), generator=g)


@pytest.mark.parametrize("backend", BACKENDS + (None,))
@pytest.mark.parametrize("case", range(len(CASES)))
def test_int_matmul_every_backend_is_exact(backend, case):
    a_dtype, a_zp, b_dtype, b_kind = CASES[case]
    g = gen(case)
    a, b = codes((5, 7, 40), a_dtype, g), codes((40, 9), b_dtype, g)
    a[0, 0] = torch.iinfo(a_dtype).min  # extreme codes
    b[:, 0] = torch.iinfo(b_dtype).max
    b_zp, bias = zero_points(b_kind, 9, g), torch.randint(-(2**20), 2**20, (9,), generator=g, dtype=torch.int32)
    ref = (a.double() - a_zp) @ (b.double() - torch.as_tensor(b_zp).double())
    for with_bias in (False, True):
        acc = int_matmul(a, b, a_zp, b_zp, bias if with_bias else None, backend=backend)
        assert acc.dtype == torch.int32 and acc.shape == (5, 7, 9)
        assert torch.equal(acc.double(), ref + (bias.double() if with_bias else 0))


def test_int_matmul_errors_and_overflow():
    with pytest.raises(ValueError, match="K"):
        int_matmul(torch.zeros(3, 4, dtype=torch.int8), torch.zeros(5, 2, dtype=torch.int8))
    with pytest.raises(TypeError, match="integers"):
        int_matmul(torch.zeros(3, 4), torch.zeros(4, 2, dtype=torch.int8))
    with pytest.raises(ValueError, match="backend"):
        int_matmul(torch.zeros(3, 4, dtype=torch.int8), torch.zeros(4, 2, dtype=torch.int8), backend="magic")
    with pytest.raises(TypeError, match="reference"):  # the kernels take 8-bit codes only
        int_matmul(torch.zeros(3, 4, dtype=torch.int64), torch.zeros(4, 2, dtype=torch.int8), backend="int_mm")
    big = torch.full((2, 2**16), 2**10)
    with pytest.raises(OverflowError, match="int32"):
        int_matmul(big, torch.full((2**16, 1), 2**10))
    # 8-bit codes whose int32 accumulation can overflow: auto falls back to the reference, which raises
    a, b = torch.full((2, 2**17), 255, dtype=torch.uint8), torch.full((2**17, 1), -128, dtype=torch.int8)
    with pytest.raises(OverflowError, match="int32"):
        int_matmul(a, b, 0, 0)
    with pytest.raises(OverflowError, match="reference"):
        int_matmul(a, b, 0, 0, backend="int32")
    with pytest.raises(OverflowError, match="accumulator"):  # the bias pushes the sum out of int32
        int_matmul(torch.full((1, 4), 127, dtype=torch.int8), torch.full((4, 1), 127, dtype=torch.int8),
                   0, 0, torch.tensor([2**31 - 100], dtype=torch.int64))


def test_im2col_matches_torch_unfold():
    x = torch.randn(2, 3, 9, 8, generator=gen(40))
    cols = im2col(x, (3, 2), stride=(2, 1), padding=1, dilation=(1, 2))
    ref = F.unfold(x, (3, 2), stride=(2, 1), padding=1, dilation=(1, 2))  # (N, C*kh*kw, L)
    assert torch.equal(cols.reshape(2, -1, cols.shape[-1]).transpose(1, 2), ref)


def test_channels_last_patches_are_im2col_reordered():
    x = torch.randn(2, 3, 9, 8, generator=gen(41))
    kw = dict(stride=(2, 1), padding=(1, 2), dilation=(1, 2))
    a = im2col(x, (3, 2), **kw)                                    # columns (C, kh, kw)
    b = _patches_nhwc(x.permute(0, 2, 3, 1), (3, 2), pad_value=0, **kw)  # columns (kh, kw, C)
    assert torch.equal(a.reshape(*a.shape[:3], 3, 3, 2).permute(0, 1, 2, 4, 5, 3).reshape(b.shape), b)


CONV = [dict(), dict(stride=2, padding=1), dict(padding=2, dilation=2), dict(stride=(1, 2), padding=(0, 1))]


@pytest.mark.parametrize("backend", BACKENDS + (None,))
@pytest.mark.parametrize("kw", range(len(CONV)))
@pytest.mark.parametrize("case", range(len(CASES)))
def test_int_conv2d_every_backend_matches_float64_conv(backend, kw, case):
    x_dtype, x_zp, w_dtype, w_kind = CASES[case]
    g = gen(100 + 10 * case + kw)
    x, w = codes((2, 3, 9, 9), x_dtype, g), codes((5, 3, 3, 2), w_dtype, g)
    w_zp = zero_points(w_kind, 5, g)
    bias = torch.randint(-1000, 1000, (5,), generator=g, dtype=torch.int32)
    acc = int_conv2d(x, w, x_zp, w_zp, bias=bias, backend=backend, **CONV[kw])
    # zero padding = real 0.0 = code x_zp
    ref = F.conv2d(x.double() - x_zp, w.double() - torch.as_tensor(w_zp).double().reshape(-1, 1, 1, 1),
                   bias.double(), **CONV[kw])
    assert acc.dtype == torch.int32 and acc.shape == ref.shape and torch.equal(acc.double(), ref)


def test_int_conv2d_checks_its_input():
    with pytest.raises(ValueError, match="N, C, H, W"):
        int_conv2d(torch.zeros(3, 4, 4, dtype=torch.uint8), torch.zeros(2, 3, 1, 1, dtype=torch.int8))
    with pytest.raises(TypeError, match="integers"):
        int_conv2d(torch.zeros(1, 3, 4, 4), torch.zeros(2, 3, 1, 1, dtype=torch.int8))
    with pytest.raises(TypeError, match="torch.Tensor"):
        int_conv2d([[1]], torch.zeros(2, 3, 1, 1, dtype=torch.int8))


# ------------------------------------------------------------------ grouped convolutions (depthwise)
@pytest.mark.parametrize("wide", [False, True])
def test_int_conv2d_grouped_is_the_sum_over_each_group(wide):
    """The written definition, per group in int64, with per-channel weight zero points and a
    non-zero input zero point (the padding is a real 0, the code z_x). ``wide``: int32 codes up
    to 2**16, so partial sums pass 2**24 (float32 rounds them: the float64 path runs)."""
    g = gen(10 + wide)
    if wide:
        x_q = torch.randint(-(2**16), 2**16, (2, 6, 6, 6), generator=g).to(torch.int32)
    else:
        x_q = torch.randint(0, 256, (2, 6, 6, 6), generator=g).to(torch.uint8)
    w_q = torch.randint(-128, 128, (4, 3, 3, 3), generator=g).to(torch.int8)
    w_zp = torch.randint(-5, 6, (4,), generator=g)
    bias = torch.randint(-1000, 1000, (4,), generator=g).to(torch.int32)
    x = F.pad(x_q.long() - 77, (1, 1, 1, 1))
    want = torch.empty(2, 4, 6, 6, dtype=torch.int64)
    for o in range(4):
        grp = o // 2
        patch = x[:, grp * 3:(grp + 1) * 3]
        w = w_q[o].long() - w_zp[o]
        want[:, o] = sum(patch[:, c, u:u + 6, v:v + 6] * w[c, u, v]
                         for c in range(3) for u in range(3) for v in range(3)) + bias[o]
    if wide:  # float32 would not be exact here
        w_real = (w_q.long() - w_zp.reshape(-1, 1, 1, 1)).float()
        f32 = F.conv2d((x_q.long() - 77).float(), w_real, bias.float(), 1, 1, 1, 2)
        assert not torch.equal(f32.long(), want)
    for backend in (("reference", None) if wide else BACKENDS + (None,)):  # kernels take 8-bit codes
        got = int_conv2d_grouped(x_q, w_q, 77, w_zp, 1, 1, 1, 2, bias, backend)
        assert got.dtype == torch.int32 and torch.equal(got.long(), want), backend


def test_int_conv2d_grouped_errors():
    x = torch.zeros(1, 4, 5, 5, dtype=torch.uint8)
    w = torch.zeros(4, 2, 3, 3, dtype=torch.int8)
    with pytest.raises(ValueError, match="groups=4 dividing"):
        int_conv2d_grouped(x, w, groups=4)
    with pytest.raises(ValueError, match="groups must be an int"):
        int_conv2d_grouped(x, w, groups=0)
    with pytest.raises(TypeError, match="integers"):
        int_conv2d_grouped(x.float(), w, groups=2)
    big = torch.full((1, 4, 5, 5), 2**20, dtype=torch.int32)
    with pytest.raises(OverflowError, match="overflow"):
        int_conv2d_grouped(big, torch.full((4, 2, 3, 3), 127, dtype=torch.int8), groups=2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_grouped_conv_on_cuda_gives_the_cpu_integers():
    """On CUDA: float64 (cuDNN's float32 may be TF32) and the float64 reference, the same integers."""
    g = gen(12)
    x_q = torch.randint(0, 256, (4, 32, 9, 9), generator=g).to(torch.uint8)
    w_q = torch.randint(-128, 128, (32, 1, 3, 3), generator=g).to(torch.int8)
    w_zp = torch.randint(-3, 4, (32,), generator=g)
    bias = torch.randint(-5000, 5000, (32,), generator=g).to(torch.int32)
    want = int_conv2d_grouped(x_q, w_q, 131, w_zp, 2, 1, 1, 32, bias)
    for backend in ("reference", None):
        got = int_conv2d_grouped(x_q.cuda(), w_q.cuda(), 131, w_zp.cuda(), 2, 1, 1, 32, bias.cuda(), backend)
        assert got.device.type == "cuda" and torch.equal(got.cpu(), want), backend
