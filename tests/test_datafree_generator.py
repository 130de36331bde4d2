"""Tests for qlib.datafree.generator (GDFQ-style generator trained from the teacher alone).

Reference: GDFQ (Xu et al., ECCV 2020): the generator's loss is the teacher's
cross-entropy on the requested labels plus the BN-statistics loss of ZeroQ
(qlib.datafree.synthetic.bn_statistics_loss); training must lower both and make the
teacher recognise the requested classes more often than chance. Uses the shipped cnn8.
"""

import pytest
import torch
from torch import nn

from qlib import models
from qlib.datafree.generator import Generator, generator_batches, train_generator
from qlib.fold import fold_batchnorm


def test_shapes_labels_seed_and_range():
    g = Generator((1, 8, 8), num_classes=10, latent_dim=16, width=8, input_range=(-1.0, 2.0), seed=0)
    x, y = g.sample(20, torch.Generator().manual_seed(0))
    assert x.shape == (20, 1, 8, 8) and x.dtype == torch.float32
    assert y.tolist() == [i % 10 for i in range(20)]
    assert x.min() >= -1.0 and x.max() <= 2.0
    same = Generator((1, 8, 8), 10, 16, 8, input_range=(-1.0, 2.0), seed=0)
    assert all(torch.equal(a, b) for a, b in zip(g.parameters(), same.parameters()))
    batches = generator_batches(g, num_samples=50, batch_size=16, seed=1)
    assert [len(b) for b in batches] == [16, 16, 16, 2]
    assert torch.equal(torch.cat(batches), torch.cat(generator_batches(g, 50, 16, seed=1)))
    free = Generator((3, 16, 12), num_classes=5, latent_dim=8, width=4)
    out = free(torch.randn(6, 8), torch.arange(6) % 5)
    assert out.shape == (6, 3, 16, 12)
    # no input_range: the last BatchNorm standardizes every batch
    assert abs(out.mean().item()) < 1e-4 and abs(out.std(unbiased=False).item() - 1) < 1e-2


def test_training_lowers_losses_and_teacher_recognises_labels():
    teacher = models.pretrained("cnn8", 0)
    before = [p.clone() for p in teacher.parameters()]
    gen = Generator((1, 8, 8), num_classes=10, latent_dim=32, width=8, seed=0)
    hist = train_generator(gen, teacher, steps=60, batch_size=32, lr=1e-2, seed=0)
    assert set(hist) == {"loss", "ce", "bn", "confidence"} and len(hist["loss"]) == 60
    head, tail = slice(0, 10), slice(-10, None)
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    assert mean(hist["ce"][tail]) < 0.7 * mean(hist["ce"][head])
    assert mean(hist["loss"][tail]) < mean(hist["loss"][head])
    assert mean(hist["confidence"][tail]) > mean(hist["confidence"][head])
    x = torch.cat(generator_batches(gen, 100, 50, seed=0))
    with torch.no_grad():
        hit = (teacher(x).argmax(1) == torch.arange(100) % 10).float().mean().item()
    assert hit > 0.2  # chance is 0.1
    assert all(torch.equal(a, b) for a, b in zip(before, teacher.parameters()))
    assert all(p.requires_grad for p in teacher.parameters())


def test_clear_errors():
    teacher = models.pretrained("cnn8", 0)
    with pytest.raises(ValueError, match="divisible by 4"):
        Generator((1, 6, 6))
    with pytest.raises(ValueError, match="input_range"):
        Generator((1, 8, 8), input_range=(2.0, 1.0))
    g = Generator((1, 8, 8), latent_dim=4, width=4)
    with pytest.raises(ValueError, match="z must have shape"):
        g(torch.randn(3, 5), torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="int64 labels"):
        g(torch.randn(3, 4), torch.zeros(3))
    with pytest.raises(ValueError, match="no BatchNorm"):
        train_generator(g, fold_batchnorm(teacher), steps=1)
    with pytest.raises(ValueError, match="does not accept"):
        train_generator(Generator((1, 8, 8), latent_dim=4, width=4), nn.Sequential(
            nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), steps=1)
    with pytest.raises(TypeError):
        train_generator(nn.Linear(2, 2), teacher, steps=1)
    with pytest.raises(ValueError, match="steps"):
        train_generator(g, teacher, steps=0)


# --- regressions (issue 8): modes, dtypes, the RNG of other devices --------------------------

def test_teacher_modes_restored_when_training_raises():
    """Before: ``teacher.train(was_training)`` restored one flag for the whole tree."""
    teacher = models.pretrained("cnn8", 0).train()
    teacher[1].eval()
    modes = [m.training for m in teacher.modules()]
    g = Generator((1, 8, 8), latent_dim=8, width=4, seed=0)
    with pytest.raises(ValueError, match="lr"):
        train_generator(g, teacher, steps=1, lr=float("nan"))
    with pytest.raises(ValueError, match="NaN"):  # the images, or the loss, blow up
        train_generator(g, teacher, steps=3, batch_size=8, lr=1e30)
    assert [m.training for m in teacher.modules()] == modes
    assert all(p.requires_grad for p in teacher.parameters())


def test_float64_teacher_and_generator():
    """Before: the generator's float32 images met a float64 teacher inside torch."""
    teacher = models.pretrained("cnn8", 0).double()
    g = Generator((1, 8, 8), latent_dim=8, width=4, seed=0)
    hist = train_generator(g, teacher, steps=2, batch_size=8, seed=0, progress=False)
    assert all(torch.isfinite(torch.tensor(v)).all() for v in hist.values())
    x, _ = g.double().sample(4, torch.Generator().manual_seed(0))
    assert x.dtype == torch.float64


def test_seeded_construction_touches_only_the_cpu_rng(monkeypatch):
    """The generator's weights come from the CPU RNG, forked: no CUDA device is queried and
    the caller's random stream is untouched (``fork_rng(devices=[])``)."""
    calls = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: calls.append(1) or 0)
    state = torch.get_rng_state()
    a = Generator((1, 8, 8), latent_dim=4, width=2, seed=3)
    assert calls == [] and torch.equal(torch.get_rng_state(), state)
    b = Generator((1, 8, 8), latent_dim=4, width=2, seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
