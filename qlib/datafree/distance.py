"""How close is a calibration set to the real data? Distances between distributions.

Synthetic calibration data (noise, ZeroQ images, generator samples) works as well as real
data only where the *model* cannot tell the difference. Four yardsticks:

- **MMD** (maximum mean discrepancy, Gretton et al., JMLR 2012) between two samples
  ``x_1..x_n ~ P`` and ``y_1..y_m ~ Q``, with a Gaussian kernel
  ``k(a, b) = exp(-||a - b||^2 / (2 h^2))``::

      MMD^2 = E k(x, x') + E k(y, y') - 2 E k(x, y)

  It is 0 iff ``P = Q`` (the Gaussian kernel is characteristic). The unbiased estimator
  drops the ``i = j`` terms, so it scatters around 0 for two samples of one distribution
  (it can be slightly negative). The bandwidth ``h`` defaults to the median distance.
- **KL between softmax outputs**: ``KL(softmax(a) || softmax(b))`` per input, averaged;
  e.g. fp32 vs quantized outputs on the same inputs.
- **KL between activation histograms**: both samples binned on common edges, each
  histogram smoothed with ``eps`` and normalized, ``sum p log(p / q)``.
- **BN-statistics distance**: per BatchNorm, how far the per-channel mean and std of its
  input over a whole dataset are from the model's running statistics (the quantity
  ZeroQ minimizes, see ``synthetic.py``), ``mean_c (mu~ - mu)^2 + mean_c (sigma~ - sigma)^2``.

``score_calibration_set`` gathers them into one report for a candidate calibration set.
Shapes: samples are ``(N, ...)`` and flattened to ``(N, D)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..batching import eval_mode, input_batches, model_device, model_dtype, to_device
from ..distill import check_temperature
from .synthetic import batch_moments, bn_layers, capture_bn_inputs

__all__ = ["gaussian_kernel", "median_bandwidth", "mmd", "softmax_kl", "histogram_kl",
           "bn_statistic_distance", "score_calibration_set"]


def _flat(x: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor")
    if x.dim() == 0 or x.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty sample (N, ...), got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return x.reshape(len(x), -1).to(torch.float64)


def gaussian_kernel(a: torch.Tensor, b: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """``K[i, j] = exp(-||a_i - b_j||^2 / (2 h^2))`` for ``a`` ``(n, D)``, ``b`` ``(m, D)``."""
    return torch.exp(-torch.cdist(a, b).pow(2) / (2.0 * bandwidth**2))


def median_bandwidth(x: torch.Tensor, y: torch.Tensor) -> float:
    """The median heuristic: ``h`` = median of the pairwise distances in the pooled sample."""
    z = torch.cat([x, y])
    d = torch.cdist(z, z)
    d = d[torch.triu(torch.ones_like(d, dtype=torch.bool), diagonal=1)]
    h = d.median().item() if d.numel() else 1.0
    return h if h > 0 else 1.0


def mmd(x: torch.Tensor, y: torch.Tensor, bandwidth: float | None = None,
        unbiased: bool = True) -> float:
    """``MMD^2`` between samples ``x`` ``(n, ...)`` and ``y`` ``(m, ...)`` (module docstring).

    Both are flattened to vectors of one dimension ``D``. ``bandwidth`` None: the median
    heuristic. ``unbiased=True`` needs ``n, m >= 2``. Computed in float64; returns a float.
    """
    x, y = _flat(x, "x"), _flat(y, "y")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y have different sizes per sample: {x.shape[1]} vs {y.shape[1]}")
    if bandwidth is not None and (isinstance(bandwidth, bool) or not isinstance(bandwidth, (int, float))):
        raise TypeError(f"bandwidth must be a number > 0 or None, got {bandwidth!r}")
    y = y.to(x.device)
    h = median_bandwidth(x, y) if bandwidth is None else float(bandwidth)
    if not (h > 0 and h < float("inf")):
        raise ValueError(f"bandwidth must be a finite number > 0, got {bandwidth}")
    kxx, kyy, kxy = gaussian_kernel(x, x, h), gaussian_kernel(y, y, h), gaussian_kernel(x, y, h)
    n, m = len(x), len(y)
    if unbiased:
        if n < 2 or m < 2:
            raise ValueError("the unbiased MMD needs at least 2 samples on each side")
        exx = (kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
        eyy = (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
    else:
        exx, eyy = kxx.mean(), kyy.mean()
    return (exx + eyy - 2.0 * kxy.mean()).item()


def softmax_kl(logits_p: torch.Tensor, logits_q: torch.Tensor, temperature: float = 1.0) -> float:
    """Mean over inputs of ``KL(softmax(p/T) || softmax(q/T))``; logits ``(N, classes)``."""
    t = check_temperature(temperature)  # T = 0 would divide by zero: NaN
    p, q = _flat(logits_p, "logits_p"), _flat(logits_q, "logits_q")
    if p.shape != q.shape:
        raise ValueError(f"logits differ in shape: {tuple(p.shape)} vs {tuple(q.shape)}")
    q = q.to(p.device)
    log_p, log_q = F.log_softmax(p / t, 1), F.log_softmax(q / t, 1)
    return (log_p.exp() * (log_p - log_q)).sum(1).mean().item()


def histogram_kl(a: torch.Tensor, b: torch.Tensor, bins: int = 64, eps: float = 1e-6) -> float:
    """``KL(P_a || P_b)`` of the histograms of two activation samples (any shapes).

    Common edges span ``[min, max]`` of both samples; ``eps`` is added to every bin
    before normalizing so that empty bins of ``b`` give a large but finite value.
    """
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
        raise ValueError(f"bins must be a positive int, got {bins!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 <= eps < float("inf"):
        raise ValueError(f"eps must be a finite number >= 0 (> 0 keeps empty bins finite), got {eps!r}")
    a, b = _flat(a, "a").flatten(), _flat(b, "b").flatten().to(a.device)
    lo, hi = min(a.min(), b.min()).item(), max(a.max(), b.max()).item()
    if hi <= lo:
        return 0.0
    return _kl(torch.histc(a, bins, lo, hi), torch.histc(b, bins, lo, hi), eps)


def _kl(p: torch.Tensor, q: torch.Tensor, eps: float) -> float:
    """KL of two histograms (counts), each smoothed with ``eps`` and normalized."""
    p, q = p + eps, q + eps
    p, q = p / p.sum(), q / q.sum()
    return (p * (p / q).log()).sum().item()


def _batches(data) -> list[torch.Tensor]:
    """The non-empty input batches of ``data`` (any ``qlib.batching`` form), checked finite."""
    out = list(input_batches(data, finite=True))
    if not out:
        raise ValueError("the data is empty: give at least one batch of inputs")
    for b in out:
        _flat(b, "batch")
    return out


@torch.no_grad()
def bn_statistic_distance(model: nn.Module, data) -> dict[str, float]:
    """Per BatchNorm: ``mean_c (mu~ - mu)^2 + mean_c (sigma~ - sigma)^2``, with ``mu~`` and
    ``sigma~`` the per-channel mean and std of that BN's input over *all* of ``data``.

    ``data``: a tensor, a list of batches (tensors or ``(x, y)``) or a TensorDataset, fed on
    the model's device and dtype. The model runs in eval mode (running statistics
    unchanged; every submodule's mode restored, also on an error). Returns ``{bn_name: distance}``
    plus ``"total"`` (their sum). Raises ValueError for a model without BatchNorm.
    """
    bns = bn_layers(model)
    sums: dict[str, list] = {}
    device, dtype = model_device(model), model_dtype(model, default=None)
    with capture_bn_inputs(model) as seen, eval_mode(model):
        for x in _batches(data):
            seen.clear()
            model(to_device(x, device, dtype))
            for name, act in seen.items():
                n = act.numel() // act.shape[1]
                mean, var = batch_moments(act.double())
                s = sums.setdefault(name, [0, 0.0, 0.0])
                s[0] += n
                s[1] = s[1] + mean[0] * n                      # sum of x per channel
                s[2] = s[2] + (var[0] + mean[0] ** 2) * n      # sum of x^2 per channel
    out = {}
    for name, bn in bns.items():
        if name not in sums:
            continue
        n, sx, sxx = sums[name]
        mean = sx / n
        std = torch.sqrt((sxx / n - mean**2).clamp_min(0) + bn.eps)
        target = torch.sqrt(bn.running_var.double() + bn.eps)
        out[name] = (((mean - bn.running_mean.double()) ** 2).mean() + ((std - target) ** 2).mean()).item()
    out["total"] = sum(out.values())
    return out


@torch.no_grad()
def score_calibration_set(model: nn.Module, candidate, reference=None, max_samples: int = 512) -> dict[str, float]:
    """A report card for a calibration set ``candidate`` (batches or a tensor).

    Always: ``bn_distance`` (total of :func:`bn_statistic_distance`; NaN for a model
    without BatchNorm), ``confidence`` (mean max-softmax of the model) and ``class_entropy``
    (entropy in nats of the predicted-class histogram; ``log(classes)`` = balanced).
    ``kl_classes`` is ``KL(reference classes || candidate classes)``.
    With a ``reference`` sample (e.g. real images): ``mmd_inputs`` between the images,
    ``mmd_outputs`` between the logits and ``kl_classes`` between the predicted-class
    histograms, on at most ``max_samples`` inputs of each.
    """
    if isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1:
        raise ValueError(f"max_samples must be an int >= 1, got {max_samples!r}")
    with eval_mode(model):
        return _report(model, candidate, reference, max_samples)


def _report(model: nn.Module, candidate, reference, max_samples: int) -> dict[str, float]:
    device, dtype = model_device(model), model_dtype(model, default=None)
    x = to_device(torch.cat(_batches(candidate))[:max_samples], device, dtype)
    logits = model(x)
    try:
        bn = bn_statistic_distance(model, x)["total"]
    except ValueError:
        bn = float("nan")
    probs = logits.softmax(1)
    hist = torch.bincount(logits.argmax(1), minlength=logits.shape[1]).double() / len(x)
    entropy = -(hist[hist > 0] * hist[hist > 0].log()).sum().item()
    report = {"bn_distance": bn, "confidence": probs.max(1).values.mean().item(), "class_entropy": entropy}
    if reference is not None:
        r = to_device(torch.cat(_batches(reference))[:max_samples], device, dtype)
        r_logits = model(r)
        r_hist = torch.bincount(r_logits.argmax(1), minlength=logits.shape[1]).double() / len(r)
        report["mmd_inputs"] = mmd(x, r)
        report["mmd_outputs"] = mmd(logits, r_logits)
        report["kl_classes"] = _kl(r_hist, hist, 1e-6)
    return report
