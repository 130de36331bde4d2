"""Tests for qlib.qparams.

Reference: torch.ao.quantization MinMaxObserver / PerChannelMinMaxObserver
``calculate_qparams()`` (per_tensor/per_channel, affine/symmetric, qint8/quint8 and custom
2..8-bit ranges), compared bit for bit, including exact ties of the zero-point rounding;
the teaching variant against its written formula.
"""

import warnings

import pytest
import torch
from hypothesis import given, settings, strategies as st

from qlib.qparams import (PerAxis, PerChannel, PerGroup, PerTensor, check_bits, choose_qparams,
                          choose_qparams_symmetric_qmax, minmax, minmax_qparams, qparams_for,
                          qparams_shape, quant_range, resolve_signed, rows_to_qparams, to_rows)

pytestmark = pytest.mark.filterwarnings("ignore:.*deprecat")
tq = torch.ao.quantization
FAST = settings(max_examples=30, deadline=None)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality of float32 tensors (distinguishes -0.0 and +0.0)."""
    return a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))


def torch_observer(bits, signed, symmetric, axis=None):
    """The torch observer for a ``bits``-bit range: default range for 8 bits, custom below."""
    dtype = torch.qint8 if signed else torch.quint8
    if axis is None:
        qscheme = torch.per_tensor_symmetric if symmetric else torch.per_tensor_affine
        cls, kw = tq.MinMaxObserver, {}
    else:
        qscheme = torch.per_channel_symmetric if symmetric else torch.per_channel_affine
        cls, kw = tq.PerChannelMinMaxObserver, {"ch_axis": axis}
    if bits < 8:
        kw["quant_min"], kw["quant_max"] = quant_range(bits, signed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls(dtype=dtype, qscheme=qscheme, **kw)


@st.composite
def data(draw, ndim_min=0):
    """A random float32 tensor: Gaussian with random spread and offset, or a corner case."""
    seed = draw(st.integers(0, 2**31 - 1))
    shape = tuple(draw(st.lists(st.integers(1, 6), min_size=max(ndim_min, 1), max_size=3)))
    g = torch.Generator().manual_seed(seed)
    kind = draw(st.sampled_from(["gauss", "gauss", "positive", "negative", "zeros", "constant", "tiny", "tie"]))
    spread = 10 ** draw(st.floats(-4, 3))
    x = torch.randn(shape, generator=g) * spread
    if kind == "positive":
        x = x.abs() + spread
    elif kind == "negative":
        x = -x.abs() - spread
    elif kind == "zeros":
        x = torch.zeros(shape)
    elif kind == "constant":
        x = torch.full(shape, draw(st.floats(-5, 5, width=32)))
    elif kind == "tiny":
        x = torch.randn(shape, generator=g) * 1e-8
    elif kind == "tie":  # min and max on a power-of-two grid: min_neg / scale is k + 0.5
        x = tie_tensor(shape, draw(st.integers(2, 8)), draw(st.integers(-12, 6)), g)
    return x


def tie_tensor(shape, bits, exponent, g):
    """Values whose min/max make ``min_neg / scale`` an exact tie for ``bits``-bit ranges."""
    levels = 2**bits - 1
    k = int(torch.randint(0, levels, (1,), generator=g))
    lo, hi = -(k + 0.5) * 2.0**exponent, (levels - k - 0.5) * 2.0**exponent
    x = lo + torch.rand(shape, generator=g) * (hi - lo)
    x.view(-1)[0], x.view(-1)[-1] = lo, hi
    return x


@FAST
@given(x=data(), bits=st.integers(2, 8), signed=st.booleans(), symmetric=st.booleans())
def test_choose_qparams_per_tensor_matches_torch(x, bits, signed, symmetric):
    obs = torch_observer(bits, signed, symmetric)
    obs(x)
    ref_scale, ref_zp = obs.calculate_qparams()
    qmin, qmax = quant_range(bits, signed)
    scale, zp = choose_qparams(x.min(), x.max(), qmin, qmax, symmetric=symmetric)
    assert scale.shape == () and scale.dtype == torch.float32 and zp.dtype == torch.int64
    assert same_bits(scale.reshape(1), ref_scale)
    assert torch.equal(zp.reshape(1), ref_zp.to(torch.int64))


@FAST
@given(x=data(ndim_min=2), bits=st.integers(2, 8), signed=st.booleans(),
       symmetric=st.booleans(), axis=st.integers(0, 2))
def test_choose_qparams_per_channel_matches_torch(x, bits, signed, symmetric, axis):
    axis = axis % x.dim()
    obs = torch_observer(bits, signed, symmetric, axis=axis)
    obs(x)
    ref_scale, ref_zp = obs.calculate_qparams()
    qmin, qmax = quant_range(bits, signed)
    min_val, max_val = minmax(x, PerChannel(axis))
    scale, zp = choose_qparams(min_val, max_val, qmin, qmax, symmetric=symmetric)
    assert scale.shape == (x.shape[axis],)
    assert same_bits(scale, ref_scale)
    assert torch.equal(zp, ref_zp.to(torch.int64))


def test_quant_range_values():
    assert quant_range(8) == (-128, 127)
    assert quant_range(8, signed=False) == (0, 255)
    assert quant_range(4) == (-8, 7)
    assert quant_range(2, signed=False) == (0, 3)
    assert quant_range(16) == (-32768, 32767)
    assert quant_range(8, narrow=True) == (-127, 127)


def test_quant_range_errors():
    with pytest.raises(ValueError, match="1 bit gives only two codes"):
        quant_range(1)
    with pytest.raises(ValueError, match=r"\[2, 16\]"):
        quant_range(17)
    with pytest.raises(TypeError, match="bits must be an int"):
        quant_range(8.0)
    with pytest.raises(TypeError, match="bits must be an int"):
        quant_range(True)
    with pytest.raises(ValueError, match="narrow"):
        quant_range(8, signed=False, narrow=True)


def test_unsigned_symmetric_zero_point():
    # torch's default quint8 uses 128; custom unsigned ranges the rounded-down midpoint.
    one = torch.tensor(1.0)
    assert choose_qparams(-one, one, 0, 255, symmetric=True)[1] == 128
    assert choose_qparams(-one, one, 0, 15, symmetric=True)[1] == 7
    assert choose_qparams(-one, one, -8, 7, symmetric=True)[1] == 0
    assert choose_qparams(-one, one, 0, 65535, symmetric=True)[1] == 2**15


def test_documented_deviation_custom_0_255_symmetric():
    # PyTorch gives 127 when (0, 255) is passed as a *custom* range, 128 for the default.
    # qlib has no dtype argument to tell them apart and follows the default: 128.
    obs = tq.MinMaxObserver(dtype=torch.quint8, qscheme=torch.per_tensor_symmetric,
                            quant_min=0, quant_max=255)
    obs(torch.tensor([-1.0, 1.0]))
    assert obs.calculate_qparams()[1].item() == 127
    assert choose_qparams(torch.tensor(-1.0), torch.tensor(1.0), 0, 255, True)[1].item() == 128


def test_symmetric_qmax_variant_formula():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 7, generator=g)
    lo, hi = minmax(x, PerChannel(0))
    scale, zp = choose_qparams_symmetric_qmax(lo, hi, 127)
    expected = torch.maximum(lo.abs(), hi.abs()) / 127.0  # the written formula
    assert same_bits(scale, expected) and torch.equal(zp, torch.zeros(5, dtype=torch.int64))
    # the largest magnitude lands on the code 127; torch's /127.5 puts it on the edge 127.5
    amax = torch.maximum(lo.abs(), hi.abs())
    assert torch.allclose(amax / scale, torch.full((5,), 127.0))
    ts, _ = choose_qparams(lo, hi, -128, 127, symmetric=True)
    assert torch.allclose(amax / ts, torch.full((5,), 127.5))


def test_qparams_for_shapes_and_values():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(6, 8, generator=g)
    s, z = qparams_for(w)
    assert s.shape == () and z.shape == ()
    assert qparams_for(w, granularity=PerChannel(1))[0].shape == (8,)
    s, z = qparams_for(w, bits=4, symmetric=True, granularity=PerGroup(4))
    assert s.shape == (6, 2) and torch.all(z == 0)
    # each group's qparams equal choose_qparams on that group's own min and max
    for r in range(6):
        for k in range(2):
            grp = w[r, 4 * k:4 * k + 4]
            rs, rz = choose_qparams(grp.min(), grp.max(), -8, 7, symmetric=True)
            assert same_bits(s[r, k], rs) and z[r, k] == rz
    s0, _ = qparams_for(w, granularity=PerGroup(3, axis=0))
    assert s0.shape == (2, 8)
    lo, _ = minmax(w, PerGroup(3, axis=0))
    assert torch.equal(lo[1], w[3:6].amin(0))
    # affine default is unsigned (0, 255), like torch's quint8 activations
    s, z = qparams_for(w.abs())
    assert z == 0 and torch.isclose(s, w.abs().max() / 255)


def test_to_rows_and_shapes():
    x = torch.arange(24.0).reshape(2, 3, 4)
    assert to_rows(x, PerTensor()).shape == (1, 24)
    assert torch.equal(to_rows(x, PerChannel(1))[2], x[:, 2].flatten())
    assert to_rows(x, PerGroup(2)).shape == (12, 2)
    assert qparams_shape(x.shape, PerGroup(2, axis=-1)) == (2, 3, 2)
    assert qparams_shape(x.shape, PerChannel(-1)) == (4,)


def test_errors():
    one, nan = torch.tensor(1.0), torch.tensor(float("nan"))
    with pytest.raises(ValueError, match="NaN or infinite"):
        choose_qparams(nan, one, 0, 255)
    with pytest.raises(ValueError, match="NaN or infinite"):
        choose_qparams(-one, torch.tensor(float("inf")), 0, 255)
    with pytest.raises(ValueError, match="min_val must be <= max_val"):
        choose_qparams(one, -one, 0, 255)
    with pytest.raises(ValueError, match="differ in shape"):
        choose_qparams(torch.zeros(3), torch.ones(2), 0, 255)
    with pytest.raises(ValueError, match="quant_min must be < quant_max"):
        choose_qparams(-one, one, 5, 5)
    with pytest.raises(TypeError, match="quant_min must be an int"):
        choose_qparams(-one, one, 0.0, 255)
    with pytest.raises(ValueError, match="must contain 0"):
        choose_qparams(-one, one, 1, 255)
    with pytest.raises(ValueError, match="eps must be > 0"):
        choose_qparams(-one, one, 0, 255, eps=0.0)
    with pytest.raises(ValueError, match="empty"):
        choose_qparams(torch.zeros(0), torch.zeros(0), 0, 255)
    with pytest.raises(ValueError, match="empty"):
        minmax(torch.zeros(2, 0))
    with pytest.raises(TypeError, match="floating-point"):
        minmax(torch.arange(4))
    with pytest.raises(TypeError, match="torch.Tensor"):
        minmax([1.0, 2.0])
    with pytest.raises(ValueError, match="NaN or infinite"):
        qparams_for(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="not divisible by group_size"):
        qparams_for(torch.ones(2, 6), granularity=PerGroup(4))
    with pytest.raises(ValueError, match="group_size must be a positive int"):
        qparams_for(torch.ones(2, 6), granularity=PerGroup(0))
    with pytest.raises(ValueError, match="axis 2 is out of range"):
        qparams_for(torch.ones(2, 6), granularity=PerChannel(2))
    with pytest.raises(TypeError, match="granularity must be"):
        qparams_for(torch.ones(2, 6), granularity="per_channel")
    with pytest.raises(ValueError, match=r"bits must be in \[2, 16\]"):
        qparams_for(torch.ones(3), bits=1)


# ------------------------------------------------------------------ exact ties
@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("signed", [False, True])
def test_zero_point_ties_round_half_to_even_like_torch(bits, signed):
    # min_neg = -(k + 1/2) s and max_pos = (levels - k - 1/2) s with s a power of two:
    # scale == s exactly and min_neg / scale == -(k + 1/2), a tie, for every k.
    qmin, qmax = quant_range(bits, signed)
    levels = qmax - qmin
    for exponent in (-9, 0, 3):
        s = 2.0**exponent
        k = torch.arange(levels, dtype=torch.float32)
        lo, hi = -(k + 0.5) * s, (levels - k - 0.5) * s
        scale, zp = choose_qparams(lo, hi, qmin, qmax)
        assert torch.all(scale == s) and torch.all(lo / scale == -(k + 0.5))
        # written formula: Python's round() is half to even
        assert zp.tolist() == [min(max(qmin - round(-(j + 0.5)), qmin), qmax) for j in range(levels)]
        obs = torch_observer(bits, signed, False, axis=0)
        obs(torch.stack([lo, hi], dim=1))
        ref_scale, ref_zp = obs.calculate_qparams()
        assert same_bits(scale, ref_scale) and torch.equal(zp, ref_zp.to(torch.int64))


@FAST
@given(seed=st.integers(0, 2**31 - 1), bits=st.integers(2, 8), exponent=st.integers(-12, 6))
def test_per_tensor_ties_match_torch(seed, bits, exponent):
    x = tie_tensor((7, 3), bits, exponent, torch.Generator().manual_seed(seed))
    obs = torch_observer(bits, False, False)
    obs(x)
    scale, zp = qparams_for(x, bits)
    assert same_bits(scale.reshape(1), obs.calculate_qparams()[0])
    assert torch.equal(zp.reshape(1), obs.calculate_qparams()[1].long())


# ------------------------------------------------------------------ one vocabulary
def test_check_bits_is_the_one_rule():
    assert [check_bits(b) for b in (2, 8, 16)] == [2, 8, 16]
    for bad, err in ((1, ValueError), (17, ValueError), (0, ValueError), (True, TypeError),
                     (8.0, TypeError), ("8", TypeError)):
        with pytest.raises(err, match=r"bits must be (in \[2, 16\]|an int)"):
            check_bits(bad)
        with pytest.raises(err, match=r"bits must be"):
            quant_range(bad)


def test_signed_default_one_rule():
    assert resolve_signed(None, True) is True and resolve_signed(None, False) is False
    assert resolve_signed(False, True) is False and resolve_signed(True, False) is True
    with pytest.raises(TypeError, match="signed must be True, False or None"):
        resolve_signed(1, True)
    w = torch.randn(4, 5, generator=torch.Generator().manual_seed(2))
    s, z = qparams_for(w, symmetric=True)  # signed: zero point 0
    assert torch.equal(z, torch.tensor(0)) and same_bits(s, choose_qparams(w.min(), w.max(), -128, 127, True)[0])
    s, z = qparams_for(w, symmetric=True, signed=False)  # explicit unsigned: zero point 128
    assert torch.equal(z, torch.tensor(128))


def test_per_axis_is_per_channel_and_granularities_validate():
    assert PerAxis is PerChannel and PerAxis(1) == PerChannel(1)
    w = torch.randn(3, 5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(qparams_for(w, granularity=PerAxis(1))[0], qparams_for(w, granularity=PerChannel(1))[0])
    with pytest.raises(TypeError, match="PerChannel axis must be an int"):
        PerChannel("0")
    with pytest.raises(TypeError, match="PerGroup group_size must be an int"):
        PerGroup(4.0)
    with pytest.raises(ValueError, match="group_size must be a positive int"):
        PerGroup(-2)


def test_minmax_qparams_is_choose_qparams_of_minmax():
    w = torch.randn(6, 8, generator=torch.Generator().manual_seed(4))
    for g in (PerTensor(), PerChannel(0), PerGroup(4)):
        for symmetric in (False, True):
            want = choose_qparams(*minmax(w, g), -8, 7, symmetric=symmetric)
            got = minmax_qparams(w, -8, 7, symmetric, g)
            assert same_bits(got[0], want[0]) and torch.equal(got[1], want[1])


def test_python_numbers_and_dtypes_for_min_max():
    want = choose_qparams(torch.tensor(-1.5), torch.tensor(2.0), 0, 255)
    for lo, hi in ((-1.5, 2.0), (-1.5, 2), (torch.tensor(-1.5, dtype=torch.float64), 2.0),
                   (torch.tensor(-1.5, dtype=torch.bfloat16), torch.tensor(2.0, dtype=torch.float16))):
        got = choose_qparams(lo, hi, 0, 255)
        assert same_bits(got[0], want[0]) and torch.equal(got[1], want[1])


def test_rows_to_qparams_checks_the_length():
    x = torch.zeros(4, 6)
    assert rows_to_qparams(torch.arange(8.0), x.shape, PerGroup(3)).shape == (4, 2)
    with pytest.raises(ValueError, match="expected a tensor of 8 values"):
        rows_to_qparams(torch.arange(6.0), x.shape, PerGroup(3))


def test_affine_zero_point_is_the_one_formula_choose_qparams_uses():
    """Reference: ``clamp(qmin - round_half_even(min_neg / scale), qmin, qmax)`` (DESIGN numerics)."""
    from qlib.qparams import affine_zero_point

    g = torch.Generator().manual_seed(11)
    min_val = -torch.rand(50, generator=g) * 3
    max_val = torch.rand(50, generator=g) * 3
    scale, zp = choose_qparams(min_val, max_val, 0, 255)
    assert torch.equal(affine_zero_point(min_val, scale, 0, 255), zp)
    # an exact tie rounds to even: min_neg / scale = -2.5 -> round -2 -> zero point 2
    assert affine_zero_point(torch.tensor([-2.5]), torch.tensor([1.0]), 0, 255).item() == 2
