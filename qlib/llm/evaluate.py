"""How good is a language model: perplexity and next-byte accuracy, with the seeds' spread.

Perplexity is the exponential of the mean negative log-likelihood of every target byte::

    nll = -(1/N) * sum_i log p(x_i | x_<i),      ppl = exp(nll)

A model that guessed uniformly among 256 bytes has ``ppl = 256``; a perfect one has 1. A
quantized model is compared with its float parent by the *relative* change
``ppl_q / ppl_fp32 - 1``. Next-byte accuracy is the fraction of targets where the most likely
byte is the right one: a small task metric that students can feel ("it guessed 60% of the
characters of unseen code").

The held-out text is cut into non-overlapping windows of ``context`` bytes
(``corpus.windows``), every window scored from its first byte; ``limit`` keeps the first
windows (fast mode). The same windows are used for every method, so differences between
methods are not noise of the sample (seeds are: report ``over_seeds``).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from ..batching import eval_mode, model_device
from ..train import accuracy_over_seeds
from . import corpus


def _windows(model: nn.Module, data: torch.Tensor, limit: int | None) -> torch.Tensor:
    if not isinstance(data, torch.Tensor) or data.dtype != torch.long:
        raise TypeError("data must be an int64 tensor of bytes (corpus.load().val)")
    if data.dim() == 2:
        return data[:limit] if limit is not None else data
    return corpus.windows(data, model.cfg.context, limit=limit)


@torch.no_grad()
def evaluate(model: nn.Module, data: torch.Tensor, *, limit: int | None = None,
             batch_size: int = 32) -> dict:
    """``{"ppl", "nll", "acc", "tokens"}`` of ``model`` on ``data``.

    ``data``: 1-D bytes (cut into windows of the model's context) or ready windows of shape
    ``(n, T + 1)``. ``acc`` is next-byte accuracy in percent. Runs on the model's device.
    """
    w = _windows(model, data, limit)
    if w.shape[0] == 0:
        raise ValueError("no windows to evaluate")
    device = model_device(model)
    nll, correct, count = 0.0, 0, 0
    with eval_mode(model):
        for i in range(0, w.shape[0], batch_size):
            batch = w[i:i + batch_size].to(device)
            x, y = batch[:, :-1], batch[:, 1:]
            logits = model(x).float()
            nll += F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
            correct += (logits.argmax(-1) == y).sum().item()
            count += y.numel()
    mean = nll / count
    return {"ppl": math.exp(mean), "nll": mean, "acc": 100.0 * correct / count, "tokens": count}


def perplexity(model: nn.Module, data: torch.Tensor, *, limit: int | None = None,
               batch_size: int = 32) -> float:
    """``exp`` of the mean next-byte negative log-likelihood (see ``evaluate``)."""
    return evaluate(model, data, limit=limit, batch_size=batch_size)["ppl"]


def relative_change(value: float, reference: float) -> float:
    """``value / reference - 1``: +0.02 means 2% worse perplexity than the reference."""
    if reference <= 0:
        raise ValueError(f"reference must be positive, got {reference}")
    return value / reference - 1.0


def over_seeds(values) -> dict[str, float]:
    """Mean and min-max over seeds (``qlib.train.accuracy_over_seeds``, any metric)."""
    return accuracy_over_seeds(values)
