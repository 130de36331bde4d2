"""Tests for qlib.observers.

Reference: torch.ao.quantization MinMaxObserver, PerChannelMinMaxObserver,
MovingAverageMinMaxObserver and MovingAveragePerChannelMinMaxObserver (buffers and
``calculate_qparams()`` bit for bit); percentile against a sort-based written formula;
MSE against its defining property (entropy: tests/test_entropy.py); reservoir sampling against
the sequential Algorithm R (Vitter 1985) written out in Python.
"""

import warnings

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

import qlib.observers
from qlib.entropy import EntropyObserver
from qlib.observers import (MinMaxObserver, MovingAverageMinMaxObserver,
                            MSEObserver, PercentileObserver, make_observer,
                            mse_range, percentile_range, reservoir_update)
from qlib.qparams import PerChannel, PerGroup, choose_qparams, quant_range
from qlib.quantize import fake_quantize

pytestmark = pytest.mark.filterwarnings("ignore:.*deprecat")
tq = torch.ao.quantization
FAST = settings(max_examples=25, deadline=None)
NAMES = ["minmax", "moving_average", "percentile", "mse", "entropy"]


def same_bits(a, b):
    return a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))


def torch_observer(cls, bits, signed, symmetric, per_channel, **kw):
    if per_channel:
        kw["qscheme"] = torch.per_channel_symmetric if symmetric else torch.per_channel_affine
    else:
        kw["qscheme"] = torch.per_tensor_symmetric if symmetric else torch.per_tensor_affine
    if bits < 8:
        kw["quant_min"], kw["quant_max"] = quant_range(bits, signed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls(dtype=torch.qint8 if signed else torch.quint8, **kw)


def batches(seed, n, shape=(4, 6, 5)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) * float(torch.rand(1, generator=g) * 3 + 0.1)
            + float(torch.randn(1, generator=g)) for _ in range(n)]


@FAST
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 4), bits=st.integers(2, 8),
       signed=st.booleans(), symmetric=st.booleans(), moving=st.booleans())
def test_per_tensor_observers_match_torch(seed, n, bits, signed, symmetric, moving):
    ours_cls, ref_cls = ((MovingAverageMinMaxObserver, tq.MovingAverageMinMaxObserver) if moving
                         else (MinMaxObserver, tq.MinMaxObserver))
    ref = torch_observer(ref_cls, bits, signed, symmetric, False)
    obs = ours_cls(bits=bits, symmetric=symmetric, signed=signed)
    for x in batches(seed, n):
        assert obs(x) is x
        ref(x)
    assert same_bits(obs.min_val, ref.min_val) and same_bits(obs.max_val, ref.max_val)
    scale, zp = obs.calculate_qparams()
    ref_scale, ref_zp = ref.calculate_qparams()
    assert same_bits(scale.reshape(1), ref_scale) and torch.equal(zp.reshape(1), ref_zp.long())


@FAST
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 3), bits=st.integers(2, 8),
       signed=st.booleans(), symmetric=st.booleans(), axis=st.integers(0, 2), moving=st.booleans())
def test_per_channel_observers_match_torch(seed, n, bits, signed, symmetric, axis, moving):
    ours_cls, ref_cls = ((MovingAverageMinMaxObserver, tq.MovingAveragePerChannelMinMaxObserver) if moving
                         else (MinMaxObserver, tq.PerChannelMinMaxObserver))
    ref = torch_observer(ref_cls, bits, signed, symmetric, True, ch_axis=axis)
    obs = ours_cls(bits=bits, symmetric=symmetric, signed=signed, granularity=PerChannel(axis))
    for x in batches(seed, n):
        obs(x)
        ref(x)
    assert same_bits(obs.min_val, ref.min_val) and same_bits(obs.max_val, ref.max_val)
    scale, zp = obs.calculate_qparams()
    ref_scale, ref_zp = ref.calculate_qparams()
    assert same_bits(scale, ref_scale) and torch.equal(zp, ref_zp.long())


@pytest.mark.parametrize("name", NAMES)
def test_interface_and_weight_use_case(name):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 12, generator=g) * torch.linspace(0.1, 2, 8)[:, None]
    kw = {"bins": 128} if name == "entropy" else {}
    obs = make_observer(name, bits=4, symmetric=True, signed=True, granularity=PerChannel(0), **kw)
    assert (obs.quant_min, obs.quant_max, obs.bits, obs.symmetric) == (-8, 7, 4, True)
    assert obs.granularity == PerChannel(0)
    assert obs(w) is w
    scale, zp = obs.calculate_qparams()
    assert scale.shape == (8,) and scale.dtype == torch.float32 and zp.dtype == torch.int64
    assert torch.all(zp == 0) and torch.all(scale > 0)
    # scales follow the channel magnitudes
    assert scale[-1] > scale[0]
    assert {"min_val", "max_val"} <= set(obs.state_dict())
    # in a model: returns its input unchanged, gradients flow
    model = nn.Sequential(nn.Linear(12, 5), make_observer(name, **kw))
    x = torch.randn(3, 12, generator=g, requires_grad=True)
    model(x).sum().backward()
    assert x.grad is not None and model[1].calculate_qparams()[0].shape == ()


@pytest.mark.parametrize("name", NAMES)
def test_per_group(name):
    w = torch.randn(4, 32, generator=torch.Generator().manual_seed(1))
    kw = {"bins": 64} if name == "entropy" else {}
    obs = make_observer(name, bits=4, symmetric=True, signed=True, granularity=PerGroup(8), **kw)
    obs(w)
    scale, _ = obs.calculate_qparams()
    assert scale.shape == (4, 4)
    if name in ("minmax", "moving_average"):
        assert torch.equal(scale[2, 1], choose_qparams(w[2, 8:16].min(), w[2, 8:16].max(), -8, 7, True)[0])


def test_percentile_matches_written_formula():
    g = torch.Generator().manual_seed(2)
    xs = [torch.randn(50, 7, generator=g) for _ in range(3)]
    obs = PercentileObserver(percentile=99.0, granularity=PerChannel(1))
    for x in xs:
        obs(x)
    rows = torch.cat(xs).T  # (7, 150): all values kept (max_samples is larger)
    s = rows.sort(dim=1).values
    pos = 0.99 * 149  # linear interpolation between the neighbouring order statistics
    i = int(pos)
    hi = s[:, i] + (pos - i) * (s[:, i + 1] - s[:, i])
    pos = 0.01 * 149
    i = int(pos)
    lo = s[:, i] + (pos - i) * (s[:, i + 1] - s[:, i])
    assert torch.allclose(obs._clip_range()[1], hi) and torch.allclose(obs._clip_range()[0], lo)
    assert torch.allclose(hi, torch.quantile(rows, 0.99, dim=1))
    ref = choose_qparams(lo, hi, 0, 255)
    assert torch.allclose(obs.calculate_qparams()[0], ref[0])


def test_percentile_clips_outliers_and_100_is_minmax():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(10000, generator=g)
    x[0] = 1000.0
    p = PercentileObserver(percentile=99.9, symmetric=True, signed=True)
    m = MinMaxObserver(symmetric=True, signed=True)
    p(x), m(x)
    assert p.calculate_qparams()[0] < m.calculate_qparams()[0] / 100
    full = PercentileObserver(percentile=100.0)
    full(x)
    assert torch.equal(full.calculate_qparams()[0], choose_qparams(x.min(), x.max(), 0, 255)[0])


def test_reservoir_is_bounded_uniform_and_seeded():
    def run(seed):
        gen = torch.Generator().manual_seed(seed)
        sample, seen = torch.empty(2, 0), 0
        for start in range(0, 20000, 1000):
            cols = torch.arange(start, start + 1000, dtype=torch.float32).expand(2, -1)
            sample, seen = reservoir_update(sample, seen, cols, 500, gen)
        return sample, seen
    sample, seen = run(0)
    assert sample.shape == (2, 500) and seen == 20000
    assert torch.equal(sample[0], sample[1])  # rows share the sampled columns
    assert abs(sample.mean().item() - 10000) < 1500  # uniform over the whole stream
    assert torch.equal(run(0)[0], sample) and not torch.equal(run(1)[0], sample)


def test_mse_never_worse_than_minmax_per_channel():
    g = torch.Generator().manual_seed(4)
    w = torch.randn(16, 64, generator=g)
    w[:, 0] *= 6  # one outlier per channel: clipping it pays off at 4 bits
    obs = MSEObserver(bits=4, symmetric=True, signed=True, granularity=PerChannel(0))
    obs(w)
    err = lambda s, z: ((fake_quantize(w, s, z, -8, 7, axis=0) - w) ** 2).mean(1)
    e_mse = err(*obs.calculate_qparams())
    e_max = err(*choose_qparams(w.amin(1), w.amax(1), -8, 7, True))
    assert torch.all(e_mse <= e_max) and e_mse.mean() < e_max.mean()
    lo, hi = mse_range(w, -8, 7, symmetric=True, grid=1)  # grid=1: only a = 1, i.e. min-max
    assert torch.equal(lo, w.amin(1)) and torch.equal(hi, w.amax(1))


@pytest.mark.parametrize("name", ["minmax", "moving_average", "entropy"])
@pytest.mark.parametrize("granularity", [PerChannel(0), PerGroup(2)])
def test_state_dict_round_trip(name, granularity):
    kw = dict(symmetric=True, signed=True, granularity=granularity)
    kw.update({"bins": 32} if name == "entropy" else {})
    obs = make_observer(name, **kw)
    obs(torch.randn(5, 4, generator=torch.Generator().manual_seed(6)))
    fresh = make_observer(name, **kw)
    fresh.load_state_dict(obs.state_dict())
    assert torch.equal(fresh.calculate_qparams()[0], obs.calculate_qparams()[0])


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("cast", [torch.bfloat16, torch.float16, torch.float64])
def test_dtype_casts_keep_the_statistics_exact(name, cast):
    # reference: an observer that never left float32 (the statistics are float32 by contract);
    # 1 + 2**-12 is not a bfloat16 or float16 number, so a cast and back would move the range
    kw = {"bins": 32} if name == "entropy" else {}
    g = torch.Generator().manual_seed(7)
    first = torch.randn(64, generator=g) * 3 + (1 + 2**-12)
    first[0] = 1 + 2**-12 + 20.0
    later = torch.randn(64, generator=g)
    cast_obs, reference = make_observer(name, **kw), make_observer(name, **kw)
    cast_obs(first)
    reference(first)
    cast_obs.to(cast)
    for buf_name, buf in reference.named_buffers():
        kept = dict(cast_obs.named_buffers())[buf_name]
        assert kept.dtype == buf.dtype, buf_name
        assert torch.equal(kept, buf), buf_name
    cast_obs(later.to(cast))  # observing resumes from the exact range
    reference(later.to(cast))
    for a, b in zip(cast_obs.calculate_qparams(), reference.calculate_qparams()):
        assert torch.equal(a, b)


def test_reset():
    obs = PercentileObserver()
    obs(torch.randn(10))
    obs.reset()
    with pytest.raises(ValueError, match="observer has seen no data"):
        obs.calculate_qparams()


@pytest.mark.parametrize("name", NAMES)
def test_errors(name):
    obs = make_observer(name)
    with pytest.raises(ValueError, match="observer has seen no data: run calibration batches first"):
        obs.calculate_qparams()
    with pytest.raises(ValueError, match="NaN or infinite"):
        obs(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="empty"):
        obs(torch.zeros(0))
    with pytest.raises(TypeError, match="floating-point"):
        obs(torch.arange(3))
    with pytest.raises(ValueError, match=r"bits must be in \[2, 16\]"):
        make_observer(name, bits=1)
    with pytest.raises(TypeError, match="granularity must be"):
        make_observer(name, granularity="per_tensor")
    ch = make_observer(name, granularity=PerChannel(0))
    ch(torch.randn(3, 4))
    with pytest.raises(ValueError, match="one observer per tensor"):
        ch(torch.randn(5, 4))


def test_constructor_errors():
    with pytest.raises(ValueError, match="unknown observer 'histogramm'"):
        make_observer("histogramm")
    with pytest.raises(ValueError, match="percentile must be in"):
        PercentileObserver(percentile=20)
    with pytest.raises(ValueError, match="averaging_constant must be in"):
        MovingAverageMinMaxObserver(averaging_constant=0.0)
    with pytest.raises(ValueError, match="grid must be a positive int"):
        MSEObserver(grid=0)
    with pytest.raises(ValueError, match="max_samples must be a positive int"):
        MSEObserver(max_samples=0)
    with pytest.raises(ValueError, match="bins must be an int"):
        EntropyObserver(bins=4)




# Largest error / max|w| per channel over 300 seeds (4-bit symmetric per-channel weights):
# minmax, moving_average and entropy (nothing clipped here) 1/15 = scale/2 exactly;
# percentile 0.0674; mse 0.132. Bounds: the theory where there is one, else about twice that.
ERROR_BOUND = {"minmax": 1 / 15, "moving_average": 1 / 15, "entropy": 0.14, "percentile": 0.14, "mse": 0.27}


@pytest.mark.parametrize("name", NAMES)
def test_weight_error_bound(name):
    kw = {"bins": 128} if name == "entropy" else {}
    for seed in range(10):
        g = torch.Generator().manual_seed(100 + seed)
        w = torch.randn(8, 12, generator=g) * torch.linspace(0.1, 2, 8)[:, None]
        obs = make_observer(name, bits=4, symmetric=True, signed=True, granularity=PerChannel(0), **kw)
        obs(w)
        scale, zp = obs.calculate_qparams()
        err = (fake_quantize(w, scale, zp, -8, 7, axis=0) - w).abs().amax(1)
        # (1 + 1e-5): float32 rounding of w_dq - w, about 15 ulps of the bound 1/15
        assert torch.all(err <= ERROR_BOUND[name] * w.abs().amax(1) * (1 + 1e-5)), (seed, err / w.abs().amax(1))
        if name in ("minmax", "moving_average"):  # never clips: the rounding error alone
            assert torch.all(err <= scale / 2 * (1 + 1e-5))


def test_make_observer_builds_each_rule():
    g = torch.Generator().manual_seed(9)
    x1 = torch.randn(4000, generator=g)
    x1[0] = 40.0  # one outlier: the clipping observers cut it, min-max keeps it
    x2 = 3 * torch.randn(4000, generator=g)
    obs = {n: make_observer(n, bits=4) for n in NAMES}
    for o in obs.values():
        o(x1), o(x2)
    lo, hi = torch.minimum(x1.min(), x2.min()), torch.maximum(x1.max(), x2.max())
    assert torch.equal(obs["minmax"].calculate_qparams()[0], choose_qparams(lo, hi, 0, 15)[0])
    c = 0.01  # moving average: the first batch, then 1% of the way to the second
    ma_lo = x1.min() + c * (x2.min() - x1.min())
    ma_hi = x1.max() + c * (x2.max() - x1.max())
    assert torch.equal(obs["moving_average"].calculate_qparams()[0], choose_qparams(ma_lo, ma_hi, 0, 15)[0])
    minmax_scale = obs["minmax"].calculate_qparams()[0]
    for n in ("percentile", "mse", "entropy"):
        assert obs[n].calculate_qparams()[0] < 0.6 * minmax_scale, n


# ------------------------------------------------------------------ one vocabulary
def test_signed_default_follows_symmetric():
    w = torch.randn(6, 5, generator=torch.Generator().manual_seed(10))
    for name in NAMES:
        kw = {"bins": 64} if name == "entropy" else {}
        sym = make_observer(name, symmetric=True, **kw)
        assert (sym.quant_min, sym.quant_max, sym.signed) == (-128, 127, True)
        sym(w)
        assert sym.calculate_qparams()[1] == 0
        aff = make_observer(name, **kw)
        assert (aff.quant_min, aff.quant_max, aff.signed) == (0, 255, False)
        explicit = make_observer(name, symmetric=True, signed=False, **kw)  # explicit arguments still win
        assert (explicit.quant_min, explicit.quant_max) == (0, 255)
        explicit(w)
        assert explicit.calculate_qparams()[1] == 128
    with pytest.raises(TypeError, match="signed must be True, False or None"):
        MinMaxObserver(signed="yes")


def test_star_import_and_all():
    namespace = {}
    exec("from qlib.observers import *", namespace)
    assert set(qlib.observers.__all__) <= set(namespace)
    assert namespace["EntropyObserver"] is EntropyObserver
    assert "HistogramObserver" not in qlib.observers.__all__
    assert "qlib has no ``HistogramObserver``" in qlib.observers.__doc__


# ------------------------------------------------------------------ pure functions: bad arguments
def test_percentile_range_rejects_percentiles_outside_50_100():
    rows = torch.randn(2, 100, generator=torch.Generator().manual_seed(11))
    for p in (150, 30, 50, 0, -1):
        with pytest.raises(ValueError, match=r"percentile must be in \(50, 100\]"):
            percentile_range(rows, p)
    with pytest.raises(TypeError, match="percentile must be a number"):
        percentile_range(rows, True)
    lo, hi = percentile_range(rows, 90)
    assert torch.all(lo <= hi)
    with pytest.raises(ValueError, match="must be 2-D"):
        percentile_range(rows.flatten(), 99)


def test_mse_range_needs_a_search_grid():
    rows = torch.randn(2, 50, generator=torch.Generator().manual_seed(12))
    for grid in (0, -3):
        with pytest.raises(ValueError, match="grid must be a positive int"):
            mse_range(rows, -8, 7, grid=grid)
    with pytest.raises(TypeError, match="grid must be an int"):
        mse_range(rows, -8, 7, grid=2.5)
    with pytest.raises(ValueError, match=r"lo must have shape \(R,\) = \(2,\)"):
        mse_range(rows, -8, 7, lo=torch.zeros(3), hi=torch.ones(3))


def sequential_reservoir(columns, capacity, draws):
    """Algorithm R one column at a time: column i replaces slot j = floor(u * (i + 1)) if j < capacity."""
    sample, d = [], iter(draws)
    for i, col in enumerate(columns):
        if len(sample) < capacity:
            sample.append(col)
            continue
        j = int(next(d) * (i + 1))
        if j < capacity:
            sample[j] = col
    return sample


def test_reservoir_equals_sequential_algorithm_r_with_colliding_slots():
    # capacity 3 and long batches: many columns of one batch draw the same slot; the last one wins
    for seed in range(5):
        gen = torch.Generator().manual_seed(seed)
        sample, seen = torch.empty(1, 0), 0
        stream = torch.arange(400.0)
        for start in range(0, 400, 100):
            sample, seen = reservoir_update(sample, seen, stream[None, start:start + 100], 3, gen)
        gen = torch.Generator().manual_seed(seed)
        draws = []
        for start in range(0, 400, 100):
            n = 100 - max(0, 3 - start)
            draws += torch.rand(n, generator=gen, dtype=torch.float64).tolist()
        assert sample[0].tolist() == sequential_reservoir(stream.tolist(), 3, draws)


def test_reservoir_rejects_bad_arguments():
    s = torch.empty(2, 0)
    with pytest.raises(ValueError, match="capacity must be a positive int"):
        reservoir_update(s, 0, torch.ones(2, 4), 0)
    with pytest.raises(ValueError, match="must have the rows of new"):
        reservoir_update(s, 0, torch.ones(3, 4), 5)
    with pytest.raises(ValueError, match="must be a 2-D tensor"):
        reservoir_update(s, 0, torch.ones(4), 5)
