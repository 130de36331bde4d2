"""Training and evaluation loops, small and explicit.

``train`` uses AdamW with a one-cycle learning-rate schedule (warm up, then anneal): on the
digits, 40 epochs take 1-15 s on two CPU cores. The shuffling order comes from ``seed``;
the initial weights come from ``qlib.models.create(name, seed=...)``.

``evaluate`` returns top-1 accuracy in percent. On the 360 test digits one image is 0.28
points: differences of a point are noise unless several seeds agree.

Every loop runs on the model's device and dtype: batches go through ``qlib.batching``
(moved to the model's device, floating inputs cast to its dtype), so the same call works
for a CUDA, float64 or bfloat16 model. NaN or infinite inputs, logits or losses stop a loop
with a ``ValueError`` that names the batch or step, instead of a meaningless accuracy.
"""

from __future__ import annotations

import math
import numbers
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from . import runtime
from .batching import check_seed, eval_mode, placed

_FORMS = "a TensorDataset, a DataLoader or a list of (x, y) batches"


def _check_model(model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")


def as_loader(data, batch_size: int = 256, shuffle: bool = False, seed: int = 0):
    """A TensorDataset becomes a seeded ``DataLoader``; a DataLoader or a list of ``(x, y)``
    batches is used as it is. (Iterate it through ``qlib.batching`` to place the batches.)"""
    if isinstance(data, TensorDataset):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        gen = torch.Generator().manual_seed(check_seed(seed)) if shuffle else None
        return DataLoader(data, batch_size=batch_size, shuffle=shuffle, generator=gen)
    if isinstance(data, (DataLoader, list, tuple)):
        return data
    raise TypeError(f"expected {_FORMS}, got {type(data).__name__}")


@torch.no_grad()
def predict(model: nn.Module, data, batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``(N, classes)`` and labels ``(N,)`` of a labelled dataset, model in eval mode.

    ``data``: a TensorDataset, a DataLoader or a list of ``(x, y)`` batches. The batches run
    on the model's device and dtype; the results stay there. Every submodule's mode is
    restored afterwards, also when an error is raised.
    """
    _check_model(model)
    logits, labels = [], []
    with eval_mode(model):
        for i, (x, y) in enumerate(placed(model, data, batch_size)):
            if y is None:
                raise TypeError(f"evaluation needs labels: expected {_FORMS}, got inputs without labels")
            if y.is_floating_point() or y.shape != (len(x),):
                raise ValueError(f"labels must be integer class indices of shape ({len(x)},), "
                                 f"got {y.dtype} {tuple(y.shape)} in batch {i}")
            out = model(x)
            if out.dim() != 2 or len(out) != len(x):
                raise ValueError(f"the model must return logits (N, classes), got shape {tuple(out.shape)}")
            if not torch.isfinite(out).all():
                raise ValueError(f"the model's logits on batch {i} contain NaN or infinite values: "
                                 "an accuracy would be meaningless (check the model's weights)")
            logits.append(out)
            labels.append(y)
    if not logits:
        raise ValueError("evaluation data is empty: give at least one (x, y) batch")
    return torch.cat(logits), torch.cat(labels)


def evaluate(model: nn.Module, data, batch_size: int = 512) -> float:
    """Top-1 accuracy in percent (0-100) of ``model`` on labelled ``data`` (see ``predict``)."""
    logits, labels = predict(model, data, batch_size)
    return 100.0 * (logits.argmax(1) == labels).float().mean().item()


def train_epoch(model: nn.Module, loader, opt, sched, loss_fn, start_step: int = 0) -> float:
    """One pass over ``loader``: loss, backward, optimizer and scheduler step; mean loss.

    Batches are placed on the model's device and dtype. A NaN or infinite loss raises
    ``ValueError`` naming the step (``start_step`` + batch index) before it can poison the
    weights; ``start_step`` lets ``train`` number the steps across epochs.
    """
    total, count = 0.0, 0
    for i, (x, y) in enumerate(placed(model, loader)):
        if y is None:
            raise TypeError(f"training needs labels: expected {_FORMS}, got inputs without labels")
        loss = loss_fn(model, x, y)
        if not torch.isfinite(loss).all():
            raise ValueError(f"the loss is NaN or infinite at step {start_step + i} (batch {i} of "
                             "this epoch): lower lr, or look for NaN in the data or the weights")
        opt.zero_grad()
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        total += loss.item() * len(x)
        count += len(x)
    if count == 0:
        raise ValueError("training data is empty: give at least one (x, y) batch")
    return total / count


def _check_positive(name: str, v, allow_zero: bool = False) -> None:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if not ok or v < 0 or (v == 0 and not allow_zero):
        raise ValueError(f"{name} must be a finite number {'>= 0' if allow_zero else '> 0'}, got {v!r}")


def train(model: nn.Module, train_data, val_data=None, epochs: int = 40, lr: float = 3e-3,
          weight_decay: float = 1e-4, batch_size: int = 64, seed: int = 0,
          loss_fn=None, progress: bool = True) -> dict[str, list[float]]:
    """Train ``model`` in place; returns the history of loss (and val accuracy per epoch).

    ``loss_fn(model, x, y) -> loss`` replaces cross-entropy (QAT and distillation use it).
    The model ends in eval mode; if training raises, every submodule gets its mode back.
    """
    _check_model(model)
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be an int >= 1, got {epochs!r}")
    _check_positive("lr", lr)
    _check_positive("weight_decay", weight_decay, allow_zero=True)
    seed = check_seed(seed)
    loader = as_loader(train_data, batch_size, shuffle=True, seed=seed)
    if len(loader) == 0:
        raise ValueError("training data is empty: give at least one (x, y) batch")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    steps = epochs * len(loader)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    loss_fn = loss_fn or (lambda m, x, y: F.cross_entropy(m(x), y))
    history: dict[str, list[float]] = {"loss": [], "val_acc": []}
    bar = tqdm(range(epochs), desc="train", disable=not progress or runtime.quiet())
    with eval_mode(model):  # restores the modes if anything below raises
        for epoch in bar:
            model.train()
            history["loss"].append(train_epoch(model, loader, opt, sched, loss_fn,
                                               start_step=epoch * len(loader)))
            if val_data is not None:
                history["val_acc"].append(evaluate(model, val_data))
                bar.set_postfix(loss=f"{history['loss'][-1]:.3f}", val=f"{history['val_acc'][-1]:.1f}")
    model.eval()
    return history


def accuracy_over_seeds(values: Iterable[float]) -> dict[str, float]:
    """Mean and min-max of accuracies from several seeds: report spread, not one run."""
    vals = list(values)
    if not vals:
        raise ValueError("no accuracies given")
    for v in vals:
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
            raise ValueError(f"accuracies must be finite numbers, got {v!r}")
    return {"mean": sum(vals) / len(vals), "min": min(vals), "max": max(vals), "n": len(vals)}


def format_spread(stats: dict, digits: int = 1, width: int = 5,
                  bounds_digits: int | None = None, bounds_width: int | None = None) -> str:
    """``"mean [min, max]"`` of an ``accuracy_over_seeds`` dict, as the lessons and benchmarks print it.

    ``format_spread({"mean": 91.25, "min": 90.0, "max": 92.5})`` gives ``" 91.2 [ 90.0,  92.5]"``:
    the mean in ``width`` characters with ``digits`` decimals, then the bounds with
    ``bounds_digits`` decimals (default ``digits``) in ``bounds_width`` characters (default
    ``width``; 0 means as narrow as possible). Columns of these line up in a table.
    """
    if not isinstance(stats, dict) or not {"mean", "min", "max"} <= stats.keys():
        raise TypeError(f"stats must be a dict with 'mean', 'min' and 'max' (from accuracy_over_seeds), got {stats!r}")
    bd = digits if bounds_digits is None else bounds_digits
    bw = width if bounds_width is None else bounds_width
    return (f"{stats['mean']:{width}.{digits}f} "
            f"[{stats['min']:{bw}.{bd}f}, {stats['max']:{bw}.{bd}f}]")
