"""qlib.domain.generalization: gap, robustness, sharpness and loss slices.

Reference: the definitions in the module docstring; the filter-normalized direction of
Li et al. (NeurIPS 2018) checked filter by filter; a hand-made sharp vs flat pair of models.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from qlib import models
from qlib.domain import generalization as G
from qlib.train import evaluate


@pytest.fixture(scope="module")
def small(digits8):
    return TensorDataset(*(t[:200] for t in digits8.val.tensors))


def test_gap_and_corruption_accuracy(digits8):
    model = models.pretrained("cnn8", 0)
    gap = G.train_test_gap(model, digits8)
    assert gap["gap"] == pytest.approx(gap["train"] - gap["test"])
    assert gap["test"] == evaluate(model, digits8.test)
    rob = G.corruption_accuracy(model, digits8.test, severity=5, shifts=("blur",))
    assert rob < gap["test"]


def test_sharpness_is_seeded_grows_with_sigma_and_equals_one_draw_by_hand(small):
    model = models.pretrained("cnn8", 0)
    a = G.sharpness(model, small, sigma=0.1, samples=2, seed=1)
    assert a == G.sharpness(model, small, sigma=0.1, samples=2, seed=1)
    assert G.sharpness(model, small, sigma=0.3, samples=2, seed=1) > a > 0
    # one draw by hand: every conv/linear weight gets sigma * rms(W) * N(0, 1), in module order
    g = torch.Generator().manual_seed(7)
    noisy = copy.deepcopy(model)
    with torch.no_grad():
        for m in noisy.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.add_(0.1 * m.weight.pow(2).mean().sqrt() * torch.randn(m.weight.shape, generator=g))
    want = G.mean_loss(noisy, small) - G.mean_loss(model, small)
    assert G.sharpness(model, small, sigma=0.1, samples=1, seed=7) == pytest.approx(want, rel=1e-6)


def test_filter_normalized_direction_matches_filter_norms():
    model = models.create("cnn8", seed=0)
    d = G.filter_normalized_direction(model, seed=0)
    weights = [m.weight for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(d) == len(weights)
    for w, di in zip(weights, d):
        assert di.shape == w.shape
        for f in range(w.shape[0]):
            assert torch.isclose(di[f].norm(), w[f].detach().norm(), rtol=1e-4)


def test_loss_slice_is_minimal_near_the_trained_weights(small):
    model = models.pretrained("cnn8", 0)
    losses = G.loss_slice(model, small, [-1.0, 0.0, 1.0], seed=0)
    assert losses[1] == pytest.approx(G.mean_loss(model, small))
    assert losses[1] < losses[0] and losses[1] < losses[2]


def test_train_variant_fp32_and_qat(digits8):
    tiny = type(digits8)(TensorDataset(*(t[:64] for t in digits8.train.tensors)), digits8.val,
                         digits8.test, 10, "tiny")
    fp = G.train_variant("mlp", tiny, None, epochs=1)
    q = G.train_variant("mlp", tiny, 4, epochs=1)
    from qlib.modules import fake_quantizers
    assert not fake_quantizers(fp) and fake_quantizers(q)
    assert all(fq.bits == 4 for fq in fake_quantizers(q).values())


def test_bad_arguments(small):
    model = models.create("mlp", seed=0)
    with pytest.raises(ValueError, match="sigma"):
        G.sharpness(model, small, sigma=0)
    with pytest.raises(ValueError, match="samples"):
        G.sharpness(model, small, samples=0)
    with pytest.raises(ValueError, match="alphas"):
        G.loss_slice(model, small, [])
