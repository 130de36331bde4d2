"""Preparing a float model for QAT: fake-quant layers, then a first calibration.

``prepare_qat`` copies the model, (optionally) folds its BatchNorms, and swaps every
``nn.Linear``/``nn.Conv2d`` for a fake-quant layer (``qlib.modules.swap_modules``) whose
quantizers depend on the method:

- ``"ste"``: activations keep the config's observer (``FakeQuantize``: it records while
  training, until it is frozen); weights get a ``TrackingWeightFakeQuantize`` (``qat.ste``).
- ``"lsq"``: ``LSQFakeQuantize`` everywhere (``qlib.lsq``): the scales are parameters.
- ``"pact"``: activations get ``PACTFakeQuantize`` (``qlib.pact``: a learned clipping level
  ``alpha``, started at the calibrated maximum), weights the STE's ``TrackingWeightFakeQuantize``
  (the paper quantized weights with DoReFa; qlib keeps its per-channel weight grid, so that the
  comparison with the other methods changes the activations only).

``calibrate_qat`` then runs a few batches through the model in eval mode with the activations
in float, so that each activation quantizer starts from the range of the float activations
(observers record; LSQ sets its initial step size, PACT its clipping level), and switches
quantization on.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

from ..batching import eval_mode, input_batches, model_device, model_dtype
from ..fold import find_layer_bn_pairs, fold_batchnorm
from ..lsq import LSQFakeQuantize
from ..modules import FakeQuantize, QuantConfig, swap_modules
from ..pact import PACTFakeQuantize
from .ste import TrackingWeightFakeQuantize

__all__ = ["METHODS", "LEARNED", "qat_layers", "prepare_qat", "refresh_weight_qparams", "calibrate_qat"]

METHODS = ("ste", "lsq", "pact")
LEARNED = (LSQFakeQuantize, PACTFakeQuantize)
"""Quantizers whose qparams are parameters: they record during calibration, then ``initialize()``."""


def qat_layers(model: nn.Module) -> dict[str, nn.Module]:
    """``{name: layer}`` of the fake-quant layers (those with ``input_fq`` and ``weight_fq``)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    return {n: m for n, m in model.named_modules() if hasattr(m, "weight_fq") and hasattr(m, "input_fq")}


def _lsq_pair(cfg: QuantConfig, init: str | None) -> tuple[LSQFakeQuantize, LSQFakeQuantize]:
    weight = LSQFakeQuantize(cfg.weight_bits, cfg.weight_symmetric, cfg.weight_granularity, cfg.weight_signed,
                             init=init or cfg.weight_observer, batch_axis=None)
    act = LSQFakeQuantize(cfg.act_bits, cfg.act_symmetric, cfg.act_granularity, cfg.act_signed,
                          init=init or cfg.act_observer, batch_axis=0)
    return weight, act


def prepare_qat(model: nn.Module, config: QuantConfig | None = None, method: str = "ste",
                fold_bn: bool = True, per_layer: dict | None = None, lsq_init: str | None = None) -> nn.Module:
    """A train-mode copy of ``model`` with fake-quant layers, ready for ``calibrate_qat`` and QAT.

    ``method``: ``"ste"`` or ``"lsq"`` (module docstring). ``lsq_init``: how LSQ step sizes
    start, ``"lsq"`` (the paper's ``2 mean|x| / sqrt(qmax)``) or an observer name (default: the
    config's observers). ``fold_bn=False`` keeps the BatchNorms; their pairs are remembered in
    ``model.qat_bn_pairs`` and folded by ``convert_qat``. ``model`` is unchanged.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    if lsq_init is not None and not isinstance(lsq_init, str):
        raise TypeError(f"lsq_init must be None, 'lsq' or an observer name, got {type(lsq_init).__name__}")
    pairs = [] if fold_bn else find_layer_bn_pairs(model)
    qmodel = swap_modules(fold_batchnorm(model) if fold_bn else model, config, per_layer)  # a copy
    qmodel.qat_bn_pairs = pairs  # folded after training (names are those of ``model``)
    for layer in qat_layers(qmodel).values():
        if method == "lsq":  # step sizes are set by the first data (the weights: first forward)
            layer.weight_fq, layer.input_fq = _lsq_pair(layer.config, lsq_init)
        else:
            layer.weight_fq = TrackingWeightFakeQuantize(layer.config.weight_observer_factory())
            if method == "pact":
                layer.input_fq = PACTFakeQuantize(layer.config.act_bits, init=lsq_init or "minmax")
    refresh_weight_qparams(qmodel)
    return qmodel.train()


def refresh_weight_qparams(model: nn.Module) -> nn.Module:
    """STE weights: let each weight's observer choose its clipping ratio on the current weights."""
    for layer in qat_layers(model).values():
        if isinstance(layer.weight_fq, TrackingWeightFakeQuantize):
            layer.weight_fq.refresh(layer.weight)
    return model


def act_quantizers(model: nn.Module) -> list[nn.Module]:
    """The activation quantizers (``input_fq``) of every fake-quant layer."""
    return [layer.input_fq for layer in qat_layers(model).values()]


def calibrate_qat(model: nn.Module, data, batches: int = 4) -> nn.Module:
    """Start every activation quantizer from the float activations of ``batches`` batches.

    ``data``: anything ``qlib.batching.input_batches`` accepts (a DataLoader of ``(x, y)``...),
    moved to the model's device and floating dtype. Runs in eval mode under ``torch.no_grad`` (the model's modes
    are restored afterwards, also on an exception). STE activations then observe *and*
    quantize (QAT); LSQ activations take their initial step size. Returns ``model``.
    """
    if isinstance(batches, bool) or not isinstance(batches, int) or batches < 1:
        raise ValueError(f"calibration batches must be an int >= 1, got {batches!r}")
    acts = act_quantizers(model)
    if not acts:
        raise ValueError("no fake-quant layers: prepare the model with prepare_qat first")
    for fq in acts:
        if isinstance(fq, LEARNED):
            fq.calibrating = True
        else:
            fq.observe, fq.quantize = True, False  # switching observe on opens the calibration
    seen = 0
    try:
        with eval_mode(model), torch.no_grad():
            for x in itertools.islice(input_batches(data, device=model_device(model), dtype=model_dtype(model),
                                                    finite=True), batches):
                model(x)
                seen += 1
    finally:
        for fq in acts:
            fq.calibrating = False
    if seen == 0:
        raise ValueError("the calibration data is empty: give at least one batch")
    for fq in acts:
        if isinstance(fq, LEARNED):
            fq.initialize()
        elif isinstance(fq, FakeQuantize):
            fq.quantize = True  # QAT: keep observing (while training), and quantize
    return model
