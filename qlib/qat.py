"""Quantization-aware training (QAT): train the network *through* its fake quantizers.

PTQ rounds a trained model and hopes; QAT keeps training with the rounding in the forward
pass, so the weights learn to live on the quantization grid. ``round`` has zero gradient
almost everywhere, so the backward pass uses the straight-through estimator (STE)::

    forward   y = fake_quantize(x) = (clamp(round(x/s) + z, qmin, qmax) - z) * s   (a staircase)
    backward  dy/dx = 1 where qmin <= round(x/s) + z <= qmax, else 0               (a mask)

``ste_staircase`` returns both, for plotting. Two ways to get the step size ``s``:

- ``method="ste"``: observers choose it. Activations keep their observer (the config's) on
  while training, until ``freeze_observer_epoch``. Weights use ``TrackingWeightFakeQuantize``:
  the observer (min-max, MSE, ...) picks a clipping ratio once, and the scale follows the
  min-max of the weights at every step.
- ``method="lsq"``: ``s`` (and the activation zero point) are learned (``qlib.lsq``).

The pipeline, ``quantization_aware_training``, from a trained float model:

1. fold BatchNorm into the layers (``fold_bn=True``), or keep it, training its statistics
   until ``freeze_bn_epoch``, and fold it at the end (exact for per-channel weight scales:
   scaling a channel by ``f`` scales its grid by ``|f|``);
2. swap in fake-quant layers (weights per-channel symmetric, activations per-tensor affine,
   as the ``QuantConfig`` says) and calibrate the activations on a few training batches;
3. train (AdamW, one-cycle learning rate) with cross-entropy, optionally lowering the bits
   on a schedule (``bits_schedule={0: 8, 2: 4, 4: 2}``: epoch -> bits, never below the
   config's), and stop early once the validation accuracy is within ``early_stop_margin``
   points of fp32;
4. ``convert_qat`` freezes every quantizer (what ``qlib.ptq.convert`` returns), and
   ``to_integer`` runs the result in integer arithmetic (``qlib.intmodel``).
"""

from __future__ import annotations

import copy
import time

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import runtime
from .fold import _set_submodule, find_layer_bn_pairs, fold_batchnorm, fold_bn
from .lsq import LSQFakeQuantize
from .modules import FakeQuantize, QuantConfig, swap_modules
from .observers import ObserverBase
from .qparams import check_tensor, choose_qparams, minmax, quant_range
from .quantize import fake_quantize
from .train import as_loader, evaluate, train_epoch

__all__ = ["METHODS", "ste_staircase", "FixedQParamsObserver", "TrackingWeightFakeQuantize", "qat_layers",
           "prepare_qat", "refresh_weight_qparams", "set_bits", "step_sizes", "convert_qat", "to_integer",
           "quantization_aware_training"]

METHODS = ("ste", "lsq")


def ste_staircase(x: torch.Tensor, scale, zero_point, quant_min: int, quant_max: int):
    """The STE's two faces on a 1-D grid ``x``: ``(y, grad_mask)``.

    ``y = fake_quantize(x)`` (the forward staircase, float32) and ``grad_mask`` (bool,
    ``x.shape``): where the straight-through gradient ``dy/dx`` is 1 rather than 0. Both
    come from ``qlib.quantize.fake_quantize`` and autograd, not from a formula written here.
    """
    check_tensor(x)
    x = x.detach().to(torch.float32).clone().requires_grad_(True)
    y = fake_quantize(x, scale, zero_point, quant_min, quant_max)
    (grad,) = torch.autograd.grad(y.sum(), x)
    return y.detach(), grad != 0


class FixedQParamsObserver(ObserverBase):
    """An observer that always answers the qparams it was given (learned ones, after QAT)."""

    def __init__(self, scale, zero_point, bits: int, symmetric: bool, granularity, signed: bool):
        super().__init__(bits=bits, symmetric=symmetric, granularity=granularity, signed=signed)
        self.register_buffer("fixed_scale", torch.as_tensor(scale, dtype=torch.float32).clone())
        self.register_buffer("fixed_zero_point", torch.as_tensor(zero_point, dtype=torch.int64).clone())
        self.num_batches.fill_(1)

    def forward(self, x):
        return x

    def calculate_qparams(self):
        return self.fixed_scale.clone(), self.fixed_zero_point.clone()


class TrackingWeightFakeQuantize(FakeQuantize):
    """STE weights in QAT: qparams follow the weights as they train.

    ``refresh(weight)`` lets the observer (min-max, MSE, ...) choose the weight's scale once
    and keeps it as a ratio of the plain min-max scale, per channel (MSE clips: ratio < 1).
    Every forward then uses ``ratio * minmax_scale(current weight)``: cheap, and no jumps.
    """

    def __init__(self, observer: nn.Module):
        super().__init__(observer, dynamic=True)
        self.register_buffer("clip_ratio", torch.ones(()))

    def minmax_qparams(self, w: torch.Tensor):
        min_val, max_val = minmax(w.detach(), self.granularity)
        return choose_qparams(min_val, max_val, self.quant_min, self.quant_max, self.observer.symmetric)

    @torch.no_grad()
    def refresh(self, weight: torch.Tensor) -> None:
        self.observer.reset()
        self.observer(weight.detach())
        self.clip_ratio = self.observer.calculate_qparams()[0] / self.minmax_qparams(weight)[0]
        self.observed_batches += 1

    def batch_qparams(self, w: torch.Tensor):
        scale, zero_point = self.minmax_qparams(w)
        return scale * self.clip_ratio, zero_point


def qat_layers(model: nn.Module) -> dict[str, nn.Module]:
    """``{name: layer}`` of the fake-quant layers (those with ``input_fq`` and ``weight_fq``)."""
    return {n: m for n, m in model.named_modules() if hasattr(m, "weight_fq") and hasattr(m, "input_fq")}


def _lsq_pair(cfg: QuantConfig, init: str | None):
    w_init = init or cfg.weight_observer
    a_init = init or cfg.act_observer
    weight = LSQFakeQuantize(cfg.weight_bits, cfg.weight_symmetric, cfg.weight_granularity, cfg.weight_signed,
                             init=w_init, batch_axis=None)
    act = LSQFakeQuantize(cfg.act_bits, cfg.act_symmetric, cfg.act_granularity, cfg.act_signed,
                          init=a_init, batch_axis=0)
    return weight, act


def prepare_qat(model: nn.Module, config: QuantConfig | None = None, method: str = "ste",
                fold_bn: bool = True, per_layer: dict | None = None, lsq_init: str | None = None) -> nn.Module:
    """A train-mode copy of ``model`` with fake-quant layers, ready for calibration and QAT.

    ``method="ste"``: activations get the config's observer (``FakeQuantize``), weights a
    ``TrackingWeightFakeQuantize``. ``method="lsq"``: ``LSQFakeQuantize`` everywhere, their
    step sizes set by the first data they see (``lsq_init``: ``"lsq"`` or an observer name;
    default: the config's observers). ``fold_bn=False`` keeps the BatchNorms (module docstring).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    pairs = [] if fold_bn else find_layer_bn_pairs(model)
    qmodel = swap_modules(fold_batchnorm(model) if fold_bn else model, config, per_layer)  # a copy
    qmodel.qat_bn_pairs = pairs  # folded after training (names are those of ``model``)
    for layer in qat_layers(qmodel).values():
        if method == "lsq":  # step sizes are set by the first data (the weights: first forward)
            layer.weight_fq, layer.input_fq = _lsq_pair(layer.config, lsq_init)
        else:
            layer.weight_fq = TrackingWeightFakeQuantize(layer.config.weight_observer_factory())
    refresh_weight_qparams(qmodel)
    return qmodel.train()


def refresh_weight_qparams(model: nn.Module) -> nn.Module:
    """STE weights: let each weight's observer choose its clipping ratio on the current weights."""
    for layer in qat_layers(model).values():
        if isinstance(layer.weight_fq, TrackingWeightFakeQuantize):
            layer.weight_fq.refresh(layer.weight)
    return model


def set_bits(model: nn.Module, weight_bits: int | None = None, act_bits: int | None = None) -> nn.Module:
    """Set the bits of every quantizer, never below its layer's config (``None`` keeps them).

    STE quantizers keep their observed ranges (the qparams are recomputed for the new
    range of codes); LSQ quantizers keep their learned clipping range.
    """
    for layer in qat_layers(model).values():
        cfg = layer.config
        for fq, bits, floor in ((layer.weight_fq, weight_bits, cfg.weight_bits), (layer.input_fq, act_bits, cfg.act_bits)):
            if bits is None:
                continue
            bits = max(bits, floor)
            quant_range(bits)  # validates
            if isinstance(fq, LSQFakeQuantize):
                fq.set_bits(bits)
            else:
                obs = fq.observer
                obs.quant_min, obs.quant_max = quant_range(bits, obs.signed)
                obs.bits, fq._cached = bits, None
    refresh_weight_qparams(model)
    return model


def _qparams_now(fq, layer) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The ``(scale, zero_point)`` a quantizer uses now; None before it has seen data."""
    if isinstance(fq, LSQFakeQuantize):
        return fq.qparams() if bool(fq.initialized) else None
    if isinstance(fq, TrackingWeightFakeQuantize):
        return fq.batch_qparams(layer.weight)
    return fq.qparams() if int(fq.observed_batches) > 0 and not fq.dynamic else None


def step_sizes(model: nn.Module) -> dict[str, float | list[float]]:
    """``{quantizer name: scale}`` (a float per tensor, a list per channel), e.g. ``"0.input_fq"``."""
    out = {}
    for name, layer in qat_layers(model).items():
        for part in ("input_fq", "weight_fq"):
            qparams = _qparams_now(getattr(layer, part), layer)
            if qparams is not None:
                s = qparams[0].detach().reshape(-1)
                out[f"{name}.{part}" if name else part] = s.item() if s.numel() == 1 else s.tolist()
    return out


def _frozen(fq, layer) -> FakeQuantize:
    """A frozen plain ``FakeQuantize`` with the qparams ``fq`` uses now."""
    if type(fq) is FakeQuantize:
        return copy.deepcopy(fq).freeze()
    qparams = _qparams_now(fq, layer)
    if qparams is None:
        raise ValueError("a quantizer has seen no data: calibrate or train the QAT model first")
    obs = fq.observer
    frozen = FakeQuantize(FixedQParamsObserver(*qparams, obs.bits, obs.symmetric, obs.granularity, obs.signed))
    frozen.observed_batches.fill_(1)
    return frozen.freeze()


@torch.no_grad()
def _fold_kept_bn(model: nn.Module) -> nn.Module:
    """Fold the BatchNorms kept during QAT: ``w' = w * f``, and per-channel weight scales ``s' = s |f|``.

    LSQ scales are multiplied by ``|f|``; STE weight scales follow the min-max of the folded
    weights by themselves (their clip ratio must not be searched again: the weights were
    trained on this grid)."""
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
        _set_submodule(model, bn_name, nn.Identity())
    model.qat_bn_pairs = []
    return model


def convert_qat(model: nn.Module) -> nn.Module:
    """An eval-mode copy of a QAT model with every quantizer frozen (plain ``FakeQuantize``).

    Kept BatchNorms are folded first. The result is what ``qlib.ptq.convert`` returns, so
    ``qlib.intmodel.convert_to_integer`` accepts it.
    """
    layers = qat_layers(model)
    if not layers:
        raise ValueError("no fake-quant layers: prepare the model with prepare_qat first")
    model = _fold_kept_bn(copy.deepcopy(model)).eval()
    for layer in qat_layers(model).values():
        layer.input_fq, layer.weight_fq = _frozen(layer.input_fq, layer), _frozen(layer.weight_fq, layer)
    return model


def to_integer(model: nn.Module):
    """``qlib.intmodel.convert_to_integer(convert_qat(model))``: integer-only inference."""
    from .intmodel import convert_to_integer
    return convert_to_integer(convert_qat(model))


# ------------------------------------------------------------------ the training pipeline
def _split_data(data):
    """``Splits`` (``.train``, ``.val``) or a ``(train, val)`` pair -> ``(train, val)``."""
    if hasattr(data, "train") and hasattr(data, "val"):
        train, val = data.train, data.val
    elif isinstance(data, (tuple, list)) and len(data) == 2:
        train, val = data
    else:
        raise TypeError(f"data must be a qlib.data.Splits or a (train, val) pair, got {type(data).__name__}")
    for name, part in (("training", train), ("validation", val)):
        if part is not None and len(part) == 0:
            raise ValueError(f"the {name} data is empty")
    if train is None:
        raise ValueError("training data is required")
    return train, val


def _check_schedule(bits_schedule, config: QuantConfig, epochs: int) -> dict:
    if bits_schedule is None:
        return {}
    if not isinstance(bits_schedule, dict) or 0 not in bits_schedule:
        raise ValueError(f"bits_schedule must be a dict {{epoch: bits}} starting at epoch 0, got {bits_schedule!r}")
    sched = {}
    for epoch, bits in sorted(bits_schedule.items()):
        if isinstance(epoch, bool) or not isinstance(epoch, int) or not 0 <= epoch < max(epochs, 1):
            raise ValueError(f"bits_schedule epochs must be ints in [0, epochs={epochs}), got {epoch!r}")
        w, a = bits if isinstance(bits, (tuple, list)) else (bits, bits)
        quant_range(w), quant_range(a)  # TypeError/ValueError for bad bits
        sched[epoch] = (max(w, config.weight_bits), max(a, config.act_bits))
    if sched[max(sched)] != (config.weight_bits, config.act_bits):
        raise ValueError(f"bits_schedule ends at W{sched[max(sched)][0]}A{sched[max(sched)][1]}, above the "
                         f"config's W{config.weight_bits}A{config.act_bits}: the last entry must reach them")
    return sched


def _act_quantizers(model: nn.Module) -> list:
    return [layer.input_fq for layer in qat_layers(model).values()]


def _calibrate(model: nn.Module, loader, batches: int) -> None:
    """Record activation ranges on a few batches (float activations), then quantize them."""
    acts = _act_quantizers(model)
    for fq in acts:
        if isinstance(fq, LSQFakeQuantize):
            fq.calibrating = True
        else:
            fq.observe, fq.quantize = True, False
    model.eval()
    with torch.no_grad():
        for i, (x, _) in enumerate(loader):
            if i == batches:
                break
            model(x)
    for fq in acts:
        if isinstance(fq, LSQFakeQuantize):
            fq.calibrating = False
            fq.initialize()
        else:
            fq.quantize = True  # QAT: keep observing, and quantize


def _quiet_evaluate(model: nn.Module, data) -> float:
    """Accuracy without letting the STE observers see the evaluation data."""
    acts = [fq for fq in _act_quantizers(model) if isinstance(fq, FakeQuantize)]
    saved = [fq.observe for fq in acts]
    for fq in acts:
        fq.observe = False
    try:
        return evaluate(model, data)
    finally:
        for fq, observe in zip(acts, saved):
            fq.observe = observe


def quantization_aware_training(model: nn.Module, data, config: QuantConfig | None = None, epochs: int = 15,
                                lr: float = 5e-4, *, method: str = "ste", fold_bn: bool = True,
                                freeze_bn_epoch: int | None = None, freeze_observer_epoch: int | None = None,
                                bits_schedule: dict | None = None, early_stop_margin: float | None = None,
                                per_layer: dict | None = None, lsq_init: str | None = None,
                                weight_decay: float = 1e-4, batch_size: int = 64, calibration_batches: int = 4,
                                loss_fn=None, seed: int = 0, progress: bool = True):
    """QAT from a trained float ``model``; returns ``(qat_model, history)``. ``model`` is unchanged.

    ``data``: ``qlib.data.Splits`` or ``(train, val)`` (TensorDatasets, DataLoaders or lists
    of ``(x, y)`` batches; ``val`` may be None). ``config``: a ``QuantConfig`` (default W8A8).
    ``epochs=0`` only calibrates: that is static PTQ. ``loss_fn(model, x, y)`` replaces
    cross-entropy (distillation). The other options are described in the module docstring.

    ``history``: per epoch ``loss``, ``val_acc``, ``weight_bits``, ``act_bits``, ``lr``;
    ``step_sizes[name]``: the quantizer's scale after calibration (entry 0) and after each
    epoch; ``fp32_val_acc``, ``final_val_acc`` (after folding kept BatchNorms), ``epochs_run``,
    ``stopped_early`` and ``time_s``. The returned model is in eval mode with its activation
    observers frozen (``qlib.modules.set_quant_mode(model, observe=True)`` to observe again).
    """
    config = QuantConfig() if config is None else config
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a qlib.modules.QuantConfig, got {type(config).__name__}")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"epochs must be an int >= 0, got {epochs!r}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if early_stop_margin is not None and not early_stop_margin >= 0:
        raise ValueError(f"early_stop_margin must be >= 0 (accuracy points) or None, got {early_stop_margin}")
    if calibration_batches < 1:
        raise ValueError(f"calibration_batches must be >= 1, got {calibration_batches}")
    schedule = _check_schedule(bits_schedule, config, epochs)
    train_data, val_data = _split_data(data)
    start = time.perf_counter()
    qmodel = prepare_qat(model, config, method, fold_bn, per_layer, lsq_init)
    fp32_val = evaluate(model, val_data) if val_data is not None else None
    if 0 in schedule:
        set_bits(qmodel, *schedule[0])
    loader = as_loader(train_data, batch_size, shuffle=True, seed=seed)
    _calibrate(qmodel, loader, calibration_batches)
    history = {"loss": [], "val_acc": [], "weight_bits": [], "act_bits": [], "lr": [],
               "step_sizes": {k: [v] for k, v in step_sizes(qmodel).items()}, "fp32_val_acc": fp32_val,
               "stopped_early": False, "epochs_run": 0}
    bits = schedule.get(0, (config.weight_bits, config.act_bits))
    if epochs:
        quant_params = {id(p) for m in qmodel.modules() if isinstance(m, LSQFakeQuantize) for p in m.parameters()}
        params = [p for p in qmodel.parameters() if p.requires_grad]
        opt = torch.optim.AdamW([{"params": [p for p in params if id(p) not in quant_params]},
                                 {"params": [p for p in params if id(p) in quant_params], "weight_decay": 0.0}],
                                lr=lr, weight_decay=weight_decay)
        lr_schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * len(loader))
        loss_fn = loss_fn or (lambda m, x, y: F.cross_entropy(m(x), y))
    bar = tqdm(range(epochs), desc=f"QAT {method}", disable=not progress or runtime.quiet())
    for epoch in bar:
        if epoch in schedule and epoch > 0:
            bits = schedule[epoch]
            set_bits(qmodel, *bits)
        if freeze_observer_epoch is not None and epoch >= freeze_observer_epoch:
            for fq in _act_quantizers(qmodel):
                if isinstance(fq, FakeQuantize) and fq.observe:
                    fq.freeze()
        qmodel.train()
        if freeze_bn_epoch is not None and epoch >= freeze_bn_epoch:
            for m in qmodel.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()  # use and keep the running statistics
        history["lr"].append(opt.param_groups[0]["lr"])
        history["loss"].append(train_epoch(qmodel, loader, opt, lr_schedule, loss_fn))
        history["weight_bits"].append(bits[0])
        history["act_bits"].append(bits[1])
        for name, s in step_sizes(qmodel).items():
            history["step_sizes"].setdefault(name, []).append(s)
        history["epochs_run"] = epoch + 1
        if val_data is None:
            continue
        history["val_acc"].append(_quiet_evaluate(qmodel, val_data))
        bar.set_postfix(loss=f"{history['loss'][-1]:.3f}", val=f"{history['val_acc'][-1]:.1f}", bits=f"W{bits[0]}A{bits[1]}")
        if (early_stop_margin is not None and epoch >= max(schedule, default=0)
                and history["val_acc"][-1] >= fp32_val - early_stop_margin):
            history["stopped_early"] = epoch + 1 < epochs
            break
    for fq in _act_quantizers(qmodel):  # training is over: no observing of evaluation data
        if isinstance(fq, FakeQuantize) and fq.observe:
            fq.freeze()
    qmodel = _fold_kept_bn(qmodel).eval()
    history["final_val_acc"] = _quiet_evaluate(qmodel, val_data) if val_data is not None else None
    history["time_s"] = time.perf_counter() - start
    return qmodel, history
