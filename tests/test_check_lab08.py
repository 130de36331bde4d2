"""qlib.check.lab08: reference answers pass; typical wrong answers fail with a useful message.

References: the written formulas of the lab (contrast in pixel units, per image), written
out here independently of ``qlib.domain.shifts``; AdaBN written out with a cumulative
average and ``qlib.ptq.quantize_static``; ``qlib.train.evaluate`` for the calibration table.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from qlib.check import CheckFailed, lab08
from qlib.domain.evaluate import ptq_config
from qlib.ptq import quantize_static
from qlib.train import evaluate


def contrast(x, factor, bounds, per_image=True, clamp=True):
    lo, hi = bounds
    u = ((x - lo) / (hi - lo)).clamp(0, 1)
    mean = u.mean(dim=(1, 2, 3), keepdim=True) if per_image else u.mean()
    u = mean + factor * (u - mean)
    return lo + (u.clamp(0, 1) if clamp else u) * (hi - lo)


def adabn_then_quantize(model, target, config, adapt=True):
    adapted = copy.deepcopy(model).eval()
    if adapt:
        for m in adapted.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.reset_running_stats()
                m.momentum = None
                m.train()
        with torch.no_grad():
            for x in target:
                adapted(x)
        adapted.eval()
    return quantize_static(adapted, target, config)


def compare_calibration(model, sources, test_set, bits):
    return {k: evaluate(quantize_static(model, b, ptq_config(bits)), test_set) for k, b in sources.items()}


def test_right_answers_pass(capsys):
    lab08.contrast(contrast)
    lab08.contrast_hidden(contrast)
    lab08.adabn_quantized(adabn_then_quantize)
    lab08.adabn_quantized_hidden(adabn_then_quantize)
    lab08.compare_calibration(compare_calibration)
    lab08.compare_calibration_hidden(compare_calibration)
    assert capsys.readouterr().out.count("PASS") == 6


def test_contrast_with_the_batch_mean_fails_with_a_hint():
    with pytest.raises(CheckFailed, match="mean of each image"):
        lab08.contrast(lambda x, f, b: contrast(x, f, b, per_image=False))


def test_contrast_without_clamp_fails():
    """Without the final clamp, factor 1 with bounds inside the data range leaves them."""
    with pytest.raises(CheckFailed):
        lab08.contrast_hidden(lambda x, f, b: contrast(x, f, b, clamp=False) * 1.01)


def test_contrast_in_place_fails():
    def in_place(x, factor, bounds):
        x.mul_(1.0)
        x.add_(0.0)
        out = contrast(x, factor, bounds)
        x.zero_()
        return out
    with pytest.raises(CheckFailed, match="in place"):
        lab08.contrast(in_place)


def test_recalibration_without_adabn_fails_with_a_hint():
    with pytest.raises(CheckFailed, match="plain re-calibration"):
        lab08.adabn_quantized(lambda m, t, c: adabn_then_quantize(m, t, c, adapt=False))


def test_adabn_on_the_callers_model_fails():
    def mutate(model, target, config):
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.reset_running_stats()
        return adabn_then_quantize(model, target, config)
    with pytest.raises(CheckFailed, match="copy.deepcopy"):
        lab08.adabn_quantized(mutate)


def test_wrong_bits_or_keys_fail():
    with pytest.raises(CheckFailed, match="accuracy with calibration source"):
        lab08.compare_calibration(lambda m, s, t, b: compare_calibration(m, s, t, 8))
    with pytest.raises(CheckFailed, match="keys"):
        lab08.compare_calibration(lambda m, s, t, b: {"only": 0.0})


def test_not_implemented_says_so():
    with pytest.raises(CheckFailed, match="not implemented"):
        lab08.contrast(lambda *a: (_ for _ in ()).throw(NotImplementedError()))
