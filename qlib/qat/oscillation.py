"""Weight oscillations in QAT and the two remedies of Nagel et al. 2022.

With the straight-through estimator a latent weight whose best value lies between two grid
levels is pushed up on the lower level and down on the upper one: it crosses the rounding
threshold back and forth, and its quantized value **oscillates** between two levels ("Overcoming
Oscillations in Quantization-Aware Training", Nagel et al., ICML 2022). A learning rate that
decays to zero does not settle them: it *freezes* each oscillating weight on whichever side of
the threshold it happens to be at the end, effectively at random, and the batch-norm statistics
measured during the oscillation no longer match. The paper's two remedies:

- **oscillation dampening**: a regularizer pulling each latent weight towards the centre of its
  current bin, ``lambda * sum (w - q(w))^2`` with ``q(w)`` (the fake-quantized weight)
  detached (eq. 8; ``dampening_loss``). qlib measures the distance in steps (divided by the
  scale) and averages per layer, so one ``lambda`` fits every layer and bit width.
- **iterative freezing**: count, for every weight, how often its integer code changes direction
  (an exponential moving average ``f = m * o_t + (1 - m) * f``, where ``o_t = 1`` when the code
  moved opposite to its previous move); once ``f`` exceeds a threshold the weight is frozen at the
  rounded moving average of its codes (its usual level) and no longer trained (``OscillationFreezer``).
  qlib freezes the latent weight at that level's *value* at the time of freezing (clipped to
  its channel's current range), not at the integer code: qlib's STE weight grid follows the
  min-max of the weights, and a weight pinned to the outermost code (``-8 s`` where the grid
  reaches only ``-7.5 s``) would widen the grid at every step, which widens it again.

``OscillationFreezer`` works through hooks, without touching the training loop: a forward
pre-hook on every QAT layer updates the statistics once per training forward (one step), and
re-applies the frozen values; a gradient hook zeroes the gradient of frozen weights.
"""

from __future__ import annotations

import torch
from torch import nn

from ..quantize import quantize
from .convert import qparams_now
from .prepare import qat_layers

__all__ = ["weight_codes", "dampening_loss", "OscillationFreezer"]


def _grid(layer: nn.Module):
    fq = layer.weight_fq
    qparams = qparams_now(fq, layer)
    if qparams is None:
        return None
    scale, zero_point = qparams
    axis = getattr(fq, "axis", None)
    if axis is None and scale.numel() > 1:
        axis = 0
    shape = [-1] + [1] * (layer.weight.dim() - 1) if scale.numel() > 1 else []
    return scale.to(layer.weight.device), zero_point.to(layer.weight.device), axis, shape, fq.quant_min, fq.quant_max


def weight_codes(layer: nn.Module) -> torch.Tensor | None:
    """The integer codes (int64) of ``layer``'s weight on its current grid; None before calibration."""
    grid = _grid(layer)
    if grid is None:
        return None
    scale, zero_point, axis, _, qmin, qmax = grid
    return quantize(layer.weight.detach(), scale, zero_point, qmin, qmax, axis=axis).to(torch.int64)


def dampening_loss(model: nn.Module) -> torch.Tensor:
    """Nagel et al.'s dampening term: mean over layers of ``mean(((w - q(w)) / s)^2)``, ``q(w)`` detached.

    ``w`` is first clipped to the grid's range (eq. 8's ``clip(w, s n, s p)``), so clipped
    weights are not pulled. Differentiable in ``w``; 0 when every weight sits on a level.
    """
    terms = []
    for layer in qat_layers(model).values():
        grid = _grid(layer)
        if grid is None:
            continue
        scale, zero_point, axis, shape, qmin, qmax = grid
        s = scale.reshape(shape) if shape else scale
        z = zero_point.reshape(shape) if shape else zero_point
        w = layer.weight
        w_clip = torch.maximum(torch.minimum(w, (qmax - z) * s), (qmin - z) * s)
        codes = quantize(w.detach(), scale, zero_point, qmin, qmax, axis=axis)
        centre = (codes.to(w.dtype) - z) * s
        terms.append((((w_clip - centre) / s) ** 2).mean())
    if not terms:
        raise ValueError("no calibrated fake-quant layers: prepare and calibrate the model first")
    return torch.stack(terms).mean()


class OscillationFreezer:
    """Iterative freezing of oscillating weights (Nagel et al. 2022, sec. 4.2), attached by hooks.

    ``threshold``: the oscillation frequency (moving average of direction changes per step)
    above which a weight is frozen; ``momentum``: the averaging constant ``m``. Use it as::

        freezer = OscillationFreezer(qmodel, threshold=0.02)
        ... train ...
        freezer.frozen_fraction(); freezer.remove()

    Per layer it keeps, as tensors of the weight's shape: the last codes, the direction of the
    last change, the frequency ``f``, the moving average of the codes, and the frozen mask.
    """

    def __init__(self, model: nn.Module, threshold: float = 0.02, momentum: float = 0.01):
        for name, v in (("threshold", threshold), ("momentum", momentum)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1:
                raise ValueError(f"{name} must be a number in (0, 1], got {v!r}")
        self.threshold, self.momentum = float(threshold), float(momentum)
        self.layers = qat_layers(model)
        if not self.layers:
            raise ValueError("no fake-quant layers: prepare the model with prepare_qat first")
        self.state: dict[str, dict] = {}
        self.handles = []
        for name, layer in self.layers.items():
            self.handles.append(layer.register_forward_pre_hook(self._hook(name)))
            self.handles.append(layer.weight.register_hook(self._grad_hook(name)))

    def _grad_hook(self, name):
        def hook(grad):
            st = self.state.get(name)
            return grad if st is None else grad.masked_fill(st["frozen"], 0)
        return hook

    def _hook(self, name):
        def hook(layer, args):
            if not layer.training:
                return None
            self.update(name, layer)
            return None
        return hook

    @torch.no_grad()
    def update(self, name: str, layer: nn.Module) -> None:
        """One step: re-apply the frozen values, update the statistics, freeze new oscillators."""
        st = self.state.get(name)
        if st is not None and st["frozen"].any():
            self._apply_frozen(layer, st)
        codes = weight_codes(layer)
        if codes is None:
            return
        if st is None or st["codes"].shape != codes.shape:
            zeros = torch.zeros_like(codes, dtype=torch.float32)
            self.state[name] = {"codes": codes, "direction": torch.zeros_like(codes), "freq": zeros,
                                "ema_codes": codes.to(torch.float32), "frozen": torch.zeros_like(codes, dtype=torch.bool),
                                "frozen_values": torch.zeros_like(layer.weight.detach())}
            return
        m = self.momentum
        delta = torch.sign(codes - st["codes"])
        oscillated = (delta != 0) & (st["direction"] != 0) & (delta != st["direction"])
        st["freq"].mul_(1 - m).add_(oscillated.to(torch.float32), alpha=m)
        st["ema_codes"].mul_(1 - m).add_(codes.to(torch.float32), alpha=m)
        st["direction"] = torch.where(delta != 0, delta, st["direction"])
        st["codes"] = codes
        new = (st["freq"] > self.threshold) & ~st["frozen"]
        if new.any():
            scale, zero_point, _, shape, qmin, qmax = _grid(layer)
            s = scale.reshape(shape) if shape else scale
            z = zero_point.reshape(shape) if shape else zero_point
            w = layer.weight.detach()
            rows = w.reshape(w.shape[0], -1)
            lo = rows.amin(1).reshape([-1] + [1] * (w.dim() - 1))
            hi = rows.amax(1).reshape([-1] + [1] * (w.dim() - 1))
            level = (torch.round(st["ema_codes"]).clamp(qmin, qmax) - z).to(w.dtype) * s
            value = torch.maximum(torch.minimum(level, hi), lo)  # inside the channel's range
            st["frozen_values"] = torch.where(new, value, st["frozen_values"])
            st["frozen"] |= new
            self._apply_frozen(layer, st)

    @staticmethod
    def _apply_frozen(layer: nn.Module, st: dict) -> None:
        layer.weight.data = torch.where(st["frozen"], st["frozen_values"], layer.weight.data)

    def frozen_fraction(self) -> float:
        """Share of the weights of all QAT layers that are frozen."""
        frozen = sum(int(st["frozen"].sum()) for st in self.state.values())
        total = sum(layer.weight.numel() for layer in self.layers.values())
        return frozen / total if total else 0.0

    def oscillating_fraction(self) -> float:
        """Share of the weights whose oscillation frequency is above the threshold now (frozen ones included)."""
        above = sum(int((st["freq"] > self.threshold).sum()) for st in self.state.values())
        total = sum(layer.weight.numel() for layer in self.layers.values())
        return above / total if total else 0.0

    def remove(self) -> None:
        """Detach the hooks (the frozen weights keep their values)."""
        for h in self.handles:
            h.remove()
        self.handles = []
