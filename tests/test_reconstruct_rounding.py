"""Tests for qlib.reconstruct.rounding (AdaRound's soft rounding).

Reference: Nagel et al., ICML 2020, "Up or Down? Adaptive Rounding for Post-Training
Quantization": eq. 22 (w~ = s * clip(floor(w/s) + h(V), n, p)), eq. 23 (rectified sigmoid
h(V) = clip(sigmoid(V)(zeta - gamma) + gamma, 0, 1), zeta = 1.1, gamma = -0.1), eq. 24
(f_reg = sum 1 - |2h(V) - 1|^beta) and section 5 (beta annealed from 20 to 2 after a warm-up).
The formulas are written out here in float64 from the paper, independently of the module; the
on-grid property is checked against ``qlib.quantize.fake_quantize`` with ``torch.equal``.
"""

import math

import pytest
import torch

from qlib.fakequant import FakeQuantize
from qlib.observers import make_observer
from qlib.qparams import PerChannel, PerGroup, PerTensor
from qlib.quantize import fake_quantize
from qlib.reconstruct.rounding import (GAMMA, ZETA, AdaRoundQuantizer, beta_schedule, inverse_rectified_sigmoid,
                                       rectified_sigmoid, rounding_regularizer)


def paper_h(v):
    """Eq. 23 in float64, elementwise with Python math."""
    return [min(1.0, max(0.0, (1 / (1 + math.exp(-x))) * (1.1 - (-0.1)) + (-0.1))) for x in v]


def frozen_fq(weight, bits=4, granularity=PerChannel(0), observer="minmax"):
    fq = FakeQuantize(make_observer(observer, bits=bits, symmetric=True, granularity=granularity, signed=True))
    fq.eval()
    fq.calibrating = True
    fq(weight)
    return fq.freeze()


def test_constants_and_rectified_sigmoid_match_eq_23():
    assert (ZETA, GAMMA) == (1.1, -0.1)
    v = torch.randn(200, dtype=torch.float64) * 4
    expected = torch.tensor(paper_h(v.tolist()), dtype=torch.float64)
    torch.testing.assert_close(rectified_sigmoid(v), expected, atol=1e-12, rtol=0)
    # it reaches 0 and 1 exactly (the plain sigmoid never does), at finite V
    assert rectified_sigmoid(torch.tensor([-3.0])).item() == 0.0
    assert rectified_sigmoid(torch.tensor([3.0])).item() == 1.0


def test_inverse_starts_h_at_the_fractional_part():
    h = torch.rand(500, dtype=torch.float64) * 0.98 + 0.01
    torch.testing.assert_close(rectified_sigmoid(inverse_rectified_sigmoid(h)), h, atol=1e-12, rtol=0)
    ends = inverse_rectified_sigmoid(torch.tensor([0.0, 1.0]))
    assert torch.isfinite(ends).all() and rectified_sigmoid(ends).tolist() == [0.0, 1.0]


def test_regularizer_matches_eq_24():
    v = torch.randn(300, dtype=torch.float64) * 3
    for beta in (20.0, 7.5, 2.0):
        h = paper_h(v.tolist())
        expected = sum(1 - abs(2 * x - 1) ** beta for x in h)
        assert rounding_regularizer(v, beta).item() == pytest.approx(expected, rel=1e-10, abs=1e-10)
    binary = torch.tensor([-5.0, 5.0, -4.0])          # h = 0, 1, 0
    assert rounding_regularizer(binary, 2.0).item() == 0.0
    half = inverse_rectified_sigmoid(torch.full((10,), 0.5, dtype=torch.float64))
    assert rounding_regularizer(half, 2.0).item() == pytest.approx(10.0)  # its maximum, 1 per weight
    with pytest.raises(ValueError, match="beta"):
        rounding_regularizer(v, 0)


def test_beta_schedule_warmup_then_linear_20_to_2():
    steps = 100
    betas = [beta_schedule(t, steps, warmup=0.2) for t in range(steps)]
    assert betas[:20] == [None] * 20
    assert betas[20] == 20.0
    assert all(a > b for a, b in zip(betas[20:], betas[21:]))
    assert betas[-1] == pytest.approx(2.0 + 18.0 / 80)
    assert beta_schedule(steps, steps) == 2.0
    with pytest.raises(ValueError, match="warmup"):
        beta_schedule(0, 10, warmup=1.0)


@pytest.mark.parametrize("granularity", [PerChannel(0), PerTensor()])
def test_quantizer_starts_at_float_weight_and_nearest_rounding(granularity):
    w = torch.randn(8, 4, 3, 3) * 0.2
    fq = frozen_fq(w, bits=4, granularity=granularity)
    r = AdaRoundQuantizer(w, fq)
    # soft start: floor + frac = w / s, so the soft weight is the float weight inside the range
    # (a symmetric grid's largest |w| maps to 7.5 or -8.5 at 4 bits: those are clamped)
    scaled = w / r.s
    inside = (scaled >= fq.quant_min) & (scaled <= fq.quant_max)
    assert inside.float().mean() > 0.9
    torch.testing.assert_close(r(w)[inside], w[inside], atol=1e-6, rtol=1e-5)
    # hard start: up when frac >= 1/2, i.e. round to nearest (ties are measure-zero here)
    r.hard = True
    assert torch.equal(r(w), fq(w))
    assert torch.equal(r.hard_weight(), fq(w))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_hard_weight_is_exactly_on_the_grid(dtype):
    w = (torch.randn(6, 10) * 0.3).to(dtype)
    fq = frozen_fq(w, bits=3)
    r = AdaRoundQuantizer(w, fq)
    with torch.no_grad():
        r.V.copy_(torch.randn_like(r.V) * 3)  # any rounding decisions
    hw = r.hard_weight()
    assert hw.dtype == dtype and r.V.dtype == dtype
    scale, zp = fq.qparams()
    assert torch.equal(fake_quantize(hw, scale, zp, fq.quant_min, fq.quant_max, axis=0), hw)
    codes = r.codes()
    assert codes.min() >= fq.quant_min and codes.max() <= fq.quant_max
    # each weight moved to floor or floor + 1 of its own w/s (clamped at the ends)
    lo = torch.floor(w.float() / scale[:, None]).clamp(fq.quant_min, fq.quant_max)
    assert ((codes - lo).abs() <= 1).all()
    # the soft weight is differentiable in V, and only in V
    r(w).sum().backward()
    assert r.V.grad is not None and r.V.grad.abs().sum() > 0


def test_per_group_scales_are_refused():
    w = torch.randn(4, 8)
    fq = FakeQuantize(make_observer("minmax", bits=4, symmetric=True, granularity=PerGroup(4, axis=1), signed=True))
    fq.eval()
    fq.calibrating = True
    fq(w)
    fq.freeze()
    with pytest.raises(ValueError, match="per-tensor and per-channel"):
        AdaRoundQuantizer(w, fq)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_quantizer_on_cuda():
    w = torch.randn(8, 16, device="cuda")
    fq = frozen_fq(w, bits=3).cuda()
    r = AdaRoundQuantizer(w, fq)
    assert r.V.device.type == "cuda" and r(w).device.type == "cuda"
    assert torch.equal(fake_quantize(r.hard_weight(), *fq.qparams(), fq.quant_min, fq.quant_max, axis=0),
                       r.hard_weight())
