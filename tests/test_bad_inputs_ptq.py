"""Bad-input probe for the public functions of qlib.modules, fakequant, ptq, qat, fold and lsq.

Reference: the project's error contract (DESIGN.md, "Errors"): every public function rejects
bad input with a ``ValueError`` or ``TypeError`` whose message says what was expected, never
a silent result and never an error from deep inside torch where qlib can say what is wrong.
Cases: a model with no layers to quantize, empty calibration data, NaN data, bad bits, wrong
types. Each case names the call, the error class and words of the expected message.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from qlib import fold, lsq, modules, ptq, qat
from qlib.fakequant import FakeQuantize
from qlib.observers import make_observer

NAN = float("nan")


def cnn():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 3))


def no_layers():
    return nn.Sequential(nn.ReLU(), nn.Flatten())


def x(n=4, value=None):
    t = torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(n))
    return t if value is None else torch.full_like(t, value)


def prepared():
    return ptq.prepare(cnn())


def converted():
    return ptq.quantize_static(cnn(), x(8))


def splits(value=None):
    xs = x(32, value)
    y = torch.randint(0, 3, (32,), generator=torch.Generator().manual_seed(1))
    return TensorDataset(xs, y), TensorDataset(x(16), y[:16])


CASES = [
    # ---- a model with no layers to quantize
    ("swap_modules(no layers)", lambda: modules.swap_modules(no_layers()), ValueError, "no layers to quantize"),
    ("ptq.prepare(no layers)", lambda: ptq.prepare(no_layers()), ValueError, "no layers to quantize"),
    ("quantize_static(no layers)", lambda: ptq.quantize_static(no_layers(), x()), ValueError, "no layers"),
    ("quantize_dynamic(no layers)", lambda: ptq.quantize_dynamic(no_layers()), ValueError, "no layers"),
    ("calibrate(float model)", lambda: ptq.calibrate(cnn(), x()), ValueError, "prepare first"),
    ("convert(float model)", lambda: ptq.convert(cnn()), ValueError, "prepare first"),
    ("prepare_qat(no layers)", lambda: qat.prepare_qat(no_layers()), ValueError, "no layers"),
    ("quantization_aware_training(no layers)",
     lambda: qat.quantization_aware_training(no_layers(), splits(), epochs=1), ValueError, "no layers"),
    ("convert_qat(float model)", lambda: qat.convert_qat(cnn()), ValueError, "prepare_qat"),
    ("to_integer(float model)", lambda: qat.to_integer(cnn()), ValueError, "prepare_qat"),
    ("set_bits(float model)", lambda: qat.set_bits(cnn(), 4, 4), ValueError, "prepare_qat"),
    ("calibrate_qat(float model)", lambda: qat.calibrate_qat(cnn(), x(), 1), ValueError, "prepare_qat"),
    # ---- empty calibration data
    ("calibrate([])", lambda: ptq.calibrate(prepared(), []), ValueError, "empty"),
    ("calibrate(empty tensor)", lambda: ptq.calibrate(prepared(), torch.empty(0, 1, 8, 8)), ValueError, "empty"),
    ("quantize_static(model, [])", lambda: ptq.quantize_static(cnn(), []), ValueError, "empty"),
    ("convert(uncalibrated)", lambda: ptq.convert(prepared()), ValueError, "seen no data"),
    ("calibrate_qat([])", lambda: qat.calibrate_qat(qat.prepare_qat(cnn()), [], 1), ValueError, "empty"),
    ("quantization_aware_training(empty train)",
     lambda: qat.quantization_aware_training(cnn(), (TensorDataset(torch.empty(0, 1, 8, 8), torch.empty(0)), None)),
     ValueError, "empty"),
    ("FakeQuantize.calculate_qparams() unseen",
     lambda: FakeQuantize(make_observer("minmax")).calculate_qparams(), ValueError, "seen no data"),
    ("LSQFakeQuantize.initialize() unseen", lambda: lsq.LSQFakeQuantize().initialize(), ValueError, "no data"),
    # ---- NaN data
    ("calibrate(NaN)", lambda: ptq.calibrate(prepared(), x(value=NAN)), ValueError, "NaN"),
    ("calibrate(inf)", lambda: ptq.calibrate(prepared(), [x(), x(value=float("inf"))]), ValueError, "batch 1"),
    ("quantize_static(NaN)", lambda: ptq.quantize_static(cnn(), x(value=NAN)), ValueError, "NaN"),
    ("calibrate_qat(NaN)", lambda: qat.calibrate_qat(qat.prepare_qat(cnn()), x(value=NAN), 1), ValueError, "NaN"),
    ("quantization_aware_training(NaN data)",
     lambda: qat.quantization_aware_training(cnn(), splits(NAN), epochs=1, progress=False), ValueError, "NaN"),
    ("fold_bn(NaN weight)", lambda: fold.fold_bn(torch.full((4, 3), NAN), None, nn.BatchNorm1d(4)),
     ValueError, "NaN"),
    ("lsq_fake_quantize(NaN)", lambda: lsq.lsq_fake_quantize(x(value=NAN), torch.ones(1), 0, 0, 15),
     ValueError, "NaN"),
    ("lsq_init_scale(NaN)", lambda: lsq.lsq_init_scale(x(value=NAN), 7), ValueError, "NaN"),
    ("ste_staircase(NaN)", lambda: qat.ste_staircase(torch.tensor([NAN]), 0.1, 0, 0, 15), ValueError, "NaN"),
    # ---- bad bits
    ("QuantConfig(weight_bits=1)", lambda: modules.QuantConfig(weight_bits=1), ValueError, "bits"),
    ("QuantConfig(act_bits=17)", lambda: modules.QuantConfig(act_bits=17), ValueError, "bits"),
    ("QuantConfig(act_bits=8.0)", lambda: modules.QuantConfig(act_bits=8.0), TypeError, "bits must be an int"),
    ("quantize_dynamic(bits=0)", lambda: ptq.quantize_dynamic(cnn(), bits=0), ValueError, "bits"),
    ("set_bits(act_bits=-1)", lambda: qat.set_bits(qat.prepare_qat(cnn()), act_bits=-1), ValueError, "act_bits"),
    ("set_bits(weight_bits=True)", lambda: qat.set_bits(qat.prepare_qat(cnn()), weight_bits=True), TypeError,
     "weight_bits"),
    ("bits_schedule {0: 1}",
     lambda: qat.quantization_aware_training(cnn(), splits(), epochs=1, bits_schedule={0: 1}), ValueError, "bits"),
    ("bits_schedule {0: (8, 8, 8)}",
     lambda: qat.quantization_aware_training(cnn(), splits(), epochs=1, bits_schedule={0: (8, 8, 8)}),
     ValueError, "pair"),
    ("LSQFakeQuantize(bits=1)", lambda: lsq.LSQFakeQuantize(bits=1), ValueError, "bits"),
    ("LSQFakeQuantize.set_bits(40)", lambda: lsq.LSQFakeQuantize().set_bits(40), ValueError, "bits"),
    # ---- wrong types and values
    ("swap_modules('model')", lambda: modules.swap_modules("model"), TypeError, "nn.Module"),
    ("swap_modules(config=dict)", lambda: modules.swap_modules(cnn(), {"weight_bits": 4}), TypeError, "QuantConfig"),
    ("swap_modules(per_layer unknown)", lambda: modules.swap_modules(cnn(), per_layer={"9": None}), ValueError,
     "not quantizable layers"),
    ("fake_quantizers('model')", lambda: modules.fake_quantizers("model"), TypeError, "nn.Module"),
    ("quant_layers(None)", lambda: modules.quant_layers(None), TypeError, "nn.Module"),
    ("set_quant_mode(observe='yes')", lambda: modules.set_quant_mode(prepared(), observe="yes"), TypeError,
     "True, False or None"),
    ("set_submodule('', m)", lambda: modules.set_submodule(cnn(), "", nn.ReLU()), ValueError, "non-empty"),
    ("set_submodule(m, 'x', 3)", lambda: modules.set_submodule(cnn(), "0", 3), TypeError, "nn.Modules"),
    ("FakeQuantize(ReLU)", lambda: FakeQuantize(nn.ReLU()), TypeError, "observer"),
    ("QuantLinear.from_float(conv)", lambda: modules.QuantLinear.from_float(nn.Conv2d(1, 1, 1)), TypeError,
     "nn.Linear"),
    ("QuantConv2d.from_float(linear)", lambda: modules.QuantConv2d.from_float(nn.Linear(1, 1)), TypeError,
     "nn.Conv2d"),
    ("QuantConfig(granularity str)", lambda: modules.QuantConfig(weight_granularity="per_channel"), TypeError,
     "PerChannel"),
    ("calibrate('model')", lambda: ptq.calibrate("model", x()), TypeError, "nn.Module"),
    ("calibrate(data=5)", lambda: ptq.calibrate(prepared(), 5), TypeError, "expected a tensor"),
    ("calibrate(data='abc')", lambda: ptq.calibrate(prepared(), "abc"), TypeError, "expected a tensor"),
    ("calibrate(max_batches=0)", lambda: ptq.calibrate(prepared(), x(), max_batches=0), ValueError,
     "positive int"),
    ("calibrate(converted)", lambda: ptq.calibrate(converted(), x()), ValueError, "observe=True"),
    ("quantize_dynamic(bits and config)", lambda: ptq.quantize_dynamic(cnn(), 4, modules.QuantConfig()),
     ValueError, "not both"),
    ("prepare_qat('model')", lambda: qat.prepare_qat("model"), TypeError, "nn.Module"),
    ("prepare_qat(method='magic')", lambda: qat.prepare_qat(cnn(), method="magic"), ValueError, "method"),
    ("prepare_qat(lsq_init=3)", lambda: qat.prepare_qat(cnn(), lsq_init=3), TypeError, "lsq_init"),
    ("convert_qat('model')", lambda: qat.convert_qat("model"), TypeError, "nn.Module"),
    ("step_sizes('model')", lambda: qat.step_sizes("model"), TypeError, "nn.Module"),
    ("calibrate_qat(batches=0)", lambda: qat.calibrate_qat(qat.prepare_qat(cnn()), x(), 0), ValueError, ">= 1"),
    ("quantization_aware_training(data=tensor)", lambda: qat.quantization_aware_training(cnn(), x()), TypeError,
     "Splits"),
    ("quantization_aware_training(config=dict)",
     lambda: qat.quantization_aware_training(cnn(), splits(), {"weight_bits": 4}), TypeError, "QuantConfig"),
    ("quantization_aware_training(epoch=1)", lambda: qat.quantization_aware_training(cnn(), splits(), epoch=1),
     TypeError, "unknown QAT option"),
    ("QATConfig(epochs=-1)", lambda: qat.QATConfig(epochs=-1), ValueError, "epochs"),
    ("QATConfig(epochs=2.5)", lambda: qat.QATConfig(epochs=2.5), TypeError, "epochs"),
    ("QATConfig(lr='fast')", lambda: qat.QATConfig(lr="fast"), TypeError, "lr"),
    ("QATConfig(lr=0)", lambda: qat.QATConfig(lr=0), ValueError, "lr"),
    ("QATConfig(lr=nan)", lambda: qat.QATConfig(lr=NAN), ValueError, "finite"),
    ("QATConfig(method='x')", lambda: qat.QATConfig(method="x"), ValueError, "method"),
    ("QATConfig(batch_size=0)", lambda: qat.QATConfig(batch_size=0), ValueError, "batch_size"),
    ("QATConfig(early_stop_margin=-1)", lambda: qat.QATConfig(early_stop_margin=-1), ValueError, "early_stop"),
    ("QATConfig(loss_fn=3)", lambda: qat.QATConfig(loss_fn=3), TypeError, "loss_fn"),
    ("QATConfig(bits_schedule=[8])", lambda: qat.QATConfig(bits_schedule=[8]), TypeError, "bits_schedule"),
    ("QATConfig(progress='no')", lambda: qat.QATConfig(progress="no"), TypeError, "True or False"),
    ("ste_staircase(list)", lambda: qat.ste_staircase([0.1], 0.1, 0, 0, 15), TypeError, "torch.Tensor"),
    ("fold_bn(list weight)", lambda: fold.fold_bn([[1.0]], None, nn.BatchNorm1d(1)), TypeError, "floating"),
    ("fold_bn(ReLU)", lambda: fold.fold_bn(torch.ones(4, 3), None, nn.ReLU()), TypeError, "BatchNorm"),
    ("fold_bn(channels)", lambda: fold.fold_bn(torch.ones(5, 3), None, nn.BatchNorm1d(4)), ValueError,
     "output channels"),
    ("fold_bn(negative var)", lambda: fold.fold_bn(torch.ones(4, 3), None, _bn_with(running_var=-1.0)),
     ValueError, "variance"),
    ("fold_batchnorm('model')", lambda: fold.fold_batchnorm("model"), TypeError, "nn.Module"),
    ("find_layer_pairs(second='bn')", lambda: fold.find_layer_pairs(cnn(), second="bn"), TypeError,
     "nn.Module class"),
    ("find_layer_pairs('model')", lambda: fold.find_layer_pairs("model"), TypeError, "nn.Module"),
    ("lsq_fake_quantize(int x)", lambda: lsq.lsq_fake_quantize(torch.ones(3, dtype=torch.int32), torch.ones(1), 0,
                                                               0, 15), TypeError, "floating"),
    ("lsq_fake_quantize(float scale)", lambda: lsq.lsq_fake_quantize(x(), 0.1, 0, 0, 15), TypeError, "scale"),
    ("lsq_fake_quantize(scale <= 0)", lambda: lsq.lsq_fake_quantize(x(), torch.zeros(1), 0, 0, 15), ValueError,
     "scale"),
    ("lsq_fake_quantize(axis=7)", lambda: lsq.lsq_fake_quantize(x(), torch.ones(1), 0, 0, 15, axis=7), ValueError,
     "axis"),
    ("lsq_fake_quantize(grad_factor=-1)", lambda: lsq.lsq_fake_quantize(x(), torch.ones(1), 0, 0, 15, grad_factor=-1),
     ValueError, "grad_factor"),
    ("lsq_grad_factor(0, 7)", lambda: lsq.lsq_grad_factor(0, 7), ValueError, ">= 1"),
    ("lsq_grad_factor(2.5, 7)", lambda: lsq.lsq_grad_factor(2.5, 7), TypeError, "numel"),
    ("LSQFakeQuantize(PerGroup)", lambda: lsq.LSQFakeQuantize(granularity="x"), TypeError, "PerTensor"),
    ("LSQFakeQuantize(init='x')", lambda: lsq.LSQFakeQuantize(init="nonsense"), ValueError, "observer"),
    ("LSQFakeQuantize.qparams() unseen", lambda: lsq.LSQFakeQuantize().qparams(), ValueError, "not initialized"),
]


def _bn_with(**stats):
    bn = nn.BatchNorm1d(4)
    for name, value in stats.items():
        getattr(bn, name).fill_(value)
    return bn


@pytest.mark.parametrize("what, call, err, words", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_rejected_with_a_clear_message(what, call, err, words):
    with pytest.raises(err) as info:
        call()
    assert words.lower() in str(info.value).lower(), f"{what}: {info.value}"


def test_calibrate_rejects_before_touching_the_observers():
    """A NaN batch in the middle stops calibration with the batch number; nothing is recorded from it."""
    model = prepared()
    with pytest.raises(ValueError, match="batch 1"):
        ptq.calibrate(model, [x(), x(value=NAN)])
    counts = {int(fq.observed_batches) for fq in modules.fake_quantizers(model).values() if fq.observe}
    assert counts == {1}
    assert all(torch.isfinite(fq.observer.min_val).all() for fq in modules.fake_quantizers(model).values()
               if int(fq.observed_batches))


def test_good_inputs_still_pass():
    """The probe's fixtures are valid: the same calls succeed with good arguments."""
    q = ptq.quantize_static(cnn(), x(8))
    assert modules.fake_quantizers(q)
    model, _ = qat.quantization_aware_training(cnn(), splits(), dataclasses.replace(modules.QuantConfig()),
                                               epochs=1, progress=False)
    assert qat.step_sizes(model)
