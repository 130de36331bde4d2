"""Layer sensitivity: which layers can live with fewer bits?

A mixed-precision allocation needs, for every quantizable layer ``l`` and bit width ``b``,
a number ``Omega[l][b]``: how much the model suffers when ``l``'s weights get ``b`` bits
(the others stay in float). Three ways to get it, from expensive to cheap:

1. ``one_at_a_time``: quantize layer ``l`` alone (``qlib.ptq`` with ``per_layer``: every
   other layer ``None``) and measure the increase of the loss on held-out data.
   Honest, but one PTQ + one evaluation per (layer, bits).
2. ``hawq_sensitivity`` (HAWQ-v2, Dong et al. 2020): a second-order Taylor expansion of the
   loss around the trained weights, where the gradient is ~0, gives
   ``dL ~ 1/2 dW^T H dW``; approximating ``H`` on layer ``l`` by its average eigenvalue,
   ``Omega[l][b] = Tr(H_l) / n_l * ||Q_b(W_l) - W_l||^2``. ``Tr(H_l)`` comes from
   Hutchinson's estimator ``Tr(H) = E_v[v^T H v]`` with Rademacher ``v`` (+-1 entries); ``H v``
   is one extra backward pass through the gradient (double backprop): no Hessian is built.
3. ``sqnr_sensitivity``: the signal-to-quantization-noise ratio of the layer's own output,
   ``SQNR = ||y||^2 / ||y - y_q||^2`` with ``y_q`` computed from ``Q_b(W)``; the sensitivity is
   the noise-to-signal ratio ``1 / SQNR``. One forward pass, no labels, no gradients.

``spearman`` compares two rankings (the Spearman rank correlation: the Pearson correlation of
the ranks, ties sharing their average rank). Every sensitivity is a dict
``{layer name: {bits: float}}`` with the layer names of the float model (BatchNorm folding
keeps them), ready for ``qlib.mixed.allocate``. Weights are quantized with the
``QuantConfig``'s weight recipe (default: symmetric, per output channel, min-max).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from ..batching import check_seed, eval_mode, placed
from ..fold import fold_batchnorm
from ..modules import FakeQuantize, QuantConfig, quant_layers
from ..ptq import quantize_static

__all__ = ["check_bits_list", "quantization_perturbation", "one_at_a_time", "hessian_traces",
           "hawq_sensitivity", "sqnr_sensitivity", "ranking", "spearman"]


def check_bits_list(bits) -> tuple[int, ...]:
    """``bits`` as a sorted tuple of distinct ints in 2..16 (TypeError/ValueError otherwise)."""
    if isinstance(bits, int) and not isinstance(bits, bool):
        bits = (bits,)
    try:
        bits = tuple(bits)
    except TypeError:
        raise TypeError(f"bits must be an int or a list of ints, got {type(bits).__name__}") from None
    if not bits or any(isinstance(b, bool) or not isinstance(b, int) or not 2 <= b <= 16 for b in bits):
        raise ValueError(f"bits must be ints between 2 and 16, got {bits!r}")
    return tuple(sorted(set(bits)))


def _config(config) -> QuantConfig:
    config = QuantConfig() if config is None else config
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a QuantConfig, got {type(config).__name__}")
    return config


def _folded_layers(model: nn.Module) -> tuple[nn.Module, dict[str, nn.Module]]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    folded = fold_batchnorm(model).eval()
    layers = quant_layers(folded)
    if not layers:
        raise ValueError("no layers to quantize: the model has no nn.Linear or nn.Conv2d")
    return folded, layers


def quantize_weight(weight: torch.Tensor, bits: int, config: QuantConfig | None = None) -> torch.Tensor:
    """``Q_b(W)``: ``weight`` fake-quantized with ``config``'s weight recipe at ``bits`` bits."""
    config = dataclasses.replace(_config(config), weight_bits=bits)
    fq = FakeQuantize(config.weight_observer_factory()).to(weight.device)
    w = weight.detach()
    fq(w)
    return fq.freeze()(w)


def quantization_perturbation(model: nn.Module, bits, config: QuantConfig | None = None) -> dict:
    """``{layer: {b: ||Q_b(W) - W||^2}}`` for the BN-folded weights (float)."""
    bits = check_bits_list(bits)
    _, layers = _folded_layers(model)
    return {name: {b: float((quantize_weight(m.weight, b, config) - m.weight.detach()).pow(2).sum())
                   for b in bits} for name, m in layers.items()}


def _mean_loss(model: nn.Module, data, loss_fn) -> float:
    total, count = 0.0, 0
    with torch.no_grad(), eval_mode(model):
        for x, y in placed(model, data):
            if y is None:
                raise ValueError("sensitivity needs labelled data: (x, y) batches or a TensorDataset")
            total += float(loss_fn(model(x), y)) * len(x)
            count += len(x)
    if count == 0:
        raise ValueError("the data is empty: give at least one labelled batch")
    return total / count


def one_at_a_time(model: nn.Module, data, calib, bits, config: QuantConfig | None = None,
                  loss_fn=F.cross_entropy) -> dict:
    """``{layer: {b: loss(only layer quantized at W b) - loss(float)}}`` on labelled ``data``.

    Each layer is quantized alone with ``config`` (weights at ``b`` bits, activations at
    ``config.act_bits``), calibrated on ``calib`` with ``qlib.ptq.quantize_static``. Costs
    ``layers x len(bits)`` calibrations and evaluations. May be negative (noise helps by chance).
    """
    bits, config = check_bits_list(bits), _config(config)
    _, layers = _folded_layers(model)
    base = _mean_loss(model, data, loss_fn)
    out = {}
    for name in layers:
        out[name] = {}
        for b in bits:
            per_layer = {other: None for other in layers if other != name}
            q = quantize_static(model, calib, dataclasses.replace(config, weight_bits=b), per_layer)
            out[name][b] = _mean_loss(q, data, loss_fn) - base
    return out


def hessian_traces(model: nn.Module, data, samples: int = 16, seed: int = 0,
                   loss_fn=F.cross_entropy, max_batches: int = 1) -> dict[str, float]:
    """Hutchinson estimate of ``Tr(H_l)`` for each layer's (BN-folded) weight.

    ``H_l`` is the Hessian of the mean loss on the first ``max_batches`` batches of
    ``data`` with respect to ``W_l``. For each of ``samples`` Rademacher vectors ``v``
    (drawn with a ``torch.Generator`` seeded by ``seed``): ``g = dL/dW`` with a graph,
    ``Hv = d(g . v)/dW``, and ``v_l . (Hv)_l`` is one unbiased sample of ``Tr(H_l)``. One
    ``v`` spans all layers at once (one double backward per sample, as PyHessian does), so
    the cross-layer blocks of ``H`` add variance, not bias.
    """
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be an int >= 1, got {samples!r}")
    seed = check_seed(seed)
    folded, layers = _folded_layers(model)
    params = [m.weight for m in layers.values()]
    batches = []
    for i, (x, y) in enumerate(placed(folded, data)):
        if i >= max_batches:
            break
        if y is None:
            raise ValueError("hessian_traces needs labelled data: (x, y) batches or a TensorDataset")
        batches.append((x, y))
    if not batches:
        raise ValueError("the data is empty: give at least one labelled batch")
    loss = sum(loss_fn(folded(x), y) for x, y in batches) / len(batches)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    gen = torch.Generator().manual_seed(seed)
    traces = torch.zeros(len(params), dtype=torch.float64)
    for _ in range(samples):
        vs = [(torch.randint(0, 2, p.shape, generator=gen) * 2 - 1).to(p) for p in params]
        hvs = torch.autograd.grad(grads, params, grad_outputs=vs, retain_graph=True)
        traces += torch.stack([(hv * v).sum().double().cpu() for hv, v in zip(hvs, vs)])
    return {name: float(t) / samples for name, t in zip(layers, traces)}


def hawq_sensitivity(model: nn.Module, data, bits, config: QuantConfig | None = None, samples: int = 16,
                     seed: int = 0, traces: dict | None = None) -> dict:
    """HAWQ-v2: ``{layer: {b: Tr(H_l) / n_l * ||Q_b(W_l) - W_l||^2}}``.

    ``traces`` (from ``hessian_traces``) may be given to reuse them across bit lists.
    """
    bits = check_bits_list(bits)
    _, layers = _folded_layers(model)
    traces = hessian_traces(model, data, samples, seed) if traces is None else traces
    pert = quantization_perturbation(model, bits, config)
    return {name: {b: traces[name] / m.weight.numel() * pert[name][b] for b in bits}
            for name, m in layers.items()}


def _layer_output(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if isinstance(layer, nn.Conv2d):
        return layer._conv_forward(x, weight, layer.bias)
    return F.linear(x, weight, layer.bias)


def sqnr_sensitivity(model: nn.Module, data, bits, config: QuantConfig | None = None,
                     max_batches: int = 1) -> dict:
    """``{layer: {b: ||y - y_q||^2 / ||y||^2}}``: the inverse SQNR of each layer's output.

    ``y`` is the layer's output in the float model on the first ``max_batches`` batches of
    ``data`` (labels unused), ``y_q`` the same layer with ``Q_b(W)``, on the same input.
    In decibels, ``SQNR_dB = -10 log10(value)``.
    """
    bits = check_bits_list(bits)
    folded, layers = _folded_layers(model)
    inputs: dict[str, list] = {name: [] for name in layers}
    hooks = [m.register_forward_hook(lambda mod, args, out, name=name: inputs[name].append(args[0].detach()))
             for name, m in layers.items()]
    try:
        with torch.no_grad():
            seen = 0
            for i, (x, _) in enumerate(placed(folded, data)):
                if i >= max_batches:
                    break
                folded(x)
                seen += 1
    finally:
        for h in hooks:
            h.remove()
    if seen == 0:
        raise ValueError("the data is empty: give at least one batch")
    out = {}
    with torch.no_grad():
        for name, layer in layers.items():
            out[name] = {}
            for b in bits:
                wq = quantize_weight(layer.weight, b, config)
                signal = noise = 0.0
                for x in inputs[name]:
                    y = _layer_output(layer, x, layer.weight)
                    signal += float(y.double().pow(2).sum())
                    noise += float((y - _layer_output(layer, x, wq)).double().pow(2).sum())
                out[name][b] = noise / max(signal, 1e-30)
    return out


def ranking(scores: dict[str, float]) -> list[str]:
    """Layer names, most sensitive first (ties keep the dict's order)."""
    return sorted(scores, key=lambda k: -scores[k])


def _ranks(values: torch.Tensor) -> torch.Tensor:
    """Ranks 1..n, ties sharing their average rank."""
    order = values.argsort(stable=True)
    ranks = torch.empty_like(values)
    ranks[order] = torch.arange(1, len(values) + 1, dtype=values.dtype)
    for v in values.unique():
        tie = values == v
        ranks[tie] = ranks[tie].mean()
    return ranks


def spearman(a: dict[str, float], b: dict[str, float]) -> float:
    """Spearman rank correlation of two ``{layer: score}`` dicts over their common layers.

    ``rho = pearson(rank(a), rank(b))`` in [-1, 1]: 1 when both order the layers alike.
    Needs at least 2 common layers; NaN when one side is constant.
    """
    if not isinstance(a, dict) or not isinstance(b, dict):
        raise TypeError("spearman compares two dicts {layer: score}")
    keys = [k for k in a if k in b]
    if len(keys) < 2:
        raise ValueError(f"spearman needs at least 2 common layers, got {len(keys)}")
    ra = _ranks(torch.tensor([float(a[k]) for k in keys], dtype=torch.float64))
    rb = _ranks(torch.tensor([float(b[k]) for k in keys], dtype=torch.float64))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = (ra.pow(2).sum() * rb.pow(2).sum()).sqrt()
    return float(ra @ rb / denom) if denom > 0 else float("nan")
