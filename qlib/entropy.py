"""Entropy (KL-divergence) calibration, as in TensorRT (Migacz, GTC 2017).

The idea: an activation's histogram has a long thin tail. Clipping the range at a
threshold ``t`` wastes no codes on rare outliers but distorts them. Choose the ``t`` whose
clipped-and-quantized distribution Q loses the least information about the clipped
reference P, measured by ``KL(P || Q) = sum_i p_i log(p_i / q_i)``.

``kl_threshold_bins`` is the search on one histogram (pure function); ``EntropyObserver``
keeps the histograms during calibration and turns the threshold into qparams.
"""

from __future__ import annotations

import torch

from .observers import ObserverBase
from .qparams import _check_int

__all__ = ["kl_threshold_bins", "EntropyObserver"]


@torch.no_grad()
def kl_threshold_bins(hist: torch.Tensor, num_levels: int, chunk: int = 256,
                      min_bins: int = 128, flatten_zero_bin: bool = True) -> int:
    """TensorRT entropy calibration (Migacz 2017) on one histogram of ``|x|``.

    For each candidate ``i`` (bins kept, ``max(num_levels, min_bins)..bins``):
    P = ``hist[:i]`` with the outliers ``sum(hist[i:])`` added to its last bin (the
    clipped distribution); Q = ``hist[:i]`` merged into ``num_levels`` groups of
    consecutive bins (bin ``j`` in group ``floor(j * num_levels / i)``), each group's mass
    spread evenly over its non-empty bins (what quantization keeps). Q lacks the
    outliers, so clipping costs divergence; where Q is 0 but P is not (outliers landing
    in an empty last bin), Q gets a floor of ``1e-4`` counts (MXNet's smoothing; NVIDIA's
    reference scores such a candidate ``inf``). Both are normalized; returns the ``i``
    minimizing ``KL(P || Q)``, the largest one on a tie. Threshold: ``i * bin_width``.

    ``flatten_zero_bin``: bin 0 holds every exact zero, and after a ReLU that is half of
    the values or more. NVIDIA's implementation (pytorch-quantization's
    ``_compute_amax_entropy``: ``bins[0] = bins[1]``) replaces its count by bin 1's before
    the search, and so does this function. Without it the spike decides: a group that
    merges bin 0 with its neighbours spreads the spike over them, a huge ``p log(p / q)``
    at bin 0, and the only way to keep groups one bin wide is the smallest ``i``. On
    ``cnn16`` this clipped the second conv's input to a quarter of its range (10% of the
    values) and cost 4 points at W8A8.

    ``min_bins`` is TensorRT's floor (it searches from 128 bins up): below 8 bits there are
    few levels, and on a sparse histogram clipping almost everything then scores a KL near
    zero. Without the floor, W4A4 calibration of cnn16's input collapsed to chance.
    ``hist``: 1-D, finite, non-negative counts with a positive sum. A histogram with
    nothing outside bin 0 (an all-zero tensor) returns ``bins``: there is nothing to clip.
    """
    if not isinstance(hist, torch.Tensor) or hist.dim() != 1 or hist.numel() == 0:
        got = tuple(hist.shape) if isinstance(hist, torch.Tensor) else type(hist).__name__
        raise ValueError(f"hist must be a non-empty 1-D tensor of counts, got {got}")
    if hist.dtype == torch.bool or hist.is_complex():
        raise TypeError(f"hist must hold real counts, got {hist.dtype}")
    if not (torch.isfinite(hist).all() and (hist >= 0).all() and hist.sum() > 0):
        raise ValueError("hist must hold finite, non-negative counts with a positive sum (no NaN or infinite)")
    for name, v in (("num_levels", num_levels), ("chunk", chunk), ("min_bins", min_bins)):
        _check_int(v, name)
        if v < 1:
            raise ValueError(f"{name} must be a positive int, got {v}")
    bins = hist.numel()
    if num_levels >= bins:
        return bins
    first = min(max(num_levels, min_bins), bins)
    hist = hist.to(torch.float64).cpu().clone()
    if flatten_zero_bin:
        hist[0] = hist[1]
        if hist.sum() == 0:
            return bins  # only zeros: nothing to clip
    tail = torch.cat([hist.flip(0).cumsum(0).flip(0), hist.new_zeros(1)])  # tail[i] = sum(hist[i:])
    j = torch.arange(bins)
    best_kl, best_i = float("inf"), bins
    for start in range(first, bins + 1, chunk):
        cand = torch.arange(start, min(start + chunk, bins + 1))
        inside = j[None, :] < cand[:, None]
        sliced = torch.where(inside, hist[None, :], 0.0)  # hist[:i], one row per candidate
        p = sliced.clone()  # P: the clipped reference distribution
        p[torch.arange(len(cand)), cand - 1] += tail[cand]
        group = torch.where(inside, (j[None, :] * num_levels) // cand[:, None], 0)
        mass = p.new_zeros(len(cand), num_levels).scatter_add_(1, group, sliced)
        count = p.new_zeros(len(cand), num_levels).scatter_add_(1, group, (sliced > 0).double())
        q = torch.where(sliced > 0, mass.gather(1, group) / count.gather(1, group).clamp_min(1), 0.0)
        q = torch.where(p > 0, q.clamp_min(1e-4), 0.0)
        p, q = p / p.sum(1, keepdim=True), q / q.sum(1, keepdim=True)
        kl = torch.where(p > 0, p * torch.log(p / q.clamp_min(1e-300)), 0.0).sum(1)
        k = len(kl) - 1 - int(kl.flip(0).argmin())  # the last minimum: ties go to the wider range
        if kl[k] <= best_kl:
            best_kl, best_i = float(kl[k]), int(cand[k])
    return best_i


class EntropyObserver(ObserverBase):
    """KL-divergence (entropy) calibration, TensorRT style (Migacz, GTC 2017).

    Keeps a ``bins``-bin histogram of ``|x|`` per row on ``[0, hist_max]``; when a batch
    exceeds ``hist_max`` the range grows by an integer factor ``f`` and every ``f`` old
    bins merge into one, exactly (``f`` is computed in float64: after an all-zero batch,
    ``hist_max`` is 0 and the first non-zero batch sets it, the zeros staying in bin 0). ``calculate_qparams`` picks the threshold ``t`` with
    :func:`kl_threshold_bins` (levels: half the codes if values of both signs share them,
    all codes for non-negative affine data) and uses ``[max(min_val, -t), min(max_val, t)]``.
    Cost grows with ``bins**2``: keep ``bins`` small for many channels.
    ``flatten_zero_bin=False`` searches with the zero spike left in bin 0 (qlib's behaviour
    before it followed NVIDIA's reference; lesson 03 shows what that costs).
    PyTorch's ``HistogramObserver`` minimizes an L2 error instead; this is the KL search.
    """

    def __init__(self, bins: int = 2048, flatten_zero_bin: bool = True, **kw):
        super().__init__(**kw)
        _check_int(bins, "bins")
        if bins < 8:
            raise ValueError(f"bins must be an int >= 8, got {bins!r}")
        if not isinstance(flatten_zero_bin, bool):
            raise TypeError(f"flatten_zero_bin must be True or False, got {flatten_zero_bin!r}")
        self.bins, self.flatten_zero_bin = bins, flatten_zero_bin
        self.register_buffer("hist", torch.empty(0, bins, dtype=torch.float64))
        self.register_buffer("hist_max", torch.empty(0))

    def _update(self, rows, lo, hi):
        super()._update(rows, lo, hi)
        a = rows.abs()
        amax = a.amax(dim=1)
        if self.hist.shape[0] != rows.shape[0]:
            self.hist = torch.zeros(rows.shape[0], self.bins, dtype=torch.float64, device=rows.device)
            self.hist_max = torch.zeros_like(amax)
        hist_max = self.hist_max
        seen = hist_max > 0  # rows with a non-zero value so far
        grow = torch.where(seen, torch.ceil(amax / torch.where(seen, hist_max, 1.0)).clamp_min(1), 1.0)
        if (grow > 1).any():  # merge every `grow` old bins into one (grow >= bins: all into bin 0)
            merged = torch.arange(self.bins, device=rows.device)[None, :] // grow.clamp_max(self.bins).long()[:, None]
            self.hist = torch.zeros_like(self.hist).scatter_add_(1, merged, self.hist)
            new_max = hist_max * grow
            if not torch.isfinite(new_max).all():  # a factor beyond float32 (e.g. 1e-30, then 1e30)
                wide = hist_max.double() * torch.ceil(amax.double() / hist_max.double())
                big = torch.finfo(torch.float32).max
                new_max = torch.where(torch.isfinite(new_max), new_max, wide.clamp_max(big).float())
            hist_max = new_max
        self.hist_max = torch.where(seen, hist_max, amax)  # only zeros so far: start the range here
        width = (self.hist_max / self.bins)[:, None]
        index = torch.where(width > 0, torch.floor(a / width), 0.0)
        index = index.clamp_(0, self.bins - 1).to(torch.int64)
        self.hist.scatter_add_(1, index, torch.ones_like(a, dtype=torch.float64))

    def _clip_range(self):
        lo, hi = self._as_rows(self.min_val), self._as_rows(self.max_val)
        levels = self.quant_max - self.quant_min + 1
        t = torch.empty_like(lo)
        for r in range(lo.numel()):
            two_sided = self.symmetric or lo[r] < 0
            i = kl_threshold_bins(self.hist[r], levels // 2 if two_sided else levels,
                                  flatten_zero_bin=self.flatten_zero_bin)
            t[r] = i * self.hist_max[r] / self.bins
        lo, hi = torch.maximum(lo, -t), torch.minimum(hi, t)
        return self._to_qparams_shape(lo), self._to_qparams_shape(hi)

    def reset(self) -> None:
        super().reset()
        self.hist, self.hist_max = torch.empty(0, self.bins, dtype=torch.float64), torch.empty(0)
