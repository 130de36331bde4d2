"""Tests for qlib.qat.config (QATConfig) and qlib.qat.schedule (bits schedules, freezing).

Reference: the recipe contract of ``quantization_aware_training`` (the keyword arguments of
earlier versions keep their meaning) and torch.ao's ``freeze_bn_stats`` (BatchNorm in eval
mode: running statistics used and not updated).
"""

import dataclasses

import pytest
import torch
from torch import nn

from qlib.modules import QuantConfig
from qlib.qat import QATConfig, check_schedule, freeze_bn_stats, freeze_observers, prepare_qat


def test_defaults_are_the_old_keyword_defaults():
    recipe = QATConfig()
    assert (recipe.epochs, recipe.lr, recipe.method, recipe.fold_bn, recipe.batch_size) == (15, 5e-4, "ste", True, 64)
    assert (recipe.calibration_batches, recipe.weight_decay, recipe.seed, recipe.progress) == (4, 1e-4, 0, True)
    with pytest.raises(dataclasses.FrozenInstanceError):
        recipe.epochs = 3
    assert dataclasses.replace(recipe, epochs=3).epochs == 3


def test_build_overrides_and_ignores_only_positional_nones():
    base = QATConfig(epochs=7, method="lsq")
    built = QATConfig.build(base, epochs=None, lr=None, seed=2)
    assert (built.epochs, built.lr, built.method, built.seed) == (7, 5e-4, "lsq", 2)
    assert QATConfig.build(None, freeze_bn_epoch=None).freeze_bn_epoch is None
    with pytest.raises(TypeError, match="unknown QAT option"):
        QATConfig.build(None, learning_rate=1e-3)


def test_check_schedule():
    w2a4 = QuantConfig(weight_bits=2, act_bits=4)
    assert check_schedule(None, w2a4, 3) == {}
    assert check_schedule({0: 8, 1: (4, 6), 2: 2}, w2a4, 3) == {0: (8, 8), 1: (4, 6), 2: (2, 4)}
    with pytest.raises(ValueError, match="epochs must be ints"):
        check_schedule({0: 8, 3: 2}, w2a4, 3)
    with pytest.raises(ValueError, match="last entry"):
        check_schedule({0: 8}, w2a4, 3)


def test_freeze_bn_stats_and_observers():
    torch.manual_seed(0)
    model = prepare_qat(nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU()), QuantConfig(), fold_bn=False)
    freeze_bn_stats(model.train())
    assert model.training and not model[1].training
    before = model[1].running_mean.clone()
    model(torch.randn(4, 1, 5, 5))
    assert torch.equal(model[1].running_mean, before)
    freeze_observers(model)
    assert not model[0].input_fq.observe and model[0].input_fq.quantize
