"""Checks for lab 06 (knowledge distillation): the distillation loss, one data-free
distillation step, and a W4A4 student distilled on synthetic inputs to an accuracy.

References: ``qlib.distill.kd_loss`` (Hinton et al. 2015) and
``torch.nn.functional.kl_div(..., reduction="batchmean", log_target=True)``::

    L = T^2 * (1/N) sum_i sum_c p_ic (log p_ic - log q_ic),
    p = softmax(teacher_logits / T),  q = softmax(student_logits / T)

Tolerance for the loss: ``rtol=1e-4, atol=1e-6`` (float32 log-softmax in a different order).
The accuracy target of Q3 (:data:`Q3_MIN_ACC`, on the 360 test digits, one image = 0.28
points) was measured with the shipped ``cnn16`` (seed 0), W4A4 with MSE per-channel weight
scales and 99.9-percentile activations, 128 BN-synthetic images (``synthesize_bn``, 50 steps),
40 distillation steps at lr 1e-3, T = 4: PTQ alone 95.3, distilled 98.6 and 99.2 (minibatch
seeds 0, 1); seeds 1 and 2: PTQ 91.4 and 93.1, distilled 93.3-96.9 and 97.8-98.1.
With min-max weight scales, as this lab used before, PTQ gives 96.4 on seed 0 but
48.6 on seed 1 (MSE: 91.4), where distillation's apparent gain of 47 points is mostly that
weight-scale problem (Q4). With Gaussian-noise inputs instead and MSE weights, distillation
gained nothing on seed 0 (PTQ 79.7, distilled 75.6-80.8): the inputs matter.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from .core import CheckFailed, as_number, call, expect, expect_close, isolated_rng, run
from .draws import Draw, hidden
from .. import distill as ref_distill
from .. import train as ref_train
from ..modules import fake_quantizers

Q3_MIN_ACC = 97.0
"""Q3: the distilled W4A4 student must reach this test accuracy (percent)."""
Q3_MIN_GAIN = 1.5
"""Q3: ... and beat PTQ on the same synthetic data by at least this many points."""

RTOL, ATOL = 1e-4, 1e-6


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _number(got, what: str) -> float:
    return as_number(got, what, finite=False)


def _diagnose_loss(got: float, s: torch.Tensor, t: torch.Tensor, T: float) -> str:
    """A hint naming the typical mistake that ``got`` corresponds to, if any."""
    p, q = F.softmax(t / T, 1), F.softmax(s / T, 1)
    kl = (p * (p.log() - q.log())).sum(1).mean().item()
    reverse = (q * (q.log() - p.log())).sum(1).mean().item()
    close = lambda a, b: abs(a - b) <= 1e-3 * max(abs(b), 1e-6) + 1e-6  # noqa: E731
    hints = [
        (kl, "the T^2 factor is missing (multiply the KL by T**2)"),
        (T * T * reverse, "the KL goes the wrong way: it must be KL(teacher || student), "
                          "sum_c p_teacher * (log p_teacher - log p_student)"),
        (T * kl, "the loss is scaled by T instead of T^2"),
        (T * T * kl / s.shape[1], "the KL is averaged over classes too: sum over classes, mean over the batch"),
        (T * T * kl * s.shape[0], "the KL is summed over the batch: take the mean over the batch"),
        (T * T * (p * (p.log() - F.softmax(s, 1).log())).sum(1).mean().item(),
         "the student's logits are not divided by T"),
    ]
    for value, hint in hints:
        if close(got, value):
            return f" Hint: {hint}."
    return ""


def _check_loss(fn, s, t, T, what):
    want = ref_distill.kd_loss(s, t, T).item()
    got = _number(call(fn, s.clone(), t.clone(), T), what)
    if not (abs(got - want) <= ATOL + RTOL * abs(want)):
        raise CheckFailed(f"{what}: expected {want:.6g}, got {got:.6g}.{_diagnose_loss(got, s, t, T)}")


# ------------------------------------------------------------------ Q1
def distillation_loss(fn) -> None:
    """Q1 visible: random logits at T = 1, 2, 4 against qlib and torch's kl_div; zero at equality."""
    def body():
        g = _gen(0)
        s, t = torch.randn(8, 10, generator=g), 2 * torch.randn(8, 10, generator=g)
        for T in (1.0, 2.0, 4.0):
            _check_loss(fn, s, t, T, f"distillation_loss(randn(8, 10), 2 * randn(8, 10), T={T})")
            torch_ref = T * T * F.kl_div(F.log_softmax(s / T, 1), F.log_softmax(t / T, 1),
                                         reduction="batchmean", log_target=True)
            expect_close(_number(call(fn, s, t, T), "distillation_loss"), torch_ref.item(),
                         f"distillation_loss vs T^2 * F.kl_div(..., log_target=True) at T={T}",
                         rtol=RTOL, atol=ATOL)
        zero = _number(call(fn, t, t.clone(), 3.0), "distillation_loss")
        expect(abs(zero) <= 1e-5, f"distillation_loss(t, t, 3) should be 0 (equal logits), got {zero:.3g}")
    run("distillation_loss: random logits vs qlib.distill.kd_loss and F.kl_div", body)


def distillation_loss_hidden(fn) -> None:
    """Q1 hidden: fresh shapes and temperatures, large logits (numerical stability), gradients."""
    def body(draw: Draw):
        g = draw.gen
        for n, c, T, scale in [(1, 2, 1.0, 1.0), (16, 10, 3.0, 3.0), (5, 100, 0.5, 1.0), (32, 10, 8.0, 5.0)]:
            s, t = scale * torch.randn(n, c, generator=g), scale * torch.randn(n, c, generator=g)
            _check_loss(fn, s, t, T, f"distillation_loss on ({n}, {c}) logits, T={T}")
        s, t = 60 * torch.randn(4, 10, generator=g), 60 * torch.randn(4, 10, generator=g)
        got = _number(call(fn, s, t, 1.0), "distillation_loss")
        expect(torch.isfinite(torch.tensor(got)),
               "distillation_loss on large logits (|x| ~ 100) is not finite: use log_softmax, "
               "not log(softmax(...))")
        _check_loss(fn, s, t, 1.0, "distillation_loss on large logits (|x| ~ 100), T=1")
        s = torch.randn(6, 10, generator=g, requires_grad=True)
        loss = call(fn, s, torch.randn(6, 10, generator=g), 2.0)
        expect(isinstance(loss, torch.Tensor) and loss.requires_grad,
               "distillation_loss must return a tensor that carries gradients to the student's "
               "logits (do not call .item() inside it)")
        loss.backward()
        expect(s.grad is not None and torch.isfinite(s.grad).all(),
               "distillation_loss gave no finite gradient for the student's logits")
    hidden("distillation_loss: fresh shapes, temperatures, large logits, gradients", body)


# ------------------------------------------------------------------ Q2
def _tiny_pair(seed: int):
    g = _gen(seed)
    with isolated_rng(seed):  # nn.Linear initialises from the global generator: leave the caller's alone
        teacher = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 6)).eval()
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=g))
    x = torch.randn(64, 12, generator=g)
    return teacher, student, x


def _check_step(fn, seed: int, T: float, steps: int = 8) -> None:
    teacher, student, x = _tiny_pair(seed)
    before = [p.detach().clone() for p in teacher.parameters()]
    student_before = [p.detach().clone() for p in student.parameters()]
    opt = torch.optim.Adam(student.parameters(), lr=1e-2)
    want_first = ref_distill.kd_loss(student(x), teacher(x), T).item()
    losses = []
    for k in range(steps):
        losses.append(_number(call(fn, student, teacher, x, opt, T), f"distill_step (step {k + 1})"))
        if k == 0:
            expect(any(p.grad is not None for p in student.parameters()),
                   "after distill_step the student has no gradients: call loss.backward()")
            expect(not all(torch.equal(a, b) for a, b in zip(student_before, student.parameters())),
                   "distill_step did not change the student's parameters: call optimizer.step()")
    expect(all(p.grad is None or not p.grad.abs().sum() for p in teacher.parameters()),
           "the teacher received gradients: compute its logits under torch.no_grad() "
           "(or detach them); the teacher is a fixed target")
    expect(all(torch.equal(a, b) for a, b in zip(before, teacher.parameters())),
           "the teacher's parameters changed: only the student may be trained")
    rel = abs(losses[0] - want_first) / max(abs(want_first), 1e-8)
    if rel > 1e-3:
        raise CheckFailed(f"distill_step should return the distillation loss at temperature T={T} "
                          f"computed before the update: expected {want_first:.6g}, got {losses[0]:.6g}."
                          f"{_diagnose_loss(losses[0], student_logits_before(seed), teacher(x).detach(), T)}")
    expect(losses[-1] < 0.8 * losses[0],
           f"the loss did not decrease over {steps} steps (Adam, lr 1e-2): {[round(v, 4) for v in losses]}")


def student_logits_before(seed: int) -> torch.Tensor:
    teacher, student, x = _tiny_pair(seed)
    with torch.no_grad():
        return student(x)


def distill_step(fn) -> None:
    """Q2 visible: a small MLP pair; the loss of the first step, decrease, teacher untouched."""
    run("distill_step: loss decreases, teacher unchanged", lambda: _check_step(fn, seed=0, T=4.0))


def distill_step_hidden(fn) -> None:
    """Q2 hidden: other seeds and temperatures."""
    def body(draw: Draw):
        seed = 1 + draw.integer(9_999)
        for T in (1.0, 2.5):
            _check_step(fn, seed=seed, T=T)
    hidden("distill_step: fresh models, T = 1 and 2.5", body)


# ------------------------------------------------------------------ Q3
def distilled_student(student, teacher, test_data, ptq_accuracy: float) -> None:
    """Q3: a W4A4 fake-quant student, distilled, beats PTQ and reaches :data:`Q3_MIN_ACC`."""
    def body():
        expect(isinstance(student, nn.Module), f"student should be a model, got {type(student).__name__}")
        expect(student is not teacher, "student is the teacher itself: distill a quantized copy")
        fqs = fake_quantizers(student)
        expect(bool(fqs), "the student has no fake quantizers: start from the W4A4 PTQ student")
        bits = sorted({int(fq.bits) for fq in fqs.values()})
        expect(bits == [4], f"the student should quantize weights and activations to 4 bits, found bits {bits}")
        acc = ref_train.evaluate(student, test_data)
        print(f"student test accuracy {acc:.1f}% (PTQ alone {ptq_accuracy:.1f}%)")
        expect(acc >= Q3_MIN_ACC, f"the distilled student reaches {acc:.1f}%, expected at least {Q3_MIN_ACC}%")
        expect(acc >= ptq_accuracy + Q3_MIN_GAIN,
               f"the distilled student ({acc:.1f}%) should beat PTQ alone ({ptq_accuracy:.1f}%) "
               f"by at least {Q3_MIN_GAIN} points")
    run(f"distilled W4A4 student: >= {Q3_MIN_ACC}% and >= PTQ + {Q3_MIN_GAIN}", body)
