"""Training objectives of QAT beyond cross-entropy: distillation from the float model, dampening.

- **Distillation-assisted QAT** (``kd_objective``): the float model that QAT starts from is a
  free teacher. The student (the fake-quant model) minimizes
  ``(1 - kd_weight) * CE(student(x), y) + kd_weight * KD(student(x), teacher(x))``, with
  Hinton's ``KD = T^2 KL(softmax(t/T) || softmax(s/T))`` (``qlib.distill.kd_loss``). The
  teacher's soft labels carry more than the hard label (which wrong classes are close), and
  they pull the quantized model towards the function the float model computes (as in
  Mishra & Marr 2018, *Apprentice*; Polino et al. 2018).
- **Oscillation dampening** (``with_dampening``): adds ``lambda * qlib.qat.oscillation.dampening_loss``
  (Nagel et al. 2022).

Each returns a ``loss_fn(model, x, y)`` for ``QATConfig.loss_fn`` / ``train_epoch``.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from ..distill import kd_loss
from .oscillation import dampening_loss

__all__ = ["cross_entropy_objective", "kd_objective", "with_dampening"]


def cross_entropy_objective(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The default QAT loss: ``F.cross_entropy(model(x), y)``."""
    return F.cross_entropy(model(x), y)


def _check_weight(name: str, v, high: float | None = None) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0 or (high is not None and v > high):
        raise ValueError(f"{name} must be a number in [0, {high if high is not None else 'inf'}), got {v!r}")
    return float(v)


def kd_objective(teacher: nn.Module, kd_weight: float = 0.5, temperature: float = 4.0):
    """``loss_fn(model, x, y) = (1 - kd_weight) CE + kd_weight KD(model(x), teacher(x))``.

    ``teacher``: the float model; an eval-mode copy is kept (its BatchNorms use their running
    statistics, and the caller's model is not touched); its logits are computed without autograd.
    """
    if not isinstance(teacher, nn.Module):
        raise TypeError(f"teacher must be an nn.Module, got {type(teacher).__name__}")
    kd_weight = _check_weight("kd_weight", kd_weight, 1.0)
    teacher = copy.deepcopy(teacher).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)

    def loss_fn(model, x, y):
        logits = model(x)
        with torch.no_grad():
            target = teacher(x)
        loss = kd_weight * kd_loss(logits, target, temperature)
        if kd_weight < 1:
            loss = loss + (1 - kd_weight) * F.cross_entropy(logits, y)
        return loss
    loss_fn.teacher = teacher
    return loss_fn


def with_dampening(loss_fn, weight: float):
    """``loss_fn`` plus ``weight * dampening_loss(model)`` (returned unchanged for ``weight == 0``)."""
    weight = _check_weight("dampening", weight)
    if weight == 0:
        return loss_fn

    def damped(model, x, y):
        return loss_fn(model, x, y) + weight * dampening_loss(model)
    return damped
