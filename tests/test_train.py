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


# --- regressions (issue 8): NaN, modes on errors, dtypes ---------------------------------

def _mlp_with_frozen_bn():
    model = models.create("mlp", seed=0)
    model.train()
    model[2].eval()  # a BatchNorm deliberately frozen by the caller
    return model


def _modes(model):
    return [m.training for m in model.modules()]


def test_evaluate_rejects_nan_inputs_and_nan_logits(digits8):
    """Before: NaN inputs gave an accuracy of 100.0 (argmax of NaN rows is 0 == the label)."""
    model = models.pretrained("mlp", 0)
    x = torch.full((4, 1, 8, 8), float("nan"))
    with pytest.raises(ValueError, match="NaN"):
        train.evaluate(model, [(x, torch.zeros(4, dtype=torch.long))])

    class NanLogits(torch.nn.Module):
        def forward(self, x):
            return torch.full((len(x), 10), float("nan"))
    with pytest.raises(ValueError, match="NaN or infinite"):
        train.evaluate(NanLogits(), digits8.test)


def test_nan_loss_names_its_step_and_leaves_the_weights_alone(digits8):
    """Before: a NaN loss was stepped into the weights and surfaced later, elsewhere."""
    model = models.create("mlp", seed=0)
    calls = []

    def loss_fn(m, x, y):
        calls.append(1)
        loss = torch.nn.functional.cross_entropy(m(x), y)
        return loss * float("nan") if len(calls) == 3 else loss
    with pytest.raises(ValueError, match="step 2"):
        train.train(model, digits8.train, epochs=1, batch_size=64, loss_fn=loss_fn, progress=False)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_modes_restored_when_training_or_evaluation_raises(digits8):
    """Before: an exception left every module in train (or eval) mode, frozen BNs included."""
    model = _mlp_with_frozen_bn()
    before = _modes(model)

    def boom(m, x, y):
        raise RuntimeError("boom")
    with pytest.raises(RuntimeError, match="boom"):
        train.train(model, digits8.train, epochs=1, loss_fn=boom, progress=False)
    assert _modes(model) == before
    with pytest.raises(ValueError, match="NaN"):
        train.evaluate(model, [(torch.full((2, 1, 8, 8), float("nan")), torch.zeros(2, dtype=torch.long))])
    assert _modes(model) == before


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_models_of_other_dtypes_train_and_evaluate_on_float32_data(digits8, dtype):
    """Before: float32 batches met float64/bfloat16 weights: a dtype error inside torch."""
    ref = models.pretrained("mlp", 0)
    model = models.pretrained("mlp", 0).to(dtype)
    logits, labels = train.predict(model, digits8.test)
    assert logits.dtype == dtype and labels.dtype == torch.int64
    same = (logits.argmax(1) == train.predict(ref, digits8.test)[0].argmax(1)).float().mean().item()
    assert same > (0.999 if dtype == torch.float64 else 0.95)
    hist = train.train(model, digits8.train, epochs=1, seed=0, progress=False)
    assert all(p.dtype == dtype for p in model.parameters()) and torch.isfinite(torch.tensor(hist["loss"])).all()
    assert train.evaluate(model, digits8.test) > 80.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_train_and_evaluate_on_cuda(digits8):
    model = models.create("mlp", seed=0).cuda()
    train.train(model, digits8.train, epochs=2, seed=0, progress=False)
    logits, labels = train.predict(model, digits8.test)
    assert logits.is_cuda and labels.is_cuda
    assert train.evaluate(model, digits8.test) > 80.0
