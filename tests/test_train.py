"""qlib.train: the loop learns, is reproducible under a seed, and rejects bad input.

Reference: plain PyTorch cross-entropy training on the digits.
"""

from __future__ import annotations

import pytest
import torch

from qlib import models, train


def test_training_learns_and_is_reproducible(digits8):
    def run():
        model = models.create("mlp", seed=0)
        hist = train.train(model, digits8.train, digits8.val, epochs=3, seed=0, progress=False)
        return model, hist
    (m1, h1), (m2, h2) = run(), run()
    assert h1["loss"][-1] < h1["loss"][0]
    assert train.evaluate(m1, digits8.test) > 85.0
    assert h1["loss"] == h2["loss"]
    assert all(torch.equal(p, q) for p, q in zip(m1.parameters(), m2.parameters()))


def test_evaluate_counts_correct(digits8):
    class Oracle(torch.nn.Module):
        def forward(self, x):
            return torch.zeros(len(x), 10)  # always predicts class 0
    want = 100.0 * (digits8.test.tensors[1] == 0).float().mean().item()
    assert train.evaluate(Oracle(), digits8.test) == pytest.approx(want)


def test_bad_input():
    with pytest.raises(ValueError, match="epochs"):
        train.train(models.create("mlp"), [], epochs=0)
    with pytest.raises(TypeError, match="TensorDataset"):
        train.evaluate(models.create("mlp"), torch.zeros(3))
    with pytest.raises(ValueError, match="empty"):
        train.evaluate(models.create("mlp"), [])


def test_accuracy_over_seeds():
    assert train.accuracy_over_seeds([97.0, 99.0, 98.0]) == {"mean": 98.0, "min": 97.0, "max": 99.0, "n": 3}
