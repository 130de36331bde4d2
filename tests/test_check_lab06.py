"""qlib.check.lab06: reference answers pass; typical wrong answers fail with a useful message.

Reference: ``qlib.distill.kd_loss`` (Hinton et al. 2015, ``T^2 KL(softmax(t/T) || softmax(s/T))``,
batch mean). Wrong answers: the T^2 factor missing, the KL direction reversed, a mean over
classes, log(softmax) overflow, teacher gradients flowing, no optimizer step.
"""

import copy

import pytest
import torch
import torch.nn.functional as F

from qlib.check import CheckFailed, lab06
from qlib.distill import kd_loss


def ref_step(student, teacher, x, optimizer, T):
    with torch.no_grad():
        t = teacher(x)
    loss = kd_loss(student(x), t, T)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.item()


def test_reference_answers_pass(capsys):
    lab06.distillation_loss(kd_loss)
    lab06.distillation_loss_hidden(kd_loss)
    lab06.distill_step(ref_step)
    lab06.distill_step_hidden(ref_step)
    assert capsys.readouterr().out.count("PASS") == 4


def test_torch_kl_div_answer_passes():
    def via_torch(s, t, T):
        return T**2 * F.kl_div(F.log_softmax(s / T, 1), F.log_softmax(t / T, 1),
                               reduction="batchmean", log_target=True)
    lab06.distillation_loss(via_torch)
    lab06.distillation_loss_hidden(via_torch)


@pytest.mark.parametrize("wrong, hint", [
    (lambda s, t, T: kd_loss(s, t, T) / T**2, "T\\^2 factor is missing"),
    (lambda s, t, T: T**2 * F.kl_div(F.log_softmax(t / T, 1), F.log_softmax(s / T, 1),
                                     reduction="batchmean", log_target=True), "wrong way"),
    (lambda s, t, T: T**2 * F.kl_div(F.log_softmax(s / T, 1), F.log_softmax(t / T, 1),
                                     reduction="mean", log_target=True), "averaged over classes"),
    (lambda s, t, T: kd_loss(s, t, T) / T, "scaled by T instead"),
])
def test_wrong_losses_fail_with_a_hint(wrong, hint):
    with pytest.raises(CheckFailed, match=hint):
        lab06.distillation_loss(wrong)


def test_unstable_loss_fails_hidden():
    def unstable(s, t, T):
        p, q = F.softmax(t / T, 1), F.softmax(s / T, 1)
        return T**2 * (p * (p.log() - q.log())).sum(1).mean()
    lab06.distillation_loss(unstable)  # fine on moderate logits
    with pytest.raises(CheckFailed, match="log_softmax|expected"):
        lab06.distillation_loss_hidden(unstable)


def test_item_inside_loss_fails_hidden():
    with pytest.raises(CheckFailed, match="gradients"):
        lab06.distillation_loss_hidden(lambda s, t, T: kd_loss(s, t, T).item())


def test_teacher_gradients_flowing_fail():
    def leaky(student, teacher, x, optimizer, T):
        s, t = student(x), teacher(x)
        loss = T * T * F.kl_div(F.log_softmax(s / T, 1), F.log_softmax(t / T, 1),
                                reduction="batchmean", log_target=True)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss.item()
    with pytest.raises(CheckFailed, match="teacher received gradients"):
        lab06.distill_step(leaky)


def test_teacher_trained_fails():
    def trains_teacher(student, teacher, x, optimizer, T):
        loss = ref_step(student, teacher, x, optimizer, T)
        with torch.no_grad():
            next(teacher.parameters()).add_(0.01)
        return loss
    with pytest.raises(CheckFailed, match="teacher's parameters changed"):
        lab06.distill_step(trains_teacher)


def test_missing_step_and_wrong_loss_fail():
    def no_step(student, teacher, x, optimizer, T):
        with torch.no_grad():
            t = teacher(x)
        loss = kd_loss(student(x), t, T)
        loss.backward()
        return loss.item()
    with pytest.raises(CheckFailed, match="optimizer.step"):
        lab06.distill_step(no_step)

    def no_t2(student, teacher, x, optimizer, T):
        return ref_step(student, teacher, x, optimizer, T) / T**2
    with pytest.raises(CheckFailed, match="T\\^2 factor is missing"):
        lab06.distill_step(no_t2)

    with pytest.raises(CheckFailed, match="not implemented"):
        lab06.distill_step(lambda *a: (_ for _ in ()).throw(NotImplementedError()))


def test_distilled_student_check_rejects_the_teacher_and_fp32_models():
    teacher = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 10))
    data = torch.utils.data.TensorDataset(torch.randn(8, 1, 2, 2), torch.zeros(8, dtype=torch.long))
    with pytest.raises(CheckFailed, match="teacher itself"):
        lab06.distilled_student(teacher, teacher, data, 50.0)
    with pytest.raises(CheckFailed, match="no fake quantizers"):
        lab06.distilled_student(copy.deepcopy(teacher), teacher, data, 50.0)


def test_q3_pipeline_passes_and_ptq_alone_fails(capsys):
    """The lab's Q3 as written (MSE weight scales, 128 BN-synthetic images, 40 steps at lr 1e-3,
    T = 4) passes with the reference loop; the undistilled PTQ student misses the gain."""
    from qlib import data, models, ptq
    from qlib.datafree import synthesize_bn
    from qlib.modules import QuantConfig
    from qlib.train import evaluate

    digits = data.load_digits(16)
    teacher = models.pretrained("cnn16", seed=0).eval()
    x = synthesize_bn(teacher, digits.image_shape, num_samples=128, batch_size=64, steps=50, lr=0.5, seed=0,
                      progress=False).x
    config = QuantConfig(weight_bits=4, act_bits=4, weight_observer="mse", act_observer="percentile",
                         act_observer_kwargs={"percentile": 99.9})
    ptq_student = ptq.quantize_static(teacher, x.split(64), config)
    ptq_accuracy = evaluate(ptq_student, digits.test)
    with pytest.raises(CheckFailed, match=r"expected at least 97.0%"):
        lab06.distilled_student(ptq_student, teacher, digits.test, ptq_accuracy)
    student = copy.deepcopy(ptq_student)
    g = torch.Generator().manual_seed(0)
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-3)
    for _ in range(40):
        ref_step(student, teacher, x[torch.randint(len(x), (32,), generator=g)], optimizer, 4.0)
    lab06.distilled_student(student, teacher, digits.test, ptq_accuracy)
    assert "PASS" in capsys.readouterr().out
