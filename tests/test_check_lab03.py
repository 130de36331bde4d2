"""qlib.check.lab03: reference answers pass; typical wrong answers fail with a useful message.

Reference: qlib.fold.fold_bn / fold_batchnorm (themselves tested against an eval-mode
nn.BatchNorm in test_fold.py) and qlib.ptq.calibrate / convert / quantize_static.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from qlib import check
from qlib.check import lab03
from qlib.fold import fold_batchnorm, fold_bn
from qlib.modules import fake_quantizers, set_quant_mode, swap_modules
from qlib.ptq import calibrate as ref_calibrate
from qlib.ptq import convert as ref_convert
from qlib.ptq import quantize_static


# ------------------------------------------------------------------ reference answers
def calibrate(qmodel, batches):
    return ref_calibrate(set_quant_mode(qmodel, observe=True, quantize=False), batches)


def ptq(model, batches, config):
    return quantize_static(model, batches, config)


def test_reference_answers_pass_every_check(capsys):
    lab03.fold_bn(fold_bn)
    lab03.fold_bn_hidden(fold_bn)
    lab03.fold_model(fold_batchnorm)
    lab03.fold_model_hidden(fold_batchnorm)
    lab03.calibrate(calibrate)
    lab03.calibrate_hidden(calibrate)
    lab03.convert(ref_convert)
    lab03.convert_hidden(ref_convert)
    lab03.ptq(ptq)
    assert capsys.readouterr().out.count("PASS") == 9


@pytest.mark.slow
def test_reference_pipeline_passes_the_hidden_check(capsys):
    lab03.ptq_hidden(ptq)
    assert "PASS" in capsys.readouterr().out


# ------------------------------------------------------------------ wrong answers
def _fold_with(factor_fn, bias_fn=None):
    def fn(weight, bias, bn):
        with torch.no_grad():
            gamma = bn.weight if bn.weight is not None else torch.ones_like(bn.running_mean)
            beta = bn.bias if bn.bias is not None else torch.zeros_like(bn.running_mean)
            b = bias if bias is not None else torch.zeros_like(bn.running_mean)
            f = factor_fn(gamma, bn)
            w = weight * f.reshape(-1, *([1] * (weight.dim() - 1)))
            nb = bias_fn(b, f, beta, bn) if bias_fn else (b - bn.running_mean) * f + beta
        return w, nb
    return fn


def test_fold_bn_mistakes_get_hints():
    with pytest.raises(AssertionError, match="not by the variance"):
        lab03.fold_bn(_fold_with(lambda g, bn: g / (bn.running_var + bn.eps)))
    with pytest.raises(AssertionError, match="eps inside the square root"):
        lab03.fold_bn(_fold_with(lambda g, bn: g / bn.running_var.sqrt()))
    with pytest.raises(AssertionError, match="mean is scaled too"):
        lab03.fold_bn(_fold_with(lambda g, bn: g / (bn.running_var + bn.eps).sqrt(),
                                 lambda b, f, beta, bn: b * f + beta - bn.running_mean))
    with pytest.raises(AssertionError, match="add beta"):
        lab03.fold_bn(_fold_with(lambda g, bn: g / (bn.running_var + bn.eps).sqrt(),
                                 lambda b, f, beta, bn: (b - bn.running_mean) * f))


def test_fold_bn_in_place_and_missing_none_handling_fail():
    def in_place(weight, bias, bn):
        w, b = fold_bn(weight, bias, bn)
        with torch.no_grad():
            weight.copy_(w)
        return weight, b

    def needs_bias(weight, bias, bn):
        return fold_bn(weight, bias + 0, bn)  # TypeError when bias is None
    with pytest.raises(AssertionError, match="changed its inputs"):
        lab03.fold_bn(in_place)
    with pytest.raises(check.CheckFailed, match="raised TypeError"):
        lab03.fold_bn(needs_bias)


def test_fold_model_mistakes_fail():
    def in_place(model):
        folded = fold_batchnorm(model)
        model.load_state_dict(folded.state_dict(), strict=False)
        return folded

    def keeps_bn(model):
        m = copy.deepcopy(model).eval()
        for i in range(len(m) - 1):
            if isinstance(m[i], nn.Conv2d) and isinstance(m[i + 1], nn.BatchNorm2d):
                w, b = fold_bn(m[i].weight, m[i].bias, m[i + 1])
                m[i].weight, m[i].bias = nn.Parameter(w), nn.Parameter(b)
        return m

    def conv_only(model):  # forgets the Linear -> BatchNorm1d pairs of the mlp
        m = copy.deepcopy(model).eval()
        for i in range(len(m) - 1):
            if isinstance(m[i], nn.Conv2d) and isinstance(m[i + 1], nn.BatchNorm2d):
                w, b = fold_bn(m[i].weight, m[i].bias, m[i + 1])
                m[i].weight, m[i].bias = nn.Parameter(w), nn.Parameter(b)
                m[i + 1] = nn.Identity()
        return m
    with pytest.raises(AssertionError, match="original model was changed"):
        lab03.fold_model(in_place)
    with pytest.raises(AssertionError, match="BatchNorm layers left"):
        lab03.fold_model(keeps_bn)
    with pytest.raises(AssertionError, match=r"BatchNorm layers left in the folded model: \['2', '5'\]"):
        lab03.fold_model_hidden(conv_only)


def test_calibrate_and_convert_mistakes_fail():
    def quantizes_while_calibrating(qmodel, batches):
        return ref_calibrate(set_quant_mode(qmodel, observe=True, quantize=True), batches)

    def first_batch_only(qmodel, batches):
        return calibrate(qmodel, batches[:1])

    def convert_in_place(qmodel):
        return set_quant_mode(qmodel, observe=False, quantize=True)

    def still_observing(qmodel):
        return set_quant_mode(copy.deepcopy(qmodel), observe=True, quantize=True)
    with pytest.raises(AssertionError, match="observe=True, quantize=False"):
        lab03.calibrate(quantizes_while_calibrating)
    with pytest.raises(AssertionError, match="batches, expected 4"):
        lab03.calibrate(first_batch_only)
    with pytest.raises(AssertionError, match="ValueError|observe=True, quantize=False"):
        lab03.calibrate_hidden(lambda qmodel, batches: ref_calibrate(qmodel, batches))  # switches not set
    with pytest.raises(AssertionError, match="return a converted copy"):
        lab03.convert(convert_in_place)
    with pytest.raises(AssertionError, match="observe=True, quantize=True"):
        lab03.convert(still_observing)


def test_pipeline_that_ignores_the_config_or_skips_folding_fails():
    def always_w8(model, batches, config):
        return quantize_static(model, batches)

    def no_fold(model, batches, config):
        q = swap_modules(model, config).eval()
        calibrate(q, batches)
        return ref_convert(q)
    with pytest.raises(AssertionError, match=r"weights quantized at \[8\] bits, expected 4"):
        lab03.ptq(always_w8)
    with pytest.raises(AssertionError, match="fold them first"):
        lab03.ptq(no_fold)


def test_unimplemented_says_so():
    with pytest.raises(check.CheckFailed, match="not implemented yet"):
        lab03.ptq(check.not_implemented)


def test_calibrated_observers_really_saw_the_data():
    model = swap_modules(fold_batchnorm(torch.nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4))).eval())
    calibrate(model, [torch.randn(2, 1, 5, 5)])
    assert all(int(fq.observed_batches) == 1 for fq in fake_quantizers(model).values())


@pytest.mark.slow
def test_pipeline_below_the_accuracy_target_fails_with_the_reference_accuracy():
    import dataclasses

    def minmax_weights(model, batches, config):  # ignores the MSE weight observer it is given
        return quantize_static(model, batches, dataclasses.replace(config, weight_observer="minmax"))
    with pytest.raises(AssertionError, match=r"seed 1\): W4A8 \(MSE weight scales\) accuracy .*< 95.0%; "
                                             r"qlib.ptq.quantize_static reaches"):
        lab03.ptq_hidden(minmax_weights)
