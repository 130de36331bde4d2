"""Tests for qlib.intlayers (IntLinear / IntConv2d built from frozen fake-quant layers).

References: PyTorch's quantized convolution (``torch.ao.nn.quantized.Conv2d``, x86 engine) for
grouped and depthwise ``IntConv2d``, bit for bit on a grid where its float requantization is
exact (power-of-two scales, multipliers 1 and 2, codes inside the output range); and the
fake-quant layers of qlib.modules that the integer layers implement. An integer layer and
its fake-quant layer differ by the int32 bias rounding (at most half an accumulator unit) and by float32 rounding
in the fake-quant layer, bounded from the arithmetic: a float32 dot product of K terms is
within ``(K + 4) * eps32 * sum_k |x_k| |w_k|`` of the exact one (Higham's gamma_K, plus the
float32 rounding of the dequantized codes and of the bias). Torch draws use generators seeded
from ``QLIB_TEST_SEED`` (default 0).
"""

import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qlib.intlayers import IntConv2d, IntLinear, int_conv2d_grouped
from qlib.intops import BACKENDS
from qlib.modules import QuantConfig, QuantConv2d, QuantLinear, fake_quantizers
from qlib.ptq import quantize_dynamic
from qlib.qparams import PerTensor
from qlib.quantize import quantize

SEED = int(os.environ.get("QLIB_TEST_SEED", "0"))
EPS32 = torch.finfo(torch.float32).eps


def gen(offset: int) -> torch.Generator:
    return torch.Generator().manual_seed(SEED * 1000 + offset)


def frozen(layer, x):
    layer(x)
    for fq in fake_quantizers(layer).values():
        fq.freeze()
    return layer


CONVS = {  # kind -> (C_in, C_out, groups, stride)
    "conv": (3, 8, 1, 1),
    "depthwise": (8, 8, 8, 2),   # MobileNet's 3x3 layer: one filter per channel
    "grouped": (6, 4, 2, 1),     # two groups of 3 inputs -> 2 outputs
}
KINDS = ["linear", *CONVS]


def make(kind, g, config=None, bias=True):
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=g)))  # the layer's init
    if kind == "linear":
        q = QuantLinear.from_float(nn.Linear(30, 12, bias=bias), config)
        return frozen(q, torch.randn(64, 30, generator=g)), torch.randn(64, 30, generator=g) * 1.2
    c_in, c_out, groups, stride = CONVS[kind]
    q = QuantConv2d.from_float(nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, groups=groups, bias=bias),
                               config)
    return (frozen(q, torch.randn(8, c_in, 10, 10, generator=g)),
            torch.randn(8, c_in, 10, 10, generator=g) * 1.2)


def float_error_bound(q, x) -> torch.Tensor:
    """``(K + 4) * eps32 * (sum |x_dq| |w_dq| + |b|)``, per output, in float64."""
    x_dq, w_dq = q.input_fq(x).double().abs(), q.weight_fq(q.weight).detach().double().abs()
    b = q.bias.detach().double().abs() if q.bias is not None else None
    if isinstance(q, QuantLinear):
        k, s = w_dq.shape[1], F.linear(x_dq, w_dq, b)
    else:
        k, s = w_dq[0].numel(), F.conv2d(x_dq, w_dq, b, q.stride, q.padding, q.dilation, q.groups)
    return (k + 4) * EPS32 * s


@pytest.mark.parametrize("kind", KINDS)
def test_int_layer_matches_fake_quant_layer(kind):
    g = gen(1 + KINDS.index(kind) * 100)
    q, x = make(kind, g)
    layer = (IntLinear if kind == "linear" else IntConv2d).from_float(q)
    assert layer.weight_q.dtype == torch.int8 and layer.bias_q.dtype == torch.int32
    acc = layer(layer.quantize_input(x))
    assert acc.dtype == torch.int32
    with torch.no_grad():
        y = q(x).double()
    shape = (-1,) if kind == "linear" else (-1, 1, 1)
    unit = layer.acc_scale.reshape(shape)
    exact = acc.double() * unit
    err = 0.5 * unit + float_error_bound(q, x)  # bias rounding + float32 rounding of the fake-quant layer
    assert ((exact - y).abs() <= err).all()
    assert ((layer.dequantize(acc).double() - exact).abs() <= EPS32 * exact.abs()).all()
    # requantized to a next layer's qparams: the fake-quant output's codes, except where y / s_out
    # lies within err / s_out of a rounding boundary (there, one code either way)
    s_out, z_out = torch.tensor(float(y.abs().max()) / 100), torch.tensor(7)
    codes = layer.requantize(acc, s_out, z_out, 0, 255).long()
    ref = quantize(y.float(), s_out, z_out, 0, 255).long()
    diff = (codes - ref).abs()
    assert diff.max() <= 1
    t = y / s_out.double()
    near_boundary = ((t - t.floor() - 0.5).abs() * s_out <= err + 2 * EPS32 * y.abs())
    assert (near_boundary | (diff == 0)).all()


@pytest.mark.parametrize("kind", KINDS)
def test_every_backend_gives_the_same_integers(kind):
    g = gen(3 + KINDS.index(kind) * 100)
    q, x = make(kind, g)
    cls = IntLinear if kind == "linear" else IntConv2d
    x_q = cls.from_float(q).quantize_input(x)
    out = {b: cls.from_float(q, backend=b)(x_q) for b in BACKENDS + (None,)}
    for b, acc in out.items():
        assert torch.equal(acc, out["reference"]), b


def test_requantize_follows_double_rounding():
    """A layer's requantization is ``requantize_scaled`` with the layer's rounding convention."""
    from qlib.requant import requantize_scaled
    g = gen(5)
    q, x = make("conv", g, QuantConfig(weight_bits=4, act_bits=4))
    single, double = IntConv2d.from_float(q), IntConv2d.from_float(q, double_rounding=True)
    acc = single(single.quantize_input(x))
    s_out = torch.tensor(0.3)
    for layer, dr in ((single, False), (double, True)):
        want = requantize_scaled(acc, layer.acc_scale.reshape(-1, 1, 1), s_out, 2, 0, 15, dr)
        assert torch.equal(layer.requantize(acc, s_out, 2, 0, 15), want)


def test_from_quant_is_an_alias_of_from_float():
    g = gen(6)
    q, x = make("linear", g)
    a, b = IntLinear.from_float(q), IntLinear.from_quant(q)
    assert isinstance(b, IntLinear) and torch.equal(a(a.quantize_input(x)), b(b.quantize_input(x)))
    assert IntConv2d.from_quant.__func__ is IntConv2d.from_float.__func__


def test_int_layer_without_bias_and_per_tensor_weights():
    g = gen(7)
    q, x = make("linear", g, QuantConfig(weight_granularity=PerTensor()), bias=False)
    layer = IntLinear.from_float(q)
    assert layer.bias_q is None and layer.weight_scale.shape == (12,)
    acc = layer(layer.quantize_input(x))
    with torch.no_grad():
        y = q(x).double()
    exact = acc.double() * layer.acc_scale
    assert ((exact - y).abs() <= float_error_bound(q, x)).all()  # no bias: only float32 rounding


def test_int_layer_errors():
    with pytest.raises(ValueError, match="not frozen"):
        IntLinear.from_float(QuantLinear.from_float(nn.Linear(3, 2)))
    dynamic = quantize_dynamic(nn.Sequential(nn.Linear(3, 2)))
    with pytest.raises(ValueError, match="dynamic"):
        IntLinear.from_float(dynamic[0])
    with pytest.raises(TypeError, match="QuantLinear"):
        IntLinear.from_float(nn.Linear(3, 2))
    with pytest.raises(TypeError, match="QuantConv2d"):
        IntConv2d.from_float(nn.Conv2d(3, 2, 1))
    g = gen(8)
    reflect = frozen(QuantConv2d.from_float(nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect")),
                     torch.randn(2, 4, 5, 5, generator=g))
    with pytest.raises(NotImplementedError, match="zero padding"):
        IntConv2d.from_float(reflect)
    q, _ = make("linear", g)
    with pytest.raises(ValueError, match="backend"):
        IntLinear.from_float(q, backend="gpu")
    with pytest.raises(TypeError, match="double_rounding"):
        IntLinear.from_float(q, double_rounding="yes")


# ------------------------------------------------------------------ grouped convolutions
def test_grouped_layers_build_and_no_longer_raise():
    """Regression: IntConv2d.from_float raised NotImplementedError for groups != 1."""
    g = gen(9)
    for kind in ("depthwise", "grouped"):
        q, x = make(kind, g)
        layer = IntConv2d.from_float(q)
        assert layer.groups == q.groups > 1 and layer.weight_q.shape == q.weight.shape
        assert f"groups={q.groups}" in repr(layer)
        with torch.no_grad():
            assert layer(layer.quantize_input(x)).shape == q(x).shape


@pytest.fixture
def x86_engine():
    """PyTorch's x86 quantized engine for the test, the previous engine restored after it."""
    if "x86" not in torch.backends.quantized.supported_engines:
        pytest.skip("no x86 quantized engine in this PyTorch build")
    before = torch.backends.quantized.engine
    torch.backends.quantized.engine = "x86"
    yield
    torch.backends.quantized.engine = before


@pytest.mark.filterwarnings("ignore:.*deprecated")  # PyTorch's quantized tensors
@pytest.mark.parametrize("c_in, c_out, groups", [(8, 8, 8), (8, 16, 8), (4, 6, 2)])
def test_grouped_conv_equals_pytorchs_quantized_conv(c_in, c_out, groups, x86_engine):
    """``IntConv2d`` (accumulate, requantize) vs ``torch.ao.nn.quantized.Conv2d``, bit for bit.

    groups = C_in (depthwise; with a channel multiplier of 2 too) and groups = 2. Per-channel
    weight scales 2**-4 or 2**-5 and output scale s_x * 2**-5: every requantization multiplier
    is 1 or 2, which PyTorch's float requantization and qlib's Q31 one both apply exactly; the
    codes stay inside [0, 255] (checked), so no clamp can hide a difference.
    """
    import torch.ao.nn.quantized as nnq
    g = torch.Generator().manual_seed(torch.randint(2**31, (1,)).item() % 2**31)  # fresh inputs for each QLIB_TEST_SEED
    k = c_in // groups * 9
    dx, dw = (3, 2) if k == 9 else (2, 1)                   # K * dx * dw * 2 + |b| < 128
    s_x, z_x, z_y = 2.0**-3, int(torch.randint(10, 240, (1,), generator=g)), 128
    s_w = 2.0 ** -torch.randint(4, 6, (c_out,), generator=g).double()
    s_y = s_x * 2.0**-5
    x_q = (z_x + torch.randint(-dx, dx + 1, (2, c_in, 7, 7), generator=g)).to(torch.uint8)
    w_q = torch.randint(-dw, dw + 1, (c_out, c_in // groups, 3, 3), generator=g).to(torch.int8)
    b_q = torch.randint(-10, 11, (c_out,), generator=g)
    # PyTorch: quantized tensors with these codes and scales; the bias as a float, b_q * s_x * s_w
    ref = nnq.Conv2d(c_in, c_out, 3, stride=1, padding=1, groups=groups)
    w = torch._make_per_channel_quantized_tensor(w_q, s_w, torch.zeros(c_out, dtype=torch.int64), 0)
    ref.set_weight_bias(w, (b_q.double() * s_x * s_w).float())
    ref.scale, ref.zero_point = s_y, z_y
    want = ref(torch._make_per_tensor_quantized_tensor(x_q, s_x, z_x)).int_repr().long()
    # qlib: an IntConv2d of a grouped QuantConv2d, its codes and scales replaced by the same ones
    q = frozen(QuantConv2d.from_float(nn.Conv2d(c_in, c_out, 3, padding=1, groups=groups)),
               torch.randn(2, c_in, 7, 7, generator=g))
    layer = IntConv2d.from_float(q)
    layer.weight_q.copy_(w_q), layer.weight_scale.copy_(s_w), layer.weight_zero_point.zero_()
    layer.input_scale.fill_(s_x), layer.input_zero_point.fill_(z_x), layer.bias_q.copy_(b_q)
    got = layer.requantize(layer(x_q), torch.tensor(s_y), z_y, 0, 255).long()
    assert (want > 0).all() and (want < 255).all()
    assert torch.equal(got, want)
    direct = int_conv2d_grouped(x_q, w_q, z_x, 0, 1, 1, 1, groups, b_q)  # the accumulator itself
    assert torch.equal(direct.long(), ((want - z_y) / (s_x * s_w / s_y).reshape(-1, 1, 1)).round().long())
