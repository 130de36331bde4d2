"""Tests for qlib.modules (QuantConfig, QuantLinear/QuantConv2d, swap_modules, frozen state).

FakeQuantize itself is tested in test_fakequant.py.

Reference: torch.ao.quantization's observers (MinMaxObserver, PerChannelMinMaxObserver)
with torch.fake_quantize_per_tensor_affine / fake_quantize_per_channel_affine, i.e. what
torch.ao.nn.qat.Linear / Conv2d compute with the default x86 qconfig (bit for bit).
"""

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.ao.quantization import MinMaxObserver, PerChannelMinMaxObserver

from qlib.modules import (QuantConfig, QuantConv2d, QuantLinear, fake_quantizers, quant_layers, set_quant_mode,
                          swap_modules)
from qlib.qparams import PerChannel, PerGroup, PerTensor
from qlib.quantize import fake_quantize


def torch_act_fq(x_calib, x):
    """Per-tensor affine quint8, as torch's default activation fake-quant."""
    obs = MinMaxObserver(dtype=torch.quint8, qscheme=torch.per_tensor_affine)
    obs(x_calib)
    scale, zp = obs.calculate_qparams()
    return torch.fake_quantize_per_tensor_affine(x, scale, zp.to(torch.int32), 0, 255)


def torch_weight_fq(w):
    """Per-channel symmetric qint8 weights, as torch's default weight fake-quant."""
    obs = PerChannelMinMaxObserver(ch_axis=0, dtype=torch.qint8, qscheme=torch.per_channel_symmetric)
    obs(w)
    scale, zp = obs.calculate_qparams()
    return torch.fake_quantize_per_channel_affine(w, scale, zp.to(torch.int32), 0, -128, 127)


def calibrated(layer, x):
    """Observe ``x`` once, then freeze."""
    layer(x)
    for fq in fake_quantizers(layer).values():
        fq.freeze()
    return layer


# ----------------------------------------------------------------- QuantConfig
def test_config_defaults_and_variants():
    cfg = QuantConfig()
    assert (cfg.weight_bits, cfg.act_bits, cfg.weight_symmetric, cfg.act_symmetric) == (8, 8, True, False)
    assert cfg.weight_granularity == PerChannel(0) and cfg.act_granularity == PerTensor()
    w4 = dataclasses.replace(cfg, weight_bits=4)
    assert w4.weight_bits == 4 and hash(w4) != hash(cfg) and w4 != cfg
    obs = cfg.weight_observer_factory()
    assert (obs.quant_min, obs.quant_max, obs.symmetric) == (-128, 127, True)
    obs = cfg.act_observer_factory()
    assert (obs.quant_min, obs.quant_max, obs.symmetric) == (0, 255, False)


def test_config_observer_kwargs_are_passed_on():
    cfg = QuantConfig(act_observer="percentile", act_observer_kwargs={"percentile": 99.0})
    assert cfg.act_observer_factory().percentile == 99.0


@pytest.mark.parametrize("kwargs, err", [
    ({"weight_bits": 1}, ValueError),
    ({"act_bits": 40}, ValueError),
    ({"weight_bits": 4.0}, TypeError),
    ({"weight_granularity": "per_channel"}, TypeError),
    ({"act_observer": "nope"}, ValueError),
    ({"act_observer_kwargs": [("percentile", 99)]}, TypeError),
])
def test_config_rejects_bad_values(kwargs, err):
    with pytest.raises(err):
        QuantConfig(**kwargs)


def test_quant_linear_from_float_copies_and_matches_torch():
    lin = nn.Linear(12, 6)
    state = torch.get_rng_state()
    q = QuantLinear.from_float(lin)
    assert torch.equal(torch.get_rng_state(), state), "from_float must not consume the global RNG"
    assert q.weight is not lin.weight and torch.equal(q.weight, lin.weight)
    x_calib, x = torch.randn(32, 12), torch.randn(32, 12)
    # observers on, quantization off: the float layer
    assert torch.equal(q(x_calib), lin(x_calib))
    for fq in fake_quantizers(q).values():
        fq.freeze()
    expected = F.linear(torch_act_fq(x_calib, x), torch_weight_fq(lin.weight), lin.bias)
    assert torch.equal(q(x), expected)


@pytest.mark.parametrize("kw", [
    dict(stride=2, padding=1, bias=False),
    dict(stride=1, padding=2, dilation=2, groups=2),
    dict(padding=1, padding_mode="reflect"),
])
def test_quant_conv2d_from_float_matches_torch(kw):
    conv = nn.Conv2d(4, 6, 3, **kw)
    q = QuantConv2d.from_float(conv)
    for attr in ("stride", "padding", "dilation", "groups", "padding_mode", "kernel_size"):
        assert getattr(q, attr) == getattr(conv, attr)
    assert (q.bias is None) == (conv.bias is None)
    x_calib, x = torch.randn(8, 4, 9, 9), torch.randn(8, 4, 9, 9)
    calibrated(q, x_calib)
    expected = conv._conv_forward(torch_act_fq(x_calib, x), torch_weight_fq(conv.weight), conv.bias)
    assert torch.equal(q(x), expected)


def test_quant_linear_per_group_weights():
    cfg = QuantConfig(weight_bits=4, weight_granularity=PerGroup(4))
    lin = nn.Linear(16, 5)
    q = calibrated(QuantLinear.from_float(lin, cfg), torch.randn(8, 16))
    scale, zp = q.weight_fq.qparams()
    assert scale.shape == (5, 4)
    w_dq = fake_quantize(lin.weight, scale, zp, -8, 7, axis=-1, group_size=4)
    x = torch.randn(8, 16)
    torch.testing.assert_close(q(x), F.linear(q.input_fq(x), w_dq, lin.bias))


def test_quant_layers_train_with_ste():
    q = QuantLinear.from_float(nn.Linear(5, 3))
    set_quant_mode(q, observe=True, quantize=True)
    q(torch.randn(4, 5)).pow(2).sum().backward()
    assert q.weight.grad is not None and q.weight.grad.abs().sum() > 0


def test_from_float_rejects_wrong_modules():
    with pytest.raises(TypeError, match="nn.Linear"):
        QuantLinear.from_float(nn.Conv2d(1, 1, 1))
    with pytest.raises(TypeError, match="nn.Conv2d"):
        QuantConv2d.from_float(nn.Linear(1, 1))
    with pytest.raises(TypeError, match="nn.Linear"):
        QuantLinear.from_float(QuantLinear.from_float(nn.Linear(2, 2)))
    with pytest.raises(TypeError, match="QuantConfig"):
        QuantLinear.from_float(nn.Linear(2, 2), config={"weight_bits": 4})


# ----------------------------------------------------------------- swap_modules
def small_cnn():
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(),
                         nn.Flatten(), nn.Linear(4 * 6 * 6, 10))


def test_swap_modules_replaces_every_layer_and_keeps_the_original():
    model = small_cnn()
    swapped = swap_modules(model)
    assert [type(m) for m in swapped] == [QuantConv2d, nn.ReLU, QuantConv2d, nn.ReLU, nn.Flatten, QuantLinear]
    assert [type(m) for m in model] == [nn.Conv2d, nn.ReLU, nn.Conv2d, nn.ReLU, nn.Flatten, nn.Linear]
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(swapped(x), model(x))  # observers only: still the float model
    assert len(fake_quantizers(swapped)) == 6


def test_swap_modules_per_layer():
    model = small_cnn()
    w4 = QuantConfig(weight_bits=4, act_bits=4)
    swapped = swap_modules(model, per_layer={"0": None, "5": w4})
    assert type(swapped[0]) is nn.Conv2d
    assert swapped[2].config == QuantConfig() and swapped[5].config is w4
    assert swapped[5].weight_fq.quant_min == -8 and swapped[5].input_fq.quant_max == 15
    assert list(quant_layers(swapped)) == ["0"]


def test_swap_modules_errors():
    with pytest.raises(ValueError, match="no layers to quantize"):
        swap_modules(nn.Sequential(nn.ReLU(), nn.Flatten()))
    with pytest.raises(ValueError, match="not quantizable layers"):
        swap_modules(small_cnn(), per_layer={"1": None})
    with pytest.raises(TypeError, match="QuantConfig"):
        swap_modules(small_cnn(), per_layer={"0": 8})
    with pytest.raises(TypeError, match="QuantConfig"):
        swap_modules(small_cnn(), config="w8a8")
    with pytest.raises(TypeError, match="nn.Module"):
        swap_modules(lambda x: x)
    with pytest.raises(ValueError, match="no layers to quantize"):
        swap_modules(swap_modules(small_cnn()))  # nothing left in float


def test_swap_single_layer_model():
    q = swap_modules(nn.Linear(3, 2))
    assert isinstance(q, QuantLinear)


def test_set_quant_mode():
    model = swap_modules(small_cnn())
    set_quant_mode(model, observe=False)
    assert all(not fq.observe and not fq.quantize for fq in fake_quantizers(model).values())
    set_quant_mode(model, quantize=True)
    assert all(fq.quantize for fq in fake_quantizers(model).values())


# ----------------------------------------------------------------- observing and frozen state
def _frozen_cnn(seed: int):
    gen = torch.Generator().manual_seed(seed)
    model = swap_modules(small_cnn()).eval()
    model(torch.randn(8, 1, 8, 8, generator=gen) * (1 + seed))
    for fq in fake_quantizers(model).values():
        fq.freeze()
    return model


def test_frozen_qparams_follow_load_state_dict():
    """Regression: the frozen qparams were a plain attribute, stale after load_state_dict."""
    torch.manual_seed(0)
    a, b = _frozen_cnn(0), _frozen_cnn(1)
    b.load_state_dict(copy.deepcopy(a.state_dict()))  # weights too: small_cnn draws them from the global RNG
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    assert torch.equal(b(x), a(x))
    for name, fq in fake_quantizers(b).items():
        assert torch.equal(fq.qparams()[0], fake_quantizers(a)[name].qparams()[0]), name


def test_frozen_qparams_load_into_a_fresh_unfrozen_model_and_back():
    torch.manual_seed(0)
    a = _frozen_cnn(0)
    fresh = swap_modules(small_cnn()).eval()
    fresh.load_state_dict(a.state_dict())
    for fq in fake_quantizers(fresh).values():
        fq.freeze()
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    assert torch.equal(fresh(x), a(x))
    unfrozen = swap_modules(small_cnn()).eval()
    unfrozen(x)
    a.load_state_dict(unfrozen.state_dict())  # no frozen qparams saved: recomputed from the loaded observers
    for name, fq in fake_quantizers(a).items():
        want = fake_quantizers(unfrozen)[name].observer.calculate_qparams()[0]
        assert torch.equal(fq.qparams()[0], want), name


def test_frozen_qparams_move_with_to():
    """Regression: ``.to()`` left the cached qparams behind (dtype here; device on a GPU)."""
    torch.manual_seed(0)
    model = _frozen_cnn(0)
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    want = model(x)
    scales = {n: fq.qparams()[0].clone() for n, fq in fake_quantizers(model).items()}
    model.double()
    for name, fq in fake_quantizers(model).items():
        assert fq.frozen_scale.dtype == torch.float32  # a buffer that keeps its dtype
        assert torch.equal(fq.qparams()[0], scales[name])
    y64 = model(x.double())
    assert y64.dtype == torch.float64
    # float64 activations quantize in float64 (as torch's kernels do), so a value within
    # rounding error of a tie may land one step away from the float32 run: most outputs agree.
    close = torch.isclose(y64, want.double(), rtol=1e-4, atol=1e-5)
    assert close.float().mean() > 0.4, close.float().mean()
    assert torch.equal(model.float()(x), want)
    model.bfloat16().float()  # a lossy round trip for floats: the frozen scales keep their bits
    assert all(torch.equal(fq.qparams()[0], scales[n]) for n, fq in fake_quantizers(model).items())
    if torch.cuda.is_available():
        cuda = copy.deepcopy(model).cuda()
        assert all(fq.qparams()[0].is_cuda for fq in fake_quantizers(cuda).values())
        torch.testing.assert_close(cuda(x.cuda()).cpu(), want, rtol=1e-4, atol=1e-5)
