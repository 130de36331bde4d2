"""Measuring what quantization buys: bytes and time.

Size: a model with ``P`` parameters stored at ``b`` bits takes ``P * b / 8`` bytes, plus the
quantization parameters (one float32 scale and one zero point per tensor or channel).
``model_size_bytes(model, bits)`` gives the first term; ``state_dict_bytes`` the real size of
what ``torch.save`` writes.

Time: ``latency`` runs a function several times after a warm-up and returns the **median**
in seconds. Only compare latencies measured side by side in one run, as ratios.
"""

from __future__ import annotations

import io
import statistics
import time
from typing import Callable

import torch
from torch import nn


def tensor_bytes(numel: int, bits: int) -> int:
    """Bytes to store ``numel`` numbers of ``bits`` bits each, packed: ``ceil(numel*bits/8)``."""
    if not isinstance(bits, int) or not 1 <= bits <= 64:
        raise ValueError(f"bits must be an int between 1 and 64, got {bits!r}")
    if numel < 0:
        raise ValueError(f"numel must be >= 0, got {numel}")
    return (numel * bits + 7) // 8


def model_size_bytes(model: nn.Module, bits: int = 32) -> int:
    """Bytes of all parameters of ``model`` stored at ``bits`` bits (packed, no metadata)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    return tensor_bytes(sum(p.numel() for p in model.parameters()), bits)


def state_dict_bytes(model: nn.Module) -> int:
    """Bytes ``torch.save(model.state_dict())`` writes: the real on-disk size, metadata included."""
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getbuffer().nbytes


def latency(fn: Callable[[], object], repeats: int = 20, warmup: int = 3) -> float:
    """Median wall time of ``fn()`` in seconds, after ``warmup`` untimed calls."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def cast_error(weight: torch.Tensor, dtype: torch.dtype = torch.float16) -> float:
    """Largest absolute error of casting a float32 tensor to ``dtype`` and back."""
    if not weight.is_floating_point():
        raise TypeError(f"expected a floating-point tensor, got {weight.dtype}")
    return (weight.to(dtype).float() - weight.float()).abs().max().item()
