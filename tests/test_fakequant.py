"""Tests for qlib.fakequant (FakeQuantize: an observer and fake_quantize behind two switches).

Reference: torch.ao.quantization.FakeQuantize's contract (observer_enabled / fake_quant_enabled)
and torch.ao's MinMaxObserver / PerChannelMinMaxObserver with torch.fake_quantize_per_tensor_affine
/ fake_quantize_per_channel_affine (bit for bit); the straight-through gradient of those kernels.
"""

import pytest
import torch
from torch import nn

from qlib.fakequant import FakeQuantize
from qlib.modules import QuantConfig
from qlib.observers import make_observer
from qlib.qparams import qparams_for
from qlib.quantize import fake_quantize

from torch.ao.quantization import MinMaxObserver, PerChannelMinMaxObserver


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


def test_fake_quantize_observe_only_is_identity():
    fq = FakeQuantize(make_observer("minmax"))
    x = torch.randn(4, 5)
    assert fq(x) is x
    assert int(fq.observed_batches) == 1


def test_fake_quantize_needs_data():
    fq = FakeQuantize(make_observer("minmax"))
    with pytest.raises(ValueError, match="seen no data"):
        fq.qparams()
    with pytest.raises(TypeError, match="observer"):
        FakeQuantize(nn.ReLU())


def test_fake_quantize_frozen_matches_torch_and_is_cached():
    x_calib = torch.randn(64, 10) * 3 + 1
    fq = FakeQuantize(make_observer("minmax"))
    fq(x_calib)
    fq.freeze()
    x = torch.randn(64, 10) * 4
    assert torch.equal(fq(x), torch_act_fq(x_calib, x))
    scale, zp = fq.qparams()
    fq(x * 100)  # frozen: a wild batch does not move the qparams
    assert fq.qparams()[0] is scale and fq.qparams()[1] is zp


def test_fake_quantize_per_channel_weights_match_torch():
    w = torch.randn(8, 3, 3, 3)
    fq = FakeQuantize(QuantConfig().weight_observer_factory())
    fq(w)
    fq.freeze()
    assert torch.equal(fq(w), torch_weight_fq(w))


def test_fake_quantize_straight_through_gradient():
    fq = FakeQuantize(make_observer("minmax"))
    fq(torch.linspace(-1, 1, 11))
    fq.freeze()
    x = torch.tensor([-2.0, -0.5, 0.0, 0.3, 0.99, 3.0], requires_grad=True)
    fq(x).sum().backward()
    assert torch.equal(x.grad, torch.tensor([0.0, 1, 1, 1, 1, 0]))


def test_fake_quantize_observe_and_quantize_together_follows_the_data():
    fq = FakeQuantize(make_observer("minmax"))
    fq.quantize = True  # QAT-style: observe and quantize at once
    fq(torch.randn(10))
    s1 = fq.qparams()[0].clone()
    fq(torch.randn(10) * 50)
    assert fq.qparams()[0] > s1


def test_dynamic_fake_quantize_uses_each_batch():
    fq = FakeQuantize(make_observer("minmax"), dynamic=True)
    for _ in range(2):
        x = torch.randn(16, 7) * torch.rand(()) * 10
        scale, zp = qparams_for(x, bits=8)
        assert torch.equal(fq(x), fake_quantize(x, scale, zp, 0, 255))
    with pytest.raises(ValueError, match="dynamic"):
        fq.qparams()


# ----------------------------------------------------------------- QuantLinear / QuantConv2d


def test_eval_mode_records_only_while_calibrating():
    """Switching ``observe`` on opens a calibration; closing it stops eval-mode recording."""
    fq = FakeQuantize(make_observer("minmax")).eval()
    fq(torch.ones(3))
    assert int(fq.observed_batches) == 1  # the lab contract: observe=True + eval forward records
    fq.calibrating = False
    fq(100 * torch.ones(3))
    assert int(fq.observed_batches) == 1 and fq.observer.max_val.item() == 1.0
    fq.train()(torch.full((3,), 2.0))  # training always records while observe is on
    assert int(fq.observed_batches) == 2 and fq.observer.max_val.item() == 2.0
    fq.eval().observe = True  # switching observe on again reopens it
    fq(torch.full((3,), 3.0))
    assert fq.observer.max_val.item() == 3.0


def test_calculate_qparams_is_qparams():
    fq = FakeQuantize(make_observer("minmax"))
    fq(torch.randn(10, generator=torch.Generator().manual_seed(0)))
    s1, z1 = fq.calculate_qparams()
    s2, z2 = fq.qparams()
    assert torch.equal(s1, s2) and torch.equal(z1, z2)


def test_freeze_recomputes_and_observe_clears_the_frozen_qparams():
    fq = FakeQuantize(make_observer("minmax"))
    fq(torch.tensor([0.0, 1.0]))
    fq.freeze()
    assert fq.frozen_scale.numel() == 1 and not fq.calibrating
    fq.observe = True
    assert fq.frozen_scale.numel() == 0 and fq.calibrating
    fq(torch.tensor([0.0, 2.0]))
    fq.freeze()
    assert fq.qparams()[0].item() == pytest.approx(2.0 / 255)


def test_repr_says_when_observing_is_paused():
    fq = FakeQuantize(make_observer("minmax")).eval()
    fq.calibrating = False
    assert "not recording" in repr(fq)
