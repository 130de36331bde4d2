"""Synthetic calibration data: noise, and images optimized to match BatchNorm statistics.

Post-training quantization needs a few hundred inputs to calibrate activation ranges. When
no real data may be used (privacy, licensing), the model itself carries a summary of its
training data: every BatchNorm stores the running mean and variance of the activations that
entered it. ZeroQ (Cai et al., CVPR 2020, "ZeroQ: A Novel Zero Shot Quantization Framework")
turns that summary back into inputs: start from Gaussian noise ``x`` and minimize, by
gradient descent *on the pixels*, the BN-statistics loss ``L_BN(x)`` of
``qlib.datafree.bn_loss`` (its forms: ``"mean"``, ZeroQ's ``"zeroq"``, ``"l2"``,
DeepInversion's ``"deepinversion"``). Optionally, a class-conditional term
``ce_weight * CrossEntropy(model(x), y)`` with chosen labels ``y`` pushes each image towards
a class ("The Knowledge Within", Haroush et al. 2020; GDFQ, Xu et al. 2020).

A data-free method must still know what a valid input is: ``standardized_range`` gives the
range of standardized pixels from the preprocessing (``DIGITS_NORMALIZATION``), not from images.

Pure functions first (``standardized_range``, ``gaussian_batches``, ``uniform_batches``), then
``synthesize_bn`` (the optimization loop), which returns a ``SyntheticData``: an iterable of
calibration batches that ``qlib.ptq.calibrate`` accepts. The BN-statistics names
(``bn_layers``, ``batch_moments``, ``capture_bn_inputs``, ``bn_statistics_loss``) are
re-exported here. Shapes: images ``(N, C, H, W)`` float32; ``shape`` arguments are ``(C, H, W)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .. import runtime
from ..batching import check_seed, eval_mode, model_device, model_dtype
from .bn_loss import (BN_LOSS_VARIANTS, _check_variant, batch_moments,  # noqa: F401
                      bn_layers, bn_statistics_loss, capture_bn_inputs, check_input_shape)

__all__ = ["DIGITS_NORMALIZATION", "standardized_range", "gaussian_batches", "uniform_batches",
           "SyntheticData", "synthesize_bn",
           # re-exported from qlib.datafree.bn_loss
           "BN_LOSS_VARIANTS", "bn_layers", "capture_bn_inputs", "batch_moments", "bn_statistics_loss",
           "check_input_shape"]


# ------------------------------------------------------------------ the input range, data-free
DIGITS_NORMALIZATION = {8: (0.3046349585056305, 0.3756367266178131),
                        16: (0.3046349585056305, 0.3185967206954956)}
"""``{image_size: (mean, std)}``: the input normalization ``x_std = (x - mean) / std`` that
ships with the course's digit models (``qlib.data.load_digits``; raw pixels in [0, 1]). Like
torchvision's ImageNet ``mean``/``std``, these two numbers are part of the model's
preprocessing: whoever runs the model has them, with or without its training images."""


def standardized_range(mean: float, std: float, low: float = 0.0, high: float = 1.0) -> tuple[float, float]:
    """The valid range of a standardized input, known without a single image.

    Raw inputs lie in a documented range ``[low, high]`` (pixels: 0 = black, 1 = white) and
    the preprocessing maps ``x -> (x - mean) / std`` (``std > 0``), so the model only ever sees
    ``[(low - mean) / std, (high - mean) / std]``. For the digits at 16x16
    (``DIGITS_NORMALIZATION[16]``) that is about ``(-0.956, 2.183)``. Returns two floats.
    """
    _check_real(mean=mean, low=low, high=high)
    _check_real(std=std)
    if not std > 0:
        raise ValueError(f"std must be > 0, got {std!r}")
    if not low < high:
        raise ValueError(f"need low < high, got low={low}, high={high}")
    return ((low - mean) / std, (high - mean) / std)


# ------------------------------------------------------------------ noise
def _check_sizes(shape, num_samples: int, batch_size: int) -> tuple[int, ...]:
    if not isinstance(shape, (tuple, list, torch.Size)) or not all(
            isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape):
        raise ValueError(f"shape must be a tuple of positive ints such as (1, 16, 16), got {shape!r}")
    for name, v in (("num_samples", num_samples), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    return tuple(shape)


def _check_real(minimum: float | None = None, **values) -> None:
    for name, v in values.items():
        if (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
                or (minimum is not None and v < minimum)):
            raise ValueError(f"{name} must be a finite number{'' if minimum is None else f' >= {minimum}'}, "
                             f"got {v!r}")


def gaussian_batches(shape, num_samples: int = 256, batch_size: int = 64, mean: float = 0.0,
                     std: float = 1.0, seed: int = 0, *, device=None,
                     dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """``num_samples`` images ``x ~ N(mean, std^2)`` of ``shape`` ``(C, H, W)``, in batches.

    The simplest data-free calibration set: the right mean and spread for a standardized
    input, but none of the structure of real images. Drawn on the CPU with ``seed`` (the
    same images on any machine), then put on ``device`` in ``dtype``.
    """
    shape = _check_sizes(shape, num_samples, batch_size)
    _check_real(mean=mean)
    _check_real(0, std=std)
    g = torch.Generator().manual_seed(check_seed(seed))
    x = mean + std * torch.randn(num_samples, *shape, generator=g)
    return list(x.to(device=device, dtype=dtype).split(batch_size))


def uniform_batches(shape, num_samples: int = 256, batch_size: int = 64, low: float = -1.0,
                    high: float = 1.0, seed: int = 0, *, device=None,
                    dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """``num_samples`` images ``x ~ U(low, high)`` of ``shape`` ``(C, H, W)``, in batches
    (drawn on the CPU with ``seed``, then put on ``device`` in ``dtype``)."""
    shape = _check_sizes(shape, num_samples, batch_size)
    _check_real(low=low, high=high)
    if not low < high:
        raise ValueError(f"need low < high, got low={low}, high={high}")
    g = torch.Generator().manual_seed(check_seed(seed))
    x = low + (high - low) * torch.rand(num_samples, *shape, generator=g)
    return list(x.to(device=device, dtype=dtype).split(batch_size))


# ------------------------------------------------------------------ the optimization loop
@dataclass
class SyntheticData:
    """Synthetic calibration images, iterable as batches (pass it to ``qlib.ptq.calibrate``).

    ``x``: ``(N, C, H, W)`` images; ``labels``: the target classes of the cross-entropy
    term (or None); ``batch_size``: the size of the batches it yields; ``history``: the
    BN-statistics loss after every step (``history[0]`` is that of the initial noise).
    """

    x: torch.Tensor
    labels: torch.Tensor | None = None
    batch_size: int = 64
    history: list[float] = field(default_factory=list)

    @property
    def batches(self) -> list[torch.Tensor]:
        return list(self.x.split(self.batch_size))

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return math.ceil(len(self.x) / self.batch_size)


def synthesize_bn(model: nn.Module, shape, num_samples: int = 256, batch_size: int = 64,
                  steps: int = 100, lr: float = 0.5, input_mean: float | None = 0.0,
                  input_std: float | None = 1.0, input_range: tuple[float, float] | None = None,
                  ce_weight: float = 0.0, num_classes: int | None = None, seed: int = 0,
                  progress: bool = True, variant: str = "mean") -> SyntheticData:
    """ZeroQ: optimize ``num_samples`` noise images so that they match ``model``'s BN statistics.

    Starts from ``x ~ N(0, 1)`` of shape ``(num_samples, *shape)`` and takes ``steps`` Adam
    steps of size ``lr`` on ``L_BN(x)`` (every ``batch_size`` images form one sub-batch
    with its own statistics; all sub-batches run in a single forward pass). ``input_mean``
    / ``input_std`` (None: off) match the preprocessed input's statistics; ``input_range``
    ``(lo, hi)`` projects the pixels into the valid range after every step, as
    DeepInversion does (Yin et al., CVPR 2020): for standardized images, the standardized
    values of the darkest and brightest pixel, known from the preprocessing. With
    ``ce_weight > 0`` each image also gets a label ``y = i % num_classes`` (balanced
    classes) and the loss adds ``ce_weight * CE(model(x), y)``. ``variant`` chooses the form
    of ``L_BN`` (``bn_statistics_loss``; ``history`` records that form).

    The model is left unchanged (its parameters get no gradient, its mode is restored).
    Returns a ``SyntheticData`` with the final images, labels and the loss history.
    Defaults (100 steps, lr 0.5) drive the loss of 256 images for ``cnn16`` below that of a
    real batch in 10-30 s on two CPU cores (ZeroQ: 500 steps; 300 steps at lr 0.25 do too).
    """
    shape = _check_sizes(shape, num_samples, batch_size)
    _check_variant(variant)
    bn_layers(model)
    if num_samples % batch_size:
        raise ValueError(f"num_samples ({num_samples}) must be a multiple of batch_size ({batch_size})")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if not (isinstance(lr, (int, float)) and not isinstance(lr, bool) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive finite number, got {lr!r}")
    _check_real(0, ce_weight=ce_weight)
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        raise ValueError("the model has NaN or infinite parameters")
    if input_range is not None and not (len(input_range) == 2 and input_range[0] < input_range[1]):
        raise ValueError(f"input_range must be (lo, hi) with lo < hi, got {input_range!r}")
    if ce_weight > 0 and (num_classes is None or num_classes < 2):
        raise ValueError("ce_weight > 0 needs num_classes >= 2 (the classes to aim at)")
    labels = torch.arange(num_samples) % num_classes if ce_weight > 0 else None

    g = torch.Generator().manual_seed(check_seed(seed))  # drawn on the CPU: same images on any device
    device = model_device(model)
    x = torch.randn(num_samples, *shape, generator=g).to(device=device, dtype=model_dtype(model))
    if input_range is not None:
        x = x.clamp(*input_range)
    x.requires_grad_(True)
    opt = torch.optim.Adam([x], lr=lr)
    groups = num_samples // batch_size
    grads = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    history = []
    try:
        with eval_mode(model):
            check_input_shape(model, shape)
            for _ in tqdm(range(steps), desc="BN synthesis", disable=not progress or runtime.quiet()):
                bn_loss, logits = bn_statistics_loss(model, x, groups, input_mean, input_std,
                                                     return_logits=True, variant=variant)
                loss = bn_loss + (ce_weight * F.cross_entropy(logits, labels.to(device))
                                  if labels is not None else 0.0)
                if not torch.isfinite(loss):
                    raise ValueError("BN-statistics synthesis diverged (loss is NaN or infinite): lower lr")
                history.append(bn_loss.item())
                opt.zero_grad()
                loss.backward()
                opt.step()
                if input_range is not None:
                    with torch.no_grad():
                        x.clamp_(*input_range)
            with torch.no_grad():
                history.append(bn_statistics_loss(model, x, groups, input_mean, input_std,
                                                  variant=variant).item())
    finally:
        for p, r in zip(model.parameters(), grads):
            p.requires_grad_(r)
    return SyntheticData(x.detach(), labels, batch_size, history)
