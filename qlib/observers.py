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

Pure functions first (``reservoir_update``, ``percentile_range``, ``mse_range`` live in
``clipping.py``; the KL
search ``kl_threshold_bins`` and ``EntropyObserver`` live in ``entropy.py`` and are
re-exported here), thin ``nn.Module`` classes over them. Every class takes
``bits, symmetric, granularity, signed``; ``signed=None`` (the default) means signed codes
when symmetric and unsigned when affine, as in ``qparams.resolve_signed``. For weights use
``symmetric=True, granularity=PerChannel(0)``. qlib has no ``HistogramObserver``: PyTorch's
of that name minimizes an L2 error; qlib's histogram observer is ``EntropyObserver`` (KL).
"""

from __future__ import annotations

import torch
from torch import nn

from .clipping import _check_percentile, _check_positive_int, mse_range, percentile_range, reservoir_update
from .qparams import PerGroup, PerTensor, _rows_minmax, check_granularity, choose_qparams, quant_range, resolve_signed

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
