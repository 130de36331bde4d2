"""Batches on the model's device: one helper for every loop in qlib.

Training, evaluation, calibration, distillation and the data-free tools all take data in
the same forms, and all must feed a model on whatever device (CPU, CUDA) and dtype it lives
in. They go through these functions instead of each writing its own:

- ``iter_batches(data, ...)`` accepts a tensor (one batch of inputs), a ``TensorDataset``, a
  ``DataLoader``, or any iterable of tensors or ``(x, y)`` pairs, and yields ``(x, y)`` pairs
  (``y`` is ``None`` where the data has no labels) moved to ``device``, with floating inputs
  cast to ``dtype``. Labels keep their integer dtype.
- ``input_batches(data, ...)``: the same, inputs only (calibration needs no labels).
- ``model_device(model)`` / ``model_dtype(model)``: where a model's parameters live.
- ``placed(model, data, ...)``: ``iter_batches`` on the model's own device and dtype.
- ``check_seed(seed)``: seeds of shuffles and draws are ints.
- ``eval_mode(*models)``: a context manager that puts models in eval mode and restores every
  submodule's own mode on exit, also when an exception is raised.

Example::

    device = model_device(model)
    for x, y in iter_batches(test_set, batch_size=512, device=device):
        logits = model(x)
"""

from __future__ import annotations

import contextlib
import numbers
from collections.abc import Iterator

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def model_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s first parameter (or buffer); the CPU for a model with none."""
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


def model_dtype(model: nn.Module, default: torch.dtype | None = torch.float32) -> torch.dtype | None:
    """The dtype of ``model``'s first floating-point parameter; ``default`` for a model with none.

    Loops pass ``default=None`` so that inputs of a parameter-free model keep their dtype.
    """
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return default


def to_device(x, device=None, dtype: torch.dtype | None = None):
    """Move a tensor (or a tuple/list of them) to ``device``; cast floating tensors to ``dtype``.

    Integer tensors (labels, codes) keep their dtype. ``None`` leaves device or dtype alone.
    """
    if isinstance(x, (tuple, list)):
        return type(x)(to_device(t, device, dtype) for t in x)
    if not isinstance(x, torch.Tensor):
        return x
    if dtype is not None and x.is_floating_point():
        return x.to(device=device, dtype=dtype)
    return x.to(device=device) if device is not None else x


def _source(data, batch_size: int, shuffle: bool, seed: int):
    """The batches of ``data`` before moving them (see ``iter_batches`` for the forms)."""
    if isinstance(data, torch.Tensor):
        return [data]  # one tensor is one batch (iterating it would give single samples)
    if isinstance(data, TensorDataset):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        gen = torch.Generator().manual_seed(seed) if shuffle else None
        return DataLoader(data, batch_size=batch_size, shuffle=shuffle, generator=gen)
    if isinstance(data, (str, bytes, dict)):
        raise TypeError(f"expected a tensor, a TensorDataset, a DataLoader or an iterable of batches, "
                        f"got {type(data).__name__}")
    # Test iterability without calling iter(): a shuffling DataLoader draws from its generator
    # each time an iterator is made, so a trial iter() would change the order of the batches.
    if not (hasattr(data, "__iter__") or hasattr(data, "__getitem__")):
        raise TypeError(f"expected a tensor, a TensorDataset, a DataLoader or an iterable of batches, "
                        f"got {type(data).__name__}")
    return data


def _split(batch) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise TypeError("a batch must be a tensor or an (x, y) pair, got an empty sequence")
        x, y = batch[0], (batch[1] if len(batch) > 1 else None)
    else:
        x, y = batch, None
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"each batch must be a tensor or an (x, y) pair of tensors, got {type(x).__name__}")
    return x, y


def iter_batches(data, batch_size: int = 256, *, shuffle: bool = False, seed: int = 0,
                 device=None, dtype: torch.dtype | None = None, finite: bool = False,
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """Yield ``(x, y)`` batches of ``data`` on ``device``, floating ``x`` cast to ``dtype``.

    ``data``: a tensor ``(N, ...)`` (one batch, ``y`` is ``None``); a ``TensorDataset``
    (cut into ``batch_size`` batches, shuffled with ``seed`` when ``shuffle``); a
    ``DataLoader`` or any iterable of tensors or ``(x, y)`` pairs (used as they come).
    Empty batches are skipped. Raises ``TypeError`` for anything else. With ``finite=True``
    a batch whose inputs hold NaN or infinity raises ``ValueError`` (naming the batch): a
    loop fed NaN must stop, not return a number.
    """
    for i, batch in enumerate(_source(data, batch_size, shuffle, seed)):
        x, y = _split(batch)
        if x.numel() == 0:
            continue
        if finite and x.is_floating_point() and not torch.isfinite(x).all():
            raise ValueError(f"batch {i} of the data contains NaN or infinite inputs: "
                             "expected finite numbers")
        yield to_device(x, device, dtype), to_device(y, device)


def input_batches(data, batch_size: int = 256, *, device=None, dtype: torch.dtype | None = None,
                  finite: bool = False) -> Iterator[torch.Tensor]:
    """Like ``iter_batches``, inputs only: ``x`` of every batch, on ``device``."""
    for x, _ in iter_batches(data, batch_size, device=device, dtype=dtype, finite=finite):
        yield x


def check_seed(seed, name: str = "seed") -> int:
    """``seed`` as an int, or ``TypeError``: seeds are integers (Python or NumPy ints; not
    bools, floats or strings, which would silently stand for another seed)."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {seed!r}")
    return int(seed)


def placed(model: nn.Module, data, batch_size: int = 256, *, shuffle: bool = False, seed: int = 0,
           finite: bool = True) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """``iter_batches`` on ``model``'s device, floating inputs cast to its floating dtype.

    What every loop uses: a float64 or bfloat16 model gets float64 or bfloat16 inputs, a
    CUDA model gets CUDA batches, and (``finite``) NaN inputs stop the loop with a message.
    """
    yield from iter_batches(data, batch_size, shuffle=shuffle, seed=seed, device=model_device(model),
                            dtype=model_dtype(model, default=None), finite=finite)


@contextlib.contextmanager
def eval_mode(*models: nn.Module):
    """Put ``models`` in eval mode; on exit (normal or by exception) restore every submodule's mode.

    ``model.train(was_training)`` would restore only one flag for the whole tree; a model
    whose BatchNorms were deliberately left in eval mode keeps them so here.
    """
    saved = [(m, m.training) for model in models for m in model.modules()]
    for model in models:
        model.eval()
    try:
        yield models[0] if len(models) == 1 else models
    finally:
        for m, mode in saved:
            m.training = mode
