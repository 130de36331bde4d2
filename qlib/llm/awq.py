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

**Clipping** (``clip_search``, on by default as in the paper's code, ``auto_clip`` after
``auto_scale`` in mit-han-lab/llm-awq ``awq/quantize/auto_clip.py``). Min-max groups spend
their 16 levels on the group's largest weight; shrinking the range rounds the other weights
more finely at the price of clipping the largest. After the scale search, for every output
channel ``o`` and group ``g`` of the scaled weight ``W' = W diag(s)`` (inputs ``X' = X / s``)::

    m = max_{j in g} |W'[o, j]|,   W'_r = clamp(W'[o, g], -r m, r m)
    r*[o, g] = argmin over r of mean_t ( X'[t, g] . Q(W'_r) - X'[t, g] . W'[o, g] )^2

with ``r`` on the code's grid ``1 - k / 20`` for ``k = 0 .. 9`` (``n_grid = 20``,
``max_shrink = 0.5``: ten ratios from 1.0 down to 0.55; ``r = 1`` is no clipping, and ties keep
the larger ratio). The error is the group's *partial* output (its share of the dot product),
measured on at most 512 calibration tokens (every ``n // 512``-th, as the code does). Because
each group is quantized on its own, the per-group choices add up: the layer's output error with
clipping is never above the error without it (on those tokens). As in the code, ``q`` and ``k``
are not clipped (their outputs meet in the attention scores, which a layer-local error ignores).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .layers import FakeQuantWeightLinear, capture_inputs, linear_layers
from .weight_only import fake_quantize_groups, group_width

N_GRID = 20
CLIP_GRID, MAX_SHRINK, CLIP_TOKENS = 20, 0.5, 512
NO_CLIP = ("attn.q", "attn.k")


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


def clip_ratios(n_grid: int = CLIP_GRID, max_shrink: float = MAX_SHRINK) -> list[float]:
    """The clipping grid ``[1 - k / n_grid for k < int(max_shrink * n_grid)]`` (1.0 ... 0.55)."""
    if not isinstance(n_grid, int) or n_grid < 1 or not 0.0 < max_shrink <= 1.0:
        raise ValueError(f"need an int n_grid >= 1 and max_shrink in (0, 1], got {n_grid!r}, {max_shrink!r}")
    return [1.0 - k / n_grid for k in range(max(1, int(max_shrink * n_grid)))]


def _group_outputs(w: torch.Tensor, x: torch.Tensor, g: int) -> torch.Tensor:
    """Partial outputs per group: ``(tokens, out, groups)``, ``sum_{j in g} x[t, j] w[o, j]``."""
    return torch.einsum("tgk,ogk->tog", x.reshape(x.shape[0], -1, g), w.reshape(w.shape[0], -1, g))


@torch.no_grad()
def clip_search(weight: torch.Tensor, x: torch.Tensor, bits: int = 4, group_size: int | None = 128,
                symmetric: bool = False, ratios: list[float] | None = None,
                n_tokens: int | None = CLIP_TOKENS) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(weight_clipped, ratio, errors)``: AWQ's per-group clipping search for one layer.

    ``weight``: ``(out, in)`` (already scaled by AWQ's ``s``); ``x``: calibration inputs
    ``(n, in)`` (already divided by ``s``). ``ratio``: ``(out, in // group_size)``, the chosen
    ``r`` per group; ``errors``: ``(len(ratios), out, in // group_size)``, the mean squared
    partial-output error of every ratio. ``weight_clipped`` is the float weight clamped to
    ``[-r m, r m]`` per group, ready for ``fake_quantize_groups`` (same dtype and device).
    ``n_tokens``: use every ``n // n_tokens``-th token (``None``: all).
    """
    g = group_width(weight, group_size)
    if x.dim() != 2 or x.shape[1] != weight.shape[1] or x.shape[0] == 0:
        raise ValueError(f"x must be (n, {weight.shape[1]}) calibration inputs, got {tuple(x.shape)}")
    ratios = clip_ratios() if ratios is None else list(ratios)
    if not ratios or not all(0.0 < r <= 1.0 for r in ratios):
        raise ValueError(f"ratios must be a non-empty list in (0, 1], got {ratios!r}")
    w = weight.detach()
    x = x.to(w.dtype)
    if n_tokens is not None and x.shape[0] > n_tokens:
        x = x[::x.shape[0] // n_tokens]
    absmax = w.abs().reshape(w.shape[0], -1, g).amax(dim=-1, keepdim=True)       # (out, groups, 1)
    ref = _group_outputs(w, x, g)
    errors = []
    for r in ratios:
        m = (absmax * r).expand(-1, -1, g).reshape(w.shape)
        w_q = fake_quantize_groups(torch.clamp(w, -m, m), bits, g, symmetric)
        errors.append(((_group_outputs(w_q, x, g) - ref) ** 2).mean(dim=0))
    errors = torch.stack(errors)                                                 # (ratios, out, groups)
    best = errors.argmin(dim=0)                                  # first minimum: ties keep the larger r
    ratio = torch.as_tensor(ratios, dtype=w.dtype, device=w.device)[best]
    m = (absmax.squeeze(-1) * ratio).repeat_interleave(g, dim=1)
    return torch.clamp(w, -m, m), ratio, errors


def awq_layer(weight: torch.Tensor, x: torch.Tensor, bits: int = 4, group_size: int | None = 128,
              symmetric: bool = False, n_grid: int = N_GRID, clip: bool = True) -> dict:
    """AWQ for one layer: the scale search, then (``clip=True``) the clipping search.

    Returns ``{"weight_dq", "alpha", "losses", "ratio", "mse"}``: the effective weight
    ``Q(clip(W diag(s))) diag(s)^-1`` (shape of ``weight``), the chosen alpha, the alpha grid's
    losses, the clipping ratio per group (``None`` without clipping) and the final output MSE
    on ``x`` (``mse <= min(losses)`` up to float rounding when clipping).
    """
    w_dq, alpha, losses = awq_search(weight, x, bits, group_size, symmetric, n_grid)
    ratio = None
    if clip:
        w = weight.detach()
        xf = x.to(w.dtype)
        s = awq_scales(xf.abs().mean(dim=0), alpha)
        w_clip, ratio, _ = clip_search(w * s, xf / s, bits, group_size, symmetric)
        w_dq = fake_quantize_groups(w_clip, bits, group_size, symmetric) / s
    xf = x.to(w_dq.dtype)
    mse = float(((xf @ w_dq.T - xf @ weight.detach().T) ** 2).mean())
    return {"weight_dq": w_dq, "alpha": alpha, "losses": losses, "ratio": ratio, "mse": mse}


@torch.no_grad()
def quantize_model(model: nn.Module, tokens: torch.Tensor, bits: int = 4, group_size: int | None = 128,
                   symmetric: bool = False, n_grid: int = N_GRID, clip: bool = True) -> nn.Module:
    """AWQ every block linear (inputs from the float model on ``tokens``).

    ``clip=True`` (the paper's default) adds the clipping search to every layer except the
    ``q`` and ``k`` projections (``NO_CLIP``); ``qinfo`` records ``alpha`` and the mean ratio.
    """
    new = copy.deepcopy(model)
    acts = capture_inputs(model, tokens)
    for name in linear_layers(new):
        layer = new.get_submodule(name)
        do_clip = clip and not name.endswith(NO_CLIP)
        r = awq_layer(layer.weight, acts[name], bits, group_size, symmetric, n_grid, do_clip)
        info = {"bits": bits, "group_size": group_size, "symmetric": symmetric, "alpha": r["alpha"],
                "clip_ratio": None if r["ratio"] is None else float(r["ratio"].mean())}
        parent, _, attr = name.rpartition(".")
        setattr(new.get_submodule(parent), attr, FakeQuantWeightLinear(r["weight_dq"], layer.bias, info))
    return new
