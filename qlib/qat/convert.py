"""After QAT: read the step sizes, fold kept BatchNorms, freeze, and go to integers.

A QAT model holds three kinds of quantizers: STE activations (``FakeQuantize``, observing
while training), STE weights (``TrackingWeightFakeQuantize``: the scale follows the weights)
and LSQ quantizers (learned scales). ``convert_qat`` turns each into a plain frozen
``FakeQuantize`` holding the qparams it uses *now* (``FixedQParamsObserver`` keeps learned
ones), so that the result is exactly what ``qlib.ptq.convert`` returns and
``qlib.intmodel.convert_to_integer`` accepts it (``to_integer``).

BatchNorms kept during training are folded first (``fold_kept_bn``)::

    w' = w * f,  f = gamma / sqrt(var + eps)   (per output channel)

With per-channel weight scales, scaling a channel by ``f`` scales its grid by ``|f|``:
``round(w f / (s |f|)) s |f| = f round(w / s) s`` (rounding half to even is odd-symmetric), so
every weight keeps its code up to the sign, except in the outermost bins of the range: a
negative ``f`` flips the codes and ``quant_min`` has no twin (``-(-8) = 8 > 7``: it clamps to
``quant_max``), and symmetric min-max scales put the largest weight on a tie
(``max|w| / s = 7.5``) that float rounding may break either way. Those weights move by one
step; with per-tensor weight scales the fold is only approximate.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..fold import fold_bn
from ..lsq import LSQFakeQuantize
from ..modules import FakeQuantize, set_submodule
from ..observers import ObserverBase
from ..pact import PACTFakeQuantize
from .prepare import qat_layers
from .ste import TrackingWeightFakeQuantize

__all__ = ["FixedQParamsObserver", "qparams_now", "step_sizes", "fold_kept_bn", "convert_qat", "to_integer"]


class FixedQParamsObserver(ObserverBase):
    """An observer that always answers the qparams it was given (learned ones, after QAT).

    ``scale``: float, ``()`` or ``(C,)``; ``zero_point``: integers of the same shape.
    """

    def __init__(self, scale, zero_point, bits: int, symmetric: bool, granularity, signed: bool):
        super().__init__(bits=bits, symmetric=symmetric, granularity=granularity, signed=signed)
        self.register_buffer("fixed_scale", torch.as_tensor(scale, dtype=torch.float32).clone())
        self.register_buffer("fixed_zero_point", torch.as_tensor(zero_point, dtype=torch.int64).clone())
        self.num_batches.fill_(1)

    def forward(self, x):
        return x

    def calculate_qparams(self):
        return self.fixed_scale.to(torch.float32).clone(), self.fixed_zero_point.clone()


def qparams_now(fq: nn.Module, layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The ``(scale, zero_point)`` the quantizer ``fq`` of ``layer`` uses now; None before it has seen data."""
    if isinstance(fq, (LSQFakeQuantize, PACTFakeQuantize)):
        return fq.qparams() if bool(fq.initialized) else None
    if isinstance(fq, TrackingWeightFakeQuantize):
        return fq.batch_qparams(layer.weight)
    return fq.qparams() if int(fq.observed_batches) > 0 and not fq.dynamic else None


def step_sizes(model: nn.Module) -> dict[str, float | list[float]]:
    """``{quantizer name: scale}`` (a float per tensor, a list per channel), e.g. ``"0.input_fq"``."""
    out = {}
    for name, layer in qat_layers(model).items():
        for part in ("input_fq", "weight_fq"):
            qparams = qparams_now(getattr(layer, part), layer)
            if qparams is not None:
                s = qparams[0].detach().reshape(-1)
                out[f"{name}.{part}" if name else part] = s.item() if s.numel() == 1 else s.tolist()
    return out


def _frozen(fq: nn.Module, layer: nn.Module) -> FakeQuantize:
    """A frozen plain ``FakeQuantize`` with the qparams ``fq`` uses now."""
    if type(fq) is FakeQuantize:
        return copy.deepcopy(fq).freeze()
    qparams = qparams_now(fq, layer)
    if qparams is None:
        raise ValueError("a quantizer has seen no data: calibrate or train the QAT model first")
    obs = fq.observer
    frozen = FakeQuantize(FixedQParamsObserver(*qparams, obs.bits, obs.symmetric, obs.granularity, obs.signed))
    frozen.observed_batches.fill_(1)
    return frozen.freeze()


@torch.no_grad()
def fold_kept_bn(model: nn.Module) -> nn.Module:
    """Fold, in place, the BatchNorms kept during QAT (``model.qat_bn_pairs``); returns ``model``.

    LSQ weight scales are multiplied by ``|f|`` (per channel; per tensor: by ``max |f|``);
    STE weight scales follow the min-max of the folded weights by themselves (their clip
    ratio is not searched again: the weights were trained on this grid).
    """
    for layer_name, bn_name in getattr(model, "qat_bn_pairs", []):
        layer, bn = model.get_submodule(layer_name), model.get_submodule(bn_name)
        weight, bias = fold_bn(layer.weight, layer.bias, bn)
        gamma = bn.weight.detach() if bn.weight is not None else torch.ones_like(bn.running_var)
        factor = gamma * torch.rsqrt(bn.running_var + bn.eps)                 # (C_out,)
        layer.weight = nn.Parameter(weight)
        layer.bias = nn.Parameter(bias)
        fq = layer.weight_fq
        if isinstance(fq, LSQFakeQuantize):
            fq.scale.data = fq.scale.data * (factor.abs() if fq.axis is not None else factor.abs().max())
        set_submodule(model, bn_name, nn.Identity())
    model.qat_bn_pairs = []
    return model


def convert_qat(model: nn.Module) -> nn.Module:
    """An eval-mode copy of a QAT model with every quantizer frozen (plain ``FakeQuantize``).

    Kept BatchNorms are folded first. The result is what ``qlib.ptq.convert`` returns, so
    ``qlib.intmodel.convert_to_integer`` accepts it. ``model`` is unchanged.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    if not qat_layers(model):
        raise ValueError("no fake-quant layers: prepare the model with prepare_qat first")
    model = fold_kept_bn(copy.deepcopy(model)).eval()
    for layer in qat_layers(model).values():
        layer.input_fq, layer.weight_fq = _frozen(layer.input_fq, layer), _frozen(layer.weight_fq, layer)
    return model


def to_integer(model: nn.Module):
    """``qlib.intmodel.convert_to_integer(convert_qat(model))``: integer-only inference."""
    from ..intmodel import convert_to_integer
    return convert_to_integer(convert_qat(model))
