"""Cross-layer equalization (CLE): balance per-channel weight ranges without changing the function.

Nagel, van Baalen, Blankevoort and Welling, ICCV 2019, "Data-Free Quantization Through
Weight Equalization and Bias Correction". ReLU is *positive homogeneous*:
``relu(s * x) = s * relu(x)`` for ``s > 0``. So for two consecutive layers
``y = W2 relu(W1 x + b1) + b2`` and any positive per-channel scales ``s`` ::

    W1' = diag(1/s) W1,   b1' = b1 / s,   W2' = W2 diag(s)      gives the same y exactly

(max-pooling, average pooling and flattening commute with the scaling too). Per-tensor
weight quantization gives every channel of a tensor the same grid, set by the largest
channel: a channel whose range is 100x smaller gets ~2 of 256 codes. CLE picks ``s`` so
that channel ``i`` has the same range in both layers::

    r1_i = max |W1[i, ...]|    (output channel i of layer 1)
    r2_i = max |W2[:, i, ...]| (input channel i of layer 2)
    s_i  = sqrt(r1_i * r2_i) / r2_i    ->   r1_i / s_i = r2_i * s_i = sqrt(r1_i * r2_i)

This maximizes the paper's "precision" ``sum_i (r1_i / R1) (r2_i / R2)`` (``R`` = range of
the whole tensor). For chains of layers, equalize each pair in turn and repeat until the
scales stop changing. BatchNorm must be folded first (``qlib.fold``): otherwise it would
undo the scaling, and the weights that get quantized are the folded ones.

**Grouped and depthwise convolutions** (MobileNet). A convolution with ``groups = g`` has
weight ``(C_out, C_in / g, kh, kw)``: output channel ``o`` of group ``j`` sees only input
channels ``j * C_in/g ... (j+1) * C_in/g - 1``, so "input channel ``i`` of layer 2" is
column ``i mod (C_in/g)`` of the rows of group ``i // (C_in/g)``. As layer 1 a grouped
conv is like any other (its output channel ``i`` is row ``i``). The *depthwise* case
(``g = C_in = C_out``: one ``kh x kw`` filter per channel, weight ``(C, 1, kh, kw)``) is the
one that matters: its input channel ``c`` **is** row ``c``, so ``r2 = channel_ranges(w, 0)``
and row ``c`` is multiplied by ``s_c``. Depthwise filters have only 9 weights per channel
and BN folding multiplies each by its own ``gamma / sigma``: their ranges spread widely,
which is why per-tensor MobileNetV2 fails at W8 (0.1% top-1 in the paper, 70.9% after CLE
and bias correction).

**ReLU6 is not positive homogeneous**: ``relu6(s x) = s relu6(x)`` only where ``x <= 6/s``
(the clip would have to move to ``6 / s_c``, per channel). DFQ therefore replaces ReLU6
by ReLU before CLE (:func:`relu6_to_relu`; the float model changes wherever an activation
exceeded 6: measure its accuracy). :func:`cross_layer_equalize` refuses a model with ReLU6
between two layers unless asked to replace it (``replace_relu6=True``).

``unbalance`` does the opposite on purpose: random positive scales ``c_i`` (an exact
fp32-equivalent model whose per-tensor quantization collapses), the patient for the lesson.
Both return the per-output-channel factor applied to every rescaled layer, so that
statistics of its outputs (``bias_correction.scale_stats``) can follow the rescaling.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from ..batching import check_seed
from ..fold import BATCHNORMS, find_layer_pairs, fold_batchnorm

__all__ = ["POSITIVE_HOMOGENEOUS", "is_depthwise", "relu6_to_relu", "channel_ranges", "input_channel_ranges",
           "equalization_scales", "find_equalization_pairs", "equalize_pair", "rescale_pair", "pair_precision",
           "cross_layer_equalize", "unbalance"]

LAYERS = (nn.Conv2d, nn.Linear)
POSITIVE_HOMOGENEOUS = (nn.ReLU, nn.LeakyReLU, nn.Identity, nn.Dropout, nn.MaxPool2d, nn.AvgPool2d,
                        nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Flatten)
"""Modules ``f`` with ``f(s * x) = s * f(x)`` for per-channel ``s > 0``: CLE may cross them."""


def is_depthwise(layer: nn.Module) -> bool:
    """A depthwise convolution: one filter per channel (``1 < groups == in == out channels``)."""
    return isinstance(layer, nn.Conv2d) and 1 < layer.groups == layer.in_channels == layer.out_channels


def relu6_to_relu(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every ``nn.ReLU6`` replaced by ``nn.ReLU`` (DFQ's step before CLE).

    Not the same function: wherever an activation exceeded 6 the copy passes it on. Measure
    the copy's float accuracy before blaming quantization for a loss.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    model = copy.deepcopy(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.ReLU6):
                setattr(parent, name, nn.ReLU(inplace=child.inplace))
    return model


def channel_ranges(weight: torch.Tensor, axis: int = 0, channels: int | None = None) -> torch.Tensor:
    """``max |w|`` per channel along ``axis`` (0: output channels, 1: input channels).

    ``channels``: for a linear layer after a ``Flatten``, its ``in_features`` hold
    ``channels`` blocks of consecutive features, one block per channel of the previous
    layer; each block counts as one channel. Returns a float tensor ``(channels,)``.
    (``axis=1`` is the input channel only for ``groups == 1``: see :func:`input_channel_ranges`.)
    """
    if not isinstance(weight, torch.Tensor) or weight.dim() < 2:
        raise ValueError("weight must be a tensor with at least 2 dims (out, in, ...)")
    w = weight.detach().abs().movedim(axis, 0)
    c = w.shape[0] if channels is None else channels
    if w.shape[0] % c:
        raise ValueError(f"{w.shape[0]} features do not split into {c} channels")
    return w.reshape(c, -1).amax(dim=1)


def _group_view(layer2: nn.Module, channels: int) -> tuple[int, int, int, int]:
    """``(g, C_out/g, channels/g, -1)``: layer 2's weight with input channel ``j * channels/g + i``
    at ``[j, :, i, :]`` (``g = groups``; for a linear layer after ``Flatten`` the last axis
    holds a channel's block of features)."""
    w, g = layer2.weight, getattr(layer2, "groups", 1)
    inputs = w.shape[1] * g
    if inputs % channels:
        raise ValueError(f"layer 2 has {inputs} inputs, not a multiple of layer 1's {channels} outputs")
    if g > 1 and inputs != channels:
        raise ValueError(f"grouped layer 2 (groups={g}) takes {inputs} channels, layer 1 gives {channels}")
    return (g, w.shape[0] // g, channels // g, -1)


def input_channel_ranges(layer2: nn.Module, channels: int | None = None) -> torch.Tensor:
    """``r2``: ``max |w|`` over everything that multiplies input channel ``i`` of ``layer2``.

    ``groups == 1``: ``channel_ranges(w, 1, channels)``. Depthwise: row ``i``
    (``channel_ranges(w, 0)``). Any ``groups``: the column of channel ``i`` within its
    group's rows. ``channels`` defaults to the layer's input channels. Returns ``(channels,)``.
    """
    g = getattr(layer2, "groups", 1)
    channels = layer2.weight.shape[1] * g if channels is None else channels
    view = _group_view(layer2, channels)
    return layer2.weight.detach().abs().reshape(view).amax(dim=(1, 3)).reshape(channels)


def equalization_scales(r1: torch.Tensor, r2: torch.Tensor) -> torch.Tensor:
    """``s = sqrt(r1 * r2) / r2`` elementwise; 1 where a channel is dead (a range is 0)."""
    if r1.shape != r2.shape:
        raise ValueError(f"ranges differ in shape: {tuple(r1.shape)} vs {tuple(r2.shape)}")
    alive = (r1 > 0) & (r2 > 0)
    s = torch.sqrt(r1 * r2) / torch.where(alive, r2, torch.ones_like(r2))
    return torch.where(alive, s, torch.ones_like(s))


def _pairs(model: nn.Module, through) -> list[tuple[str, str]]:
    exact = lambda name: type(model.get_submodule(name)) in LAYERS  # noqa: E731 (not fake-quant subclasses)
    return [(p.first, p.second) for p in find_layer_pairs(model, first=LAYERS, second=LAYERS, through=through)
            if exact(p.first) and exact(p.second)]


def find_equalization_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """``(layer1, layer2)`` names of ``Conv2d``/``Linear`` layers where layer 1's output flows
    only into layer 2, through positive-homogeneous modules only.

    The pairs are ``qlib.fold.find_layer_pairs(model, first=LAYERS, second=LAYERS,
    through=POSITIVE_HOMOGENEOUS)`` (the real data flow, traced with ``torch.fx``; an output
    with a second consumer, such as a residual branch, is never rescaled), keeping those where
    both layers are exactly ``Conv2d``/``Linear``; grouped and depthwise convolutions included
    (module docstring). ``ReLU6`` breaks a chain (not positive homogeneous). Raises
    ValueError when a BatchNorm follows a layer: fold it first.
    """
    bns = find_layer_pairs(model, first=LAYERS, second=BATCHNORMS, through=POSITIVE_HOMOGENEOUS)
    if bns:
        raise ValueError(f"BatchNorm {bns[0].second} follows a layer: fold "
                         "BatchNorm before equalizing (qlib.fold.fold_batchnorm)")
    return _pairs(model, POSITIVE_HOMOGENEOUS)


@torch.no_grad()
def equalize_pair(layer1: nn.Module, layer2: nn.Module) -> torch.Tensor:
    """Equalize two consecutive layers in place; returns the scales ``s`` ``(channels,)``.

    ``layer1``'s output channel ``i`` (weight and bias) is divided by ``s_i`` and
    ``layer2``'s input channel ``i`` multiplied by it (module docstring); ``r2`` is
    :func:`input_channel_ranges` (a depthwise layer 2: its row ``i``).
    """
    c = layer1.weight.shape[0]
    r1 = channel_ranges(layer1.weight, 0)
    r2 = input_channel_ranges(layer2, c)
    s = equalization_scales(r1, r2)
    rescale_pair(layer1, layer2, s)
    return s


@torch.no_grad()
def rescale_pair(layer1: nn.Module, layer2: nn.Module, s: torch.Tensor) -> None:
    """In place: layer 1's output channel ``i`` (weight, bias) ``/ s_i``, layer 2's input
    channel ``i`` ``* s_i``. Any ``s > 0`` keeps the function through a ReLU."""
    if not (s > 0).all():
        raise ValueError("scales must be positive (ReLU commutes only with positive scaling)")
    s = s.to(device=layer1.weight.device, dtype=layer1.weight.dtype)
    view = _group_view(layer2, len(s))
    layer1.weight.div_(s.reshape(-1, *[1] * (layer1.weight.dim() - 1)))
    if layer1.bias is not None:
        layer1.bias.div_(s)
    w2 = layer2.weight
    w2.copy_((w2.reshape(view) * s.reshape(view[0], 1, view[2], 1)).reshape(w2.shape))


def pair_precision(layer1: nn.Module, layer2: nn.Module) -> float:
    """Nagel et al.'s objective ``sum_i (r1_i / R1) (r2_i / R2)``: what CLE maximizes."""
    r1 = channel_ranges(layer1.weight, 0)
    r2 = input_channel_ranges(layer2, layer1.weight.shape[0])
    return ((r1 / r1.max()) * (r2 / r2.max())).sum().item()


def _folded_pairs(model: nn.Module, replace_relu6: bool = False):
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    if replace_relu6:
        model = relu6_to_relu(model)
    model = fold_batchnorm(model)  # an eval-mode copy; a model without BatchNorm is just copied
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        raise ValueError("the model has NaN or infinite weights (after folding BatchNorm)")
    pairs = find_equalization_pairs(model)
    blocked = [p for p in _pairs(model, POSITIVE_HOMOGENEOUS + (nn.ReLU6,)) if p not in pairs]
    if blocked:
        raise ValueError(f"ReLU6 between layers {blocked[0][0]!r} and {blocked[0][1]!r}: relu6(s*x) != s*relu6(x), "
                         "so rescaling would change the model. Replace ReLU6 by ReLU first, as DFQ does "
                         "(qlib.datafree.relu6_to_relu, or replace_relu6=True) and measure that float model")
    if not pairs:
        raise ValueError("no consecutive Conv2d/Linear layers with ReLU-like modules between them")
    return model, pairs


def cross_layer_equalize(model: nn.Module, iterations: int = 20, tol: float = 1e-4, replace_relu6: bool = False):
    """CLE on a copy of ``model``: returns ``(equalized, scales)``.

    BatchNorms are folded first (``qlib.fold.fold_batchnorm``), then every pair of
    :func:`find_equalization_pairs` (plain, grouped and depthwise layers) is equalized, in
    order, up to ``iterations`` sweeps or until every ``|s_i - 1| < tol``. ``scales`` maps
    each rescaled layer to the total factor ``(C_out,)`` its outputs were multiplied by (the
    product of ``1 / s``). In eval mode ``equalized(x)`` equals ``model(x)`` up to float
    rounding. A ``ReLU6`` between two layers raises ValueError, unless ``replace_relu6=True``:
    then every ReLU6 becomes a ReLU first (:func:`relu6_to_relu`, DFQ's choice) and the
    equalized model computes that model's function, not the original one.
    """
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations must be a positive int, got {iterations!r}")
    model, pairs = _folded_pairs(model, replace_relu6)
    scales = {}
    for n1, _ in pairs:
        w = model.get_submodule(n1).weight
        scales[n1] = torch.ones(w.shape[0], device=w.device, dtype=w.dtype)
    for _ in range(iterations):
        worst = 0.0
        for n1, n2 in pairs:
            s = equalize_pair(model.get_submodule(n1), model.get_submodule(n2))
            scales[n1] = scales[n1] / s
            worst = max(worst, (s - 1).abs().max().item())
        if worst < tol:
            break
    return model, scales


@torch.no_grad()
def unbalance(model: nn.Module, spread: float = 100.0, seed: int = 0):
    """An fp32-equivalent copy with badly unbalanced channel ranges: ``(model, scales)``.

    Folds BatchNorm, then for every equalization pair multiplies output channel ``i`` of
    layer 1 by ``c_i`` and input channel ``i`` of layer 2 by ``1 / c_i``, with
    ``log c_i ~ U(-log spread, log spread)`` (a ``torch.Generator`` seeded with ``seed``).
    ``scales`` maps each layer 1 to its ``c`` ``(C_out,)``. The float function is
    unchanged; per-tensor weight quantization of the copy collapses.
    """
    if not (isinstance(spread, (int, float)) and math.isfinite(spread) and spread >= 1):
        raise ValueError(f"spread must be a finite number >= 1, got {spread!r}")
    model, pairs = _folded_pairs(model)
    g = torch.Generator().manual_seed(check_seed(seed))
    scales = {}
    for n1, n2 in pairs:
        layer1, layer2 = model.get_submodule(n1), model.get_submodule(n2)
        log_c = (2 * torch.rand(layer1.weight.shape[0], generator=g) - 1) * math.log(spread)
        c = log_c.exp().to(device=layer1.weight.device, dtype=layer1.weight.dtype)  # drawn on the CPU
        rescale_pair(layer1, layer2, 1 / c)
        scales[n1] = c
    return model, scales

