"""Clipping ranges from data: the pure functions under the observers.

Each takes ``rows`` (a float ``(R, N)`` tensor, one row per (scale, zero_point) pair, see
``granularity.to_rows``) and returns per-row ``(lo, hi)``:

- ``reservoir_update``: keep a uniform random sample of at most ``capacity`` values per row
  from a stream of batches (Vitter's Algorithm R, vectorized), so that percentiles and MSE
  searches see all calibration batches in bounded memory;
- ``percentile_range``: ``[q_(100-p), q_p]`` of each row (symmetric: ``+-q_p`` of ``|x|``);
- ``mse_range``: grid search of ``[a*lo, a*hi]`` for ``a`` in ``(0, 1]`` minimizing
  ``mean((fake_quantize(x) - x)**2)`` per row.

``observers.py`` wraps them in ``nn.Module`` classes that record batches.
"""

from __future__ import annotations

import math

import torch

from .qparams import _check_int, check_quant_range, check_tensor, choose_qparams
from .quantize import fake_quantize

__all__ = ["reservoir_update", "percentile_range", "mse_range"]


def _check_rows(rows, name: str = "rows") -> None:
    check_tensor(rows, name)
    if rows.dim() != 2:
        raise ValueError(f"{name} must be 2-D (R, N), one row per qparams pair, got shape {tuple(rows.shape)}")


def _check_percentile(percentile) -> float:
    if isinstance(percentile, bool) or not isinstance(percentile, (int, float)):
        raise TypeError(f"percentile must be a number in (50, 100], got {type(percentile).__name__}")
    if not 50 < percentile <= 100:
        raise ValueError(f"percentile must be in (50, 100] (the upper clip; 100 - p is the lower), got {percentile}")
    return float(percentile)


def _check_positive_int(v, name: str) -> int:
    _check_int(v, name)
    if v < 1:
        raise ValueError(f"{name} must be a positive int, got {v!r}")
    return v


# ------------------------------------------------------------------ pure functions
def reservoir_update(sample: torch.Tensor, seen: int, new: torch.Tensor, capacity: int,
                     generator: torch.Generator | None = None) -> tuple[torch.Tensor, int]:
    """Keep a uniform random sample of at most ``capacity`` columns of a stream.

    ``sample`` ``(R, m)``, ``new`` ``(R, n)``; ``seen`` columns came before ``new``.
    Algorithm R (vectorized): column number ``i`` replaces a random slot with
    probability ``capacity / (i + 1)``; when several columns of one batch draw the same
    slot, the last one wins, as in the sequential algorithm. Returns ``(sample, seen + n)``.
    """
    _check_positive_int(capacity, "capacity")
    _check_int(seen, "seen")
    for name, t in (("sample", sample), ("new", new)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise ValueError(f"{name} must be a 2-D tensor (rows, columns), got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if sample.shape[0] != new.shape[0] or seen < sample.shape[1] or sample.shape[1] > capacity:
        raise ValueError(f"sample {tuple(sample.shape)} must have the rows of new {tuple(new.shape)}, at most "
                         f"capacity={capacity} columns and no more than seen={seen}")
    fill = min(capacity - sample.shape[1], new.shape[1])
    sample = torch.cat([sample, new[:, :fill].to(sample.device)], dim=1)
    rest = new[:, fill:]
    if rest.shape[1]:
        index = torch.arange(seen + fill, seen + new.shape[1], dtype=torch.float64)
        slot = (torch.rand(rest.shape[1], generator=generator, dtype=torch.float64) * (index + 1)).long()
        keep = slot < capacity
        # several columns may draw the same slot: as in the sequential algorithm, the last wins
        last = torch.full((capacity,), -1, dtype=torch.int64).scatter_reduce(
            0, slot[keep], torch.arange(rest.shape[1])[keep], "amax")
        slots = torch.nonzero(last >= 0).flatten()
        sample[:, slots.to(sample.device)] = rest[:, last[slots].to(rest.device)].to(sample.device)
    return sample, seen + new.shape[1]


def _quantile(rows: torch.Tensor, q: float) -> torch.Tensor:
    """Row-wise quantile with linear interpolation (``torch.quantile`` without its size cap)."""
    s = rows.sort(dim=1).values
    pos = q * (s.shape[1] - 1)
    i = min(int(math.floor(pos)), s.shape[1] - 1)
    j = min(i + 1, s.shape[1] - 1)
    return s[:, i] + (pos - i) * (s[:, j] - s[:, i])


def percentile_range(rows: torch.Tensor, percentile: float, symmetric: bool = False):
    """Clip each row at percentiles: ``(P_{100-p}, P_p)``, or ``(-t, t)``, ``t = P_p(|x|)``.

    ``rows`` ``(R, N)`` float; ``percentile`` in ``(50, 100]``; returns two ``(R,)`` tensors.
    """
    _check_rows(rows)
    q = _check_percentile(percentile) / 100.0
    if symmetric:
        t = _quantile(rows.abs(), q)
        return -t, t
    return _quantile(rows, 1.0 - q), _quantile(rows, q)


@torch.no_grad()
def mse_range(rows: torch.Tensor, quant_min: int, quant_max: int, symmetric: bool = False,
              grid: int = 100, lo: torch.Tensor | None = None, hi: torch.Tensor | None = None):
    """Per row, the range ``[a*lo, a*hi]``, ``a`` in ``{1/grid, 2/grid, ..., 1}``, whose
    fake quantization of the row has the smallest mean squared error.

    ``lo``/``hi`` (default: the row's min and max) are the unclipped range, shape ``(R,)``.
    """
    _check_rows(rows)
    check_quant_range(quant_min, quant_max)
    _check_positive_int(grid, "grid")
    lo = rows.amin(dim=1) if lo is None else lo
    hi = rows.amax(dim=1) if hi is None else hi
    for name, t in (("lo", lo), ("hi", hi)):
        check_tensor(t, name)
        if tuple(t.shape) != (rows.shape[0],):
            raise ValueError(f"{name} must have shape (R,) = ({rows.shape[0]},), got {tuple(t.shape)}")
    best_err = torch.full_like(lo, float("inf"))
    best_a = torch.ones_like(lo)
    for k in range(1, grid + 1):
        a = k / grid
        scale, zero_point = choose_qparams(a * lo, a * hi, quant_min, quant_max, symmetric)
        x_dq = fake_quantize(rows, scale, zero_point, quant_min, quant_max, axis=0)
        err = (x_dq - rows).pow(2).mean(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_a = torch.where(better, torch.full_like(best_a, a), best_a)
    return best_a * lo, best_a * hi


# ------------------------------------------------------------------ classes
