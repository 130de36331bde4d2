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
finds "layer -> BatchNorm" pairs with ``torch.fx`` symbolic tracing, which sees the real
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

import torch
from torch import nn
from torch.fx import symbolic_trace

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
    with torch.no_grad():
        mean, var = bn.running_mean, bn.running_var
        gamma = bn.weight if bn.weight is not None else torch.ones_like(mean)
        beta = bn.bias if bn.bias is not None else torch.zeros_like(mean)
        b = bias if bias is not None else torch.zeros_like(mean)
        factor = gamma * torch.rsqrt(var + bn.eps)                    # (C_out,)
        new_weight = weight * factor.reshape(-1, *([1] * (weight.dim() - 1)))
        new_bias = (b - mean) * factor + beta
    return new_weight.to(weight.dtype), new_bias.to(weight.dtype)


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    """``root.<name> = module`` for a dotted name such as ``"layer1.0.bn1"``."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def find_layer_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """Names ``(layer, bn)`` of every foldable layer whose output feeds only a BatchNorm.

    Traces ``model`` with ``torch.fx``. If it cannot be traced (data-dependent control
    flow), falls back to adjacent children of ``nn.Sequential`` containers, with a warning.
    A module called more than once (shared weights) is never folded.
    """
    try:
        graph = symbolic_trace(model).graph
    except Exception as err:  # noqa: BLE001 - any tracing failure means "use the fallback"
        warnings.warn(f"torch.fx could not trace the model ({type(err).__name__}: {err}); "
                      "folding only Layer->BatchNorm neighbours inside nn.Sequential",
                      stacklevel=2)
        return _sequential_pairs(model)
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(model.get_submodule(node.target), BATCHNORMS):
            continue
        src = node.args[0] if node.args else None
        if (isinstance(src, torch.fx.Node) and src.op == "call_module"
                and isinstance(model.get_submodule(src.target), FOLDABLE_LAYERS)
                and len(src.users) == 1 and calls[src.target] == 1 and calls[node.target] == 1):
            pairs.append((src.target, node.target))
    return pairs


def _sequential_pairs(model: nn.Module) -> list[tuple[str, str]]:
    pairs = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Sequential):
            children = list(module.named_children())
            for (n1, m1), (n2, m2) in zip(children, children[1:]):
                if isinstance(m1, FOLDABLE_LAYERS) and isinstance(m2, BATCHNORMS):
                    prefix = f"{name}." if name else ""
                    pairs.append((prefix + n1, prefix + n2))
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
        _set_submodule(folded, bn_name, nn.Identity())
    return folded
