"""Training and evaluation loops, small and explicit.

``train`` uses AdamW with a one-cycle learning-rate schedule (warm up, then anneal): on the
digits, 40 epochs take 1-15 s on two CPU cores. The shuffling order comes from ``seed``;
the initial weights come from ``qlib.models.create(name, seed=...)``.

``evaluate`` returns top-1 accuracy in percent. On the 360 test digits one image is 0.28
points: differences of a point are noise unless several seeds agree.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from . import runtime


def as_loader(data, batch_size: int = 256, shuffle: bool = False, seed: int = 0):
    """Accept a TensorDataset, a DataLoader or a list of ``(x, y)`` batches."""
    if isinstance(data, TensorDataset):
        gen = torch.Generator().manual_seed(seed) if shuffle else None
        return DataLoader(data, batch_size=batch_size, shuffle=shuffle, generator=gen)
    if isinstance(data, (DataLoader, list, tuple)):
        return data
    raise TypeError(f"expected a TensorDataset, a DataLoader or a list of (x, y) batches, "
                    f"got {type(data).__name__}")


@torch.no_grad()
def predict(model: nn.Module, data, batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``(N, classes)`` and labels ``(N,)`` of a dataset, model in eval mode."""
    was_training = model.training
    model.eval()
    logits, labels = [], []
    for x, y in as_loader(data, batch_size):
        logits.append(model(x))
        labels.append(y)
    model.train(was_training)
    if not logits:
        raise ValueError("evaluation data is empty")
    return torch.cat(logits), torch.cat(labels)


def evaluate(model: nn.Module, data, batch_size: int = 512) -> float:
    """Top-1 accuracy in percent (0-100)."""
    logits, labels = predict(model, data, batch_size)
    return 100.0 * (logits.argmax(1) == labels).float().mean().item()


def train_epoch(model: nn.Module, loader, opt, sched, loss_fn) -> float:
    """One pass over ``loader``: loss, backward, optimizer and scheduler step; mean loss."""
    total, count = 0.0, 0
    for x, y in loader:
        loss = loss_fn(model, x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        total += loss.item() * len(x)
        count += len(x)
    return total / count


def train(model: nn.Module, train_data, val_data=None, epochs: int = 40, lr: float = 3e-3,
          weight_decay: float = 1e-4, batch_size: int = 64, seed: int = 0,
          loss_fn=None, progress: bool = True) -> dict[str, list[float]]:
    """Train ``model`` in place; returns the history of loss (and val accuracy per epoch).

    ``loss_fn(model, x, y) -> loss`` replaces cross-entropy (QAT and distillation use it).
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    loader = as_loader(train_data, batch_size, shuffle=True, seed=seed)
    steps = epochs * len(loader)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                            lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    loss_fn = loss_fn or (lambda m, x, y: F.cross_entropy(m(x), y))
    history: dict[str, list[float]] = {"loss": [], "val_acc": []}
    bar = tqdm(range(epochs), desc="train", disable=not progress or runtime.quiet())
    for _ in bar:
        model.train()
        history["loss"].append(train_epoch(model, loader, opt, sched, loss_fn))
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
    return {"mean": sum(vals) / len(vals), "min": min(vals), "max": max(vals), "n": len(vals)}
