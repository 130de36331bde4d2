"""Bad-input probe for the loops: train, distill, datafree, data, models, measure, engines.

Reference: the design's rule on errors ("every public function rejects bad input with a
clear ValueError or TypeError that says what was expected"). Each case calls one public
function with one bad argument (empty data, NaN data, bad temperatures, bad seeds, bad
names, wrong types) and checks three things: the exception type, a message that names
what was expected, and that qlib raised it itself (the innermost frame of the traceback is
a qlib file, not a line deep inside torch). A silent result fails the case.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from qlib import data, distill, engines, measure, models, train
from qlib.datafree import bias_correction as bc
from qlib.datafree import distance, equalize, generator, synthetic

QLIB = Path(data.__file__).resolve().parent
NAN = float("nan")


def _x(n=8, size=8, fill=None):
    x = torch.randn(n, 1, size, size, generator=torch.Generator().manual_seed(0))
    return x.fill_(fill) if fill is not None else x


def _ds(n=8, fill=None):
    return TensorDataset(_x(n, fill=fill), torch.arange(n) % 10)


def _mlp():
    return models.create("mlp", seed=0)


def _cnn():
    return models.create("cnn8", seed=0).eval()


def _gen():
    return generator.Generator((1, 8, 8), latent_dim=4, width=2, seed=0)


def _enter(cm):
    with cm:
        pass


CASES = {
    # --- train
    "evaluate NaN inputs": (lambda: train.evaluate(_mlp(), _ds(fill=NAN)), ValueError, "NaN"),
    "evaluate empty": (lambda: train.evaluate(_mlp(), []), ValueError, "empty"),
    "evaluate no labels": (lambda: train.evaluate(_mlp(), _x()), TypeError, "labels"),
    "evaluate float labels": (lambda: train.evaluate(_mlp(), [(_x(), torch.zeros(8))]), ValueError, "integer"),
    "evaluate not a model": (lambda: train.evaluate("mlp", _ds()), TypeError, "nn.Module"),
    "train epochs 0": (lambda: train.train(_mlp(), _ds(), epochs=0), ValueError, "epochs"),
    "train epochs bool": (lambda: train.train(_mlp(), _ds(), epochs=True), ValueError, "epochs"),
    "train lr 0": (lambda: train.train(_mlp(), _ds(), lr=0), ValueError, "lr"),
    "train lr NaN": (lambda: train.train(_mlp(), _ds(), lr=NAN), ValueError, "lr"),
    "train seed float": (lambda: train.train(_mlp(), _ds(), seed=1.5), TypeError, "seed"),
    "train batch_size 0": (lambda: train.train(_mlp(), _ds(), batch_size=0), ValueError, "batch_size"),
    "train empty": (lambda: train.train(_mlp(), [], epochs=1), ValueError, "empty"),
    "train wrong form": (lambda: train.train(_mlp(), "digits"), TypeError, "TensorDataset"),
    "train NaN data": (lambda: train.train(_mlp(), [(_x(fill=NAN), torch.zeros(8, dtype=torch.long))],
                                           progress=False), ValueError, "NaN"),
    "train no labels": (lambda: train.train(_mlp(), [_x()], progress=False), TypeError, "labels"),
    "accuracies empty": (lambda: train.accuracy_over_seeds([]), ValueError, "no accuracies"),
    "accuracies NaN": (lambda: train.accuracy_over_seeds([90.0, NAN]), ValueError, "finite"),
    # --- distill
    "kd T bool": (lambda: distill.kd_loss(torch.randn(2, 3), torch.randn(2, 3), True), TypeError, "temperature"),
    "kd T str": (lambda: distill.kd_loss(torch.randn(2, 3), torch.randn(2, 3), "4"), TypeError, "temperature"),
    "kd T 0": (lambda: distill.kd_loss(torch.randn(2, 3), torch.randn(2, 3), 0), ValueError, "temperature"),
    "kd T inf": (lambda: distill.kd_loss(torch.randn(2, 3), torch.randn(2, 3), float("inf")), ValueError,
                 "temperature"),
    "kd shapes": (lambda: distill.kd_loss(torch.randn(2, 3), torch.randn(2, 4)), ValueError, "shape"),
    "kd int logits": (lambda: distill.kd_loss(torch.ones(2, 3, dtype=torch.long), torch.randn(2, 3)), TypeError,
                      "floating"),
    "kd empty": (lambda: distill.kd_loss(torch.randn(0, 3), torch.randn(0, 3)), ValueError, "N > 0"),
    "features none": (lambda: distill.feature_loss([], []), ValueError, "features"),
    "features not tensors": (lambda: distill.feature_loss([1.0], [1.0]), TypeError, "tensors"),
    "capture a str": (lambda: _enter(distill.capture_outputs(_mlp(), "1")), TypeError, "names"),
    "capture unknown": (lambda: _enter(distill.capture_outputs(_mlp(), ["nope"])), ValueError, "no submodules"),
    "agreement empty": (lambda: distill.agreement(_mlp(), _mlp(), _x(0)), ValueError, "empty"),
    "agreement NaN": (lambda: distill.agreement(_mlp(), _mlp(), _x(fill=NAN)), ValueError, "NaN"),
    "agreement not a model": (lambda: distill.agreement("s", _mlp(), _x()), TypeError, "nn.Module"),
    "agreement batch 0": (lambda: distill.agreement(_mlp(), _mlp(), _x(), batch_size=0), ValueError, "batch_size"),
    "agreement int data": (lambda: distill.agreement(_mlp(), _mlp(), torch.ones(4, 1, 8, 8, dtype=torch.long)),
                           TypeError, "floating"),
    "distill T 0": (lambda: distill.distill(_mlp(), _mlp(), _x(), temperature=0), ValueError, "temperature"),
    "distill T bool": (lambda: distill.distill(_mlp(), _mlp(), _x(), temperature=True), TypeError, "temperature"),
    "distill seed str": (lambda: distill.distill(_mlp(), _mlp(), _x(), seed="0"), TypeError, "seed"),
    "distill steps 0": (lambda: distill.distill(_mlp(), _mlp(), _x(), steps=0), ValueError, "steps"),
    "distill lr -1": (lambda: distill.distill(_mlp(), _mlp(), _x(), lr=-1), ValueError, "lr"),
    "distill feature weight": (lambda: distill.distill(_mlp(), _mlp(), _x(), feature_weight=-1.0), ValueError,
                               "feature_weight"),
    "distill same model": (lambda: (lambda m: distill.distill(m, m, _x()))(_mlp()), ValueError, "different"),
    "distill wrong form": (lambda: distill.distill(_mlp(), _mlp(), 3.0), TypeError, "expected"),
    "distill empty": (lambda: distill.distill(_mlp(), _mlp(), []), ValueError, "empty"),
    "distill NaN": (lambda: distill.distill(_mlp(), _mlp(), _x(fill=NAN)), ValueError, "NaN"),
    "distill fn not tensor": (lambda: distill.distill(_mlp(), _mlp(), lambda n, g: [0.0] * n, progress=False),
                              TypeError, "floating-point tensor"),
    # --- datafree: synthetic data and generators
    "gaussian seed str": (lambda: synthetic.gaussian_batches((1, 8, 8), seed="0"), TypeError, "seed"),
    "gaussian std < 0": (lambda: synthetic.gaussian_batches((1, 8, 8), std=-1.0), ValueError, "std"),
    "gaussian mean NaN": (lambda: synthetic.gaussian_batches((1, 8, 8), mean=NAN), ValueError, "mean"),
    "gaussian no samples": (lambda: synthetic.gaussian_batches((1, 8, 8), num_samples=0), ValueError,
                            "num_samples"),
    "gaussian bad shape": (lambda: synthetic.gaussian_batches((1, 0, 8)), ValueError, "shape"),
    "uniform low == high": (lambda: synthetic.uniform_batches((1, 8, 8), low=1.0, high=1.0), ValueError, "low"),
    "bn layers none": (lambda: synthetic.bn_layers(nn.Linear(2, 2)), ValueError, "BatchNorm"),
    "bn layers not a model": (lambda: synthetic.bn_layers("cnn8"), TypeError, "nn.Module"),
    "bn loss NaN": (lambda: synthetic.bn_statistics_loss(_cnn(), _x(fill=NAN)), ValueError, "NaN"),
    "bn loss ints": (lambda: synthetic.bn_statistics_loss(_cnn(), torch.ones(2, 1, 8, 8, dtype=torch.long)),
                     TypeError, "floating"),
    "synthesize steps 0": (lambda: synthetic.synthesize_bn(_cnn(), (1, 8, 8), 8, 8, steps=0), ValueError, "steps"),
    "synthesize lr 0": (lambda: synthetic.synthesize_bn(_cnn(), (1, 8, 8), 8, 8, lr=0), ValueError, "lr"),
    "synthesize seed float": (lambda: synthetic.synthesize_bn(_cnn(), (1, 8, 8), 8, 8, steps=1, seed=0.5,
                                                              progress=False), TypeError, "seed"),
    "synthesize groups": (lambda: synthetic.synthesize_bn(_cnn(), (1, 8, 8), 10, 8), ValueError, "multiple"),
    "synthesize ce classes": (lambda: synthetic.synthesize_bn(_cnn(), (1, 8, 8), 8, 8, ce_weight=1.0), ValueError,
                              "num_classes"),
    "synthesize wrong shape": (lambda: synthetic.synthesize_bn(_cnn(), (3, 8, 8), 8, 8, steps=1, progress=False),
                               ValueError, "does not accept"),
    "generator shape": (lambda: generator.Generator((1, 7, 8)), ValueError, "divisible by 4"),
    "generator sample 0": (lambda: _gen().sample(0), ValueError, "positive int"),
    "generator labels list": (lambda: _gen().sample(2, labels=[0, 1]), TypeError, "labels"),
    "train generator type": (lambda: generator.train_generator("g", _cnn()), TypeError, "Generator"),
    "train generator lr": (lambda: generator.train_generator(_gen(), _cnn(), lr=0), ValueError, "lr"),
    "train generator seed": (lambda: generator.train_generator(_gen(), _cnn(), seed="1"), TypeError, "seed"),
    "generator batches 0": (lambda: generator.generator_batches(_gen(), num_samples=0), ValueError, "num_samples"),
    "generator batches type": (lambda: generator.generator_batches("g"), TypeError, "Generator"),
    # --- datafree: distances, equalization, bias correction
    "mmd sizes": (lambda: distance.mmd(torch.randn(4, 3), torch.randn(4, 5)), ValueError, "sizes"),
    "mmd empty": (lambda: distance.mmd(torch.randn(0, 3), torch.randn(4, 3)), ValueError, "non-empty"),
    "mmd NaN": (lambda: distance.mmd(torch.full((4, 3), NAN), torch.randn(4, 3)), ValueError, "NaN"),
    "mmd bandwidth < 0": (lambda: distance.mmd(torch.randn(4, 3), torch.randn(4, 3), bandwidth=-1.0),
                          ValueError, "bandwidth"),
    "mmd bandwidth str": (lambda: distance.mmd(torch.randn(4, 3), torch.randn(4, 3), bandwidth="1"),
                          TypeError, "bandwidth"),
    "softmax_kl T 0": (lambda: distance.softmax_kl(torch.randn(2, 3), torch.randn(2, 3), 0), ValueError,
                       "temperature"),
    "softmax_kl T bool": (lambda: distance.softmax_kl(torch.randn(2, 3), torch.randn(2, 3), True), TypeError,
                          "temperature"),
    "histogram bins 0": (lambda: distance.histogram_kl(torch.randn(9), torch.randn(9), bins=0), ValueError, "bins"),
    "bn distance empty": (lambda: distance.bn_statistic_distance(_cnn(), []), ValueError, "empty"),
    "bn distance NaN": (lambda: distance.bn_statistic_distance(_cnn(), _x(fill=NAN)), ValueError, "NaN"),
    "score max_samples": (lambda: distance.score_calibration_set(_cnn(), _x(), max_samples=0), ValueError,
                          "max_samples"),
    "equalize iterations": (lambda: equalize.cross_layer_equalize(_cnn(), iterations=0), ValueError, "iterations"),
    "equalize not a model": (lambda: equalize.cross_layer_equalize("cnn8"), TypeError, "nn.Module"),
    "unbalance spread": (lambda: equalize.unbalance(_cnn(), spread=0.5), ValueError, "spread"),
    "unbalance seed": (lambda: equalize.unbalance(_cnn(), seed="0"), TypeError, "seed"),
    "empirical means empty": (lambda: bc.empirical_input_means(_cnn(), []), ValueError, "empty"),
    "empirical means NaN": (lambda: bc.empirical_input_means(_cnn(), _x(fill=NAN)), ValueError, "NaN"),
    "empirical means names": (lambda: bc.empirical_input_means(_cnn(), _x(), ["nope"]), ValueError,
                              "Conv2d/Linear"),
    "correct bias nothing": (lambda: bc.correct_bias(_cnn(), {}), ValueError, "empty"),
    "clipped normal std < 0": (lambda: bc.clipped_normal_mean(torch.zeros(2), -torch.ones(2)), ValueError, "std"),
    # --- data
    "dataset unknown": (lambda: data.load_dataset("imagenet"), ValueError, "expected one of"),
    "dataset not a name": (lambda: data.load_dataset(3), TypeError, "name"),
    "digits too small": (lambda: data.load_digits(4), ValueError, "image_size"),
    "calibration 0": (lambda: data.calibration_batches(_ds(), num_samples=0), ValueError, "num_samples"),
    "calibration too many": (lambda: data.calibration_batches(_ds(), num_samples=9), ValueError, "more than"),
    "calibration batch 0": (lambda: data.calibration_batches(_ds(), 4, batch_size=0), ValueError, "batch_size"),
    "calibration seed": (lambda: data.calibration_batches(_ds(), 4, seed=0.5), TypeError, "seed"),
    "calibration form": (lambda: data.calibration_batches([_x()], 4), TypeError, "TensorDataset"),
    "standardize constant": (lambda: data.standardize(torch.ones(4, 1, 2, 2)), ValueError, "spread"),
    "standardize NaN": (lambda: data.standardize(_x(), _x(fill=NAN)), ValueError, "NaN"),
    "split n 0": (lambda: data.split_indices(0), ValueError, "n must"),
    "split fractions": (lambda: data.split_indices(10, (0.9, 0.5)), ValueError, "fractions"),
    "resize 3-D": (lambda: data.resize(torch.zeros(1, 8, 8), 16), ValueError, "N, C, H, W"),
    "resize size 0": (lambda: data.resize(_x(), 0), ValueError, "image_size"),
    "loader part": (lambda: data.Splits(_ds(), _ds(), _ds(), 10, "t").loader("dev"), ValueError, "part"),
    "loader batch 0": (lambda: data.Splits(_ds(), _ds(), _ds(), 10, "t").loader(batch_size=0), ValueError,
                       "batch_size"),
    # --- models
    "model unknown": (lambda: models.create("resnet50"), ValueError, "expected one of"),
    "model not a name": (lambda: models.create(3), TypeError, "name"),
    "model seed": (lambda: models.create("mlp", seed="0"), TypeError, "seed"),
    "model classes": (lambda: models.create("mlp", num_classes=1), ValueError, "num_classes"),
    "pretrained seed": (lambda: models.pretrained("mlp", seed=7), FileNotFoundError, "shipped seeds"),
    "pretrained unknown": (lambda: models.pretrained("vgg"), ValueError, "expected one of"),
    "image size unknown": (lambda: models.image_size("vgg"), ValueError, "expected one of"),
    "count not a model": (lambda: models.count_parameters("mlp"), TypeError, "nn.Module"),
    # --- measure
    "bytes bits 0": (lambda: measure.tensor_bytes(10, 0), ValueError, "bits"),
    "bytes bits bool": (lambda: measure.tensor_bytes(10, True), ValueError, "bits"),
    "bytes numel < 0": (lambda: measure.tensor_bytes(-1, 8), ValueError, "numel"),
    "size not a model": (lambda: measure.model_size_bytes("mlp"), TypeError, "nn.Module"),
    "state dict not a model": (lambda: measure.state_dict_bytes("mlp"), TypeError, "nn.Module"),
    "latency not callable": (lambda: measure.latency(3), TypeError, "function"),
    "latency repeats 0": (lambda: measure.latency(lambda: None, repeats=0), ValueError, "repeats"),
    "latency warmup float": (lambda: measure.latency(lambda: None, warmup=1.5), ValueError, "warmup"),
    "cast ints": (lambda: measure.cast_error(torch.ones(3, dtype=torch.long)), TypeError, "floating"),
    "cast empty": (lambda: measure.cast_error(torch.ones(0)), ValueError, "empty"),
    "cast NaN": (lambda: measure.cast_error(torch.tensor([NAN])), ValueError, "NaN"),
    "cast to int": (lambda: measure.cast_error(torch.ones(3), torch.int8), TypeError, "dtype"),
    # --- engines
    "x86 not a model": (lambda: engines.torch_x86_quantize("mlp", _x()), TypeError, "nn.Module"),
    "x86 empty": (lambda: engines.torch_x86_quantize(_mlp(), []), ValueError, "empty"),
    "x86 NaN": (lambda: engines.torch_x86_quantize(_mlp(), _x(fill=NAN)), ValueError, "NaN"),
    "x86 max_batches": (lambda: engines.torch_x86_quantize(_mlp(), _x(), max_batches=0), ValueError, "max_batches"),
    "compare no models": (lambda: engines.compare_latency({}, _x()), TypeError, "dict"),
    "compare not a tensor": (lambda: engines.compare_latency({"m": _mlp()}, [_x()]), TypeError, "tensor"),
    "compare repeats": (lambda: engines.compare_latency({"m": _mlp()}, _x(), repeats=0), ValueError, "repeats"),
    "model latency warmup": (lambda: engines.model_latency(_mlp(), _x(), warmup=-1), ValueError, "warmup"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_a_clear_error_raised_by_qlib(name):
    call, exc, match = CASES[name]
    with pytest.raises(exc, match=match) as info:
        call()
    where = Path(info.traceback[-1].path).resolve()
    assert QLIB in where.parents, f"{name}: raised from {where}, not by qlib"
