"""Tests for qlib.distill (knowledge distillation, data-free distillation of a quantized student).

Reference: Hinton, Vinyals and Dean 2015, "Distilling the Knowledge in a Neural Network":
L = T^2 KL(softmax(t/T) || softmax(s/T)), checked against torch.nn.functional.kl_div and a
written-out sum; FitNets-style feature matching against a written-out relative MSE. The
loop must lower the loss and raise the student's agreement with its teacher (shipped cnn8,
W4A4 student, synthetic inputs only).
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qlib import models
from qlib.datafree.generator import Generator, train_generator
from qlib.datafree.synthetic import synthesize_bn
from qlib.distill import agreement, capture_outputs, distill, feature_loss, kd_loss, trainable
from qlib.modules import QuantConfig
from qlib.ptq import quantize_static


def gen(seed):
    return torch.Generator().manual_seed(seed)


def test_kd_loss_formula():
    s, t = torch.randn(6, 5, generator=gen(0)), torch.randn(6, 5, generator=gen(1))
    for temp in (1.0, 4.0):
        p, q = F.softmax(t / temp, 1), F.softmax(s / temp, 1)
        written = temp**2 * (p * (p.log() - q.log())).sum(1).mean()
        torch.testing.assert_close(kd_loss(s, t, temp), written)
        ref = F.kl_div(F.log_softmax(s / temp, 1), F.softmax(t / temp, 1), reduction="batchmean") * temp**2
        torch.testing.assert_close(kd_loss(s, t, temp), ref)
    assert kd_loss(t, t).item() == pytest.approx(0.0, abs=1e-6)
    s.requires_grad_(True)
    t.requires_grad_(True)
    kd_loss(s, t).backward()
    assert s.grad is not None and t.grad is None  # the teacher is a fixed target


def test_feature_loss_and_capture():
    a = [torch.randn(4, 3, generator=gen(0)), torch.randn(4, 2, 2, generator=gen(1))]
    b = [torch.randn(4, 3, generator=gen(2)), torch.randn(4, 2, 2, generator=gen(3))]
    written = sum(((x - y) ** 2).mean() / (y**2).mean() for x, y in zip(a, b)) / 2
    torch.testing.assert_close(feature_loss(a, b), written)
    torch.testing.assert_close(feature_loss(dict(zip("pq", a)), dict(zip("pq", b))), written)
    assert feature_loss(b, b).item() == 0.0
    m = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    with capture_outputs(m, ["1"]) as feats:
        m(torch.ones(2, 3))
    assert feats["1"].shape == (2, 4) and (feats["1"] >= 0).all()
    assert not m[1]._forward_hooks
    with pytest.raises(ValueError, match="no submodules"):
        with capture_outputs(m, ["9"]):
            pass


@pytest.fixture(scope="module")
def setup():
    teacher = models.pretrained("cnn8", 1)
    synth = synthesize_bn(teacher, (1, 8, 8), num_samples=64, batch_size=64, steps=30, lr=0.5, seed=0)
    config = QuantConfig(weight_bits=3, act_bits=4)
    return teacher, synth, config


def test_data_free_distillation_improves_agreement(setup, digits8):
    teacher, synth, config = setup
    student = quantize_static(teacher, synth, config)
    before = agreement(student, teacher, digits8.val)
    hist = distill(student, teacher, synth, steps=40, lr=2e-4, batch_size=32, seed=0)
    after = agreement(student, teacher, digits8.val)
    n = 10
    assert sum(hist["loss"][-n:]) < 0.7 * sum(hist["loss"][:n])
    assert after > before
    assert not student.training and not teacher.training
    assert agreement(teacher, copy.deepcopy(teacher), digits8.val) == 100.0


def test_distill_from_generator_and_with_features(setup):
    teacher, synth, config = setup
    g = Generator((1, 8, 8), latent_dim=16, width=8, seed=0)
    train_generator(g, teacher, steps=5, batch_size=32, seed=0)
    student = quantize_static(teacher, synth, config)
    ref = [p.clone() for p in teacher.parameters()]
    hist = distill(student, teacher, g, steps=5, batch_size=16, feature_layers=["2", "5"], feature_weight=1.0)
    assert len(hist["loss"]) == 5 and all(lo >= kd for lo, kd in zip(hist["loss"], hist["kd"]))
    assert all(torch.equal(a, b) for a, b in zip(ref, teacher.parameters()))
    fn = lambda n, g: torch.randn(n, 1, 8, 8, generator=g)  # noqa: E731
    assert len(distill(student, teacher, fn, steps=3)["loss"]) == 3


def test_clear_errors(setup):
    teacher, synth, config = setup
    student = quantize_static(teacher, synth, config)
    with pytest.raises(ValueError, match="empty"):
        distill(student, teacher, [], steps=1)
    with pytest.raises(ValueError, match="NaN"):
        distill(student, teacher, [torch.full((4, 1, 8, 8), float("nan"))], steps=1)
    with pytest.raises(ValueError, match="different modules"):
        distill(teacher, teacher, synth, steps=1)
    with pytest.raises(ValueError, match="feature_layers"):
        distill(student, teacher, synth, steps=1, feature_weight=1.0)
    with pytest.raises(ValueError, match="steps"):
        distill(student, teacher, synth, steps=0)
    with pytest.raises(ValueError, match="shape"):
        kd_loss(torch.randn(4, 3), torch.randn(4, 5))
    with pytest.raises(ValueError, match="NaN"):
        kd_loss(torch.full((2, 3), float("nan")), torch.randn(2, 3))
    with pytest.raises(ValueError, match="temperature"):
        kd_loss(torch.randn(2, 3), torch.randn(2, 3), temperature=0)
    with pytest.raises(ValueError, match="at least one"):
        agreement(student, teacher, torch.empty(0, 1, 8, 8))
    with pytest.raises(TypeError):
        distill(student, teacher, 3.0, steps=1)


# --- regressions (issue 8): temperatures, modes on errors, dtypes ------------------------

def test_temperature_must_be_a_positive_real_number():
    """Before: ``True`` was accepted as T = 1 and a string raised from inside torch."""
    s, t = torch.randn(2, 3, generator=gen(0)), torch.randn(2, 3, generator=gen(1))
    for bad in (True, "4", None, torch.tensor(2.0)):
        with pytest.raises(TypeError, match="temperature"):
            kd_loss(s, t, bad)
    for bad in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature"):
            kd_loss(s, t, bad)
    torch.testing.assert_close(kd_loss(s, t, 2), kd_loss(s, t, 2.0))


def test_modes_restored_when_distillation_or_agreement_raises(setup):
    """Before: ``agreement`` left both models in eval mode after an error, and ``distill``
    restored one flag per model (a deliberately frozen BatchNorm came back in train mode)."""
    teacher, synth, config = setup
    student = quantize_static(teacher, synth, config).train()
    student[1].eval()
    teacher = copy.deepcopy(teacher).train()
    modes = [m.training for m in student.modules()], [m.training for m in teacher.modules()]

    def data(n, g):
        raise RuntimeError("no more data")
    with pytest.raises(RuntimeError, match="no more data"):
        distill(student, teacher, data, steps=2)
    assert ([m.training for m in student.modules()], [m.training for m in teacher.modules()]) == modes
    with pytest.raises(ValueError, match="NaN"):
        agreement(student, teacher, [synth.x[:4], torch.full((4, 1, 8, 8), float("nan"))])
    assert ([m.training for m in student.modules()], [m.training for m in teacher.modules()]) == modes


def test_students_of_other_dtypes(setup):
    """Before: float32 inputs met a float64 or bfloat16 student inside torch (dtype error)."""
    teacher, synth, _ = setup
    for dtype in (torch.float64, torch.bfloat16):
        student = copy.deepcopy(teacher).to(dtype)
        assert agreement(student, teacher, synth) > 90.0
        hist = distill(student, teacher, synth, steps=3, lr=1e-4, batch_size=16, seed=0)
        assert len(hist["kd"]) == 3 and all(torch.isfinite(torch.tensor(hist["loss"])))
        assert all(p.dtype == dtype for p in student.parameters())


def test_distill_is_reproducible_under_its_seed(setup):
    teacher, synth, config = setup
    runs = []
    for _ in range(2):
        student = quantize_static(teacher, synth, config)
        runs.append(distill(student, teacher, synth, steps=4, batch_size=16, seed=3)["loss"])
    assert runs[0] == runs[1]


def test_train_chooses_what_distillation_changes(setup):
    """The ablation of lesson 08 and benchmarks/datafree.py: ``train="biases"`` changes the
    biases only (every weight keeps its exact bits), ``train="weights"`` the weights only,
    ``"all"`` both; each choice lowers the loss it optimizes."""
    teacher, synth, config = setup
    base = quantize_static(teacher, synth, config)
    names = {n for n, _ in base.named_parameters()}
    assert {n for n, p in base.named_parameters() if any(p is q for q in trainable(base, "biases"))} == \
        {n for n in names if n.endswith(".bias")}
    assert len(trainable(base, "weights")) + len(trainable(base, "biases")) == len(trainable(base, "all"))
    for train, moved in (("biases", "bias"), ("weights", "weight"), ("all", None)):
        student = copy.deepcopy(base)
        hist = distill(student, teacher, synth, steps=6, lr=1e-3, batch_size=32, seed=0, train=train)
        assert hist["kd"][-1] < hist["kd"][0], train
        for (n, a), b in zip(base.named_parameters(), student.parameters()):
            kind = n.rsplit(".", 1)[-1]
            assert torch.equal(a, b) == (moved is not None and kind != moved), (train, n)
    with pytest.raises(ValueError, match="train must be one of"):
        distill(copy.deepcopy(base), teacher, synth, steps=1, train="bias")
    no_bias = nn.Sequential(nn.Linear(4, 2, bias=False))
    with pytest.raises(ValueError, match="no trainable parameters"):
        trainable(no_bias, "biases")
