"""qlib.models: the zoo's shapes and the shipped weights' accuracy.

Reference: qlib/weights/zoo.json, written by qlib/weights/train_zoo.py when it trained them.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qlib import data, models, train


@pytest.mark.parametrize("name", list(models.ALL_MODELS))
def test_forward_shape(name):
    size = models.image_size(name)
    out = models.create(name)(torch.randn(4, 1, size, size))
    assert out.shape == (4, 10)


def test_create_is_seeded():
    a, b = models.create("cnn8", seed=3), models.create("cnn8", seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    c = models.create("cnn8", seed=4)
    assert not torch.equal(a[0].weight, c[0].weight)


@pytest.mark.parametrize("name", list(models.ALL_MODELS))
def test_shipped_weights_reach_recorded_accuracy(name):
    info = models.zoo_info()["models"][name]
    splits = data.load_digits(models.image_size(name))
    for seed in models.SEEDS:
        acc = train.evaluate(models.pretrained(name, seed), splits.test)
        assert acc == pytest.approx(info[str(seed)]["test_acc"], abs=0.3)  # one image
        assert acc >= 97.0


def test_bad_names_and_seeds():
    with pytest.raises(ValueError, match="unknown model"):
        models.create("vgg")
    with pytest.raises(FileNotFoundError, match="shipped seeds"):
        models.pretrained("cnn8", seed=7)


def test_parameter_counts_are_small():
    for name in models.ALL_MODELS:
        assert 20_000 < models.count_parameters(models.create(name)) < 80_000


def test_seeded_create_forks_only_the_cpu_rng(monkeypatch):
    """Before: ``fork_rng()`` without ``devices`` queried (and on a GPU machine initialized)
    every CUDA device at each call. The weights are drawn on the CPU: fork only its RNG,
    and leave the caller's random stream where it was."""
    calls = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: calls.append(1) or 0)
    state = torch.get_rng_state()
    a = models.create("cnn8", seed=3)
    assert calls == [] and torch.equal(torch.get_rng_state(), state)
    b = models.create("cnn8", seed=np.int64(3))  # NumPy ints are seeds too
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_dsc16_is_depthwise_separable():
    """MobileNet's block (Howard et al. 2017): depthwise 3x3 with one filter per channel, BN,
    ReLU6; pointwise 1x1, BN, ReLU6. ``ZOO`` keeps the plain models every qlib path supports."""
    model = models.create("dsc16")
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    depthwise = [m for m in convs if m.groups > 1]
    assert len(depthwise) == 4 and all(m.groups == m.in_channels == m.out_channels for m in depthwise)
    assert all(m.weight.shape[1:] == (1, 3, 3) for m in depthwise)
    assert sum(isinstance(m, torch.nn.ReLU6) for m in model.modules()) == len(convs)
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == len(convs)
    assert "dsc16" in models.DEPTHWISE_ZOO and "dsc16" not in models.ZOO
    assert models.ALL_MODELS == {**models.ZOO, **models.DEPTHWISE_ZOO}
    assert models.image_size("dsc16") == 16


def test_dsc16_collapses_with_per_tensor_weights_only():
    """The lesson-04 claim, on every shipped seed: after batch-norm folding, dsc16's dead
    channels give some depthwise layers ranges hundreds of times their median (Nagel et al.
    2019, DFQ fig. 2), so W8A8 with one weight scale per tensor falls to chance while
    per-channel scales keep the float accuracy (qlib/weights/train_zoo.py, "mobilenet")."""
    from qlib.fold import fold_batchnorm
    from qlib.granularity import PerChannel, PerTensor
    from qlib.modules import QuantConfig
    from qlib.ptq import quantize_static

    splits = data.load_digits(16)
    calib = data.calibration_batches(splits.train, 256, 64, seed=0)
    for seed in models.SEEDS:
        model = models.pretrained("dsc16", seed)
        spread = []
        for layer in fold_batchnorm(model).modules():
            if isinstance(layer, torch.nn.Conv2d) and layer.groups > 1:
                r = layer.weight.detach().flatten(1).abs().amax(1)
                spread.append((r.max() / r.median()).item())
        assert max(spread) > 100, (seed, spread)
        fp32 = train.evaluate(model, splits.test)
        acc = {g: train.evaluate(quantize_static(model, calib, QuantConfig(weight_granularity=gran)), splits.test)
               for g, gran in (("tensor", PerTensor()), ("channel", PerChannel(0)))}
        assert acc["tensor"] < 20 and acc["channel"] >= fp32 - 1, (seed, fp32, acc)


def test_mobilenet_recipe_decays_plain_weights_only():
    """MobileNet's recipe (Howard et al. 2017; Sandler et al. 2018): weight decay on the plain
    conv and linear weights, none on depthwise weights, BN parameters or biases."""
    from qlib.weights.train_zoo import mobilenet_param_groups

    model = models.create("dsc16")
    decay, no_decay = mobilenet_param_groups(model, 4e-5)
    assert decay["weight_decay"] == 4e-5 and no_decay["weight_decay"] == 0.0
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    expected = {id(m.weight) for m in convs if m.groups == 1} | {id(model[-1].weight)}
    assert {id(p) for p in decay["params"]} == expected
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    with pytest.raises(ValueError, match="conv, linear and BatchNorm"):
        mobilenet_param_groups(torch.nn.Sequential(torch.nn.LayerNorm(4)), 1e-4)
    recipe = {str(s): models.zoo_info()["models"]["dsc16"][str(s)]["recipe"]["name"] for s in models.SEEDS}
    assert set(recipe.values()) == {"mobilenet"}
