"""Test-time adaptation without labels: AdaBN and TENT, for float and quantized models.

**AdaBN** (Li et al., 2016). A BatchNorm layer normalizes with the mean and variance of the
*training* activations it saw (``running_mean``, ``running_var``). On a shifted domain those
statistics are wrong; AdaBN simply re-estimates them on unlabeled target images::

    running_mean_l <- mean over target batches of the layer's input (per channel)
    running_var_l  <- (unbiased) variance of the same

Nothing else changes: no weight, no bias, no BN affine parameter, only the BN buffers
(``adabn`` uses a cumulative average, ``momentum=None``, so every batch counts equally).

**AdaBN for a quantized model.** PTQ folds each BatchNorm into the weights of its conv
(``qlib.fold``) before it picks the scales, so a quantized model has no BN left to adapt:
the statistics must be re-estimated on the float model *before* folding. ``adabn_quantized``
does ``adapt -> re-fold -> re-calibrate``: AdaBN on the float model, fold the new statistics
into new weights (new weight scales), then calibrate the activation ranges on target images.
Two alternatives to compare (``order=``):

- ``"recalibrate"``: keep the source BN statistics, only calibrate the activations on target;
- ``"stale_ranges"``: AdaBN and re-fold, but keep the activation ranges calibrated on the
  source.

Measured (``benchmarks/domain.py``, W4A4 ``cnn16``): re-calibrating alone recovers almost
nothing; AdaBN before folding recovers most of what it recovers in fp32 on statistical
shifts (noise, blur, contrast), and whether the activation ranges are then re-calibrated or
kept from the source makes no difference larger than the seeds' spread (the percentile
ranges of re-normalized activations barely move).

**TENT** (Wang et al., ICLR 2021): minimize the entropy of the predictions on target batches,
``H(p) = -sum_c p_c log p_c``, by gradient steps on the BN affine parameters ``(gamma, beta)``
only, with BN normalizing by the batch's statistics. Here ``tent`` starts from AdaBN
statistics and ends with AdaBN again (on the adapted model), so the result is an ordinary
eval-mode model whose BNs can be folded and quantized like any other.

Every function returns a new model and leaves its argument unchanged.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from torch.utils.data import TensorDataset

from ..batching import input_batches, iter_batches, model_device
from ..ptq import calibrate, convert, prepare
from ..modules import QuantConfig, fake_quantizers

__all__ = ["ORDERS", "bn_modules", "adabn", "adabn_quantized", "entropy", "tent"]

ORDERS = ("adabn", "recalibrate", "stale_ranges")


def bn_modules(model: nn.Module) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    """``{name: BatchNorm}`` of every BatchNorm1d/2d in ``model``."""
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}


def _check_model(model: nn.Module) -> dict:
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    bns = bn_modules(model)
    if not bns:
        raise ValueError("the model has no BatchNorm layers to adapt (a quantized model has them "
                         "folded: adapt the float model, then quantize; see adabn_quantized)")
    return bns


@torch.no_grad()
def adabn(model: nn.Module, data, max_batches: int | None = None, batch_size: int = 256) -> nn.Module:
    """A copy of ``model`` whose BN running statistics are re-estimated on ``data`` (no labels).

    ``data``: a tensor, a TensorDataset, a DataLoader or an iterable of batches (labels
    ignored). Only BN buffers change. Returns the copy in eval mode.
    """
    adapted = copy.deepcopy(model)
    bns = _check_model(adapted)
    adapted.eval()
    for bn in bns.values():
        bn.reset_running_stats()
        bn.momentum = None          # cumulative moving average: every batch weighs the same
        bn.train()
    device = model_device(adapted)
    seen = 0
    for x in input_batches(data, batch_size, device=device):
        adapted(x)
        seen += 1
        if max_batches is not None and seen >= max_batches:
            break
    if seen == 0:
        raise ValueError("adaptation data is empty: give at least one batch of target images")
    for name, bn in bns.items():
        bn.momentum = model.get_submodule(name).momentum
    return adapted.eval()


def adabn_quantized(model: nn.Module, target, config: QuantConfig, source=None,
                    order: str = "adabn") -> nn.Module:
    """Static PTQ of a float ``model`` adapted to ``target`` images in the given ``order``.

    ``"adabn"``: AdaBN on ``target`` -> fold -> calibrate on ``target``.
    ``"recalibrate"``: source BN statistics, calibrate on ``target``.
    ``"stale_ranges"``: AdaBN -> fold, activation ranges from a calibration on ``source``.
    ``target``/``source``: batches of images (labels ignored).
    """
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    if order == "stale_ranges" and source is None:
        raise ValueError("order='stale_ranges' needs the source calibration batches (source=...)")
    adapted = model if order == "recalibrate" else adabn(model, target)
    quantized = convert(calibrate(prepare(adapted, config), list(input_batches(target))))
    if order == "stale_ranges":
        old = convert(calibrate(prepare(model, config), list(input_batches(source))))
        old_fqs = fake_quantizers(old)
        for name, fq in fake_quantizers(quantized).items():
            if name.endswith("input_fq"):
                parent, _, attr = name.rpartition(".")
                setattr(quantized.get_submodule(parent) if parent else quantized, attr,
                        copy.deepcopy(old_fqs[name]))
    return quantized


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean prediction entropy ``-sum_c p_c log p_c`` over a batch of logits ``(N, classes)``."""
    logp = F.log_softmax(logits, dim=1)
    return -(logp.exp() * logp).sum(1).mean()


def tent(model: nn.Module, data, steps: int = 1, lr: float = 1e-3, batch_size: int = 64,
         seed: int = 0) -> nn.Module:
    """TENT: entropy minimization on the BN affine parameters (module docstring).

    ``steps`` passes over ``data`` (shuffled with ``seed``) with Adam at ``lr``; only
    ``gamma``/``beta`` of the BatchNorms get gradients. Returns an eval-mode copy whose BN
    statistics are re-estimated (AdaBN) on ``data`` at the end.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    adapted = adabn(model, data)
    bns = bn_modules(adapted)
    for p in adapted.parameters():
        p.requires_grad_(False)
    params = []
    for bn in bns.values():
        for p in (bn.weight, bn.bias):
            if p is not None:
                params.append(p.requires_grad_(True))
    if not params:
        raise ValueError("the BatchNorms have no affine parameters to adapt (affine=False)")
    opt = torch.optim.Adam(params, lr=lr)
    device = model_device(adapted)
    for step in range(steps):
        adapted.eval()
        for bn in bns.values():
            bn.train()      # normalize with the batch's statistics, as TENT does
            bn.track_running_stats = False
        for x, _ in _shuffled(data, batch_size, seed + step, device):
            if len(x) < 2:
                continue
            loss = entropy(adapted(x))
            opt.zero_grad()
            loss.backward()
            opt.step()
        for bn in bns.values():
            bn.track_running_stats = True
    for p in adapted.parameters():
        p.requires_grad_(True)
    return adabn(adapted.eval(), data)


def _shuffled(data, batch_size, seed, device):
    """Shuffled ``(x, y)`` batches of ``data`` (a tensor or a list of batches becomes a TensorDataset)."""
    if isinstance(data, torch.Tensor):
        data = TensorDataset(data)
    elif isinstance(data, (list, tuple)):
        data = TensorDataset(torch.cat([b[0] if isinstance(b, (tuple, list)) else b for b in data]))
    yield from iter_batches(data, batch_size, shuffle=True, seed=seed, device=device)
