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

What does distillation change? Everything trainable, by default: the student's weights
(whose fake-quantized codes move when a weight crosses a rounding boundary, the scales staying
those of the calibration) and its float biases. ``distill(..., train="biases")`` or
``train="weights"`` trains one kind only, which tells where the gain comes from: training the
biases alone is a learned form of bias correction (lesson 07, Nagel et al. 2019), training the
weights alone is close to learned rounding (AdaRound, Nagel et al. 2020).
"""

from __future__ import annotations

import math
import numbers
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import runtime
from .batching import check_seed, eval_mode, input_batches, model_device, model_dtype, to_device

__all__ = ["check_temperature", "kd_loss", "feature_loss", "capture_outputs", "agreement", "trainable",
           "distill"]

TRAIN_CHOICES = ("all", "weights", "biases")


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
    if student_logits.device != teacher_logits.device:
        raise ValueError(f"student logits on {student_logits.device} and teacher logits on "
                         f"{teacher_logits.device}: expected one device")


def check_temperature(temperature) -> float:
    """A softmax temperature as a float: a real number ``T > 0`` (``TypeError`` for bools and
    non-numbers, ``ValueError`` for ``T <= 0``, NaN or infinity: ``softmax(z / 0)`` is NaN)."""
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"temperature must be a real number > 0, got {temperature!r}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    return float(temperature)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
            temperature: float = 4.0) -> torch.Tensor:
    """Hinton's distillation loss ``T^2 * KL(softmax(t/T) || softmax(s/T))``, batch mean.

    Logits ``(N, classes)``; returns a 0-d tensor, zero exactly when the softened
    distributions agree. Gradients flow to the student only (the teacher is detached).
    """
    _check_logits(student_logits, teacher_logits)
    t = check_temperature(temperature)
    dtype = torch.promote_types(student_logits.dtype, teacher_logits.dtype)
    log_q = F.log_softmax(student_logits.to(dtype) / t, dim=1)
    log_p = F.log_softmax(teacher_logits.detach().to(dtype) / t, dim=1)
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
        if not (isinstance(s, torch.Tensor) and isinstance(t, torch.Tensor)):
            raise TypeError(f"features must be tensors, got {type(s).__name__} and {type(t).__name__}")
        if s.shape != t.shape:
            raise ValueError(f"feature shapes differ: {tuple(s.shape)} vs {tuple(t.shape)}")
        t = t.detach().to(device=s.device, dtype=s.dtype)
        total = total + (s - t).pow(2).mean() / t.pow(2).mean().clamp_min(1e-12)
    return total / len(teacher_feats)


@contextmanager
def capture_outputs(model: nn.Module, names):
    """Context manager: ``{name: output}`` of the named submodules on each forward pass."""
    if isinstance(names, str) or not all(isinstance(n, str) for n in names):
        raise TypeError(f"names must be a list of module names (strings), got {names!r}")
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
    Each model sees the inputs on its own device and dtype, in eval mode (modes restored).
    """
    for name, m in (("student", student), ("teacher", teacher)):
        if not isinstance(m, nn.Module):
            raise TypeError(f"{name} must be an nn.Module, got {type(m).__name__}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    batches = _inputs(data, "agreement data", batch_size)
    same = total = 0
    with eval_mode(student, teacher):
        for x in batches:
            for chunk in x.split(batch_size):
                s = student(_place(chunk, student)).argmax(1)
                t = teacher(_place(chunk, teacher)).argmax(1)
                same += (s == t.to(s.device)).sum().item()
                total += len(chunk)
    return 100.0 * same / total


def _place(x: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """``x`` on ``model``'s device, cast to its floating dtype (``qlib.batching``)."""
    return to_device(x, model_device(model), model_dtype(model, default=None))


def _inputs(data, what: str, batch_size: int = 512) -> list[torch.Tensor]:
    """The non-empty, finite, floating input batches of ``data`` (any ``qlib.batching`` form)."""
    batches = []
    for x in input_batches(data, batch_size, finite=True):
        if not x.is_floating_point():
            raise TypeError(f"every batch of inputs must be a floating-point tensor, got {x.dtype}")
        batches.append(x)
    if not batches:
        raise ValueError(f"{what} is empty: give at least one batch of inputs")
    return batches


def _sampler(data, batch_size: int, g: torch.Generator, student: nn.Module):
    """A function ``step -> x`` on the student's device and dtype: fresh generator samples,
    or random minibatches (drawn with ``g``) of a fixed set."""
    if hasattr(data, "sample") and isinstance(data, nn.Module):  # a trained qlib Generator
        def draw():
            with torch.no_grad(), eval_mode(data):
                return _place(data.sample(batch_size, g)[0], student)
        return draw
    if callable(data) and not isinstance(data, nn.Module):
        def call():
            x = data(batch_size, g)
            if not isinstance(x, torch.Tensor) or not x.is_floating_point():
                raise TypeError(f"the data function must return a floating-point tensor, got {type(x).__name__}")
            return _place(x, student)
        return call
    x = torch.cat(_inputs(data, "distillation data"))

    def draw():
        idx = torch.randint(len(x), (min(batch_size, len(x)),), generator=g)
        return _place(x[idx], student)
    return draw


def trainable(model: nn.Module, train: str = "all") -> list[nn.Parameter]:
    """The parameters of ``model`` that ``distill`` trains: those with ``requires_grad``,
    all of them (``train="all"``), only those named ``*.weight`` (``"weights"``) or only those
    named ``*.bias`` (``"biases"``). Raises ValueError for another ``train`` or an empty choice.
    """
    if train not in TRAIN_CHOICES:
        raise ValueError(f"train must be one of {TRAIN_CHOICES}, got {train!r}")
    suffix = {"all": None, "weights": "weight", "biases": "bias"}[train]
    params = [p for n, p in model.named_parameters()
              if p.requires_grad and (suffix is None or n.rsplit(".", 1)[-1] == suffix)]
    if not params:
        raise ValueError(f"the student has no trainable parameters (train={train!r})")
    return params


def distill(student: nn.Module, teacher: nn.Module, data, steps: int = 200, lr: float = 1e-4,
            temperature: float = 4.0, batch_size: int = 64, feature_layers=None,
            feature_weight: float = 0.0, seed: int = 0, progress: bool = True,
            train: str = "all") -> dict[str, list[float]]:
    """Data-free distillation: train ``student`` (in place) to imitate the frozen ``teacher``.

    ``data``: a fixed set of inputs (a tensor, a list of batches, ``SyntheticData``) from
    which each step draws ``batch_size`` images at random, or a trained ``Generator``
    (fresh samples every step), or a function ``(batch_size, torch.Generator) -> x``.
    Each step minimizes ``kd_loss`` at ``temperature`` (+ ``feature_weight *
    feature_loss`` on the outputs of ``feature_layers``, module names present in both
    models) with Adam (``lr``) over the student's float parameters chosen by ``train``
    (``trainable``: "all", "weights" or "biases"; the others stay exactly as they are). Both models run in
    eval mode (no BatchNorm statistics are updated by synthetic data) and get their modes
    back afterwards, also when a step raises. Inputs go to each model's device and dtype.
    Returns the history ``{"loss": [...], "kd": [...]}`` (one value per step).
    """
    for name, m in (("student", student), ("teacher", teacher)):
        if not isinstance(m, nn.Module):
            raise TypeError(f"{name} must be an nn.Module, got {type(m).__name__}")
    for name, v in (("steps", steps), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    check_temperature(temperature)
    seed = check_seed(seed)
    for name, v in (("lr", lr), ("feature_weight", feature_weight)):
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or v < 0 \
                or (name == "lr" and v == 0):
            raise ValueError(f"{name} must be a finite number {'> 0' if name == 'lr' else '>= 0'}, got {v!r}")
    if student is teacher:
        raise ValueError("student and teacher must be different modules (deep-copy the teacher)")
    params = trainable(student, train)
    names = list(feature_layers or [])
    if feature_weight > 0 and not names:
        raise ValueError("feature_weight > 0 needs feature_layers (module names in both models)")
    g = torch.Generator().manual_seed(seed)
    draw = _sampler(data, batch_size, g, student)
    opt = torch.optim.Adam(params, lr=lr)
    history: dict[str, list[float]] = {"loss": [], "kd": []}
    with eval_mode(student, teacher), capture_outputs(student, names) as s_feats, \
            capture_outputs(teacher, names) as t_feats:
        for step in tqdm(range(steps), desc="distill", disable=not progress or runtime.quiet()):
            x = draw()
            with torch.no_grad():
                t_logits = teacher(_place(x, teacher))
            s_logits = student(x)
            kd = kd_loss(s_logits, t_logits.to(s_logits.device), temperature)
            loss = kd + (feature_weight * feature_loss(s_feats, t_feats) if feature_weight > 0 else 0.0)
            if not torch.isfinite(loss):
                raise ValueError(f"distillation diverged at step {step} (loss is NaN or infinite): lower lr")
            opt.zero_grad()
            loss.backward()
            opt.step()
            history["loss"].append(loss.item())
            history["kd"].append(kd.item())
    return history
