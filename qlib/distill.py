"""Knowledge distillation: a student learns to imitate a teacher's outputs.

Hinton, Vinyals and Dean (2015), "Distilling the Knowledge in a Neural Network": soften
both output distributions with a temperature ``T`` and minimize their KL divergence::

    p_T = softmax(teacher_logits / T),   q_T = softmax(student_logits / T)
    L_KD = T^2 * KL(p_T || q_T)          (mean over the batch)

A high ``T`` reveals the teacher's "dark knowledge" (which wrong classes look alike); the
``T^2`` keeps gradient magnitudes comparable across temperatures. Feature matching (FitNets,
Romero et al. 2015) adds the mean squared difference of intermediate activations.

For quantization the teacher is the fp32 model and the student its fake-quantized copy
(``qlib.ptq.quantize_static``): they share the architecture, so features match by module
name (BN folding keeps names). Distillation needs no labels, so it also needs no real
data: ``distill`` trains the student on synthetic inputs, either a fixed set
(``qlib.datafree.synthesize_bn``, ZeroQ) or a fresh stream from a trained generator
(``qlib.datafree.Generator``, as in GDFQ, Xu et al. 2020). Gradients pass the rounding with
the straight-through estimator of ``qlib.quantize.fake_quantize``.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import runtime

__all__ = ["kd_loss", "feature_loss", "capture_outputs", "agreement", "distill"]


def _check_logits(student_logits, teacher_logits):
    for name, t in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor")
        if t.dim() != 2 or t.shape[0] == 0:
            raise ValueError(f"{name} must have shape (N, classes) with N > 0, got {tuple(t.shape)}")
        if not torch.isfinite(t).all():
            raise ValueError(f"{name} contains NaN or infinite values")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student {tuple(student_logits.shape)} and teacher {tuple(teacher_logits.shape)} "
                         "logits differ in shape")


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
            temperature: float = 4.0) -> torch.Tensor:
    """Hinton's distillation loss ``T^2 * KL(softmax(t/T) || softmax(s/T))``, batch mean.

    Logits ``(N, classes)``; returns a 0-d tensor, zero exactly when the softened
    distributions agree. Gradients flow to the student only (the teacher is detached).
    """
    _check_logits(student_logits, teacher_logits)
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    t = temperature
    log_q = F.log_softmax(student_logits / t, dim=1)
    log_p = F.log_softmax(teacher_logits.detach() / t, dim=1)
    return t * t * F.kl_div(log_q, log_p, reduction="batchmean", log_target=True)


def feature_loss(student_feats, teacher_feats) -> torch.Tensor:
    """Mean over layers of ``mean((s - t)^2) / mean(t^2)``: relative feature error.

    ``student_feats``/``teacher_feats``: sequences (or dicts with the same keys) of tensors
    of matching shapes. Dividing by the teacher's energy weighs every layer alike.
    """
    if isinstance(student_feats, dict) and isinstance(teacher_feats, dict):
        if student_feats.keys() != teacher_feats.keys():
            raise ValueError(f"feature names differ: {sorted(student_feats)} vs {sorted(teacher_feats)}")
        student_feats = [student_feats[k] for k in teacher_feats]
        teacher_feats = list(teacher_feats.values())
    student_feats, teacher_feats = list(student_feats), list(teacher_feats)
    if not teacher_feats or len(student_feats) != len(teacher_feats):
        raise ValueError(f"need equally many (>= 1) features, got {len(student_feats)} and {len(teacher_feats)}")
    total = 0.0
    for s, t in zip(student_feats, teacher_feats):
        if s.shape != t.shape:
            raise ValueError(f"feature shapes differ: {tuple(s.shape)} vs {tuple(t.shape)}")
        t = t.detach()
        total = total + (s - t).pow(2).mean() / t.pow(2).mean().clamp_min(1e-12)
    return total / len(teacher_feats)


@contextmanager
def capture_outputs(model: nn.Module, names):
    """Context manager: ``{name: output}`` of the named submodules on each forward pass."""
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise ValueError(f"no submodules named {missing}; some names: {list(modules)[1:8]}")
    seen: dict[str, torch.Tensor] = {}
    handles = [modules[n].register_forward_hook(lambda m, a, out, n=n: seen.__setitem__(n, out))
               for n in names]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def agreement(student: nn.Module, teacher: nn.Module, data, batch_size: int = 512) -> float:
    """Percentage of inputs on which student and teacher predict the same class.

    ``data``: a tensor of inputs, a list of batches, or a TensorDataset (labels unused).
    """
    batches = _as_batches(data)
    if not batches:
        raise ValueError("agreement needs at least one input")
    modes = student.training, teacher.training
    student.eval(), teacher.eval()
    same = total = 0
    for x in batches:
        for chunk in x.split(batch_size):
            same += (student(chunk).argmax(1) == teacher(chunk).argmax(1)).sum().item()
            total += len(chunk)
    student.train(modes[0]), teacher.train(modes[1])
    return 100.0 * same / total


def _as_batches(data) -> list[torch.Tensor]:
    if isinstance(data, torch.Tensor):
        return [data] if data.numel() else []
    if isinstance(data, torch.utils.data.TensorDataset):
        return [data.tensors[0]] if len(data) else []
    try:
        batches = [b[0] if isinstance(b, (tuple, list)) else b for b in data]
    except TypeError:
        raise TypeError(f"expected a tensor, a TensorDataset or an iterable of batches, "
                        f"got {type(data).__name__}") from None
    for b in batches:
        if not isinstance(b, torch.Tensor) or not b.is_floating_point():
            raise TypeError("every batch must be a floating-point tensor")
        if not torch.isfinite(b).all():
            raise ValueError("the data contains NaN or infinite values")
    return [b for b in batches if b.numel()]


def _sampler(data, batch_size: int, g: torch.Generator):
    """A function ``step -> x``: fresh generator samples, or shuffled minibatches of a fixed set."""
    if hasattr(data, "sample") and isinstance(data, nn.Module):  # a trained qlib Generator
        data.eval()

        def draw():
            with torch.no_grad():
                return data.sample(batch_size, g)[0]
        return draw
    if callable(data) and not isinstance(data, nn.Module):
        return lambda: data(batch_size, g)
    batches = _as_batches(data)
    if not batches:
        raise ValueError("distillation data is empty: give at least one batch of inputs")
    x = torch.cat(batches)

    def draw():
        return x[torch.randint(len(x), (min(batch_size, len(x)),), generator=g)]
    return draw


def distill(student: nn.Module, teacher: nn.Module, data, steps: int = 200, lr: float = 1e-4,
            temperature: float = 4.0, batch_size: int = 64, feature_layers=None,
            feature_weight: float = 0.0, seed: int = 0, progress: bool = True) -> dict[str, list[float]]:
    """Data-free distillation: train ``student`` (in place) to imitate the frozen ``teacher``.

    ``data``: a fixed set of inputs (a tensor, a list of batches, ``SyntheticData``) from
    which each step draws ``batch_size`` images at random, or a trained ``Generator``
    (fresh samples every step), or a function ``(batch_size, torch.Generator) -> x``.
    Each step minimizes ``kd_loss`` at ``temperature`` (+ ``feature_weight *
    feature_loss`` on the outputs of ``feature_layers``, module names present in both
    models) with Adam (``lr``) over the student's float parameters. Both models run in
    eval mode (no BatchNorm statistics are updated by synthetic data).
    Returns the history ``{"loss": [...], "kd": [...]}`` (one value per step).
    """
    for name, v in (("steps", steps), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive finite number, got {lr!r}")
    if student is teacher:
        raise ValueError("student and teacher must be different modules (deep-copy the teacher)")
    params = [p for p in student.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the student has no trainable parameters")
    names = list(feature_layers or [])
    if feature_weight > 0 and not names:
        raise ValueError("feature_weight > 0 needs feature_layers (module names in both models)")
    g = torch.Generator().manual_seed(seed)
    draw = _sampler(data, batch_size, g)
    opt = torch.optim.Adam(params, lr=lr)
    modes = student.training, teacher.training
    student.eval(), teacher.eval()
    history: dict[str, list[float]] = {"loss": [], "kd": []}
    try:
        with capture_outputs(student, names) as s_feats, capture_outputs(teacher, names) as t_feats:
            for _ in tqdm(range(steps), desc="distill", disable=not progress or runtime.quiet()):
                x = draw()
                with torch.no_grad():
                    t_logits = teacher(x)
                kd = kd_loss(student(x), t_logits, temperature)
                loss = kd + (feature_weight * feature_loss(s_feats, t_feats) if feature_weight > 0 else 0.0)
                if not torch.isfinite(loss):
                    raise ValueError("distillation diverged (loss is NaN or infinite): lower lr")
                opt.zero_grad()
                loss.backward()
                opt.step()
                history["loss"].append(loss.item())
                history["kd"].append(kd.item())
    finally:
        student.train(modes[0]), teacher.train(modes[1])
    return history
