"""Post-training quantization (PTQ): quantize a trained model without training it.

Static PTQ fixes every scale and zero point before deployment, in three steps
(the names are PyTorch's)::

    prepared  = prepare(model, config)        fold BN, swap in fake-quant layers, observers on
    calibrate(prepared, data)                 run a few batches: observers record ranges
    quantized = convert(prepared)             freeze qparams: observers off, quantization on

``quantize_static(model, data, config)`` does all three. During calibration the model runs
in float (``quantize=False``): every observer sees the activations of the float model.

Dynamic PTQ (``quantize_dynamic``) needs no calibration data: weights are quantized
once, and each layer's input range is the min/max of the batch that arrives, computed at
run time. It costs a min/max per layer and batch, and adapts to every input.

Every function returns a new model and leaves its argument unchanged, except
``calibrate``, which updates the observers of the model it is given (and returns it).
"""

from __future__ import annotations

import copy
import itertools

import torch
from torch import nn
from tqdm.auto import tqdm

from .batching import eval_mode, input_batches, model_device, model_dtype
from .fold import fold_batchnorm
from .modules import FakeQuantize, QuantConfig, fake_quantizers, set_quant_mode, swap_modules

__all__ = ["prepare", "calibrate", "convert", "quantize_static", "quantize_dynamic"]


def prepare(model: nn.Module, config: QuantConfig | None = None,
            per_layer: dict[str, QuantConfig | None] | None = None) -> nn.Module:
    """Eval-mode copy of ``model`` ready for calibration.

    BatchNorms are folded first (``qlib.fold.fold_batchnorm``: layer names do not change,
    so ``per_layer`` uses the names of the original model), then every ``nn.Linear`` and
    ``nn.Conv2d`` is swapped for its fake-quant twin (``qlib.modules.swap_modules``) with
    observers on and quantization off. Its observers record only inside ``calibrate`` (or
    in training mode): evaluating the prepared model does not move its ranges.
    """
    prepared = set_quant_mode(swap_modules(fold_batchnorm(model), config, per_layer), observe=True, quantize=False)
    for fq in fake_quantizers(prepared).values():
        fq.calibrating = False  # eval-mode forwards record only inside calibrate
    return prepared.eval()


def calibrate(model: nn.Module, data, max_batches: int | None = None) -> nn.Module:
    """Run ``data`` through a prepared ``model`` so that its observers record ranges.

    ``data``: a tensor (one batch), a ``TensorDataset``, a DataLoader, or an iterable of
    tensors or of ``(x, y)`` batches; only ``x`` is used, moved to the model's device
    and floating dtype (``qlib.batching.input_batches``); a batch holding NaN or infinity
    raises ValueError naming it. ``max_batches`` stops early. Every quantizer whose
    ``observe`` switch is on records; the run is in eval mode under ``torch.no_grad`` with a
    progress bar (hidden when the output is not a terminal), and the model's modes are
    restored afterwards, also when an exception is raised. When it returns, the calibration is
    closed (``calibrating = False``): evaluating the model later does not move its ranges, and
    calling ``calibrate`` again adds more data. Updates ``model`` in place and returns it.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    fqs = fake_quantizers(model)
    if not fqs:
        raise ValueError("the model has no quantizers to calibrate: call qlib.ptq.prepare first")
    observing = [fq for fq in fqs.values() if fq.observe]
    if not observing:
        raise ValueError("no quantizer of the model has observe=True (is it converted already?): "
                         "calibrate a prepared model, or set_quant_mode(model, observe=True, quantize=False)")
    if max_batches is not None and (isinstance(max_batches, bool) or not isinstance(max_batches, int)
                                    or max_batches < 1):
        raise ValueError(f"max_batches must be a positive int or None, got {max_batches!r}")
    total = min(len(data), max_batches or len(data)) if hasattr(data, "__len__") else max_batches
    if isinstance(data, torch.Tensor):
        total = 1
    # finite=True: a batch with NaN or infinity stops the run, named by its index, before the
    # observers record it
    batches = itertools.islice(input_batches(data, device=model_device(model), dtype=model_dtype(model),
                                             finite=True), max_batches)
    seen = 0
    for fq in observing:
        fq.calibrating = True
    try:
        with eval_mode(model), torch.no_grad():
            for x in tqdm(batches, total=total, desc="calibrate", disable=None, leave=False):
                model(x)
                seen += 1
    finally:
        for fq in observing:
            fq.calibrating = False
    if seen == 0:
        raise ValueError("calibration data is empty: give at least one batch")
    return model


def convert(model: nn.Module) -> nn.Module:
    """A copy of a calibrated ``model`` with frozen qparams (observers off, quantization on).

    Raises ValueError if some quantizer has seen no data (calibrate first).
    """
    fqs = fake_quantizers(model)
    if not fqs:
        raise ValueError("the model has no quantizers to convert: call qlib.ptq.prepare first")
    blind = [name for name, fq in fqs.items() if not fq.dynamic and int(fq.observed_batches) == 0]
    if blind:
        raise ValueError(f"quantizers {blind[:3]}{'...' if len(blind) > 3 else ''} have seen no data: "
                         "run qlib.ptq.calibrate on the prepared model first")
    converted = copy.deepcopy(model).eval()
    for fq in fake_quantizers(converted).values():
        fq.freeze()
    return converted


def quantize_static(model: nn.Module, data, config: QuantConfig | None = None,
                    per_layer: dict[str, QuantConfig | None] | None = None,
                    max_batches: int | None = None) -> nn.Module:
    """``convert(calibrate(prepare(model, config, per_layer), data, max_batches))``."""
    return convert(calibrate(prepare(model, config, per_layer), data, max_batches))


def quantize_dynamic(model: nn.Module, bits: int = 8, config: QuantConfig | None = None,
                     per_layer: dict[str, QuantConfig | None] | None = None) -> nn.Module:
    """Dynamic PTQ: weights quantized now, input activations per batch at run time.

    ``bits`` sets weight and activation bits of the default config (weights symmetric
    per-channel, activations affine per-tensor); pass ``config`` (and ``per_layer``) for
    anything else, in which case leave ``bits`` at its default. The activation range is
    the min/max of each incoming batch, whatever ``act_observer`` says. BN is folded first.
    """
    if config is None:
        config = QuantConfig(weight_bits=bits, act_bits=bits)
    elif bits != 8:
        raise ValueError("give either bits or config, not both (config already holds the bits)")
    model = swap_modules(fold_batchnorm(model), config, per_layer)
    for layer in _fake_quant_layers(model):
        layer.weight_fq(layer.weight.detach())  # weights are known now: observe them once
        layer.weight_fq.freeze()
        layer.input_fq = FakeQuantize(layer.input_fq.observer, dynamic=True)
    return model.eval()


def _fake_quant_layers(model: nn.Module) -> list[nn.Module]:
    """The fake-quant layers (``QuantLinear``/``QuantConv2d``) of ``model``."""
    return [m for m in model.modules() if isinstance(getattr(m, "weight_fq", None), FakeQuantize)]

