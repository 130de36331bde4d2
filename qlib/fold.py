"""Batch-norm folding: merge a BatchNorm into the conv or linear layer before it.

In eval mode a BatchNorm is a fixed affine map per channel ``c``::

    bn(y)_c = gamma_c * (y_c - mean_c) / sqrt(var_c + eps) + beta_c

and ``y = w x + b`` is linear, so the two collapse into one layer with::

    factor_c = gamma_c / sqrt(var_c + eps)
    w'_c     = w_c * factor_c                  (every weight of output channel c)
    b'_c     = (b_c - mean_c) * factor_c + beta_c

We fold *before* quantizing: the integer kernel then has one weight tensor and one bias to
quantize, and the quantization error is measured on the weights that really run.

``fold_bn`` is the formula on tensors; ``fold_batchnorm`` applies it to a whole model. It
finds "layer -> BatchNorm" pairs (``find_layer_pairs``, which also finds "layer -> next
layer" pairs for cross-layer equalization) with ``torch.fx`` symbolic tracing, which sees the real
data flow: the same code handles ``nn.Sequential`` chains and residual blocks written with a
custom ``forward``. A pair is folded only when the layer's output feeds the BatchNorm and
nothing else (otherwise the other consumer would see the changed output).

Folding uses the running statistics, that is the *eval-mode* behaviour of BatchNorm. So
``fold_batchnorm`` always works on an eval-mode deep copy: the model you pass is never
changed, even if it is in training mode, and the folded copy is returned in eval mode.
"""

from __future__ import annotations

import copy
import warnings
from typing import NamedTuple

import torch
from torch import nn
from torch.fx import symbolic_trace

from .modules import set_submodule

FOLDABLE_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
"""Layers whose weight has its output channels on axis 0 (so a BN folds into them)."""

BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)



def fold_bn(weight: torch.Tensor, bias: torch.Tensor | None,
            bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold the eval-mode BatchNorm ``bn`` into a layer's ``weight`` and ``bias``.

    ``weight``: float tensor ``(C_out, ...)`` (linear ``(C_out, C_in)``, conv
    ``(C_out, C_in/groups, kh, kw)``); ``bias``: ``(C_out,)`` or ``None`` (treated as zeros).
    Returns new tensors ``(w', b')`` with ``w' = w * factor`` (per output channel) and
    ``b' = (b - mean) * factor + beta``, where ``factor = gamma / sqrt(var + eps)``; a BN
    without affine parameters has ``gamma = 1`` and ``beta = 0``. Inputs are not modified.
    """
    if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
        raise TypeError(f"bn must be a BatchNorm module, got {type(bn).__name__}")
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
        raise TypeError("weight must be a floating-point tensor")
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("cannot fold a BatchNorm without running statistics "
                         "(it was built with track_running_stats=False)")
    c_out = weight.shape[0] if weight.dim() > 0 else -1
    if c_out != bn.num_features:
        raise ValueError(f"weight has {c_out} output channels (axis 0) but the BatchNorm has "
                         f"{bn.num_features} features")
    if bias is not None and bias.shape != (c_out,):
        raise ValueError(f"bias must have shape ({c_out},), got {tuple(bias.shape)}")
    for name, t in (("weight", weight), ("bias", bias), ("running_mean", bn.running_mean),
                    ("running_var", bn.running_var), ("BatchNorm weight", bn.weight), ("BatchNorm bias", bn.bias)):
        if t is not None and not torch.isfinite(t).all():
            raise ValueError(f"{name} contains NaN or infinite values: cannot fold")
    if (bn.running_var < 0).any():
        raise ValueError("running_var has negative entries: a variance must be >= 0")
    with torch.no_grad():
        mean, var = bn.running_mean, bn.running_var
        gamma = bn.weight if bn.weight is not None else torch.ones_like(mean)
        beta = bn.bias if bn.bias is not None else torch.zeros_like(mean)
        b = bias if bias is not None else torch.zeros_like(mean)
        factor = gamma * torch.rsqrt(var + bn.eps)                    # (C_out,)
        new_weight = weight * factor.reshape(-1, *([1] * (weight.dim() - 1)))
        new_bias = (b - mean) * factor + beta
    return new_weight.to(weight.dtype), new_bias.to(weight.dtype)


class LayerPair(NamedTuple):
    """A layer and the module its output flows into: names as in ``model.named_modules()``.

    ``between``: the modules passed on the way (empty for direct neighbours), in order.
    """

    first: str
    second: str
    between: tuple[str, ...] = ()


def find_layer_pairs(model: nn.Module, second=BATCHNORMS, first=FOLDABLE_LAYERS,
                     through: tuple[type, ...] = ()) -> list[LayerPair]:
    """Every ``first`` layer whose output flows only into a ``second`` module, ``through`` nothing
    but modules of the ``through`` types.

    ``first``/``second``/``through``: module classes (or tuples of them). Examples:
    BN folding is ``find_layer_pairs(model)`` (a conv/linear feeding a BatchNorm); cross-layer
    equalization is ``find_layer_pairs(model, second=(nn.Conv2d, nn.Linear),
    through=(nn.ReLU, nn.MaxPool2d, ...))`` (the next layer across positive-homogeneous modules).

    Traces ``model`` with ``torch.fx``, which sees the real data flow (custom ``forward``,
    residual blocks). A pair is kept only if every output on the way has a single consumer
    (otherwise that other consumer would see the changed values) and ``first`` and ``second`` are
    each called once (a shared module cannot be changed for one of its uses). If the model
    cannot be traced, falls back to neighbouring children of ``nn.Sequential`` containers,
    with a warning. Returns ``LayerPair(first, second, between)`` in graph order.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    for name, kinds in (("first", first), ("second", second), ("through", through)):
        kinds = kinds if isinstance(kinds, tuple) else (kinds,)
        if not all(isinstance(k, type) and issubclass(k, nn.Module) for k in kinds):
            raise TypeError(f"{name} must be an nn.Module class or a tuple of them, got {kinds!r}")
    try:
        graph = symbolic_trace(model).graph
    except Exception as err:  # noqa: BLE001 - any tracing failure means "use the fallback"
        warnings.warn(f"torch.fx could not trace the model ({type(err).__name__}: {err}); "
                      "pairing only neighbours inside nn.Sequential", stacklevel=2)
        return _sequential_pairs(model, second, first, through)
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    module = lambda node: model.get_submodule(node.target) if node.op == "call_module" else None  # noqa: E731
    pairs = []
    for node in graph.nodes:
        if not isinstance(module(node), first) or calls[node.target] != 1:
            continue
        cur, between = node, []
        while len(cur.users) == 1:
            nxt = next(iter(cur.users))
            if not (nxt.args and nxt.args[0] is cur):
                break  # the value is not the main input of the next op
            m = module(nxt)
            if isinstance(m, second):
                if calls[nxt.target] == 1:
                    pairs.append(LayerPair(node.target, nxt.target, tuple(between)))
                break
            if not isinstance(m, through):
                break
            between.append(nxt.target)
            cur = nxt
    return pairs


def find_layer_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """Names ``(layer, bn)`` of every foldable layer whose output feeds only a BatchNorm.

    ``find_layer_pairs(model)`` without the ``between`` part: see there.
    """
    return [(p.first, p.second) for p in find_layer_pairs(model)]


def _sequential_pairs(model: nn.Module, second, first, through) -> list[LayerPair]:
    pairs = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Sequential):
            continue
        prefix = f"{name}." if name else ""
        children = list(module.named_children())
        for i, (n1, m1) in enumerate(children):
            if not isinstance(m1, first):
                continue
            between = []
            for n2, m2 in children[i + 1:]:
                if isinstance(m2, second):
                    pairs.append(LayerPair(prefix + n1, prefix + n2, tuple(between)))
                    break
                if not isinstance(m2, through):
                    break
                between.append(prefix + n2)
    return pairs


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A folded eval-mode copy of ``model``: every foldable ``layer -> BatchNorm`` pair merged.

    The layer gets the folded weight and bias (``fold_bn``; a layer without bias gains one)
    and the BatchNorm is replaced by ``nn.Identity``, so module names stay the same and the
    copy is a drop-in replacement. ``model`` itself is not changed. In eval mode
    ``fold_batchnorm(model)(x)`` equals ``model.eval()(x)`` up to float rounding.
    BatchNorms that do not directly follow a foldable layer are left as they are.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    folded = copy.deepcopy(model).eval()
    for layer_name, bn_name in find_layer_bn_pairs(folded):
        layer = folded.get_submodule(layer_name)
        bn = folded.get_submodule(bn_name)
        weight, bias = fold_bn(layer.weight, layer.bias, bn)
        layer.weight = nn.Parameter(weight, requires_grad=layer.weight.requires_grad)
        layer.bias = nn.Parameter(bias, requires_grad=layer.weight.requires_grad)
        set_submodule(folded, bn_name, nn.Identity())
    return folded
