"""QAT beyond the STE and LSQ: PACT in the pipeline, distillation-assisted QAT, oscillations.

References:
- PACT (Choi et al. 2018): activations clipped to ``[0, alpha]``, ``alpha`` started at the
  calibrated maximum and learned; a converted PACT model computes what the fake-quant one does;
- distillation (Hinton et al. 2015; ``qlib.distill.kd_loss``): the QAT objective written out
  as ``(1 - w) CE + w KD``;
- Nagel et al. 2022: the dampening term ``mean(((clip(w) - q(w)) / s)^2)`` written out, and
  iterative freezing of weights whose codes change direction often.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from qlib import models
from qlib.distill import kd_loss
from qlib.modules import QuantConfig
from qlib.pact import PACTFakeQuantize
from qlib.qat import (OscillationFreezer, QATConfig, act_quantizers, calibrate_qat, convert_qat, dampening_loss,
                      kd_objective, prepare_qat, qat_layers, quantization_aware_training, weight_codes)
from qlib.qat.convert import qparams_now

W4A4 = QuantConfig(weight_bits=4, act_bits=4)


@pytest.fixture(scope="module")
def small(digits8):
    g = torch.Generator().manual_seed(0)
    tr = torch.randperm(len(digits8.train), generator=g)[:192]
    x, y = digits8.train.tensors
    xv, yv = digits8.val.tensors
    return TensorDataset(x[tr], y[tr]), TensorDataset(xv[:96], yv[:96])


def test_pact_method_learns_clipping_levels_and_converts(small, digits8):
    model = models.pretrained("cnn8", 0)
    qat, hist = quantization_aware_training(model, small, W4A4, epochs=1, lr=2e-3, method="pact", progress=False)
    acts = act_quantizers(qat)
    assert all(isinstance(fq, PACTFakeQuantize) for fq in acts)
    # the first layer sees normalized images (negative values): a fixed lower clip; the others ReLU outputs
    assert float(acts[0].lower) < 0 and all(float(fq.lower) == 0 for fq in acts[1:])
    steps = hist["step_sizes"]["3.input_fq"]
    assert steps[-1] != steps[0]                                           # alpha / 15 moved: alpha was learned
    x = digits8.test.tensors[0][:64]
    with torch.no_grad():
        assert torch.equal(convert_qat(qat)(x), qat.eval()(x))             # converts like any QAT model


def test_pact_starts_at_the_calibrated_maximum(small):
    qmodel = prepare_qat(models.pretrained("cnn8", 0), W4A4, method="pact")
    x = small[0].tensors[0][:64]
    calibrate_qat(qmodel, [(x, None)], 1)
    layer = qat_layers(qmodel)["3"]
    seen = {}
    h = qmodel.get_submodule("2").register_forward_hook(lambda m, i, o: seen.update(relu=o))
    with torch.no_grad():
        qmodel.eval()
        for fq in act_quantizers(qmodel):
            fq.calibrating = True  # pass the activations through unquantized, as calibration does
        qmodel(x)
    h.remove()
    assert torch.isclose(layer.input_fq.alpha.detach(), seen["relu"].max(), rtol=1e-5)


def test_kd_objective_is_the_weighted_sum_and_leaves_the_teacher_alone():
    g = torch.Generator().manual_seed(1)
    teacher, student = nn.Linear(6, 4), nn.Linear(6, 4)
    before = copy.deepcopy(teacher.state_dict())
    x, y = torch.randn(32, 6, generator=g), torch.randint(0, 4, (32,), generator=g)
    for w in (0.0, 0.3, 1.0):
        loss = kd_objective(teacher, w, temperature=3.0)(student, x, y)
        ref = w * kd_loss(student(x), teacher(x), 3.0) + (1 - w) * F.cross_entropy(student(x), y)
        assert torch.allclose(loss, ref)
    teacher.train()
    kd_objective(teacher, 0.5)
    assert teacher.training and all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())
    with pytest.raises(ValueError, match="kd_weight"):
        kd_objective(teacher, 1.5)


def test_qat_with_distillation_trains_on_the_teachers_soft_labels(small):
    """kd_weight = 1: the recorded loss is the KD term, not the cross-entropy of the same run."""
    model = models.pretrained("cnn8", 0)
    runs = {w: quantization_aware_training(model, small, W4A4, epochs=1, lr=1e-3, kd_weight=w, kd_temperature=2.0,
                                           progress=False)[1]["loss"][0] for w in (0.0, 1.0)}
    assert runs[0.0] > 0 and runs[1.0] > 0 and runs[0.0] != runs[1.0]
    with pytest.raises(ValueError, match="loss_fn or kd_weight"):
        QATConfig(kd_weight=0.5, loss_fn=lambda m, x, y: 0)
    with pytest.raises(ValueError, match="kd_temperature"):
        QATConfig(kd_temperature=0)


def test_dampening_loss_is_the_distance_to_the_bin_centres_in_steps():
    qmodel = prepare_qat(models.pretrained("cnn8", 0), W4A4)
    layers = qat_layers(qmodel)
    terms = []
    for layer in layers.values():
        s, z = qparams_now(layer.weight_fq, layer)
        s = s.reshape(-1, *[1] * (layer.weight.dim() - 1))
        w = layer.weight.detach()
        w_clip = torch.clamp(w, min=(-8 - 0) * s)
        w_clip = torch.minimum(w_clip, (7 - 0) * s)
        centre = (torch.clamp(torch.round(w * (1.0 / s)), -8, 7)) * s
        terms.append((((w_clip - centre) / s) ** 2).mean())
    loss = dampening_loss(qmodel)
    assert torch.allclose(loss, torch.stack(terms).mean(), rtol=1e-5)
    assert 0 < loss < 0.25 + 1e-6                        # at most half a step from a centre
    loss.backward()
    assert all(layer.weight.grad is not None for layer in layers.values())
    # weights on the grid: no pull. The grid follows max|w| = 7.5 s, so one weight a channel
    # keeps +7.5 s (clipped to the level 7 s: no distance) and the grid stays where it was
    with torch.no_grad():
        for layer in layers.values():
            s, _ = qparams_now(layer.weight_fq, layer)
            s = s.reshape(-1, *[1] * (layer.weight.dim() - 1))
            on_grid = torch.clamp(torch.round(layer.weight / s), -7, 7) * s
            on_grid.view(on_grid.shape[0], -1)[:, 0] = 7.5 * s.reshape(-1)
            layer.weight.copy_(on_grid)
            assert torch.allclose(qparams_now(layer.weight_fq, layer)[0].reshape(s.shape), s)
    assert dampening_loss(qmodel) < 1e-8


def test_freezer_freezes_exactly_the_weights_that_flip_back_and_forth():
    qmodel = prepare_qat(models.pretrained("cnn8", 0), W4A4)
    layer = qat_layers(qmodel)["3"]
    freezer = OscillationFreezer(qmodel, threshold=0.3, momentum=0.5)
    s, _ = qparams_now(layer.weight_fq, layer)
    s = s.reshape(-1, 1, 1, 1)
    base = layer.weight.detach().clone()
    flip = torch.zeros_like(base, dtype=torch.bool)
    flip[0, :4, 0, 0] = True                                  # 4 weights of channel 0 oscillate
    codes0 = weight_codes(layer)
    safe = (codes0 > -6) & (codes0 < 6)
    assert safe[0, :4, 0, 0].all()
    for step in range(8):
        with torch.no_grad():
            nudge = (s * 0.6) if step % 2 else -(s * 0.6)
            layer.weight.copy_(torch.where(flip, base + nudge, base))
        freezer.update("3", layer)
    st = freezer.state["3"]
    assert torch.equal(st["frozen"], flip)
    assert freezer.frozen_fraction() == pytest.approx(4 / sum(l.weight.numel() for l in qat_layers(qmodel).values()))
    # a frozen weight keeps its value: the next step puts it back, and its gradient is zero
    frozen_values = layer.weight.detach()[flip].clone()
    with torch.no_grad():
        layer.weight.add_(1.0)
    layer.train()
    out = layer(torch.randn(2, layer.weight.shape[1], 5, 5))
    assert torch.equal(layer.weight.detach()[flip], frozen_values)
    out.sum().backward()
    assert (layer.weight.grad[flip] == 0).all() and (layer.weight.grad[~flip] != 0).any()
    freezer.remove()
    with pytest.raises(ValueError, match="threshold"):
        OscillationFreezer(qmodel, threshold=0)


def test_qat_with_freezing_records_the_frozen_share(small):
    model = models.pretrained("cnn8", 0)
    _, hist = quantization_aware_training(model, small, W4A4, epochs=2, lr=2e-3, freeze_threshold=0.05,
                                          freeze_momentum=0.2, dampening=0.05, progress=False)
    assert len(hist["frozen_fraction"]) == 2
    assert 0 <= hist["frozen_fraction"][0] <= hist["frozen_fraction"][1] < 1
    with pytest.raises(ValueError, match="freeze_threshold"):
        QATConfig(freeze_threshold=2.0)
