"""Bias correction: remove the *average* error that weight quantization adds to each output.

Nagel et al., ICCV 2019, "Data-Free Quantization Through Weight Equalization and Bias
Correction", section 4.2. Quantizing a layer's weights ``W`` to ``W_q`` changes its output
by ``eps x`` with ``eps = W_q - W``. The error is not zero-mean: its expectation ::

    E[y_q - y] = (W_q - W) E[x]          (per output channel; convs sum over the kernel)

shifts every output channel by a constant, which the next layers amplify. Subtracting it
from the bias removes it: ``b' = b - (W_q - W) E[x]``.

E[x] without data: if ``x = relu(z)`` and ``z`` is the output of a BatchNorm, then in
eval mode ``z_c`` has (for the training data) mean ``beta_c`` and std ``|gamma_c|`` (that
is what BatchNorm does). Assuming ``z_c ~ N(mu, sigma^2)``, the ReLU output has the
*clipped-normal* mean ::

    E[relu(z)] = mu * Phi(mu / sigma) + sigma * phi(mu / sigma)

with ``Phi``/``phi`` the standard normal cdf/pdf; a ReLU6 clips at 6 as well (MobileNet),
which adds ``6 * P(z > 6)`` and removes the part above 6 (:func:`clipped_normal_mean`).
Mean-preserving modules between the activation and the layer (average pooling, flatten,
identity) keep it; max-pooling does not (its output mean is larger), so such layers are
skipped here. ``empirical_input_means``
measures E[x] on (synthetic) inputs instead: the paper's "empirical bias correction".

The statistics ``(beta, |gamma|)`` must be read *before* folding (``bn_preactivation_stats``);
if the folded layers are later rescaled (``equalize.unbalance``, ``cross_layer_equalize``),
``scale_stats`` carries the rescaling over. Zero padding at the borders of a convolution
sees 0, not E[x]; the correction ignores this (as does the paper).

Grouped and depthwise convolutions (MobileNet): output channel ``o`` only reads the input
channels of its group, so ``E[x]`` enters only through those; for a depthwise layer
``delta_c = sum_taps (W_q - W)[c] * E[x_c]`` (:func:`expected_output_error`).
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from ..batching import eval_mode, input_batches, model_device, model_dtype
from ..fold import BATCHNORMS, find_layer_bn_pairs, find_layer_pairs
from .equalize import LAYERS
from .synthetic import bn_layers

__all__ = ["clipped_normal_mean", "bn_preactivation_stats", "scale_stats", "expected_inputs",
           "empirical_input_means", "expected_output_error", "correct_bias"]

MEAN_PRESERVING = (nn.Identity, nn.Dropout, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Flatten)


def clipped_normal_mean(mean: torch.Tensor, std: torch.Tensor, upper: float | None = None) -> torch.Tensor:
    """``E[clamp(z, 0, upper)]`` for ``z ~ N(mean, std^2)``, elementwise: the mean of a ReLU
    (``upper=None``) or ReLU6 (``upper=6``) output. With ``a = -mean/std``, ``b = (upper - mean)/std``::

        E = mean (Phi(b) - Phi(a)) + std (phi(a) - phi(b)) + upper (1 - Phi(b))

    (the three parts: ``z`` inside ``[0, upper]``, and ``upper`` where it clips; ``upper -> inf``
    gives ReLU's ``mean Phi(mean/std) + std phi(mean/std)``). ``clamp(mean, 0, upper)`` where
    std is 0. Computed in float64; returned in ``mean``'s float dtype (float32 otherwise).
    """
    out_dtype = mean.dtype if isinstance(mean, torch.Tensor) and mean.is_floating_point() else torch.float32
    mean = torch.as_tensor(mean, dtype=torch.float64)
    std = torch.as_tensor(std, dtype=torch.float64, device=mean.device)
    if (std < 0).any() or not (torch.isfinite(mean).all() and torch.isfinite(std).all()):
        raise ValueError("need finite means and finite std >= 0")
    if upper is not None and not (isinstance(upper, (int, float)) and math.isfinite(upper) and upper > 0):
        raise ValueError(f"upper must be a finite number > 0 (6 for ReLU6) or None (ReLU), got {upper!r}")
    safe = torch.where(std > 0, std, torch.ones_like(std))

    def cdf(t):
        return 0.5 * torch.erfc(-t / math.sqrt(2))

    def pdf(t):
        return torch.exp(-0.5 * t * t) / math.sqrt(2 * math.pi)
    a = -mean / safe
    if upper is None:
        out = mean * cdf(-a) + std * pdf(a)
    else:
        b = (upper - mean) / safe
        out = mean * (cdf(b) - cdf(a)) + std * (pdf(a) - pdf(b)) + upper * cdf(-b)
    return torch.where(std > 0, out, mean.clamp(0, upper)).to(out_dtype)


def bn_preactivation_stats(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{layer: (beta, |gamma|)}`` for every layer followed by a BatchNorm (``qlib.fold``'s
    pairs): the mean and std of the layer's BN-normalized output, per channel."""
    bn_layers(model)
    stats = {}
    for layer_name, bn_name in find_layer_bn_pairs(model):
        bn = model.get_submodule(bn_name)
        ones = torch.ones_like(bn.running_mean)
        gamma = bn.weight.detach() if bn.weight is not None else ones
        beta = bn.bias.detach() if bn.bias is not None else torch.zeros_like(ones)
        stats[layer_name] = (beta.clone(), gamma.abs().clone())
    return stats


def scale_stats(stats: dict, scales: dict[str, torch.Tensor]) -> dict:
    """Statistics after the layers' outputs were multiplied per channel by ``scales``
    (``unbalance``/``cross_layer_equalize`` return them): ``(mean * c, std * c)``."""
    out = dict(stats)
    for name, c in scales.items():
        if name in out:
            mean, std = out[name]
            out[name] = (mean * c, std * c)
    return out


ACTIVATIONS = {nn.ReLU: None, nn.ReLU6: 6.0}
"""Activations whose output mean :func:`clipped_normal_mean` knows: type -> upper clip."""


def expected_inputs(model: nn.Module, stats: dict) -> dict[str, torch.Tensor]:
    """``{layer2: E[x]}`` for layers whose input is ``relu`` or ``relu6`` of a layer with known
    ``stats`` (its BatchNorm in between, or folded away), through mean-preserving modules only
    (max-pool: skipped).

    The pairs are ``qlib.fold.find_layer_pairs(model, first=LAYERS, second=LAYERS,
    through=BATCHNORMS + (nn.ReLU, nn.ReLU6) + MEAN_PRESERVING)`` (the traced data flow: layer 1's
    output reaches nothing else), keeping those with exactly one activation on the way and no
    BatchNorm after it. ``E[x_c]`` is ``clipped_normal_mean(mean_c, std_c, upper)`` with
    ``upper = 6`` after a ReLU6 (statistics moved by ``scale_stats`` assume ReLU: a rescaled
    ReLU6 would no longer clip at 6).

    ``E[x]`` has one value per input channel of ``layer2``, shape ``(C_in,)`` (a linear
    layer after ``Flatten`` gets each channel's value repeated over its block; a depthwise
    layer 2 gets one value per channel, the channel its row ``c`` reads).
    """
    out = {}
    pairs = find_layer_pairs(model, first=LAYERS, second=LAYERS,
                             through=BATCHNORMS + tuple(ACTIVATIONS) + MEAN_PRESERVING)
    for first, second, between in pairs:
        kinds = [type(model.get_submodule(n)) for n in between]
        if first not in stats or type(model.get_submodule(second)) not in LAYERS:
            continue
        acts = [i for i, k in enumerate(kinds) if k in ACTIVATIONS]
        if len(acts) != 1 or any(issubclass(k, BATCHNORMS) for k in kinds[acts[0]:]):
            continue  # E[x] is the clipped-normal mean only right after one activation of the BN output
        mean, std = stats[first]
        ex = clipped_normal_mean(mean, std, ACTIVATIONS[kinds[acts[0]]])
        fan = _in_features(model.get_submodule(second))
        if fan % len(ex) == 0:
            out[second] = ex.repeat_interleave(fan // len(ex))
    return out


def _in_features(layer: nn.Module) -> int:
    return layer.weight.shape[1] * getattr(layer, "groups", 1)


@torch.no_grad()
def empirical_input_means(model: nn.Module, data, names=None) -> dict[str, torch.Tensor]:
    """``{layer: per-input-channel mean of its input}`` measured on ``data``.

    ``names``: the Conv2d/Linear layers to measure (default: all). ``data``: a tensor, a
    list of batches (tensors or ``(x, y)``) or a TensorDataset, fed on the model's device and
    dtype. Eval mode (every submodule's mode restored, also on an error), no_grad. The means
    are float32 on the model's device.
    """
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LAYERS)}
    names = list(layers) if names is None else list(names)
    missing = [n for n in names if n not in layers]
    if missing:
        raise ValueError(f"not Conv2d/Linear layers of the model: {missing}")
    sums: dict[str, list] = {n: [0.0, 0] for n in names}

    def hook(module, args, name):
        x = args[0].detach().to(torch.float64)
        dims = [d for d in range(x.dim()) if d != 1]
        sums[name][0] = sums[name][0] + x.sum(dim=dims)
        sums[name][1] += x.numel() // x.shape[1]

    handles = [layers[n].register_forward_pre_hook(lambda m, a, n=n: hook(m, a, n)) for n in names]
    device, dtype = model_device(model), model_dtype(model, default=None)
    try:
        seen = 0
        with eval_mode(model):
            for x in input_batches(data, device=device, dtype=dtype, finite=True):
                model(x)
                seen += 1
        if seen == 0:
            raise ValueError("the data is empty: give at least one batch of inputs")
    finally:
        for h in handles:
            h.remove()
    return {n: (s / c).to(torch.float32) for n, (s, c) in sums.items() if c}


def expected_output_error(weight: torch.Tensor, weight_q: torch.Tensor,
                          input_mean: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """``(W_q - W) E[x]`` per output channel, shape ``(C_out,)``.

    ``weight``/``weight_q``: ``(C_out, C_in)`` or ``(C_out, C_in / groups, kh, kw)``; each
    kernel tap sees the same ``E[x]``; ``input_mean``: ``(C_in,)``. With ``groups = g``,
    output channel ``o`` of group ``j`` reads input channels ``j * C_in/g + i`` only::

        delta_o = sum_i sum_taps (W_q - W)[o, i, taps] * E[x_{j C_in/g + i}]

    A depthwise layer (``g = C_in = C_out``): ``delta_c = sum_taps (W_q - W)[c, 0, taps] * E[x_c]``.
    """
    if weight.shape != weight_q.shape:
        raise ValueError(f"weight {tuple(weight.shape)} and weight_q {tuple(weight_q.shape)} differ in shape")
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1 or weight.shape[0] % groups:
        raise ValueError(f"groups must be a positive int dividing C_out = {weight.shape[0]}, got {groups!r}")
    c_in = weight.shape[1] * groups if weight.dim() > 1 else None
    if weight.dim() < 2 or input_mean.shape != (c_in,):
        raise ValueError(f"input_mean must have shape ({c_in if c_in else '?'},) (C_in = weight.shape[1] * groups), "
                         f"got {tuple(input_mean.shape)}")
    err = (weight_q - weight).detach()
    err = err.reshape(groups, err.shape[0] // groups, err.shape[1], -1).sum(dim=3)  # (g, C_out/g, C_in/g)
    ex = input_mean.to(device=err.device, dtype=err.dtype).reshape(groups, -1, 1)  # (g, C_in/g, 1)
    return (err @ ex).reshape(-1)


def correct_bias(quant_model: nn.Module, input_means: dict[str, torch.Tensor]) -> nn.Module:
    """A copy of a converted fake-quant model (``qlib.ptq``) with ``b -= (W_q - W) E[x]``
    for every layer named in ``input_means`` (:func:`expected_inputs` or
    :func:`empirical_input_means`); grouped and depthwise convolutions included
    (:func:`expected_output_error`). ``W_q`` is what the layer's frozen ``weight_fq`` makes
    of ``W``; a layer without bias gains one."""
    if not input_means:
        raise ValueError("input_means is empty: no layer to correct")
    model = copy.deepcopy(quant_model)
    for name, ex in input_means.items():
        layer = model.get_submodule(name)
        fq = getattr(layer, "weight_fq", None)
        if fq is None:
            raise ValueError(f"layer {name!r} is not a fake-quant layer: quantize the model first (qlib.ptq)")
        if fq.observe or not fq.quantize:
            raise ValueError(f"layer {name!r} is not converted: call qlib.ptq.convert first")
        with torch.no_grad():
            delta = expected_output_error(layer.weight, fq(layer.weight), ex.to(layer.weight.device),
                                          groups=getattr(layer, "groups", 1))
            if layer.bias is None:
                layer.bias = nn.Parameter(torch.zeros_like(delta))
            layer.bias.sub_(delta.to(layer.bias.dtype))
    return model
