"""qlib.nonuniform: k-means codebooks (Lloyd's algorithm) and NormalFloat levels.

References:
- NF4: the 16 published values of bitsandbytes (``bitsandbytes/functional.py``,
  ``get_4bit_type("nf4")``; the same table is printed in Dettmers et al. 2023, QLoRA, app. E).
- k-means in 1-D: brute force over every contiguous partition of a small sorted sample (the
  optimal 1-D clusters are contiguous), Lloyd's fixed-point conditions, and Max (1960)'s
  optimal quantizers of N(0, 1): MSE 0.1175 (2 bits), 0.03454 (3), 0.009497 (4).
- the uniform grid: qlib's affine min-max quantizer, and the best clipped uniform grid.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from qlib.nonuniform import (blockwise_dequantize, blockwise_fake_quantize, blockwise_quantize, codebook_decode,
                             codebook_encode, codebook_quantize, kmeans_codebook, nf4_codebook,
                             normal_float_codebook, uniform_codebook)
from qlib.qparams import choose_qparams, qparams_for, quant_range
from qlib.quantize import fake_quantize

NF4_PUBLISHED = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                 -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                 0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                 0.7229568362236023, 1.0]
LLOYD_MAX_GAUSSIAN_MSE = {2: 0.1175, 3: 0.03454, 4: 0.009497}  # Max 1960, table I


def fresh_gen():
    return torch.Generator().manual_seed(torch.randint(2**31, (1,)).item() % 2**31)


def test_nf4_is_the_published_table_bit_for_bit():
    assert torch.equal(nf4_codebook(), torch.tensor(NF4_PUBLISHED, dtype=torch.float32))


@pytest.mark.parametrize("bits", [2, 3, 4, 5])
def test_normal_float_levels_have_the_qlora_shape(bits):
    c = normal_float_codebook(bits)
    assert c.numel() == 2**bits and torch.equal(c, c.sort().values)
    assert c[0] == -1 and c[-1] == 1 and (c == 0).sum() == 1
    assert int((c > 0).sum()) == 2 ** (bits - 1) and int((c < 0).sum()) == 2 ** (bits - 1) - 1
    steps = c.diff()
    zero = int((c == 0).nonzero())
    assert (steps[zero:].diff() >= -1e-6).all()  # denser near 0, sparser in the tails


def brute_force_1d_kmeans(v: list[float], k: int) -> float:
    """Smallest total squared error over every split of the sorted values into k contiguous runs."""
    v = sorted(v)
    best = float("inf")
    for cuts in itertools.combinations(range(1, len(v)), k - 1):
        runs = [v[a:b] for a, b in zip((0, *cuts), (*cuts, len(v)))]
        best = min(best, sum(sum((x - sum(r) / len(r)) ** 2 for x in r) for r in runs))
    return best


@pytest.mark.parametrize("trial", range(4))
def test_lloyd_reaches_a_fixed_point_never_below_the_brute_force_optimum(trial):
    g = fresh_gen()
    x = torch.randn(13, generator=g, dtype=torch.float64).float()
    levels, info = kmeans_codebook(x, 2, return_info=True)  # k = 4
    assert info["converged"]
    v = x.double()
    assign = codebook_encode(x, levels).long()
    # fixed point: every value is nearest to its level, every used level is its values' mean
    dist = (v[:, None] - levels.double()[None, :]).abs()
    assert torch.allclose(dist.gather(1, assign[:, None]).squeeze(1), dist.min(1).values)
    for j in assign.unique():
        assert torch.isclose(levels[j].double(), v[assign == j].mean(), rtol=1e-6, atol=1e-7)
    sse = float(((v - levels.double()[assign]) ** 2).sum())
    optimum = brute_force_1d_kmeans(v.tolist(), 4)
    assert sse >= optimum - 1e-6
    assert all(a >= b - 1e-12 for a, b in zip(info["mse"], info["mse"][1:]))  # Lloyd never increases the MSE


def test_lloyd_finds_well_separated_clusters_exactly():
    g = fresh_gen()
    centers = torch.tensor([-5.0, -1.0, 2.0, 7.0])
    x = (centers[:, None] + 0.1 * torch.randn(4, 6, generator=g)).reshape(-1)
    levels = kmeans_codebook(x, 2)
    sse = float(((x - codebook_quantize(x, levels)) ** 2).sum())
    assert sse == pytest.approx(brute_force_1d_kmeans(x.tolist(), 4), rel=1e-5)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_kmeans_on_a_gaussian_is_the_lloyd_max_quantizer_and_beats_every_uniform_grid(bits):
    g = fresh_gen()
    x = torch.randn(100_000, generator=g)
    mse_kmeans = float(((x - codebook_quantize(x, kmeans_codebook(x, bits))) ** 2).mean())
    assert mse_kmeans == pytest.approx(LLOYD_MAX_GAUSSIAN_MSE[bits], rel=0.03)
    # the uniform min-max grid (qlib's affine quantizer, same number of levels)
    qmin, qmax = quant_range(bits, signed=False)
    scale, zp = qparams_for(x, bits, symmetric=False)
    mse_minmax = float(((x - fake_quantize(x, scale, zp, qmin, qmax)) ** 2).mean())
    # and the best clipped symmetric uniform grid (a search over the clipping range)
    qmin, qmax = quant_range(bits)
    best_uniform = min(
        float(((x - fake_quantize(x, *choose_qparams(-c, c, qmin, qmax, symmetric=True), qmin, qmax)) ** 2).mean())
        for c in torch.linspace(0.5, 4.5, 81))
    assert mse_kmeans <= best_uniform <= mse_minmax


@pytest.mark.parametrize("init", ["linear", "density", "random"])
def test_kmeans_is_deterministic_for_a_seed(init):
    x = torch.randn(5000, generator=fresh_gen())
    a = kmeans_codebook(x, 3, init=init, seed=4)
    assert torch.equal(a, kmeans_codebook(x, 3, init=init, seed=4))
    assert a.dtype == torch.float32 and torch.equal(a, a.sort().values)


def test_kmeans_with_few_distinct_values_returns_them():
    x = torch.tensor([0.5, -1.0, 0.5, 2.0])
    levels = kmeans_codebook(x, 2)
    assert torch.equal(levels.unique(), torch.tensor([-1.0, 0.5, 2.0]))
    assert torch.equal(codebook_quantize(x, levels), x)


def test_encode_picks_the_nearest_level_ties_low_and_decode_looks_up():
    cb = torch.tensor([1.0, -1.0, 0.0])  # unsorted on purpose: indices refer to it as given
    x = torch.tensor([-0.9, -0.5, 0.2, 0.5, 3.0])
    idx = codebook_encode(x, cb)
    assert idx.dtype == torch.uint8 and idx.tolist() == [1, 1, 2, 2, 0]
    assert codebook_decode(idx, cb).tolist() == [-1.0, -1.0, 0.0, 0.0, 1.0]


@pytest.mark.parametrize("shape,block", [((64, 3), 64), ((7, 9), 16), ((100,), None)])
def test_blockwise_absmax_round_trip(shape, block):
    """Reference: each block divided by its absmax, nearest level, times the absmax again."""
    x = torch.randn(shape, generator=fresh_gen())
    cb = nf4_codebook()
    idx, absmax = blockwise_quantize(x, cb, block)
    flat = x.reshape(-1)
    size = flat.numel() if block is None else block
    expected = []
    for i in range(0, flat.numel(), size):
        b = flat[i:i + size]
        m = b.abs().max()
        expected.append(cb[(b[:, None] / m - cb[None, :]).abs().argmin(1)] * m)
    assert torch.allclose(blockwise_dequantize(idx, absmax, cb, block), torch.cat(expected).reshape(shape))
    assert absmax.numel() == -(-flat.numel() // size)
    # the largest magnitude of each block is a level (+-1 times absmax): exact
    assert torch.equal(blockwise_fake_quantize(x, cb, block).abs().max(), x.abs().max())


def test_uniform_codebook_with_absmax_is_symmetric_absmax_quantization():
    x = torch.randn(1000, generator=fresh_gen())
    for bits in (2, 3, 4, 8):
        n = 2 ** (bits - 1) - 1
        s = x.abs().max() / n
        ref = torch.clamp(torch.round(x / s), -n, n) * s
        assert torch.allclose(blockwise_fake_quantize(x, uniform_codebook(bits), None), ref, atol=1e-6)


def test_bad_inputs_say_what_is_expected():
    with pytest.raises(ValueError, match="bits"):
        kmeans_codebook(torch.randn(10), 0)
    with pytest.raises(ValueError, match="init"):
        kmeans_codebook(torch.randn(10), 2, init="forgy")
    with pytest.raises(ValueError, match="NaN"):
        kmeans_codebook(torch.tensor([1.0, float("nan")]), 2)
    with pytest.raises(ValueError, match="empty"):
        kmeans_codebook(torch.zeros(0), 2)
    with pytest.raises(TypeError, match="codebook"):
        codebook_encode(torch.randn(3), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="block_size"):
        blockwise_quantize(torch.randn(8), nf4_codebook(), 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_everything_stays_on_the_device():
    x = torch.randn(1000, device="cuda")
    levels = kmeans_codebook(x, 3)
    assert levels.device == x.device
    assert codebook_quantize(x, levels).device == x.device
    assert blockwise_fake_quantize(x, nf4_codebook(), 64).device == x.device
