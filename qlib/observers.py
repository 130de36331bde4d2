"""Observers: choose the clipping range ``[lo, hi]`` from calibration data.

An observer sits in the forward pass, records statistics of what flows through and
returns its input unchanged; after a few calibration batches ``calculate_qparams()``
turns the statistics into ``(scale, zero_point)`` with ``qparams.choose_qparams``.
The range is a trade-off: wide ranges waste codes on rare outliers (coarse ``scale``,
large rounding error), narrow ones clip the outliers (large clipping error).

=====================  ===================================================================
``minmax``             ``[min(x), max(x)]`` over all batches: never clips (PyTorch's default)
``moving_average``     exponential moving average of each batch's min and max
``percentile``         the ``p``-th and ``(100-p)``-th percentiles of a bounded sample
``mse``                grid search of ``[a*min, a*max]`` minimizing ``mean((x_dq - x)**2)``
``entropy``            TensorRT's threshold minimizing KL(P || Q) on a histogram of ``|x|``
=====================  ===================================================================

Pure functions first (``reservoir_update``, ``percentile_range``, ``mse_range``; the KL
search ``kl_threshold_bins`` and ``EntropyObserver`` live in ``entropy.py`` and are
re-exported here), thin ``nn.Module`` classes over them. Every class takes
``bits, symmetric, granularity, signed``; ``signed=None`` (the default) means signed codes
when symmetric and unsigned when affine, as in ``qparams.resolve_signed``. For weights use
``symmetric=True, granularity=PerChannel(0)``. qlib has no ``HistogramObserver``: PyTorch's
of that name minimizes an L2 error; qlib's histogram observer is ``EntropyObserver`` (KL).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .qparams import (PerGroup, PerTensor, _check_int, _rows_minmax, check_granularity, check_quant_range,
                      check_tensor, choose_qparams, quant_range, resolve_signed)
from .quantize import fake_quantize

__all__ = [
    "reservoir_update", "percentile_range", "mse_range", "kl_threshold_bins", "ObserverBase",
    "MinMaxObserver", "MovingAverageMinMaxObserver", "PercentileObserver", "MSEObserver",
    "EntropyObserver", "make_observer",
]


def __getattr__(name):  # entropy.py builds on this module: import its names on first use
    if name in ("EntropyObserver", "kl_threshold_bins"):
        from . import entropy
        return getattr(entropy, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
class ObserverBase(nn.Module):
    """Shared interface: ``obs(x)`` records and returns ``x``; ``obs.calculate_qparams()``.

    Buffers ``min_val``/``max_val`` (float32, shape ``qparams_shape(x.shape, granularity)``)
    hold the running min and max; subclasses may clip inside them (``_clip_range``). Casting
    the model (``.bfloat16()``, ``.double()``) moves them to the device only: they stay float32.
    """

    def __init__(self, bits: int = 8, symmetric: bool = False, granularity=PerTensor(),
                 signed: bool | None = None):
        super().__init__()
        check_granularity(granularity)
        signed = resolve_signed(signed, bool(symmetric))
        self.quant_min, self.quant_max = quant_range(bits, signed)
        self.bits, self.symmetric, self.granularity, self.signed = bits, bool(symmetric), granularity, signed
        self.register_buffer("min_val", torch.tensor(float("inf")))
        self.register_buffer("max_val", torch.tensor(float("-inf")))
        self.register_buffer("num_batches", torch.tensor(0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows, lo, hi = _rows_minmax(x, self.granularity)
        if self.num_batches > 0 and lo.shape != self.min_val.shape:
            raise ValueError(f"this observer's qparams have shape {tuple(self.min_val.shape)}, but x of "
                             f"shape {tuple(x.shape)} gives {tuple(lo.shape)}; use one observer per tensor")
        self._update(rows, lo, hi)
        self.num_batches += 1
        return x

    def _update(self, rows, lo, hi):
        first = self.num_batches == 0
        self.min_val = lo if first else torch.minimum(self.min_val, lo)
        self.max_val = hi if first else torch.maximum(self.max_val, hi)

    def _clip_range(self):
        return self.min_val, self.max_val

    def _as_rows(self, t: torch.Tensor) -> torch.Tensor:
        """A qparams-shaped tensor (like ``min_val``) -> length-R vector in row order."""
        if isinstance(self.granularity, PerGroup):
            return t.movedim(self.granularity.axis % t.dim(), -1).flatten()
        return t.flatten()

    def _to_qparams_shape(self, v: torch.Tensor) -> torch.Tensor:
        """Inverse of ``_as_rows``: a length-R vector -> the shape of ``min_val``."""
        if isinstance(self.granularity, PerGroup):
            axis = self.granularity.axis % self.min_val.dim()
            return v.reshape(self.min_val.movedim(axis, -1).shape).movedim(-1, axis)
        return v.reshape(self.min_val.shape)

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale float32, zero_point int64)`` of shape ``qparams_shape``."""
        if self.num_batches == 0:
            raise ValueError("observer has seen no data: run calibration batches first")
        lo, hi = self._clip_range()
        return choose_qparams(lo, hi, self.quant_min, self.quant_max, self.symmetric)

    def reset(self) -> None:
        """Forget everything observed."""
        device = self.min_val.device
        self.min_val = torch.tensor(float("inf"), device=device)
        self.max_val = torch.tensor(float("-inf"), device=device)
        self.num_batches.zero_()

    def _apply(self, fn, *args, **kwargs):
        """``.to()``, ``.cuda()``, ``.bfloat16()``...: the statistics follow the device but keep
        their dtypes (as ``FakeQuantize``'s frozen qparams do): a ``min_val`` cast to bfloat16
        and back would lose bits, and observing afterwards would start from the rounded range."""
        saved = dict(self._buffers)
        super()._apply(fn, *args, **kwargs)
        for name, buf in saved.items():
            if buf is not None:
                self._buffers[name] = buf.to(self._buffers[name].device)
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name, buf in self._buffers.items():  # buffers take their shape from the data seen
            saved = state_dict.get(prefix + name)
            if buf is not None and saved is not None and saved.shape != buf.shape:
                setattr(self, name, torch.empty_like(saved, device=buf.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (f"bits={self.bits}, symmetric={self.symmetric}, granularity={self.granularity}, "
                f"quant_min={self.quant_min}, quant_max={self.quant_max}")


class MinMaxObserver(ObserverBase):
    """Running ``min`` and ``max`` of everything seen (torch's MinMaxObserver /
    PerChannelMinMaxObserver, same qparams bit for bit)."""


class MovingAverageMinMaxObserver(ObserverBase):
    """``min_val += c * (min(x) - min_val)`` (same for max), ``c = averaging_constant``;
    the first batch sets them. Outlier batches move the range only a little."""

    def __init__(self, averaging_constant: float = 0.01, **kw):
        super().__init__(**kw)
        if isinstance(averaging_constant, bool) or not isinstance(averaging_constant, (int, float)):
            raise TypeError(f"averaging_constant must be a number in (0, 1], got {averaging_constant!r}")
        if not 0 < averaging_constant <= 1:
            raise ValueError(f"averaging_constant must be in (0, 1], got {averaging_constant}")
        self.averaging_constant = averaging_constant

    def _update(self, rows, lo, hi):
        if self.num_batches == 0:
            self.min_val, self.max_val = lo, hi
        else:
            self.min_val = self.min_val + self.averaging_constant * (lo - self.min_val)
            self.max_val = self.max_val + self.averaging_constant * (hi - self.max_val)


class _SampleObserver(ObserverBase):
    """Keeps a bounded random sample (``max_samples`` values per row) for later search."""

    def __init__(self, max_samples: int = 2**16, seed: int = 0, **kw):
        super().__init__(**kw)
        self.max_samples = _check_positive_int(max_samples, "max_samples")
        self.generator = torch.Generator().manual_seed(seed)
        self.register_buffer("sample", torch.empty(0, 0), persistent=False)
        self.seen = 0

    def _update(self, rows, lo, hi):
        super()._update(rows, lo, hi)
        if self.seen == 0:
            self.sample = rows.new_empty(rows.shape[0], 0)
        self.sample, self.seen = reservoir_update(self.sample, self.seen, rows, self.max_samples,
                                                  self.generator)

    def reset(self) -> None:
        super().reset()
        self.sample, self.seen = torch.empty(0, 0), 0

    def _sample_rows(self) -> torch.Tensor:
        if self.sample.numel() == 0:  # e.g. loaded from a state_dict: samples are not saved
            raise ValueError("observer has seen no data: run calibration batches first")
        return self.sample


class PercentileObserver(_SampleObserver):
    """Clip at the ``percentile``-th / ``(100 - percentile)``-th percentile of the sample
    (symmetric: ``t = P_percentile(|x|)``, range ``[-t, t]``)."""

    def __init__(self, percentile: float = 99.99, **kw):
        super().__init__(**kw)
        self.percentile = _check_percentile(percentile)

    def _clip_range(self):
        lo, hi = percentile_range(self._sample_rows(), self.percentile, self.symmetric)
        return self._to_qparams_shape(lo), self._to_qparams_shape(hi)


class MSEObserver(_SampleObserver):
    """Grid search ``[a*min_val, a*max_val]`` minimizing the fake-quantization MSE of the
    sample (per row: per channel for weights with ``PerChannel(0)``)."""

    def __init__(self, grid: int = 100, **kw):
        super().__init__(**kw)
        self.grid = _check_positive_int(grid, "grid")

    def _clip_range(self):
        lo, hi = mse_range(self._sample_rows(), self.quant_min, self.quant_max, self.symmetric,
                           self.grid, self._as_rows(self.min_val), self._as_rows(self.max_val))
        return self._to_qparams_shape(lo), self._to_qparams_shape(hi)


_OBSERVERS = {"minmax": MinMaxObserver, "moving_average": MovingAverageMinMaxObserver,
              "percentile": PercentileObserver, "mse": MSEObserver, "entropy": None}


def make_observer(name: str, **kw) -> ObserverBase:
    """``make_observer("mse", bits=4, symmetric=True, granularity=PerChannel(0))``."""
    if not isinstance(name, str) or name not in _OBSERVERS:
        raise ValueError(f"unknown observer {name!r}; expected one of {sorted(_OBSERVERS)}")
    if name == "entropy":  # its own module (qlib/entropy.py), which builds on this one
        from .entropy import EntropyObserver
        return EntropyObserver(**kw)
    return _OBSERVERS[name](**kw)
