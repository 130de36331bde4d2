"""The straight-through estimator (STE), and the weight quantizer STE training uses.

``round`` has zero gradient almost everywhere, so QAT's backward pass uses the STE::

    forward   y = fake_quantize(x) = (clamp(round(x/s) + z, qmin, qmax) - z) * s   (a staircase)
    backward  dy/dx = 1 where qmin <= round(x/s) + z <= qmax, else 0               (a mask)

``ste_staircase`` returns both faces, for plotting.

Weights move at every optimizer step, so a frozen weight scale would soon be wrong, and
searching it again at every step (MSE) would be slow and make the grid jump.
``TrackingWeightFakeQuantize`` lets the observer (min-max, MSE, ...) choose the scale once,
keeps it as a *clip ratio* of the plain min-max scale (per channel; MSE clips: ratio < 1),
and at every forward uses ``ratio * minmax_scale(current weight)``.
"""

from __future__ import annotations

import torch
from torch import nn

from ..modules import FakeQuantize
from ..qparams import check_tensor, minmax_qparams
from ..quantize import fake_quantize

__all__ = ["ste_staircase", "TrackingWeightFakeQuantize"]


def ste_staircase(x: torch.Tensor, scale, zero_point, quant_min: int, quant_max: int):
    """The STE's two faces on a 1-D grid ``x``: ``(y, grad_mask)``.

    ``y = fake_quantize(x)`` (the forward staircase, float32) and ``grad_mask`` (bool,
    ``x.shape``): where the straight-through gradient ``dy/dx`` is 1 rather than 0. Both
    come from ``qlib.quantize.fake_quantize`` and autograd, not from a formula written here.
    """
    check_tensor(x)
    x = x.detach().to(torch.float32).clone().requires_grad_(True)
    y = fake_quantize(x, scale, zero_point, quant_min, quant_max)
    (grad,) = torch.autograd.grad(y.sum(), x)
    return y.detach(), grad != 0


class TrackingWeightFakeQuantize(FakeQuantize):
    """STE weights in QAT: qparams follow the weights as they train (module docstring).

    ``refresh(weight)`` runs the observer on ``weight`` and stores ``clip_ratio`` (a buffer:
    ``()`` per tensor, ``(C_out,)`` per channel, float32) ``= observer scale / min-max scale``.
    ``forward(w)`` fake-quantizes ``w`` with ``clip_ratio * minmax_scale(w)``.
    """

    def __init__(self, observer: nn.Module):
        super().__init__(observer, dynamic=True)
        self.register_buffer("clip_ratio", torch.ones(()))

    def minmax_qparams(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The plain min-max ``(scale, zero_point)`` of ``w`` with this quantizer's range
        (``qlib.qparams.minmax_qparams``)."""
        return minmax_qparams(w.detach(), self.quant_min, self.quant_max, self.observer.symmetric,
                              self.granularity)

    @torch.no_grad()
    def refresh(self, weight: torch.Tensor) -> None:
        """Let the observer choose the scale of ``weight`` now; keep it as a clip ratio."""
        check_tensor(weight, "weight")
        self.observer.reset()
        self.observer(weight.detach())
        self.clip_ratio = self.observer.calculate_qparams()[0] / self.minmax_qparams(weight)[0]
        self.observed_batches += 1

    def batch_qparams(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scale, zero_point = self.minmax_qparams(w)
        return scale * self.clip_ratio.to(scale.dtype), zero_point
