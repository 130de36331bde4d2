"""Tests for qlib.intops (integer-only arithmetic and integer layers).

Reference: Jacob et al. 2018, "Quantization and Training of Neural Networks for Efficient
Integer-Arithmetic-Only Inference", and gemmlowp's fixedpoint.h / TFLite's
MultiplyByQuantizedMultiplier, re-derived here with Python's exact integers and fractions;
float64 convolution and matmul of the centered codes (exact for these integer ranges); the
fake-quant layers of qlib.modules for IntLinear / IntConv2d.
"""

from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from qlib.intops import (INT32_MAX, INT32_MIN, IntConv2d, IntLinear, im2col, int_conv2d, int_matmul,
                         multiply_by_quantized_multiplier, quantize_multiplier, requantize,
                         rounding_divide_by_pot, saturating_rounding_doubling_high_mul)
from qlib.modules import QuantConv2d, QuantLinear, fake_quantizers
from qlib.ptq import quantize_dynamic
from qlib.quantize import quantize

int32s = st.integers(INT32_MIN, INT32_MAX)


def round_half_away(fr: Fraction) -> int:
    """Exact rounding to nearest, ties away from zero."""
    n = (abs(fr.numerator) * 2 + fr.denominator) // (2 * fr.denominator)
    return n if fr >= 0 else -n


# ----------------------------------------------------------------- fixed-point pieces
@given(st.floats(2.0**-31, 2.0**30, allow_nan=False, allow_infinity=False))
def test_quantize_multiplier_reproduces_the_real_multiplier(real):
    m, shift = quantize_multiplier(real)
    assert 2**30 <= m < 2**31
    assert abs(Fraction(m) * Fraction(2) ** (shift - 31) - Fraction(real)) <= Fraction(real) * Fraction(1, 2**31)


def test_quantize_multiplier_vectorized_and_edge_cases():
    reals = torch.rand(50, dtype=torch.float64) * torch.logspace(-9, 3, 50, dtype=torch.float64)
    m, shift = quantize_multiplier(reals)
    assert m.dtype == shift.dtype == torch.int64 and m.shape == (50,)
    assert [(int(a), int(b)) for a, b in zip(m, shift)] == [quantize_multiplier(float(r)) for r in reals]
    assert quantize_multiplier(0.0) == (0, 0)
    assert quantize_multiplier(2.0**-40) == (0, 0)  # times any int32 it rounds to 0
    assert quantize_multiplier(1.0) == (2**30, 1)
    for bad in (-0.5, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            quantize_multiplier(bad)
    with pytest.raises(ValueError, match="2\\*\\*31"):
        quantize_multiplier(2.0**33)


@given(int32s, int32s)
def test_srdhm_matches_gemmlowp_formula(a, b):
    got = int(saturating_rounding_doubling_high_mul(a, b))
    if a == b == INT32_MIN:
        assert got == INT32_MAX
    else:
        assert got == round_half_away(Fraction(a * b, 2**31))


@given(st.integers(-(2**40), 2**40), st.integers(0, 40))
def test_rounding_divide_by_pot_is_round_half_away(x, exponent):
    assert int(rounding_divide_by_pot(x, exponent)) == round_half_away(Fraction(x, 2**exponent))


def test_rounding_divide_by_pot_rejects_bad_input():
    with pytest.raises(ValueError, match="exponent"):
        rounding_divide_by_pot(5, -1)
    with pytest.raises(TypeError, match="integers"):
        rounding_divide_by_pot(torch.tensor([1.5]), 1)


@settings(max_examples=200)
@given(st.integers(-(2**24), 2**24), st.floats(1e-6, 4.0))
def test_multiply_by_quantized_multiplier(x, real):
    m, shift = quantize_multiplier(real)
    exact = Fraction(x) * Fraction(m) * Fraction(2) ** (shift - 31)
    single = int(multiply_by_quantized_multiplier(x, m, shift))
    double = int(multiply_by_quantized_multiplier(x, m, shift, double_rounding=True))
    assert single == round_half_away(exact)  # one rounding of the exact product
    assert abs(double - exact) <= 1  # two roundings: off by at most one


def test_double_rounding_example_from_the_docstring():
    m, shift = quantize_multiplier(0.1148)
    assert shift == -3
    x = 13  # x * 0.1148 = 1.4924
    assert int(multiply_by_quantized_multiplier(x, m, shift)) == 1
    assert int(multiply_by_quantized_multiplier(x, m, shift, double_rounding=True)) == 2


@pytest.mark.parametrize("double_rounding", [False, True])
def test_requantize_matches_float_reference_within_one_code(double_rounding):
    acc = torch.randint(-(2**20), 2**20, (64, 16))
    real = torch.rand(16, dtype=torch.float64) * 2.0**-12 + 2.0**-14  # one per channel
    m, shift = quantize_multiplier(real)
    q = requantize(acc, m, shift, 128, 0, 255, double_rounding=double_rounding)
    assert q.dtype == torch.uint8
    ref = torch.clamp(torch.round(acc.double() * real) + 128, 0, 255)
    diff = (q.double() - ref).abs()
    assert diff.max() <= 1
    if not double_rounding:
        assert (diff == 0).float().mean() > 0.999


def test_requantize_per_channel_conv_shape():
    acc = torch.randint(-5000, 5000, (2, 3, 4, 4))
    m, shift = quantize_multiplier(torch.tensor([0.01, 0.02, 0.03], dtype=torch.float64))
    q = requantize(acc, m.reshape(3, 1, 1), shift.reshape(3, 1, 1), 0, -128, 127)
    assert q.dtype == torch.int8 and q.shape == acc.shape
    ref = torch.clamp(torch.round(acc.double() * torch.tensor([0.01, 0.02, 0.03]).reshape(3, 1, 1).double()),
                      -128, 127)
    assert (q.double() - ref).abs().max() <= 1


# ----------------------------------------------------------------- integer matmul and conv
def test_int_matmul_is_exact_int32():
    a = torch.randint(0, 256, (5, 7, 40), dtype=torch.int64).to(torch.uint8)
    b = torch.randint(-128, 128, (40, 9)).to(torch.int8)
    b_zp = torch.randint(-3, 4, (9,))
    acc = int_matmul(a, b, 117, b_zp)
    assert acc.dtype == torch.int32 and acc.shape == (5, 7, 9)
    ref = (a.double() - 117) @ (b.double() - b_zp.double())
    assert torch.equal(acc.double(), ref)


def test_int_matmul_errors():
    with pytest.raises(ValueError, match="K"):
        int_matmul(torch.zeros(3, 4, dtype=torch.int8), torch.zeros(5, 2, dtype=torch.int8))
    with pytest.raises(TypeError, match="integers"):
        int_matmul(torch.zeros(3, 4), torch.zeros(4, 2, dtype=torch.int8))
    big = torch.full((2, 2**16), 2**10)
    with pytest.raises(OverflowError, match="int32"):
        int_matmul(big, torch.full((2**16, 1), 2**10))


def test_im2col_matches_torch_unfold():
    x = torch.randn(2, 3, 9, 8)
    cols = im2col(x, (3, 2), stride=(2, 1), padding=1, dilation=(1, 2))
    ref = F.unfold(x, (3, 2), stride=(2, 1), padding=1, dilation=(1, 2))  # (N, C*kh*kw, L)
    assert torch.equal(cols.reshape(2, -1, cols.shape[-1]).transpose(1, 2), ref)


@pytest.mark.parametrize("kw", [dict(), dict(stride=2, padding=1), dict(padding=2, dilation=2)])
def test_int_conv2d_matches_float64_conv(kw):
    x = torch.randint(0, 256, (2, 3, 9, 9)).to(torch.uint8)
    w = torch.randint(-128, 128, (5, 3, 3, 3)).to(torch.int8)
    acc = int_conv2d(x, w, 100, 0, **kw)
    ref = F.conv2d(x.double() - 100, w.double(), **kw)  # zero padding = real 0.0 = code 100
    assert acc.dtype == torch.int32 and torch.equal(acc.double(), ref)


# ----------------------------------------------------------------- integer layers
def frozen(layer, x):
    layer(x)
    for fq in fake_quantizers(layer).values():
        fq.freeze()
    return layer


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_int_layer_matches_fake_quant_layer(kind):
    if kind == "linear":
        q = frozen(QuantLinear.from_float(nn.Linear(30, 12)), torch.randn(64, 30))
        x, int_cls, shape = torch.randn(64, 30) * 1.2, IntLinear, (-1,)
    else:
        q = frozen(QuantConv2d.from_float(nn.Conv2d(3, 8, 3, padding=1)), torch.randn(8, 3, 10, 10))
        x, int_cls, shape = torch.randn(8, 3, 10, 10) * 1.2, IntConv2d, (-1, 1, 1)
    layer = int_cls.from_quant(q)
    assert layer.weight_q.dtype == torch.int8 and layer.bias_q.dtype == torch.int32
    acc = layer(layer.quantize_input(x))
    assert acc.dtype == torch.int32
    y = q(x)
    # dequantized accumulator = fake-quant output, up to the int32 bias rounding (half a unit)
    unit = layer.acc_scale.reshape(shape).float()
    assert ((layer.dequantize(acc) - y).abs() <= 0.5 * unit + 1e-5 * y.abs()).all()
    # requantized to some next layer's qparams = fake-quant output quantized, within one code
    s_out, z_out = torch.tensor(y.abs().max().item() / 100), torch.tensor(7)
    codes = layer.requantize(acc, s_out, z_out, 0, 255)
    ref = quantize(y, s_out, z_out, 0, 255)
    diff = (codes.long() - ref.long()).abs()
    assert diff.max() <= 1 and (diff == 0).float().mean() > 0.99


def test_int_layer_without_bias_and_per_tensor_weights():
    from qlib.modules import QuantConfig
    from qlib.qparams import PerTensor
    cfg = QuantConfig(weight_granularity=PerTensor())
    q = frozen(QuantLinear.from_float(nn.Linear(10, 4, bias=False), cfg), torch.randn(16, 10))
    layer = IntLinear.from_quant(q)
    assert layer.bias_q is None and layer.weight_scale.shape == (4,)
    x = torch.randn(16, 10)
    torch.testing.assert_close(layer.dequantize(layer(layer.quantize_input(x))), q(x), rtol=1e-5, atol=1e-6)


def test_int_layer_errors():
    with pytest.raises(ValueError, match="not frozen"):
        IntLinear.from_quant(QuantLinear.from_float(nn.Linear(3, 2)))
    dynamic = quantize_dynamic(nn.Sequential(nn.Linear(3, 2)))
    with pytest.raises(ValueError, match="dynamic"):
        IntLinear.from_quant(dynamic[0])
    with pytest.raises(TypeError, match="QuantLinear"):
        IntLinear.from_quant(nn.Linear(3, 2))
    with pytest.raises(TypeError, match="QuantConv2d"):
        IntConv2d.from_quant(nn.Conv2d(3, 2, 1))
    grouped = frozen(QuantConv2d.from_float(nn.Conv2d(4, 4, 3, groups=2)), torch.randn(2, 4, 5, 5))
    with pytest.raises(NotImplementedError, match="groups"):
        IntConv2d.from_quant(grouped)
