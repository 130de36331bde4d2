"""qlib.models: the zoo's shapes and the shipped weights' accuracy.

Reference: qlib/weights/zoo.json, written by qlib/weights/train_zoo.py when it trained them.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qlib import data, models, train


@pytest.mark.parametrize("name", list(models.ZOO))
def test_forward_shape(name):
    size = models.image_size(name)
    out = models.create(name)(torch.randn(4, 1, size, size))
    assert out.shape == (4, 10)


def test_create_is_seeded():
    a, b = models.create("cnn8", seed=3), models.create("cnn8", seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    c = models.create("cnn8", seed=4)
    assert not torch.equal(a[0].weight, c[0].weight)


@pytest.mark.parametrize("name", list(models.ZOO))
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
    for name in models.ZOO:
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
