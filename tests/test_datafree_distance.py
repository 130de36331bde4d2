"""Tests for qlib.datafree.distance (MMD, KL divergences, BN-statistics distance).

References: Gretton et al., JMLR 2012, "A Kernel Two-Sample Test" (the unbiased MMD^2
estimator with a Gaussian kernel, checked against a written-out double loop; ~0 for
samples of one distribution, larger for shifted ones); torch.nn.functional.kl_div for the
softmax KL; scipy-free histogram KL written out; the BN-statistics distance checked
against running statistics computed on the very same data.
"""

import itertools
import math

import pytest
import torch
from torch import nn

from qlib.datafree.distance import (bn_statistic_distance, gaussian_kernel, histogram_kl, mmd,
                                    score_calibration_set, softmax_kl)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def test_mmd_matches_written_out_estimator():
    x = torch.randn(7, 3, generator=gen(0), dtype=torch.float64)
    y = torch.randn(5, 3, generator=gen(1), dtype=torch.float64) + 0.5
    h = 1.3
    k = lambda a, b: math.exp(-((a - b) ** 2).sum().item() / (2 * h * h))  # noqa: E731
    exx = sum(k(x[i], x[j]) for i, j in itertools.permutations(range(7), 2)) / (7 * 6)
    eyy = sum(k(y[i], y[j]) for i, j in itertools.permutations(range(5), 2)) / (5 * 4)
    exy = sum(k(a, b) for a in x for b in y) / 35
    assert mmd(x, y, bandwidth=h) == pytest.approx(exx + eyy - 2 * exy, rel=1e-9, abs=1e-12)
    kxx = gaussian_kernel(x, x, h)
    assert torch.allclose(kxx.diagonal(), torch.ones(7, dtype=torch.float64))
    biased = mmd(x, y, bandwidth=h, unbiased=False)
    assert biased >= 0


def test_mmd_is_zero_for_one_distribution_and_grows_with_shift():
    x = torch.randn(300, 8, generator=gen(0))
    same = torch.randn(300, 8, generator=gen(1))
    near = torch.randn(300, 8, generator=gen(2)) + 0.3
    far = torch.randn(300, 8, generator=gen(3)) + 1.0
    m_same, m_near, m_far = mmd(x, same), mmd(x, near), mmd(x, far)
    assert abs(m_same) < 0.01
    assert m_far > m_near > 5 * max(abs(m_same), 1e-3)
    assert mmd(x, x.clone()) < 0.01  # identical samples: estimator noise only
    # images are flattened; the result is symmetric
    a, b = torch.randn(40, 1, 4, 4, generator=gen(4)), torch.randn(30, 1, 4, 4, generator=gen(5)) + 1
    assert mmd(a, b) == pytest.approx(mmd(b, a))


def test_softmax_kl_matches_torch_and_is_zero_for_equal_logits():
    p, q = torch.randn(10, 5, generator=gen(0)), torch.randn(10, 5, generator=gen(1))
    ref = nn.functional.kl_div(q.log_softmax(1), p.log_softmax(1), reduction="batchmean", log_target=True)
    assert softmax_kl(p, q) == pytest.approx(ref.item(), rel=1e-6)
    assert softmax_kl(p, p) == pytest.approx(0.0, abs=1e-12)
    assert softmax_kl(p, q, temperature=4.0) < softmax_kl(p, q)


def test_histogram_kl():
    a = torch.randn(5000, generator=gen(0))
    assert histogram_kl(a, a) == pytest.approx(0.0, abs=1e-9)
    near = histogram_kl(a, torch.randn(5000, generator=gen(1)))
    far = histogram_kl(a, torch.randn(5000, generator=gen(2)) * 2 + 1)
    assert 0 <= near < 0.05 < far
    # written out: two bins
    x, y = torch.tensor([0.0, 0.0, 0.0, 1.0]), torch.tensor([0.0, 1.0, 1.0, 1.0])
    p, q = torch.tensor([0.75, 0.25]), torch.tensor([0.25, 0.75])
    assert histogram_kl(x, y, bins=2, eps=0) == pytest.approx((p * (p / q).log()).sum().item(), rel=1e-6)


def bn_model(data):
    """A conv net whose BN running statistics are exactly those of ``data``."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        m = nn.Sequential(nn.Conv2d(1, 3, 3, bias=False), nn.BatchNorm2d(3, momentum=None),
                          nn.ReLU(), nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=None),
                          nn.Flatten(), nn.Linear(36, 2))
    with torch.no_grad():
        m.train()(data)
    return m.eval()


def test_bn_statistic_distance():
    real = torch.randn(256, 1, 7, 7, generator=gen(0)) * 0.5 + 1.0
    m = bn_model(real)
    # on the data that made the running stats: ~0 (running var is unbiased, ours biased)
    d = bn_statistic_distance(m, [real[:100], real[100:]])
    assert set(d) == {"1", "4", "total"} and d["total"] < 1e-3
    assert d["total"] == pytest.approx(d["1"] + d["4"])
    shifted = bn_statistic_distance(m, real + 1.0)
    assert shifted["total"] > 100 * d["total"]
    noise = bn_statistic_distance(m, torch.utils.data.TensorDataset(torch.randn(64, 1, 7, 7, generator=gen(1)),
                                                                   torch.zeros(64)))
    assert noise["total"] > d["total"]


def test_score_calibration_set():
    real = torch.randn(200, 1, 7, 7, generator=gen(0)) * 0.5 + 1.0
    m = bn_model(real)
    good = score_calibration_set(m, [real[:100]], reference=real[100:])
    bad = score_calibration_set(m, [torch.randn(100, 1, 7, 7, generator=gen(1))], reference=real[100:])
    keys = {"bn_distance", "confidence", "class_entropy", "mmd_inputs", "mmd_outputs", "kl_classes"}
    assert set(good) == keys and set(bad) == keys
    for k in ("bn_distance", "mmd_inputs", "mmd_outputs"):
        assert good[k] < bad[k], k
    assert 0 <= good["class_entropy"] <= math.log(2) + 1e-9
    no_bn = score_calibration_set(nn.Sequential(nn.Flatten(), nn.Linear(49, 3)), real[:10])
    assert math.isnan(no_bn["bn_distance"]) and "mmd_inputs" not in no_bn


def test_clear_errors():
    x = torch.randn(10, 3)
    with pytest.raises(ValueError, match="different sizes"):
        mmd(x, torch.randn(10, 4))
    with pytest.raises(ValueError, match="non-empty"):
        mmd(x, torch.randn(0, 3))
    with pytest.raises(ValueError, match="NaN"):
        mmd(x, torch.full((4, 3), float("nan")))
    with pytest.raises(ValueError, match="at least 2"):
        mmd(x[:1], x)
    with pytest.raises(ValueError, match="bandwidth"):
        mmd(x, x, bandwidth=0.0)
    with pytest.raises(TypeError):
        mmd(x.long(), x)
    with pytest.raises(ValueError, match="shape"):
        softmax_kl(torch.randn(4, 3), torch.randn(4, 5))
    with pytest.raises(ValueError, match="no BatchNorm"):
        bn_statistic_distance(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)), torch.randn(3, 4))
    m = bn_model(torch.randn(32, 1, 7, 7, generator=gen(0)))
    with pytest.raises(ValueError, match="empty"):
        bn_statistic_distance(m, [])
    with pytest.raises(ValueError, match="NaN"):
        bn_statistic_distance(m, torch.full((2, 1, 7, 7), float("inf")))


# --- regressions (issue 8): temperature, modes on errors, dtypes ---------------------------

def test_softmax_kl_rejects_non_positive_and_non_numeric_temperatures():
    """Before: T = 0 returned NaN (0/0 inside the softmax) and T = True was taken as 1."""
    a, b = torch.randn(4, 3, generator=gen(0)), torch.randn(4, 3, generator=gen(1))
    for bad in (0, -2.0, float("nan")):
        with pytest.raises(ValueError, match="temperature"):
            softmax_kl(a, b, temperature=bad)
    with pytest.raises(TypeError, match="temperature"):
        softmax_kl(a, b, temperature=True)
    assert softmax_kl(a, b, temperature=2) == pytest.approx(softmax_kl(a / 2, b / 2))


class Boom(nn.Module):
    def forward(self, x):
        raise RuntimeError("boom")


def test_modes_restored_when_the_forward_pass_raises():
    """Before: an exception left the model in eval mode; a frozen BN came back in train mode."""
    real = torch.randn(64, 1, 7, 7, generator=gen(0))
    m = nn.Sequential(*bn_model(real), Boom()).train()
    m[1].eval()
    modes = [mod.training for mod in m.modules()]
    with pytest.raises(RuntimeError, match="boom"):
        bn_statistic_distance(m, real)
    assert [mod.training for mod in m.modules()] == modes
    with pytest.raises(RuntimeError, match="boom"):
        score_calibration_set(m, real)
    assert [mod.training for mod in m.modules()] == modes


def test_float64_model_on_float32_data():
    """Before: float32 batches met float64 weights inside torch (dtype error)."""
    real = torch.randn(128, 1, 7, 7, generator=gen(0)) * 0.5 + 1.0
    m = bn_model(real)
    shifted = real + 0.5
    want = bn_statistic_distance(m, shifted)["total"]
    got = bn_statistic_distance(m.double(), shifted)["total"]
    assert got == pytest.approx(want, rel=1e-4)
    report = score_calibration_set(m, shifted, reference=real)
    assert report["mmd_inputs"] > 0 and math.isfinite(report["mmd_outputs"])
