"""Tests for qlib.quantize.

Reference: torch.fake_quantize_per_tensor_affine and torch.fake_quantize_per_channel_affine
(values and straight-through gradients, bit for bit), torch.quantize_per_tensor /
torch.quantize_per_channel (``int_repr()`` codes); per-group against torch's per-tensor
kernel applied group by group; the round-half-away variant against its written formula.
"""

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from qlib.qparams import PerGroup, qparams_for, quant_range
from qlib.quantize import (code_dtype, dequantize, fake_quantize, fake_quantize_per_group,
                           quantize, quantize_round_half_away)

pytestmark = pytest.mark.filterwarnings("ignore:.*deprecat")
FAST = settings(max_examples=40, deadline=None)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality of float32 tensors (distinguishes -0.0 and +0.0)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))


@st.composite
def qcase(draw, per_channel=False, max_bits=8):
    """(x, scale, zero_point, quant_min, quant_max, axis) with many exact and near ties.

    x = (k - zero_point + frac) * scale, k an integer code up to 3 beyond the range (so some
    values clip) and frac in {0, +-0.5, uniform}; scales are powers of two (exact ties) or
    random. Fresh values every run: the tensors come from a hypothesis-drawn seed.
    """
    bits = draw(st.integers(2, max_bits))
    qmin, qmax = quant_range(bits, draw(st.booleans()))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    shape = tuple(draw(st.lists(st.integers(1, 19), min_size=1, max_size=3)))
    axis = draw(st.integers(0, len(shape) - 1)) if per_channel else None
    n = shape[axis] if per_channel else 1
    if draw(st.booleans()):
        scale = 2.0 ** torch.randint(-10, 5, (n,), generator=g).float()
    else:
        scale = 10 ** (torch.rand(n, generator=g) * 5 - 4)
    zero_point = torch.randint(qmin, qmax + 1, (n,), generator=g)
    view = [1] * len(shape)
    if per_channel:
        view[axis] = n
    k = torch.randint(qmin - 3, qmax + 4, shape, generator=g)
    kind = torch.randint(0, 4, shape, generator=g)
    frac = torch.rand(shape, generator=g) - 0.5
    frac = torch.where(kind == 0, 0.0, torch.where(kind == 1, 0.5, torch.where(kind == 2, -0.5, frac)))
    x = ((k - zero_point.reshape(view)).float() + frac) * scale.reshape(view)
    if not per_channel:
        scale, zero_point = scale[0], zero_point[0]
    return x, scale, zero_point, qmin, qmax, axis


def grad_of(fn, x, seed=0):
    x = x.clone().requires_grad_(True)
    y = fn(x)
    y.backward(torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)))
    return y.detach(), x.grad


@FAST
@given(case=qcase(), tensor_qparams=st.booleans())
def test_fake_quantize_per_tensor_matches_torch(case, tensor_qparams):
    x, scale, zp, qmin, qmax, _ = case
    if tensor_qparams:
        ref = lambda t: torch.fake_quantize_per_tensor_affine(t, scale, zp.to(torch.int32), qmin, qmax)
    else:
        ref = lambda t: torch.fake_quantize_per_tensor_affine(t, float(scale), int(zp), qmin, qmax)
    y_ref, g_ref = grad_of(ref, x)
    y, g = grad_of(lambda t: fake_quantize(t, scale, zp, qmin, qmax), x)
    assert same_bits(y, y_ref) and same_bits(g, g_ref)


@FAST
@given(case=qcase(per_channel=True))
def test_fake_quantize_per_channel_matches_torch(case):
    x, scale, zp, qmin, qmax, axis = case
    y_ref, g_ref = grad_of(lambda t: torch.fake_quantize_per_channel_affine(
        t, scale, zp.to(torch.int32), axis, qmin, qmax), x)
    y, g = grad_of(lambda t: fake_quantize(t, scale, zp, qmin, qmax, axis=axis), x)
    assert same_bits(y, y_ref) and same_bits(g, g_ref)


@FAST
@given(case=qcase(), signed=st.booleans())
def test_quantize_matches_torch_quantize_per_tensor(case, signed):
    x, scale, _, _, _, _ = case
    qmin, qmax = quant_range(8, signed)
    zp = (qmin + qmax) // 3
    ref = torch.quantize_per_tensor(x, float(scale), zp, torch.qint8 if signed else torch.quint8)
    x_q = quantize(x, scale, zp, qmin, qmax)
    assert torch.equal(x_q, ref.int_repr())


@FAST
@given(case=qcase(per_channel=True), signed=st.booleans())
def test_quantize_matches_torch_quantize_per_channel(case, signed):
    x, scale, _, _, _, axis = case
    qmin, qmax = quant_range(8, signed)
    zp = torch.randint(qmin, qmax + 1, scale.shape, generator=torch.Generator().manual_seed(3))
    ref = torch.quantize_per_channel(x, scale.double(), zp, axis, torch.qint8 if signed else torch.quint8)
    assert torch.equal(quantize(x, scale, zp, qmin, qmax, axis=axis), ref.int_repr())


@FAST
@given(case=st.one_of(qcase(max_bits=16), qcase(max_bits=16, per_channel=True)))
def test_dequantize_of_quantize_is_fake_quantize(case):
    x, scale, zp, qmin, qmax, axis = case
    x_q = quantize(x, scale, zp, qmin, qmax, axis=axis)
    assert x_q.dtype == code_dtype(qmin, qmax)
    x_fq = fake_quantize(x, scale, zp, qmin, qmax, axis=axis)
    assert same_bits(dequantize(x_q, scale, zp, axis=axis), x_fq)


@FAST
@given(case=qcase(max_bits=16))
def test_round_trip_error_at_most_half_scale(case):
    x, scale, zp, qmin, qmax, _ = case
    inside = (x >= (qmin - zp) * scale) & (x <= (qmax - zp) * scale)
    x_dq = dequantize(quantize(x, scale, zp, qmin, qmax), scale, zp)
    err = (x_dq - x).abs()[inside]
    assert torch.all(err <= scale / 2 + 1e-6 * x.abs()[inside])


@FAST
@given(case=qcase(max_bits=16, per_channel=True))
def test_requantizing_dequantized_codes_is_identity(case):
    x, scale, zp, qmin, qmax, axis = case
    x_q = quantize(x, scale, zp, qmin, qmax, axis=axis)
    x_dq = dequantize(x_q, scale, zp, axis=axis)
    assert x_dq.dtype == torch.float32
    assert torch.equal(quantize(x_dq, scale, zp, qmin, qmax, axis=axis), x_q)


@FAST
@given(seed=st.integers(0, 2**31 - 1), bits=st.integers(2, 8), symmetric=st.booleans(),
       group_size=st.sampled_from([1, 2, 4, 8]))
def test_fake_quantize_per_group_is_per_tensor_on_each_group(seed, bits, symmetric, group_size):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 16, generator=g) * 10 ** (torch.rand(3, 1, generator=g) * 4 - 2)
    qmin, qmax = quant_range(bits, symmetric)
    scale, zp = qparams_for(x, bits, symmetric, PerGroup(group_size))
    assert scale.shape == (3, 16 // group_size)
    y, gr = grad_of(lambda t: fake_quantize_per_group(t, scale, zp, qmin, qmax, group_size), x)
    for r in range(3):
        for k in range(16 // group_size):
            cols = slice(k * group_size, (k + 1) * group_size)
            ref = torch.fake_quantize_per_tensor_affine(x[r, cols], float(scale[r, k]), int(zp[r, k]), qmin, qmax)
            assert same_bits(y[r, cols], ref)
    # written formula for the whole tensor: scale repeated over its group
    s, z = scale.repeat_interleave(group_size, 1), zp.repeat_interleave(group_size, 1)
    expected = (torch.clamp(torch.round(x * (1.0 / s)) + z, qmin, qmax) - z) * s
    assert same_bits(y, expected)
    assert torch.equal(quantize(x, scale, zp, qmin, qmax, group_size=group_size).long(),
                       torch.clamp(torch.round(x * (1.0 / s)) + z, qmin, qmax).long())


def test_straight_through_gradient_by_hand():
    x = torch.tensor([-3.0, -0.4, 0.0, 0.6, 1.2, 5.0], requires_grad=True)
    fake_quantize(x, 0.5, 0, -2, 2).sum().backward()  # codes: -6 -1 0 1 2 10
    assert torch.equal(x.grad, torch.tensor([0.0, 1, 1, 1, 1, 0]))


def test_code_dtypes():
    assert code_dtype(-8, 7) == torch.int8  # torch has no int4: 4-bit codes live in int8
    assert code_dtype(0, 15) == torch.int8
    assert code_dtype(-128, 127) == torch.int8
    assert code_dtype(0, 255) == torch.uint8
    assert code_dtype(-32768, 32767) == torch.int16
    assert code_dtype(0, 65535) == torch.int32
    x = torch.linspace(-1, 1, 11)
    assert quantize(x, 0.1, 0, -8, 7, dtype=torch.int64).dtype == torch.int64


def test_round_half_away_variant_formula():
    g = torch.Generator().manual_seed(0)
    ties = torch.arange(-6, 7).float() + 0.5
    near = torch.tensor([0.49999997, -0.49999997, 1.4999999, 2.5000002])
    x = torch.cat([ties, near, torch.randn(50, generator=g) * 4])
    scale, zp, qmin, qmax = 1.0, 3, -8, 7
    got = quantize_round_half_away(x, scale, zp, qmin, qmax)
    inv = 1.0 / torch.tensor(scale)
    v = (x * inv).tolist()  # float32 products, as the kernels; then the formula in Python
    expected = [min(max(int(math.copysign(math.floor(abs(u) + 0.5), u)) + zp, qmin), qmax) for u in v]
    assert got.tolist() == expected
    assert quantize_round_half_away(torch.tensor([2.5, -2.5]), 1.0, 0, -8, 7).tolist() == [3, -3]
    assert quantize(torch.tensor([2.5, -2.5]), 1.0, 0, -8, 7).tolist() == [2, -2]  # half to even


def test_low_precision_input_keeps_dtype():
    x = torch.randn(64, generator=torch.Generator().manual_seed(0)).half()
    y = fake_quantize(x, 0.05, 3, 0, 255)
    assert y.dtype == torch.float16
    assert torch.equal(y, torch.fake_quantize_per_tensor_affine(x, 0.05, 3, 0, 255))


def test_errors():
    x = torch.randn(4, 3)
    with pytest.raises(TypeError, match="floating-point"):
        quantize(torch.arange(4), 0.1, 0, -128, 127)
    with pytest.raises(ValueError, match="NaN or infinite"):
        fake_quantize(torch.tensor([1.0, float("nan")]), 0.1, 0, -128, 127)
    with pytest.raises(ValueError, match="NaN or infinite"):
        quantize(torch.tensor([float("inf")]), 0.1, 0, -128, 127)
    with pytest.raises(ValueError, match="empty"):
        quantize(torch.zeros(0), 0.1, 0, -128, 127)
    with pytest.raises(ValueError, match="scale must be finite and > 0"):
        quantize(x, 0.0, 0, -128, 127)
    with pytest.raises(ValueError, match="scale must be finite and > 0"):
        fake_quantize(x, torch.tensor([0.1, -0.1, 0.1]), torch.zeros(3, dtype=torch.int64), -128, 127, axis=1)
    with pytest.raises(TypeError, match="zero_point must be an integer"):
        quantize(x, 0.1, 0.5, -128, 127)
    with pytest.raises(ValueError, match="zero_point must lie in"):
        quantize(x, 0.1, 300, 0, 255)
    with pytest.raises(ValueError, match="quant_min must be < quant_max"):
        fake_quantize(x, 0.1, 0, 7, -8)
    with pytest.raises(ValueError, match="axis 2 is out of range"):
        quantize(x, torch.ones(3), torch.zeros(3, dtype=torch.int64), -8, 7, axis=2)
    with pytest.raises(ValueError, match=r"length x.shape\[0\] = 4"):
        quantize(x, torch.ones(3), torch.zeros(3, dtype=torch.int64), -8, 7, axis=0)
    with pytest.raises(ValueError, match="axis=None means per-tensor"):
        fake_quantize(x, torch.ones(3), torch.zeros(3, dtype=torch.int64), -8, 7)
    with pytest.raises(ValueError, match="not divisible by group_size"):
        fake_quantize_per_group(x, torch.ones(4, 1), torch.zeros(4, 1, dtype=torch.int64), -8, 7, 2)
    with pytest.raises(ValueError, match=r"per-group scale must have shape \(4, 1\)"):
        fake_quantize_per_group(x, torch.ones(4, 3), torch.zeros(4, 3, dtype=torch.int64), -8, 7, 3)
    with pytest.raises(ValueError, match="cannot hold codes"):
        quantize(x, 0.1, 0, 0, 255, dtype=torch.int8)
    with pytest.raises(TypeError, match="integer torch.dtype"):
        quantize(x, 0.1, 0, 0, 255, dtype=torch.float32)
    with pytest.raises(TypeError, match="x_q must hold integer codes"):
        dequantize(x, 0.1, 0)
    with pytest.raises(ValueError, match="empty"):
        dequantize(torch.zeros(0, dtype=torch.int8), 0.1, 0)
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        quantize([1.0, 2.0], 0.1, 0, -128, 127)
