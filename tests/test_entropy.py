"""Tests for qlib.entropy.

Reference: TensorRT's entropy calibration (Migacz, GTC 2017) and NVIDIA's reference code of it
(pytorch-quantization's ``_compute_amax_entropy``, rewritten here as loops): the KL search against known
histograms and its 128-bin floor; the observer's histogram against its defining property
(merging bins when the range grows loses nothing, whatever the order of the batches).
"""

import math

import pytest
import torch

from qlib.entropy import EntropyObserver, kl_threshold_bins
from qlib.observers import MinMaxObserver
from qlib.qparams import PerChannel, choose_qparams


def test_kl_threshold_on_known_histograms():
    flat = torch.ones(512)
    assert kl_threshold_bins(flat, 128) == 512  # uniform: nothing to gain by clipping
    j = torch.arange(512.0)
    decaying = torch.round(1e6 * torch.exp(-j / 20))
    decaying[511] = 1.0  # a long tail and a far outlier are clipped away
    assert kl_threshold_bins(decaying, 128) < 300
    assert kl_threshold_bins(torch.round(1e6 * torch.exp(-(j / 100) ** 2)), 128) < 512
    spike = torch.zeros(512)
    spike[:100] = 1000.0
    spike[511] = 1.0  # blind spot: merging 4 bins loses nothing here, so KL keeps it all
    assert kl_threshold_bins(spike, 128) == 512
    assert kl_threshold_bins(torch.ones(64), 128) == 64  # more levels than bins


def test_entropy_observer_histogram_and_clipping():
    g = torch.Generator().manual_seed(5)
    obs = EntropyObserver(symmetric=True, signed=True, bins=512)
    small = torch.randn(20000, generator=g) * 0.5
    u = torch.rand(2, 40000, generator=g)
    big = torch.log(u[0] / u[1])  # Laplace(0, 1): a long tail ...
    big[:3] = torch.tensor([40.0, -40.0, 35.0])  # ... and three far outliers
    obs(small), obs(big)
    assert obs.hist.sum().item() == 60000  # merging bins when the range grows loses nothing
    assert obs.hist_max.item() >= 40.0
    scale, zp = obs.calculate_qparams()
    t = scale * 127.5
    assert zp == 0 and 6.0 < t < 0.5 * 40.0  # outliers clipped, the bulk (99.9% < 6.9) kept
    uniform = EntropyObserver(bins=512)  # affine, non-negative data: all 256 levels
    u = torch.rand(20000, generator=g)
    uniform(u)
    minmax_scale = choose_qparams(u.min(), u.max(), 0, 255)[0]
    assert torch.allclose(uniform.calculate_qparams()[0], minmax_scale, rtol=0.01)


def test_kl_search_keeps_tensorrt_floor_of_128_bins():
    # A sparse histogram (most mass in one bin, as on digit backgrounds): at 4 bits the
    # search without a floor clips almost everything; TensorRT never goes below 128 bins.
    hist = torch.zeros(2048, dtype=torch.float64)
    hist[:3] = 1e5
    hist[3:60] = torch.rand(57, dtype=torch.float64) * 50
    hist[60::7] = 1.0
    assert kl_threshold_bins(hist, 8) >= 128
    assert kl_threshold_bins(hist, 8, min_bins=8) < 128  # the collapse the floor prevents


@pytest.mark.parametrize("big", [1e3, 1e7, 1e8, 1e30])
def test_zero_batch_first_then_large_values(big):
    # The histogram started at a placeholder range of 1e-12; the merge factor
    # ceil(big / 1e-12) overflowed int64 and the scale collapsed to eps.
    g = torch.Generator().manual_seed(13)
    zeros, x = torch.zeros(10), torch.randn(1000, generator=g) * big
    a, b = EntropyObserver(bins=64), EntropyObserver(bins=64)
    a(zeros), a(x)
    b(x), b(zeros)  # the same data, zeros last: zeros always land in bin 0
    assert torch.equal(a.hist, b.hist) and torch.equal(a.hist_max, b.hist_max)
    assert a.hist.sum().item() == 1010
    assert torch.equal(a.calculate_qparams()[0], b.calculate_qparams()[0])
    assert a.calculate_qparams()[0] > 1e-3 * big


def test_range_growth_beyond_float32_ratio():
    g = torch.Generator().manual_seed(14)
    tiny, x = torch.full((10,), 1e-30), torch.randn(1000, generator=g) * 1e30
    a, b = EntropyObserver(bins=64), EntropyObserver(bins=64)
    a(tiny), a(x)
    b(x), b(tiny)
    assert torch.equal(a.hist, b.hist) and torch.equal(a.hist_max, b.hist_max)
    assert torch.equal(a.calculate_qparams()[0], b.calculate_qparams()[0])


def test_all_zero_channel_next_to_a_normal_one():
    g = torch.Generator().manual_seed(15)
    w = torch.randn(2, 300, generator=g)
    w[0] = 0.0
    obs, ref = EntropyObserver(bins=64, granularity=PerChannel(0)), MinMaxObserver(granularity=PerChannel(0))
    obs(w), ref(w)
    scale, zp = obs.calculate_qparams()
    assert scale[0] == ref.calculate_qparams()[0][0] == torch.finfo(torch.float32).eps  # like min-max
    assert scale[1] > 0.001
    obs(2 * w)  # the zero row stays zero, the other grows
    assert obs.hist_max[0] == 0 and obs.hist[0, 0] == 600


def test_kl_threshold_bins_rejects_bad_histograms():
    for bad in (torch.tensor([1.0, float("nan")]), torch.tensor([1.0, -1.0]), torch.zeros(4)):
        with pytest.raises(ValueError, match="finite, non-negative counts with a positive sum"):
            kl_threshold_bins(bad, 2)
    with pytest.raises(ValueError, match="non-empty 1-D tensor"):
        kl_threshold_bins(torch.ones(2, 3), 2)
    with pytest.raises(ValueError, match="num_levels must be a positive int"):
        kl_threshold_bins(torch.ones(8), 0)
    with pytest.raises(TypeError, match="num_levels must be an int"):
        kl_threshold_bins(torch.ones(8), True)
    assert kl_threshold_bins(torch.ones(512), 128) == 512
    assert choose_qparams(torch.tensor(0.0), torch.tensor(0.0), 0, 255)[0] == torch.finfo(torch.float32).eps


def nvidia_reference_threshold_bins(hist: torch.Tensor, num_levels: int, start_bin: int = 128) -> int:
    """NVIDIA's entropy search written out loop by loop, as in pytorch-quantization's
    ``_compute_amax_entropy`` (TensorRT's tools): ``bins[0] = bins[1]``; for every ``i`` from
    ``start_bin`` to ``len(bins)``: P = ``bins[:i]`` plus the outliers in its last bin; Q =
    ``bins[:i]`` merged into ``num_levels`` groups (``floor(j * num_levels / i)``), each
    group's mass spread over its non-empty bins; ``KL(P || Q)`` (``inf`` where Q is 0 and P
    is not); the last ``i`` with the smallest KL."""
    bins = [float(v) for v in hist]
    bins[0] = bins[1]
    best, best_i = float("inf"), len(bins)
    for i in range(start_bin, len(bins) + 1):
        p = bins[:i]
        p[-1] += sum(bins[i:])
        groups = [j * num_levels // i for j in range(i)]
        mass, count = [0.0] * num_levels, [0] * num_levels
        for j in range(i):
            if bins[j] > 0:
                mass[groups[j]] += bins[j]
                count[groups[j]] += 1
        q = [mass[groups[j]] / count[groups[j]] if bins[j] > 0 else 0.0 for j in range(i)]
        sp, sq = sum(p), sum(q)
        kl = 0.0
        for pj, qj in zip(p, q):
            if pj > 0:
                kl = kl + (pj / sp) * math.log((pj / sp) / (qj / sq)) if qj > 0 else float("inf")
        if kl <= best + 1e-12:
            best, best_i = min(kl, best), i
    return best_i


def relu_histogram(g, bins=512, n=50_000):
    """|x| histogram of ReLU outputs of a standard normal (half the values exactly 0)."""
    x = torch.relu(torch.randn(n, generator=g, dtype=torch.float64))
    return torch.histc(x, bins=bins, min=0, max=x.max().item())


@pytest.mark.parametrize("seed", [0, 1])
def test_kl_search_matches_nvidia_reference(seed):
    """Reference: pytorch-quantization's ``_compute_amax_entropy`` (loops above). Before
    the fix, qlib searched with the zero spike in bin 0 and disagreed on ReLU outputs."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(2, 30_000, generator=g, dtype=torch.float64)
    laplace = torch.histc(torch.log(u[0] / u[1]).abs(), bins=320, min=0, max=12)
    for hist, levels in ((relu_histogram(g, bins=320), 128), (relu_histogram(g, bins=320), 256),
                         (laplace, 128)):
        assert kl_threshold_bins(hist, levels, chunk=64) == nvidia_reference_threshold_bins(hist, levels)


def test_relu_outputs_are_not_clipped_to_the_first_bins():
    """Regression: the zero spike of a ReLU output drove the search to its smallest
    candidate (256 of 2048 bins, 1/8 of the histogram's range: 3.6% of the positive
    values clipped here). On cnn16 this was the second conv's input: entropy W8A8 fell from 99.4 to
    95.6 (seed 0; the committed ptq.json before the fix). With bin 0 flattened the threshold keeps the bulk."""
    g = torch.Generator().manual_seed(3)
    x = torch.relu(torch.randn(64, 16, 8, 8, generator=g))
    obs = EntropyObserver()  # affine unsigned 8-bit, 2048 bins: what QuantConfig builds
    obs(x)
    scale, zp = obs.calculate_qparams()
    t = scale.item() * (255 - zp.item())
    positive = x[x > 0]
    assert (positive > t).float().mean() < 0.002  # clips at most 0.2% of the positive values
    assert t < x.max().item()  # and still clips the far tail
    old = EntropyObserver(flatten_zero_bin=False)  # the search before the fix, kept for lesson 03
    old(x)
    scale, zp = old.calculate_qparams()
    assert (positive > scale.item() * (255 - zp.item())).float().mean() > 0.02
    with pytest.raises(TypeError, match="flatten_zero_bin must be True or False"):
        EntropyObserver(flatten_zero_bin=1)
