"""AdaRound: learn the rounding of every weight, one layer at a time (Nagel et al., ICML 2020).

Input: a *converted* qlib fake-quant model (``qlib.ptq.quantize_static``: BN folded, weight and
activation qparams frozen) and a few hundred calibration images (real, or synthetic from
``qlib.datafree``). Output: a copy whose weights are re-rounded, exactly on the same integer
grid (the frozen weight scales do not change), so ``qlib.train.evaluate``, the integer engine
and export see an ordinary quantized model::

    q  = ptq.quantize_static(model, calib, QuantConfig(weight_bits=3, act_bits=3, weight_observer="mse"))
    qa = adaround(q, calib)                 # same grid, better rounding

For each quantized layer in execution order (``named_modules`` order), with every earlier
layer already rounded::

    x~ = the layer's input in the quantized model       (N, C_in, H, W) or (N, F_in)
    y  = the layer's output in the float model           (N, C_out, H', W') or (N, F_out)
    min_V  || layer_V(x~) - y ||^2 + lambda * f_reg(V, beta)        (``reconstruction``)

The float model is the converted model with every quantizer switched off (the folded float
network, same layer names); pass ``float_model`` to use another one. The reconstruction target
is the layer's pre-activation output (the paper optionally includes the activation function;
BRECQ's blocks do). Defaults follow the BRECQ reference code (lambda 0.01, beta 20 -> 2 after a
20% warm-up, Adam on ``V``, mini-batches of 32) except the number of steps and the step size:
the papers take 20000 steps at lr 1e-3; the course's small layers take a few hundred at lr 5e-2.
With fewer or smaller steps ``V`` cannot travel far enough for ``h(V)`` to become binary (check
``binary`` in the returned stats: the hard rounding at the end differs from the soft one where
it is not).
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from ..batching import check_seed, input_batches, model_device, model_dtype
from ..modules import fake_quantizers
from .reconstruction import capture, reconstruct_unit

__all__ = ["adaround", "float_reference", "calibration_tensor", "check_reconstruct_args"]


def float_reference(qmodel: nn.Module) -> nn.Module:
    """A copy of ``qmodel`` with every quantizer off: the float (folded) model, same names."""
    fp = copy.deepcopy(qmodel).eval()
    for fq in fake_quantizers(fp).values():
        fq.dynamic = False  # a dynamic quantizer would still quantize each batch
        fq.observe, fq.quantize = False, False
    return fp


def calibration_tensor(qmodel: nn.Module, data) -> torch.Tensor:
    """All calibration inputs as one ``(N, ...)`` tensor on the model's device and dtype."""
    xs = list(input_batches(data, device=model_device(qmodel), dtype=model_dtype(qmodel), finite=True))
    if not xs:
        raise ValueError("calibration data is empty: give at least one batch of inputs")
    return torch.cat(xs)


def check_reconstruct_args(qmodel, iters, batch_size, lr, reg_weight, warmup, beta, seed) -> None:
    """Clear errors for a model that is not converted and for bad hyper-parameters."""
    if not isinstance(qmodel, nn.Module):
        raise TypeError(f"expected a converted qlib model (nn.Module), got {type(qmodel).__name__}")
    fqs = fake_quantizers(qmodel)
    weight_fqs = [fq for n, fq in fqs.items() if n.endswith("weight_fq")]
    if not weight_fqs:
        raise ValueError("the model has no fake-quant layers: quantize it first (qlib.ptq.quantize_static)")
    if any(fq.observe or not fq.quantize for fq in weight_fqs):
        raise ValueError("the model's weight quantizers are not frozen: reconstruct a converted model "
                         "(qlib.ptq.convert / quantize_static), not a prepared one")
    for name, v in (("iters", iters), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    for name, v in (("lr", lr), ("reg_weight", reg_weight)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 \
                or (name == "lr" and v == 0):
            raise ValueError(f"{name} must be a finite number > 0 (reg_weight >= 0), got {v!r}")
    if not (isinstance(warmup, (int, float)) and 0 <= warmup < 1):
        raise ValueError(f"warmup must be a fraction in [0, 1), got {warmup!r}")
    if not (isinstance(beta, (tuple, list)) and len(beta) == 2 and all(b > 0 for b in beta)):
        raise ValueError(f"beta must be (start, end), both > 0, got {beta!r}")
    check_seed(seed)


def adaround(qmodel: nn.Module, data, *, layers: list[str] | None = None, float_model: nn.Module | None = None,
             iters: int = 300,
             batch_size: int = 32, lr: float = 5e-2, reg_weight: float = 0.01, warmup: float = 0.2,
             beta: tuple[float, float] = (20.0, 2.0), seed: int = 0, progress: bool = False,
             return_stats: bool = False):
    """A copy of the converted ``qmodel`` with AdaRound weights, layer by layer (module docstring).

    ``data``: calibration inputs (a tensor, a TensorDataset, a loader, or batches; labels are
    ignored). ``layers``: names of the layers to re-round (default: all, in definition order;
    the others keep round-to-nearest). ``seed`` draws the mini-batches (a ``torch.Generator``: nothing global is
    seeded). ``qmodel`` is unchanged. With ``return_stats`` returns ``(model, {layer: stats})``.
    """
    check_reconstruct_args(qmodel, iters, batch_size, lr, reg_weight, warmup, beta, seed)
    fp = float_reference(qmodel) if float_model is None else float_model.eval()
    q = copy.deepcopy(qmodel).eval()
    x = calibration_tensor(q, data)
    gen = torch.Generator().manual_seed(seed)
    stats = {}
    for p in q.parameters():
        p.requires_grad_(False)
    names = _layer_names(q)
    if layers is not None:
        unknown = sorted(set(layers) - set(names))
        if unknown:
            raise ValueError(f"layers {unknown} are not fake-quant layers of the model; expected some of {names}")
        names = [n for n in names if n in set(layers)]
    for name in names:
        x_in = capture(q, name, x, "input")
        y = capture(fp, name, x, "output")
        stats[name] = reconstruct_unit(q, [name], x_in, y, iters=iters, batch_size=batch_size, lr=lr,
                                       reg_weight=reg_weight, warmup=warmup, beta=tuple(beta), generator=gen,
                                       progress=progress, desc=f"adaround {name}")
    for p, p0 in zip(q.parameters(), qmodel.parameters()):
        p.requires_grad_(p0.requires_grad)
    return (q, stats) if return_stats else q


def _layer_names(q: nn.Module) -> list[str]:
    """Names of the fake-quant layers of ``q`` in definition order."""
    return [n for n, m in q.named_modules() if hasattr(m, "weight_fq") and hasattr(m, "input_fq")]
