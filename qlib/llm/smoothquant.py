"""SmoothQuant: move the activation outliers into the weights, then quantize both to int8.

Xiao et al. (2023), "SmoothQuant: Accurate and Efficient Post-Training Quantization for Large
Language Models". For any positive per-input-channel vector ``s`` (shape ``(in,)``)::

    Y = X W^T = (X diag(s)^-1) (W diag(s))^T

so dividing column ``j`` of ``X`` by ``s_j`` and multiplying column ``j`` of ``W`` by ``s_j``
changes nothing in float. Activations are hard to quantize (a few channels are large) and
weights are easy (flat), so SmoothQuant picks ``s`` to share the difficulty, with a migration
strength ``alpha`` in ``[0, 1]``::

    s_j = max_t |X[t, j]| ** alpha / max_o |W[o, j]| ** (1 - alpha)

(``alpha = 0.5`` in the paper for most models; ``alpha = 0`` leaves outliers in ``X``,
``alpha = 1`` moves them all into ``W``). ``max|X_j|`` comes from calibration data.

The division by ``s`` costs nothing at run time when it is *folded* into the LayerNorm that
produces ``X``: ``LN(x) / s`` is a LayerNorm with weight ``gamma / s`` and bias ``beta / s``.
As in the paper (OPT, BLOOM), we smooth the two places where a LayerNorm feeds projections:
``ln1 -> q, k, v`` (one ``s`` for the three, with ``max|W_j|`` over all three) and
``ln2 -> fc1``. ``proj`` and ``fc2`` are quantized unsmoothed. Then every block linear becomes
W8A8 (``w8a8.quantize_model``).

The paper's efficiency levels (its Table 3) differ only in the activation scale; weights are
per-tensor in all three (``LEVELS``, ``quantize_model(..., level="O3")``):

- ``O1``: per-token *dynamic* activation scales (computed at run time for every token);
- ``O2``: per-tensor dynamic (one scale per call, still a reduction over ``X`` at run time);
- ``O3``: per-tensor *static* (``w8a8.static_scale``: fixed from calibration, fastest; an
  input beyond the calibrated range is clipped). Its scales are calibrated on the *smoothed*
  model, i.e. on ``X / s``, as the official code does.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from . import w8a8
from .layers import capture_inputs
from .stats import channel_absmax


def smoothing_scales(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float = 0.5,
                     eps: float = 1e-5) -> torch.Tensor:
    """``s_j = act_absmax_j**alpha / weight_absmax_j**(1 - alpha)``, both clamped to ``>= eps``.

    ``act_absmax``: ``max_t |X[t, j]|``; ``weight_absmax``: ``max_o |W[o, j]|`` (shape ``(in,)``).
    Returns ``s`` of shape ``(in,)``, clamped to ``>= eps`` (the official code's clamps).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if act_absmax.shape != weight_absmax.shape or act_absmax.dim() != 1:
        raise ValueError(f"act_absmax and weight_absmax must be vectors of one shape, got "
                         f"{tuple(act_absmax.shape)} and {tuple(weight_absmax.shape)}")
    a = act_absmax.clamp(min=eps)
    w = weight_absmax.clamp(min=eps)
    return (a.pow(alpha) / w.pow(1.0 - alpha)).clamp(min=eps)


@torch.no_grad()
def smooth_ln_linears(ln: nn.LayerNorm, linears: list[nn.Linear], act_absmax: torch.Tensor,
                      alpha: float = 0.5) -> torch.Tensor:
    """Fold the smoothing into ``ln`` and ``linears`` (in place); returns ``s``."""
    weight_absmax = torch.stack([fc.weight.abs().amax(dim=0) for fc in linears]).amax(dim=0)
    s = smoothing_scales(act_absmax.to(weight_absmax), weight_absmax, alpha)
    ln.weight.div_(s)
    ln.bias.div_(s)
    for fc in linears:
        fc.weight.mul_(s)
    return s


def act_scales(model: nn.Module, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{layer name: max_t |X[t, j]|}`` of every block linear's input on ``tokens``."""
    return {n: channel_absmax(x) for n, x in capture_inputs(model, tokens).items()}


def smooth_model(model: nn.Module, scales: dict[str, torch.Tensor], alpha: float = 0.5) -> nn.Module:
    """A float copy of ``model`` with ``ln1 -> q,k,v`` and ``ln2 -> fc1`` smoothed.

    ``scales``: from ``act_scales`` (``blocks.i.attn.q`` and ``blocks.i.fc1`` are read).
    The copy computes the same function as ``model`` up to float rounding.
    """
    new = copy.deepcopy(model)
    for i, block in enumerate(new.blocks):
        a = block.attn
        smooth_ln_linears(block.ln1, [a.q, a.k, a.v], scales[f"blocks.{i}.attn.q"], alpha)
        smooth_ln_linears(block.ln2, [block.fc1], scales[f"blocks.{i}.fc1"], alpha)
    return new


LEVELS = {"O1": ("token", "tensor"), "O2": ("tensor", "tensor"), "O3": ("static", "tensor")}


def quantize_model(model: nn.Module, tokens: torch.Tensor, alpha: float = 0.5,
                   act: str = "tensor", weight: str = "channel", level: str | None = None) -> nn.Module:
    """SmoothQuant W8A8: calibrate ``max|X|`` on ``tokens``, smooth, then ``w8a8.quantize_model``.

    ``act``/``weight``: the W8A8 granularities (``act="static"`` calibrates the smoothed model's
    activation scales on the same ``tokens``). ``level`` (``"O1"``, ``"O2"``, ``"O3"``) sets both
    as in the paper (``LEVELS``) and overrides them.
    """
    if level is not None:
        if level not in LEVELS:
            raise ValueError(f"level must be one of {list(LEVELS)}, got {level!r}")
        act, weight = LEVELS[level]
    smoothed = smooth_model(model, act_scales(model, tokens), alpha)
    return w8a8.quantize_model(smoothed, act, weight, tokens if act == "static" else None)
