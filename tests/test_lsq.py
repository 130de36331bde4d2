"""Tests for qlib.lsq (learned step size quantization).

References: ``torch._fake_quantize_learnable_per_tensor_affine`` and
``torch._fake_quantize_learnable_per_channel_affine`` (values and the gradients for x, scale
and zero point, with ``grad_factor``); Esser et al. 2020, "Learned Step Size Quantization"
(the scale gradient, the gradient scale ``1/sqrt(N * Qp)``, the initial step size
``2 mean|x| / sqrt(Qp)``).

Exactness: PyTorch's CPU kernel is compiled with fused multiply-add on x86 AVX2/AVX512
builds, and qlib reproduces those single roundings, so we compare with ``torch.equal``
there. Elsewhere (no FMA) the kernel rounds twice; the scale gradient, a sum of
cancelling terms, may then differ in the last bits: ``rtol=1e-4``.
"""

import math

import pytest
import torch

from qlib.lsq import LSQFakeQuantize, lsq_fake_quantize, lsq_grad_factor, lsq_gradients, lsq_init_scale
from qlib.observers import make_observer
from qlib.qparams import PerChannel, PerGroup, PerTensor, quant_range, resolve_signed
from qlib.quantize import fake_quantize

FMA_BUILD = torch.backends.cpu.get_cpu_capability().startswith("AVX")


def same(a, b):
    if FMA_BUILD:
        return torch.equal(a, b)
    return torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def run_both(torch_fn, x, scale, zero_point, dy, *args, **kwargs):
    """(y, dx, dscale, dzero_point) from torch's kernel and from qlib, on copies of the inputs."""
    out = []
    for fn in (torch_fn, None):
        xs, s, z = (t.clone().requires_grad_(True) for t in (x, scale, zero_point))
        if fn is None:
            qmin, qmax, g = args[-3:]
            axis = args[0] if len(args) == 4 else None
            y = lsq_fake_quantize(xs, s, z, qmin, qmax, axis=axis, grad_factor=g)
        else:
            y = fn(xs, s, z, *args)
        y.backward(dy)
        out.append((y.detach(), xs.grad, s.grad, z.grad))
    return out


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_per_tensor_matches_torch(bits):
    qmin, qmax = quant_range(bits, signed=False)
    for _ in range(5):
        x = torch.randn(32, 4, 6, 6) * torch.rand(()) * 3
        dy = torch.randn_like(x)
        scale = torch.rand(1) * 0.5 + 1e-3
        zero_point = torch.rand(1) * qmax           # float, learnable; >= 0 (unsigned codes)
        g = torch.rand(()).item()
        ref, ours = run_both(torch._fake_quantize_learnable_per_tensor_affine, x, scale, zero_point, dy,
                             qmin, qmax, g)
        assert torch.equal(ref[0], ours[0]) and torch.equal(ref[1], ours[1])
        assert same(ref[2], ours[2]) and same(ref[3], ours[3])
        assert ours[2].shape == (1,) and ours[2].abs() > 0   # the scale does receive a gradient


@pytest.mark.parametrize("bits,signed", [(2, True), (4, True), (8, False)])
def test_per_channel_matches_torch(bits, signed):
    qmin, qmax = quant_range(bits, signed)
    for axis in (0, 1):
        w = torch.randn(8, 6, 3, 3) * 0.2
        dy = torch.randn_like(w)
        c = w.shape[axis]
        scale = torch.rand(c) * 0.1 + 1e-3
        zero_point = qmin + torch.rand(c) * (qmax - qmin)   # negative zero points included when signed
        g = lsq_grad_factor(w.numel(), qmax)
        ref, ours = run_both(torch._fake_quantize_learnable_per_channel_affine, w, scale, zero_point, dy,
                             axis, qmin, qmax, g)
        assert torch.equal(ref[0], ours[0]) and torch.equal(ref[1], ours[1])
        assert same(ref[2], ours[2]) and same(ref[3], ours[3])
        assert ours[2].shape == (c,)


def test_torch_per_tensor_backward_rounds_negative_zero_point_differently():
    """torch's per-tensor backward uses trunc(z + 0.5): -2 -> -1 (its forward uses -2). qlib
    uses the forward's zero point in both passes; torch's gradient is ours at z + 1."""
    x, dy = torch.randn(500) * 3, torch.randn(500)
    z = torch.tensor([-2.0])
    scale = torch.tensor([0.4])
    ref, ours = run_both(torch._fake_quantize_learnable_per_tensor_affine, x, scale, z, dy, -8, 7, 1.0)
    assert torch.equal(ref[0], ours[0])                               # same forward
    assert not torch.equal(ref[2], ours[2])                          # different scale gradient
    # what torch's backward computes: our formula with the zero point -1
    _, d_scale, _ = lsq_gradients(x, dy, scale, torch.tensor([-1.0]), -8, 7)
    assert same(ref[2], d_scale.sum().reshape(1))


def test_scale_gradient_formula():
    """d x_fq / d s = round(x/s) - x/s inside, qmin - z below, qmax - z above (Esser et al. eq. 3)."""
    x = torch.rand(2001) * 6 - 3   # random: no exact ties x/s = k + 1/2, where the backward's
    s, z, qmin, qmax = torch.tensor(0.25), torch.tensor(3.0), 0, 15
    dx, ds, dz = lsq_gradients(x, torch.ones_like(x), s, z, qmin, qmax)
    v = x / s                      # round(x/s + z) and round(x/s) + z round ties differently
    q = torch.round(v) + z
    expect = torch.where(q < qmin, qmin - z, torch.where(q > qmax, qmax - z, torch.round(v) - v))
    assert torch.allclose(ds, expect, atol=1e-5)
    assert torch.equal(dx, ((q >= qmin) & (q <= qmax)).float())
    assert torch.equal(dz, torch.where((q >= qmin) & (q <= qmax), 0.0, -s))


def test_grad_factor_and_init_formulas():
    assert lsq_grad_factor(100, 7) == pytest.approx(1 / math.sqrt(700))
    with pytest.raises(ValueError):
        lsq_grad_factor(0, 7)
    x = torch.randn(5, 7)
    assert torch.allclose(lsq_init_scale(x, 7), 2 * x.abs().mean() / math.sqrt(7))
    per_channel = lsq_init_scale(x, 7, axis=0)
    assert per_channel.shape == (5,)
    assert torch.allclose(per_channel, 2 * x.abs().mean(dim=1) / math.sqrt(7))


def test_grad_factor_scales_only_the_qparam_gradients():
    x, dy = torch.randn(100), torch.randn(100)
    grads = []
    for g in (1.0, 0.125):   # a power of two: the products stay exact
        xs, s, z = x.clone().requires_grad_(), torch.tensor([0.1], requires_grad=True), torch.tensor([7.3], requires_grad=True)
        lsq_fake_quantize(xs, s, z, 0, 15, grad_factor=g).backward(dy)
        grads.append((xs.grad, s.grad, z.grad))
    assert torch.equal(grads[0][0], grads[1][0])
    assert torch.equal(grads[0][1] * 0.125, grads[1][1]) and torch.equal(grads[0][2] * 0.125, grads[1][2])


def test_module_lsq_init_and_values():
    w = torch.randn(16, 8) * 0.3
    fq = LSQFakeQuantize(bits=4, symmetric=True, granularity=PerChannel(0), init="lsq")
    y = fq(w)
    scale, zero_point = fq.qparams()
    assert torch.allclose(scale, lsq_init_scale(w, 7, axis=0))
    assert torch.equal(zero_point, torch.zeros(16, dtype=torch.int64))
    assert torch.equal(y, fake_quantize(w, scale, zero_point, -8, 7, axis=0))
    assert not fq.zero_point.requires_grad and fq.scale.requires_grad


def test_module_observer_init_over_calibration_batches():
    batches = [torch.randn(16, 10) * (i + 1) for i in range(3)]
    fq = LSQFakeQuantize(bits=8, init="minmax", batch_axis=0)
    fq.calibrating = True
    for b in batches:
        assert fq(b) is b                           # calibration: record only
    fq.calibrating = False
    fq.initialize()
    obs = make_observer("minmax", bits=8)
    for b in batches:
        obs(b)
    ref_scale, ref_zp = obs.calculate_qparams()
    scale, zero_point = fq.qparams()
    assert torch.equal(scale, ref_scale) and torch.equal(zero_point, ref_zp)
    assert fq.learn_zero_point and fq.zero_point.requires_grad


def test_module_scale_receives_gradient_and_moves():
    x = torch.randn(64, 32)
    fq = LSQFakeQuantize(bits=3, symmetric=True, signed=True, init="lsq", batch_axis=0)
    fq(x)
    s0 = fq.scale.detach().clone()
    opt = torch.optim.Adam(fq.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):   # learn the step that minimizes the quantization error of x
        loss = (fq(x) - x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        assert fq.scale.grad is not None and fq.scale.grad.abs() > 0
        opt.step()
        losses.append(loss.item())
    assert not torch.equal(fq.scale.detach(), s0)
    assert losses[-1] < losses[0]


def test_state_dict_round_trip():
    w = torch.randn(6, 4)
    fq = LSQFakeQuantize(bits=4, symmetric=True, granularity=PerChannel(0))
    fq(w)
    fresh = LSQFakeQuantize(bits=4, symmetric=True, granularity=PerChannel(0))
    fresh.load_state_dict(fq.state_dict())
    assert bool(fresh.initialized) and torch.equal(fresh(w), fq(w))


def test_set_bits_keeps_the_clipping_range():
    x = torch.rand(256) * 6 - 1
    fq = LSQFakeQuantize(bits=8, init="minmax")
    fq(x)
    s, z = fq.scale.detach().clone(), fq.zero_point.detach().clone()
    lo, hi = (0 - z) * s, (255 - z) * s
    fq.set_bits(4)
    s2, z2 = fq.scale.detach(), fq.zero_point.detach()
    assert (fq.quant_min, fq.quant_max) == (0, 15)
    assert torch.allclose((0 - z2) * s2, lo) and torch.allclose((15 - z2) * s2, hi)


def test_errors():
    x = torch.randn(4, 3)
    s = torch.tensor([0.1])
    with pytest.raises(ValueError, match="bits"):
        LSQFakeQuantize(bits=1)
    with pytest.raises(ValueError, match="bits"):
        LSQFakeQuantize(bits=4).set_bits(17)
    with pytest.raises(TypeError, match="PerTensor"):
        LSQFakeQuantize(granularity=PerGroup(2))
    with pytest.raises(TypeError, match="floating"):
        lsq_fake_quantize(x.to(torch.int32), s, 0.0, 0, 15)
    with pytest.raises(TypeError, match="scale"):
        lsq_fake_quantize(x, torch.tensor([1]), 0.0, 0, 15)
    with pytest.raises(TypeError, match="scale"):
        lsq_fake_quantize(x, 0.1, 0.0, 0, 15)
    with pytest.raises(ValueError, match="scale"):
        lsq_fake_quantize(x, torch.tensor([-0.1]), 0.0, 0, 15)
    with pytest.raises(ValueError, match="one per channel"):
        lsq_fake_quantize(x, torch.ones(4), torch.zeros(4), -8, 7, axis=1)
    with pytest.raises(ValueError, match="NaN"):
        lsq_fake_quantize(torch.tensor([float("nan")]), s, 0.0, 0, 15)
    with pytest.raises(ValueError, match="empty"):
        lsq_fake_quantize(torch.empty(0), s, 0.0, 0, 15)
    with pytest.raises(ValueError, match="not initialized"):
        LSQFakeQuantize().qparams()
    with pytest.raises(ValueError, match="no data"):
        LSQFakeQuantize().initialize()
    with pytest.raises(ValueError, match="unknown observer"):
        LSQFakeQuantize(init="nonsense")
    with pytest.raises(TypeError, match="PerTensor"):  # only per-tensor or per-channel scales are learned
        LSQFakeQuantize(granularity=PerGroup(4))
    with pytest.raises(TypeError, match="signed"):      # True, False or None (qparams.resolve_signed)
        LSQFakeQuantize(signed=1)


@pytest.mark.parametrize("symmetric, signed", [(True, None), (False, None), (True, False), (False, True)])
def test_signed_follows_the_one_rule_of_qparams(symmetric, signed):
    # reference: qlib.qparams.resolve_signed / quant_range (None: signed iff symmetric), which the
    # observers use too
    fq = LSQFakeQuantize(bits=4, symmetric=symmetric, signed=signed)
    want = resolve_signed(signed, symmetric)
    assert fq.signed is want
    assert (fq.quant_min, fq.quant_max) == quant_range(4, want)
    assert (fq.observer.quant_min, fq.observer.quant_max) == quant_range(4, want)


# ----------------------------------------------------------------- gradient scale and dtypes
@pytest.mark.parametrize("batch_axis, shape", [(0, (8, 5)), (1, (5, 8)), (0, (4, 3, 2, 2))])
def test_gradient_scale_counts_the_features_of_one_sample(batch_axis, shape):
    """``g = 1/sqrt(N qmax)`` with ``N`` the elements of one sample along ``batch_axis`` (kills the
    mutant that ignores ``batch_axis`` and counts the whole batch)."""
    gen = torch.Generator().manual_seed(sum(shape) + batch_axis)
    x, dy = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    fq = LSQFakeQuantize(bits=4, init="minmax", batch_axis=batch_axis)
    fq.calibrating = True
    fq(x)
    fq.calibrating = False
    fq.initialize()
    fq(x).backward(dy)
    n = x.numel() // x.shape[batch_axis]
    s = fq.scale.detach().clone().requires_grad_(True)
    z = fq.zero_point.detach().clone().requires_grad_(True)
    lsq_fake_quantize(x, s, z, 0, 15, grad_factor=lsq_grad_factor(n, 15)).backward(dy)
    assert torch.equal(fq.scale.grad, s.grad) and torch.equal(fq.zero_point.grad, z.grad)
    assert lsq_grad_factor(n, 15) != lsq_grad_factor(x.numel(), 15)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_lsq_fake_quantize_works_in_the_dtype_of_its_input(dtype):
    """Regression: float32 only (autocast failed). Computed in float32 as qlib.fake_quantize is:
    the values and gradients are the float32 ones, cast to the input's dtype."""
    gen = torch.Generator().manual_seed(7)
    x = (3 * torch.randn(6, 10, generator=gen)).to(dtype)
    dy = torch.randn(6, 10, generator=gen).to(dtype)
    results = []
    for xs in (x.clone(), x.float()):
        xs.requires_grad_(True)
        s, z = torch.tensor([0.2], requires_grad=True), torch.tensor([7.3], requires_grad=True)
        y = lsq_fake_quantize(xs, s, z, 0, 15, grad_factor=0.5)
        y.backward(dy.to(xs.dtype))
        results.append((y.detach(), xs.grad, s.grad, z.grad))
    (y, dx, ds, dz), (y32, dx32, ds32, dz32) = results
    assert y.dtype == dtype and dx.dtype == dtype
    assert torch.equal(y, y32.to(dtype)) and torch.equal(dx, dx32.to(dtype))
    assert torch.equal(ds, ds32) and torch.equal(dz, dz32)
    s64 = torch.tensor([0.2], dtype=torch.float64, requires_grad=True)  # a module moved by .double()
    lsq_fake_quantize(x.float(), s64, 7.0, 0, 15).sum().backward()
    assert s64.grad.dtype == torch.float64


def test_lsq_module_under_autocast_and_double():
    gen = torch.Generator().manual_seed(3)
    layer = torch.nn.Linear(6, 4)
    fq = LSQFakeQuantize(bits=4, init="minmax", batch_axis=0)
    x = torch.randn(16, 6, generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fq(layer(x))
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert fq.scale.grad is not None and torch.isfinite(fq.scale.grad).all()
    fq64 = LSQFakeQuantize(bits=4, init="minmax", batch_axis=0)
    fq64(x)
    fq64.double()
    y64 = fq64(x.double())
    assert y64.dtype == torch.float64 and torch.equal(y64, fq64(x).double())
    assert fq64.calculate_qparams()[0].dtype == torch.float32
