"""Generalization: does training through the quantizer act as a regularizer?

A folk claim says that quantization noise regularizes: a model trained with QAT should
overfit less, be more robust to shifted inputs and sit in a *flatter* minimum. Each part of
the claim is a measurement here, to be repeated over seeds:

- **train/test gap**: ``acc_train - acc_test`` (``train_test_gap``);
- **robustness**: mean accuracy over the corruptions of ``qlib.domain.shifts`` at one
  severity (``corruption_accuracy``);
- **flatness**: how much the loss rises when the weights are pushed at random.
  ``sharpness`` adds ``sigma * rms(W) * N(0, 1)`` to every conv/linear weight ``W`` and
  reports the mean loss increase over ``samples`` draws; ``loss_slice`` walks along one
  random *filter-normalized* direction ``d`` (each output filter of ``d`` rescaled to the
  norm of the same filter of ``W``, Li et al., NeurIPS 2018): ``L(W + alpha d)``.

For a quantized model the perturbation is applied to the float weights *before* its weight
quantizers, so a small push may round back to the same codes: that is part of what the
quantized network "feels", and the reason to compare at several ``sigma``.

``train_variant`` trains a zoo model from scratch in fp32 or with QAT at given bits (BN kept
during training, folded at the end), with the same epochs, learning rate and data order, so
that the only difference is the quantizer in the loop.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from .. import models as zoo
from ..batching import eval_mode, iter_batches, model_device
from ..modules import QuantConfig
from ..qat import quantization_aware_training
from ..train import evaluate, train
from .shifts import SHIFTS, corrupt_dataset

__all__ = ["train_test_gap", "corruption_accuracy", "mean_loss", "sharpness", "loss_slice", "train_variant"]


def train_test_gap(model: nn.Module, splits) -> dict[str, float]:
    """``{"train", "test", "gap"}``: accuracies (percent) and their difference."""
    tr, te = evaluate(model, splits.train), evaluate(model, splits.test)
    return {"train": tr, "test": te, "gap": tr - te}


def corruption_accuracy(model: nn.Module, test_set, severity: int = 3, shifts=SHIFTS, seed: int = 0,
                        bounds=None) -> float:
    """Mean accuracy over ``shifts`` at one ``severity`` (a one-number robustness score)."""
    accs = [evaluate(model, corrupt_dataset(test_set, s, severity, seed=seed, bounds=bounds)) for s in shifts]
    return sum(accs) / len(accs)


@torch.no_grad()
def mean_loss(model: nn.Module, data, batch_size: int = 512) -> float:
    """Mean cross-entropy of ``model`` (eval mode) on a labelled dataset."""
    total, count = 0.0, 0
    with eval_mode(model):
        for x, y in iter_batches(data, batch_size, device=model_device(model)):
            total += F.cross_entropy(model(x), y, reduction="sum").item()
            count += len(y)
    if count == 0:
        raise ValueError("loss data is empty")
    return total / count


def _weights(model: nn.Module) -> list[nn.Parameter]:
    return [m.weight for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def sharpness(model: nn.Module, data, sigma: float = 0.05, samples: int = 5, seed: int = 0) -> float:
    """Mean loss increase when every conv/linear weight gets ``sigma * rms(W) * N(0, 1)`` added.

    ``samples`` independent draws from a ``torch.Generator`` seeded with ``seed`` (on the
    model's device). ``model`` is not changed.
    """
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be a positive int, got {samples!r}")
    base = mean_loss(model, data)
    device = model_device(model)
    g = torch.Generator(device=device).manual_seed(seed)
    rises = []
    for _ in range(samples):
        noisy = copy.deepcopy(model)
        with torch.no_grad():
            for w in _weights(noisy):
                rms = w.pow(2).mean().sqrt()
                w.add_(sigma * rms * torch.randn(w.shape, generator=g, device=device, dtype=w.dtype))
        rises.append(mean_loss(noisy, data) - base)
    return sum(rises) / len(rises)


def filter_normalized_direction(model: nn.Module, seed: int = 0) -> list[torch.Tensor]:
    """One random direction per conv/linear weight, each output filter scaled to ``|W_filter|``."""
    device = model_device(model)
    g = torch.Generator(device=device).manual_seed(seed)
    out = []
    for w in _weights(model):
        d = torch.randn(w.shape, generator=g, device=device, dtype=w.dtype)
        dims = tuple(range(1, w.dim()))
        norm = lambda t: torch.linalg.vector_norm(t, dim=dims, keepdim=True)  # noqa: E731
        d = d * (norm(w.detach()) / norm(d).clamp_min(1e-12))
        out.append(d)
    return out


def loss_slice(model: nn.Module, data, alphas, seed: int = 0) -> list[float]:
    """``[L(W + alpha d) for alpha in alphas]`` along one filter-normalized random direction."""
    alphas = [float(a) for a in alphas]
    if not alphas:
        raise ValueError("alphas is empty")
    direction = filter_normalized_direction(model, seed)
    out = []
    for a in alphas:
        moved = copy.deepcopy(model)
        with torch.no_grad():
            for w, d in zip(_weights(moved), direction):
                w.add_(a * d)
        out.append(mean_loss(moved, data))
    return out


def train_variant(name: str, splits, bits: int | None = None, epochs: int = 20, lr: float = 3e-3,
                  seed: int = 0) -> nn.Module:
    """A zoo model trained from scratch: fp32 (``bits=None``) or QAT at W``bits``A``bits``.

    Same initial weights (``qlib.models.create(name, seed=seed)``), data order, epochs and
    one-cycle learning rate in both cases. The QAT model is returned converted (frozen
    quantizers, BN folded): what would be deployed.
    """
    from ..qat import convert_qat

    model = zoo.create(name, seed=seed)
    if bits is None:
        train(model, splits.train, epochs=epochs, lr=lr, seed=seed, progress=False)
        return model.eval()
    config = QuantConfig(weight_bits=bits, act_bits=bits)
    qmodel, _ = quantization_aware_training(model, (splits.train, None), config, epochs=epochs, lr=lr,
                                            fold_bn=False, seed=seed, progress=False)
    return convert_qat(qmodel)
