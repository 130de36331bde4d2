"""AWQ: activation-aware weight quantization, a per-input-channel scale found by grid search.

Lin et al. (2023), "AWQ: Activation-aware Weight Quantization for LLM Compression and
Acceleration". Not all weights matter equally: the input channels with large activations
``|X_j|`` multiply their weight column into every output, so their rounding error counts
most. AWQ protects them by scaling before rounding (the same identity as SmoothQuant)::

    Y = X W^T = (X diag(s)^-1) (W diag(s))^T   ~   X diag(s)^-1 Q(W diag(s))^T

A column scaled up by ``s_j > 1`` is rounded with a relatively smaller error (the group's
scale grows less than the column when other columns set the range). The scale comes from the
mean activation magnitude with one exponent ``alpha``, searched on calibration data::

    s = mean_t |X[t, :]| ** alpha,   s <- s / sqrt(max(s) * min(s))      (the official code)
    alpha* = argmin over alpha in {0, 1/20, ..., 19/20} of ||X W^T - X (Q(W diag(s)) diag(s)^-1)^T||^2

``alpha = 0`` is plain round-to-nearest, so AWQ never does worse than RTN on the calibration
data. ``Q`` is the group quantizer of ``weight_only`` (torchao's convention). In deployment
``diag(s)^-1`` is folded into the previous operator; here each layer keeps its own ``s`` and
the result is stored as the effective weight ``Q(W diag(s)) diag(s)^-1`` (the same product).
The paper also searches a weight clipping range; this module does the scale search only.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .layers import FakeQuantWeightLinear, capture_inputs, linear_layers
from .weight_only import fake_quantize_groups

N_GRID = 20


def awq_scales(act_mean: torch.Tensor, alpha: float) -> torch.Tensor:
    """``s = act_mean**alpha`` (clamped to ``>= 1e-4``) normalised by ``sqrt(max(s) * min(s))``."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    s = act_mean.pow(alpha).clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


def scaled_weight(weight: torch.Tensor, s: torch.Tensor, bits: int, group_size: int | None,
                  symmetric: bool) -> torch.Tensor:
    """The effective weight ``Q(W diag(s)) diag(s)^-1`` (shape of ``weight``)."""
    return fake_quantize_groups(weight * s, bits, group_size, symmetric) / s


def awq_search(weight: torch.Tensor, x: torch.Tensor, bits: int = 4, group_size: int | None = 128,
               symmetric: bool = False, n_grid: int = N_GRID) -> tuple[torch.Tensor, float, list[float]]:
    """``(weight_dq, alpha*, losses)``: the grid search for one layer.

    ``weight``: ``(out, in)``; ``x``: calibration inputs ``(n, in)``. ``losses[k]`` is the output
    MSE at ``alpha = k / n_grid``.
    """
    if x.dim() != 2 or x.shape[1] != weight.shape[1] or x.shape[0] == 0:
        raise ValueError(f"x must be (n, {weight.shape[1]}) calibration inputs, got {tuple(x.shape)}")
    if not isinstance(n_grid, int) or n_grid < 1:
        raise ValueError(f"n_grid must be a positive int, got {n_grid!r}")
    w = weight.detach()
    x = x.to(w.dtype)
    act_mean = x.abs().mean(dim=0)
    ref = x @ w.T
    best, losses = None, []
    for k in range(n_grid):
        alpha = k / n_grid
        w_dq = scaled_weight(w, awq_scales(act_mean, alpha), bits, group_size, symmetric)
        losses.append(float(((x @ w_dq.T - ref) ** 2).mean()))
        if best is None or losses[-1] < best[0]:
            best = (losses[-1], alpha, w_dq)
    return best[2], best[1], losses


@torch.no_grad()
def quantize_model(model: nn.Module, tokens: torch.Tensor, bits: int = 4, group_size: int | None = 128,
                   symmetric: bool = False, n_grid: int = N_GRID) -> nn.Module:
    """AWQ every block linear (inputs from the float model on ``tokens``)."""
    new = copy.deepcopy(model)
    acts = capture_inputs(model, tokens)
    for name in linear_layers(new):
        layer = new.get_submodule(name)
        w_dq, alpha, _ = awq_search(layer.weight, acts[name], bits, group_size, symmetric, n_grid)
        info = {"bits": bits, "group_size": group_size, "symmetric": symmetric, "alpha": alpha}
        parent, _, attr = name.rpartition(".")
        setattr(new.get_submodule(parent), attr, FakeQuantWeightLinear(w_dq, layer.bias, info))
    return new
