"""AdaRound's learned rounding: round each weight up or down, chosen by gradient descent.

Round-to-nearest treats every weight alone. Nagel et al. (ICML 2020, "Up or Down? Adaptive
Rounding for Post-Training Quantization") show that the rounding that minimises the *layer's
output* error is often not the nearest one, and learn it. With the weight grid
``(scale s, zero point z, quant_min, quant_max)`` fixed (from an observer) each weight becomes::

    w~ = s * (clamp(floor(w / s) + h(V) + z, quant_min, quant_max) - z)

with one continuous variable ``V`` per weight and the **rectified sigmoid** (paper eq. 23)::

    h(V) = clamp(sigmoid(V) * (zeta - gamma) + gamma, 0, 1),    zeta = 1.1, gamma = -0.1

``h`` stretches the sigmoid a little beyond [0, 1] and clips it, so it *reaches* 0 and 1 with
a non-vanishing gradient nearby. To push every ``h(V)`` to 0 or 1 the loss adds (eq. 24)::

    f_reg(V) = sum_i 1 - |2 h(V_i) - 1| ** beta

which is 0 at a binary ``h`` and largest at 1/2; ``beta`` is annealed from 20 (flat: only
``h`` very close to 1/2 is pushed, the reconstruction loss decides) down to 2 (a parabola: every
``h`` is pushed to the nearest end), after a warm-up without the regulariser (section 5).

``V`` starts where ``h(V)`` equals the fractional part ``w/s - floor(w/s)`` (so the soft weight
starts at the float weight, and the hard rounding at round-to-nearest, ties to even as qlib). At the end ``h`` is
replaced by the hard ``1[V >= 0]``: the weights land exactly on the integer grid.

Shapes: ``V`` has the weight's shape, on its device and in its dtype; ``scale`` / ``zero_point``
are reshaped to broadcast along the quantizer's channel axis (per-channel) or are scalars.
"""

from __future__ import annotations

import torch
from torch import nn

from ..qparams import PerChannel, PerGroup, PerTensor
from ..quantize import dequantize

__all__ = ["ZETA", "GAMMA", "rectified_sigmoid", "inverse_rectified_sigmoid", "rounding_regularizer",
           "beta_schedule", "AdaRoundQuantizer"]

ZETA, GAMMA = 1.1, -0.1


def rectified_sigmoid(v: torch.Tensor, zeta: float = ZETA, gamma: float = GAMMA) -> torch.Tensor:
    """``h(V) = clamp(sigmoid(V) * (zeta - gamma) + gamma, 0, 1)`` (AdaRound eq. 23), elementwise."""
    return torch.clamp(torch.sigmoid(v) * (zeta - gamma) + gamma, 0.0, 1.0)


def inverse_rectified_sigmoid(h: torch.Tensor, zeta: float = ZETA, gamma: float = GAMMA) -> torch.Tensor:
    """``V`` with ``h(V) = h`` for ``0 < h < 1``: ``V = -log((zeta - gamma) / (h - gamma) - 1)``.

    Used to start ``V`` at the fractional part of ``w / s``; ``h`` is clamped into the open
    interval ``(gamma, zeta)`` image first, so ``h = 0`` maps to a finite ``V`` (``h(V) = 0``).
    """
    h = h.clamp(0.0, 1.0)
    return -torch.log((zeta - gamma) / (h - gamma) - 1.0)


def rounding_regularizer(v: torch.Tensor, beta: float) -> torch.Tensor:
    """``sum(1 - |2 h(V) - 1| ** beta)`` (AdaRound eq. 24): 0 when every ``h`` is 0 or 1."""
    if not (isinstance(beta, (int, float)) and not isinstance(beta, bool) and beta > 0):
        raise ValueError(f"beta must be a positive number, got {beta!r}")
    return (1.0 - (2.0 * rectified_sigmoid(v) - 1.0).abs().pow(beta)).sum()


def beta_schedule(step: int, steps: int, warmup: float = 0.2, start: float = 20.0, end: float = 2.0) -> float | None:
    """The ``beta`` of step ``step`` (0-based) out of ``steps``: ``None`` during the warm-up
    (the first ``warmup`` fraction: no regulariser), then linear from ``start`` to ``end``."""
    if not 0 <= warmup < 1:
        raise ValueError(f"warmup must be a fraction in [0, 1), got {warmup!r}")
    first = int(warmup * steps)
    if step < first:
        return None
    rel = (step - first) / max(steps - first, 1)
    return end + (start - end) * max(0.0, 1.0 - rel)


def _broadcast(t: torch.Tensor, weight: torch.Tensor, granularity) -> torch.Tensor:
    """A per-channel qparam as a view that broadcasts against ``weight``; a scalar otherwise."""
    if isinstance(granularity, PerChannel):
        view = [1] * weight.dim()
        view[granularity.axis % weight.dim()] = -1
        return t.reshape(view)
    return t.reshape(())


class AdaRoundQuantizer(nn.Module):
    """Stands in for a layer's frozen ``weight_fq`` while its rounding is learned.

    Built from the weight and the frozen qparams of ``weight_fq`` (per-tensor or per-channel;
    per-group is refused). ``forward(w)`` ignores the value of ``w`` beyond its identity (the
    weight does not change during the optimisation) and returns the soft weight
    ``s * (clamp(floor + h(V) + z) - z)``, differentiable in ``V``; with ``hard=True`` it uses
    ``1[V >= 0]`` instead of ``h(V)``. ``hard_weight()`` gives the final on-grid weight, computed
    with ``qlib.quantize.dequantize`` (the exact arithmetic of ``fake_quantize``).
    """

    def __init__(self, weight: torch.Tensor, weight_fq: nn.Module):
        super().__init__()
        granularity = weight_fq.granularity
        if isinstance(granularity, PerGroup) or not isinstance(granularity, (PerTensor, PerChannel)):
            raise ValueError(f"AdaRound supports per-tensor and per-channel weight scales, got {granularity!r}")
        scale, zero_point = weight_fq.qparams()
        self.granularity = granularity
        self.quant_min, self.quant_max = int(weight_fq.quant_min), int(weight_fq.quant_max)
        w = weight.detach()
        self.register_buffer("scale_q", scale.detach().clone())          # as stored: (C,) or (1,)
        self.register_buffer("zero_point_q", zero_point.detach().clone())
        s = _broadcast(scale.to(w.device, torch.float32), w, granularity)
        z = _broadcast(zero_point.to(w.device, torch.float32), w, granularity)
        scaled = w.to(torch.float32) * (1.0 / s)                         # the reciprocal, as PyTorch
        floor = torch.floor(scaled)
        self.register_buffer("floor", floor)
        self.register_buffer("s", s)
        self.register_buffer("z", z)
        v = inverse_rectified_sigmoid(scaled - floor)
        # ties (frac = 1/2 exactly: a symmetric grid puts the largest |w| at -7.5 at 4 bits) go the
        # way round_half_even goes, so the hard start *is* qlib's round-to-nearest, bit for bit
        up = torch.round(scaled) > floor
        v = torch.where(up, v.clamp_min(1e-6), v.clamp_max(-1e-6))
        self.V = nn.Parameter(v.to(w.dtype))
        self.hard = False

    def h(self) -> torch.Tensor:
        """The rounding offsets in use: ``h(V)`` (soft) or ``1[V >= 0]`` (hard)."""
        return (self.V >= 0).to(self.V.dtype) if self.hard else rectified_sigmoid(self.V)

    def codes(self) -> torch.Tensor:
        """Integer codes (int64) of the hard rounding: ``clamp(floor + 1[V >= 0] + z, qmin, qmax)``."""
        up = (self.V.detach() >= 0).to(torch.float32)
        return torch.clamp(self.floor + up + self.z, self.quant_min, self.quant_max).to(torch.int64)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        q = torch.clamp(self.floor + self.h().to(torch.float32) + self.z, self.quant_min, self.quant_max)
        return ((q - self.z) * self.s).to(weight.dtype)

    def hard_weight(self) -> torch.Tensor:
        """The final weight, exactly on the grid: ``dequantize(codes, scale, zero_point)``."""
        axis = self.granularity.axis if isinstance(self.granularity, PerChannel) else None
        scale = self.scale_q.reshape(-1) if axis is not None else self.scale_q.reshape(())
        zp = self.zero_point_q.reshape(-1) if axis is not None else self.zero_point_q.reshape(())
        return dequantize(self.codes(), scale, zp, axis=axis).to(self.V.dtype)

    def binary_fraction(self, tol: float = 1e-3) -> float:
        """Share of ``h(V)`` within ``tol`` of 0 or 1 (1.0: the soft rounding is binary)."""
        h = rectified_sigmoid(self.V.detach())
        return ((h <= tol) | (h >= 1 - tol)).float().mean().item()

