"""The QAT pipeline: from a trained float model to a trained fake-quant model.

``quantization_aware_training(model, data, config, ...)``:

1. ``prepare_qat``: fold BatchNorm (or keep it until the end), swap in fake-quant layers;
2. ``calibrate_qat`` on ``calibration_batches`` training batches;
3. train with AdamW (no weight decay on LSQ step sizes; PACT's clipping levels get the weight
   decay, the paper's L2 penalty on alpha, and a learning rate of ``lr * alpha0``) and a
   one-cycle learning rate, applying the schedules (``qlib.qat.schedule``) at the start of each
   epoch, and stop early once the validation accuracy is within ``early_stop_margin`` points
   of fp32. The loss is cross-entropy, or distillation from the float model (``kd_weight``),
   plus oscillation dampening (``dampening``); ``freeze_threshold`` attaches iterative
   freezing (``qlib.qat.oscillation``);
4. freeze the activation observers, fold kept BatchNorms, return ``(model, history)``.

The recipe's settings live in a ``QATConfig``; the keyword arguments of older versions
(``epochs=``, ``lr=``, ``method=``, ...) still work and override it.
"""

from __future__ import annotations

import time

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import runtime
from ..batching import model_device, model_dtype, to_device
from ..lsq import LSQFakeQuantize
from ..modules import QuantConfig
from ..train import as_loader, evaluate, train_epoch
from .config import QATConfig
from ..pact import PACTFakeQuantize
from .convert import fold_kept_bn, step_sizes
from .losses import cross_entropy_objective, kd_objective, with_dampening
from .oscillation import OscillationFreezer
from .prepare import calibrate_qat, prepare_qat
from .schedule import check_schedule, freeze_bn_stats, freeze_observers, set_bits

__all__ = ["split_data", "quantization_aware_training"]


def split_data(data):
    """``Splits`` (``.train``, ``.val``) or a ``(train, val)`` pair -> ``(train, val)``."""
    if hasattr(data, "train") and hasattr(data, "val"):
        train, val = data.train, data.val
    elif isinstance(data, (tuple, list)) and len(data) == 2:
        train, val = data
    else:
        raise TypeError(f"data must be a qlib.data.Splits or a (train, val) pair, got {type(data).__name__}")
    if train is None:
        raise ValueError("training data is required")
    for name, part in (("training", train), ("validation", val)):
        if part is not None and hasattr(part, "__len__") and len(part) == 0:
            raise ValueError(f"the {name} data is empty")
    return train, val


class _OnDevice:
    """A loader whose batches arrive on ``device``, floating inputs in ``dtype`` (labels keep theirs);
    it keeps ``len`` for the learning-rate schedule."""

    def __init__(self, loader, device, dtype):
        self.loader, self.device, self.dtype = loader, device, dtype

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        # not iter_batches: its type check calls iter(loader) once more, which draws from a
        # shuffling DataLoader's generator and would change the training order
        for x, y in self.loader:
            yield to_device(x, self.device, self.dtype), to_device(y, self.device)


def _optimizer(qmodel: nn.Module, recipe: QATConfig, steps: int):
    """AdamW with three groups: the weights; LSQ step sizes (no weight decay); PACT clipping levels.

    Adam's steps are about ``lr`` in size whatever the gradient's scale. A step size of 0.05
    moves by 1% a step at lr 5e-4, but a clipping level of 5 by 0.01%: PACT's ``alpha`` gets
    ``lr * alpha0`` (its value after calibration), so it moves at the relative pace of the rest.
    """
    lsq = {id(p) for m in qmodel.modules() if isinstance(m, LSQFakeQuantize) for p in m.parameters()}
    pact = [m.alpha for m in qmodel.modules() if isinstance(m, PACTFakeQuantize)]
    params = [p for p in qmodel.parameters() if p.requires_grad]
    special = lsq | {id(p) for p in pact}
    groups = [{"params": [p for p in params if id(p) not in special]},
              {"params": [p for p in params if id(p) in lsq], "weight_decay": 0.0}]
    lrs = [recipe.lr, recipe.lr]
    for alpha in pact:
        groups.append({"params": [alpha]})
        lrs.append(recipe.lr * max(float(alpha.detach().abs()), 1e-3))
    opt = torch.optim.AdamW(groups, lr=recipe.lr, weight_decay=recipe.weight_decay)
    return opt, torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lrs, total_steps=steps)


def _objective(model: nn.Module, recipe: QATConfig):
    """The training loss: ``recipe.loss_fn``, cross-entropy, or distillation from ``model``; plus dampening."""
    if recipe.kd_weight > 0:
        base = kd_objective(model, recipe.kd_weight, recipe.kd_temperature)
    else:
        base = recipe.loss_fn or cross_entropy_objective
    return with_dampening(base, recipe.dampening)


def quantization_aware_training(model: nn.Module, data, config: QuantConfig | None = None, epochs: int | None = None,
                                lr: float | None = None, *, qat_config: QATConfig | None = None, **options):
    """QAT from a trained float ``model``; returns ``(qat_model, history)``. ``model`` is unchanged.

    ``data``: ``qlib.data.Splits`` or ``(train, val)`` (TensorDatasets, DataLoaders or lists
    of ``(x, y)`` batches; ``val`` may be None). ``config``: a ``QuantConfig`` (default W8A8).
    ``qat_config``: a ``QATConfig`` (the recipe); ``epochs``, ``lr`` and any ``QATConfig``
    field given as a keyword (``method="lsq"``, ``seed=1``, ...) override it.

    ``history``: per epoch ``loss``, ``val_acc``, ``weight_bits``, ``act_bits``, ``lr``;
    ``step_sizes[name]``: the quantizer's scale after calibration (entry 0) and after each
    epoch; ``fp32_val_acc``, ``final_val_acc`` (after folding kept BatchNorms), ``epochs_run``,
    ``stopped_early`` and ``time_s``; with ``freeze_threshold``, ``frozen_fraction`` per epoch
    (the share of weights frozen by iterative freezing). The returned model is in eval mode with its activation
    observers frozen (``qlib.modules.set_quant_mode(model, observe=True)`` to observe again).
    """
    recipe = QATConfig.build(qat_config, epochs=epochs, lr=lr, **options)
    config = QuantConfig() if config is None else config
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a qlib.modules.QuantConfig, got {type(config).__name__}")
    schedule = check_schedule(recipe.bits_schedule, config, recipe.epochs)
    train_data, val_data = split_data(data)
    start = time.perf_counter()
    qmodel = prepare_qat(model, config, recipe.method, recipe.fold_bn, recipe.per_layer, recipe.lsq_init)
    fp32_val = evaluate(model, val_data) if val_data is not None else None
    if 0 in schedule:
        set_bits(qmodel, *schedule[0])
    loader = _OnDevice(as_loader(train_data, recipe.batch_size, shuffle=True, seed=recipe.seed),
                       model_device(qmodel), model_dtype(qmodel))
    calibrate_qat(qmodel, loader, recipe.calibration_batches)
    history = {"loss": [], "val_acc": [], "weight_bits": [], "act_bits": [], "lr": [],
               "step_sizes": {k: [v] for k, v in step_sizes(qmodel).items()}, "fp32_val_acc": fp32_val,
               "stopped_early": False, "epochs_run": 0}
    bits = schedule.get(0, (config.weight_bits, config.act_bits))
    if recipe.epochs:
        opt, lr_schedule = _optimizer(qmodel, recipe, recipe.epochs * len(loader))
    loss_fn = _objective(model, recipe)
    freezer = None
    if recipe.freeze_threshold is not None:
        freezer = OscillationFreezer(qmodel, recipe.freeze_threshold, recipe.freeze_momentum)
        history["frozen_fraction"] = []
    bar = tqdm(range(recipe.epochs), desc=f"QAT {recipe.method}", disable=not recipe.progress or runtime.quiet())
    for epoch in bar:
        if epoch in schedule and epoch > 0:
            bits = schedule[epoch]
            set_bits(qmodel, *bits)
        if recipe.freeze_observer_epoch is not None and epoch >= recipe.freeze_observer_epoch:
            freeze_observers(qmodel)
        qmodel.train()
        if recipe.freeze_bn_epoch is not None and epoch >= recipe.freeze_bn_epoch:
            freeze_bn_stats(qmodel)
        history["lr"].append(opt.param_groups[0]["lr"])
        history["loss"].append(train_epoch(qmodel, loader, opt, lr_schedule, loss_fn))
        history["weight_bits"].append(bits[0])
        history["act_bits"].append(bits[1])
        if freezer is not None:
            history["frozen_fraction"].append(freezer.frozen_fraction())
        for name, s in step_sizes(qmodel).items():
            history["step_sizes"].setdefault(name, []).append(s)
        history["epochs_run"] = epoch + 1
        if val_data is None:
            continue
        history["val_acc"].append(evaluate(qmodel, val_data))  # eval mode: the observers do not record
        bar.set_postfix(loss=f"{history['loss'][-1]:.3f}", val=f"{history['val_acc'][-1]:.1f}",
                        bits=f"W{bits[0]}A{bits[1]}")
        if (recipe.early_stop_margin is not None and epoch >= max(schedule, default=0)
                and history["val_acc"][-1] >= fp32_val - recipe.early_stop_margin):
            history["stopped_early"] = epoch + 1 < recipe.epochs
            break
    if freezer is not None:
        freezer.remove()
    freeze_observers(qmodel)  # training is over: no observing of evaluation data
    qmodel = fold_kept_bn(qmodel).eval()
    history["final_val_acc"] = evaluate(qmodel, val_data) if val_data is not None else None
    history["time_s"] = time.perf_counter() - start
    return qmodel, history
