"""Tests for qlib.quantize.

Reference: torch.fake_quantize_per_tensor_affine and torch.fake_quantize_per_channel_affine
(values and straight-through gradients, bit for bit, 2..16-bit ranges, on float16, bfloat16, float32 and float64
input), torch.quantize_per_tensor / torch.quantize_per_channel (``int_repr()`` codes); per-group
against torch's per-tensor kernel applied group by group; the round-half-away variant and the
ranges wider than 16 bits against their written formulas computed exactly in Python.
"""

import math
import types
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings, strategies as st

import qlib
from qlib.qparams import PerAxis, PerChannel, PerGroup, PerTensor, qparams_for, quant_range
from qlib.quantize import (code_dtype, dequantize, fake_quantize, fake_quantize_per_group,
                           quantize, quantize_round_half_away)

pytestmark = pytest.mark.filterwarnings("ignore:.*deprecat")
FAST = settings(max_examples=40, deadline=None)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality of float32 tensors (distinguishes -0.0 and +0.0)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))


@st.composite
def qcase(draw, per_channel=False, max_bits=8, dtype=torch.float32):
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
    x = ((k - zero_point.reshape(view)).to(dtype) + frac.to(dtype)) * scale.reshape(view).to(dtype)
    if dtype == torch.float64:  # values between float32 numbers, where float32 math would round
        x = x + x * (torch.rand(shape, generator=g, dtype=dtype) - 0.5) * 2.0**-30
    if not per_channel:
        scale, zero_point = scale[0], zero_point[0]
    return x, scale, zero_point, qmin, qmax, axis


def grad_of(fn, x, seed=0):
    x = x.clone().requires_grad_(True)
    y = fn(x)
    y.backward(torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)))
    return y.detach(), x.grad


@FAST
@given(case=qcase(max_bits=16), tensor_qparams=st.booleans())
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
@given(case=qcase(per_channel=True, max_bits=16))
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


# ------------------------------------------------------------------ dtypes and devices
def same_float_bits(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and bool(torch.all((a == b) | (a.isnan() & b.isnan())))


@FAST
@given(case=qcase(dtype=torch.float64))
def test_float64_input_matches_torch_per_tensor(case):
    # torch computes float64 input in float64 (with the float32 reciprocal): so does qlib;
    # it used to round x to float32 first and return a float32 result cast to float64.
    x, scale, zp, qmin, qmax, _ = case
    y_ref, g_ref = grad_of(lambda t: torch.fake_quantize_per_tensor_affine(t, float(scale), int(zp), qmin, qmax), x)
    y, g = grad_of(lambda t: fake_quantize(t, scale, zp, qmin, qmax), x)
    assert y.dtype == torch.float64 and torch.equal(y, y_ref) and torch.equal(g, g_ref)
    codes = torch.clamp(torch.round(x * (1.0 / torch.tensor(float(scale))).double()) + int(zp), qmin, qmax)
    assert torch.equal(quantize(x, scale, zp, qmin, qmax).long(), codes.long())


@FAST
@given(case=qcase(per_channel=True, dtype=torch.float64))
def test_float64_input_matches_torch_per_channel(case):
    x, scale, zp, qmin, qmax, axis = case
    y_ref, g_ref = grad_of(lambda t: torch.fake_quantize_per_channel_affine(
        t, scale, zp.to(torch.int32), axis, qmin, qmax), x)
    y, g = grad_of(lambda t: fake_quantize(t, scale, zp, qmin, qmax, axis=axis), x)
    # torch's per-channel kernel keeps the float64 product (q - zp) * scale, its per-tensor
    # kernel rounds it to float32; qlib rounds both (so fake_quantize == dequantize(quantize)).
    assert torch.equal(y, y_ref.float().double()) and torch.equal(g, g_ref)
    assert torch.equal(y.float(), dequantize(quantize(x, scale, zp, qmin, qmax, axis=axis), scale, zp, axis=axis))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_match_torch_and_float32_codes(dtype):
    g = torch.Generator().manual_seed(7)
    x = (torch.randn(4, 256, generator=g) * 3).to(dtype)
    scale, zp = torch.tensor([0.05, 0.1, 0.02, 0.3]), torch.tensor([3, -4, 0, 7])
    y = fake_quantize(x, scale, zp, -8, 7, axis=0)
    ref = torch.fake_quantize_per_channel_affine(x, scale, zp.to(torch.int32), 0, -8, 7)
    assert y.dtype == dtype and torch.equal(y, ref)
    assert torch.equal(fake_quantize(x, 0.07, 2, -128, 127),
                       torch.fake_quantize_per_tensor_affine(x, 0.07, 2, -128, 127))
    # codes: those of the float32 values (the upcast is exact)
    assert torch.equal(quantize(x, scale, zp, -8, 7, axis=0), quantize(x.float(), scale, zp, -8, 7, axis=0))


def test_scales_of_any_float_dtype_and_python_numbers():
    x = torch.linspace(-3, 3, 50)
    ref = quantize(x, 0.1, 3, -128, 127)
    for scale in (torch.tensor(0.1, dtype=torch.float64), torch.tensor([0.1]), 0.1):
        for zp in (3, torch.tensor(3, dtype=torch.int8), torch.tensor([3])):
            assert torch.equal(quantize(x, scale, zp, -128, 127), ref)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_inputs_with_python_and_cpu_qparams():
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    s, z = torch.rand(8) + 0.01, torch.randint(-8, 8, (8,))
    for args in ((0.05, 3), (torch.tensor(0.05), torch.tensor(3)), (s, z)):
        axis = 0 if args[0] is s else None
        want = fake_quantize(x, *args, -8, 7, axis=axis)
        got = fake_quantize(x.cuda(), *args, -8, 7, axis=axis)
        assert got.device.type == "cuda" and torch.equal(got.cpu(), want)
        codes = quantize(x.cuda(), *args, -8, 7, axis=axis)
        assert torch.equal(dequantize(codes, *args, axis=axis).cpu(), want)


# ------------------------------------------------------------------ ranges wider than 16 bits
def exact_codes(x, scale, zp, qmin, qmax):
    """The written formula in exact arithmetic: float32 reciprocal, exact product, half to even."""
    inv = Fraction((1.0 / torch.tensor(scale, dtype=torch.float32)).item())
    return [min(max(round(Fraction(v) * inv) + zp, qmin), qmax) for v in x.tolist()]


def test_int32_range_regression():
    # 1e10 is far above 2**31 - 1: it clips to the top code (float32 math once gave -2**31)
    x = torch.tensor([1e10, -1e10, 2.0**31, 2.0**31 - 128, 16777217.0, -16777219.0])
    got = quantize(x, 1.0, 0, -(2**31), 2**31 - 1)
    assert got.dtype == torch.int32
    assert got.tolist() == exact_codes(x, 1.0, 0, -(2**31), 2**31 - 1)
    assert got[:2].tolist() == [2**31 - 1, -(2**31)]
    # float64 input keeps the integers that float32 cannot hold
    x64 = torch.tensor([16777217.0, 2.0**30 + 1, -(2.0**31) + 3], dtype=torch.float64)
    assert quantize(x64, 1.0, 0, -(2**31), 2**31 - 1).tolist() == [16777217, 2**30 + 1, -(2**31) + 3]
    y = fake_quantize(torch.tensor([1e10], requires_grad=True), 1.0, 0, -(2**31), 2**31 - 1)
    assert y.item() == 2.0**31  # the code 2**31 - 1, rounded to float32


@FAST
@given(seed=st.integers(0, 2**31 - 1), signed=st.booleans(), bits=st.integers(17, 32))
def test_wide_ranges_match_the_exact_formula(seed, signed, bits):
    g = torch.Generator().manual_seed(seed)
    qmin, qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2 ** min(bits, 31) - 1)
    scale = float(10 ** (torch.rand(1, generator=g).item() * 6 - 3))
    zp = int(torch.randint(qmin, qmax + 1, (1,), generator=g, dtype=torch.int64))
    k = torch.randint(qmin - 5, qmax + 6, (200,), generator=g, dtype=torch.int64)
    frac = torch.where(torch.rand(200, generator=g) < 0.5, 0.5, torch.rand(200, generator=g) - 0.5)
    x = ((k - zp).double() + frac.double()) * scale
    for xs in (x.float(), x):
        got = quantize(xs, scale, zp, qmin, qmax)
        assert got.tolist() == exact_codes(xs, scale, zp, qmin, qmax)
        # dequantize: computed in float64, then rounded to float32
        x_dq = dequantize(got, scale, zp)
        exact = [(c - zp) * Fraction(torch.tensor(scale, dtype=torch.float32).item()) for c in got.tolist()]
        assert all(abs(Fraction(a) - b) <= abs(b) * 2.0**-23 for a, b in zip(x_dq.tolist(), exact))


# ------------------------------------------------------------------ one vocabulary
def test_granularity_argument_everywhere():
    g = torch.Generator().manual_seed(8)
    x = torch.randn(4, 6, generator=g)
    s, z = torch.rand(6, generator=g) + 0.05, torch.randint(-8, 8, (6,), generator=g)
    for fn in (quantize, fake_quantize, quantize_round_half_away):
        assert torch.equal(fn(x, s, z, -8, 7, granularity=PerChannel(1)), fn(x, s, z, -8, 7, axis=1))
        assert torch.equal(fn(x, s, z, -8, 7, granularity=PerAxis(1)), fn(x, s, z, -8, 7, axis=1))
        assert torch.equal(fn(x, 0.1, 2, -8, 7, granularity=PerTensor()), fn(x, 0.1, 2, -8, 7))
        with pytest.raises(ValueError, match="either granularity= or axis="):
            fn(x, s, z, -8, 7, axis=1, granularity=PerChannel(1))
    q = quantize(x, s, z, -8, 7, axis=1)
    assert torch.equal(dequantize(q, s, z, granularity=PerChannel(1)), dequantize(q, s, z, axis=1))
    gs, gz = torch.rand(4, 2, generator=g) + 0.05, torch.randint(-8, 8, (4, 2), generator=g)
    by_group = fake_quantize(x, gs, gz, -8, 7, granularity=PerGroup(3))
    assert torch.equal(by_group, fake_quantize(x, gs, gz, -8, 7, axis=-1, group_size=3))
    assert torch.equal(by_group, fake_quantize_per_group(x, gs, gz, -8, 7, 3, -1))
    with pytest.raises(TypeError, match="granularity must be"):
        quantize(x, s, z, -8, 7, granularity="per_channel")


def test_qlib_quantize_is_the_function_and_the_module():
    x = torch.linspace(-2, 2, 21)
    assert isinstance(qlib.quantize, types.ModuleType) and callable(qlib.quantize)
    assert torch.equal(qlib.quantize(x, 0.1, 0, -128, 127), quantize(x, 0.1, 0, -128, 127))
    assert qlib.quantize.dequantize is dequantize and qlib.quantize.quantize is quantize
    assert torch.equal(qlib.dequantize(qlib.quantize(x, 0.25, 1, -8, 7), 0.25, 1),
                       qlib.quantize.fake_quantize(x, 0.25, 1, -8, 7))


def test_round_half_away_checks_its_dtype():
    x = torch.tensor([0.5, 1.5, -2.5])
    with pytest.raises(TypeError, match="integer torch.dtype"):
        quantize_round_half_away(x, 1.0, 0, -8, 7, dtype=torch.float32)
    with pytest.raises(ValueError, match="cannot hold codes"):
        quantize_round_half_away(x, 1.0, 0, 0, 255, dtype=torch.int8)
    assert quantize_round_half_away(x, 1.0, 0, -8, 7, dtype=torch.int64).tolist() == [1, 2, -3]
    assert quantize_round_half_away(x.double(), 1.0, 0, -8, 7).tolist() == [1, 2, -3]
