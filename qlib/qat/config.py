"""``QATConfig``: the training recipe of ``quantization_aware_training``, in one frozen object.

``QuantConfig`` (``qlib.modules``) says *what* the quantized model is (bits, granularity,
observers); ``QATConfig`` says *how* to train it. Make variants with
``dataclasses.replace(recipe, epochs=30)``. Every field is checked when the object is built,
so a bad recipe fails before any training starts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

__all__ = ["QATConfig"]


def _int(name: str, value, low: int = 0, none: bool = False) -> None:
    if value is None and none:
        return
    expected = f"{name} must be an int >= {low}{' or None' if none else ''}, got {value!r}"
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(expected)
    if value < low:
        raise ValueError(expected)


@dataclass(frozen=True)
class QATConfig:
    """How to train (every field has a default; see ``qlib.qat`` for the recipe).

    - ``epochs`` (15; 0 only calibrates: static PTQ), ``lr`` (5e-4, the one-cycle peak),
      ``weight_decay`` (1e-4; never on LSQ step sizes), ``batch_size`` (64), ``seed`` (0: the
      shuffling order), ``loss_fn(model, x, y)`` (None: cross-entropy; distillation replaces it);
    - ``method``: ``"ste"`` (observers pick the scales), ``"lsq"`` (learned step sizes) or
      ``"pact"`` (learned activation clipping levels, STE weights: ``qlib.pact``), ``lsq_init``
      (None: the config's observers, or ``"lsq"``, or an observer name);
    - ``fold_bn`` (True), ``freeze_bn_epoch``, ``freeze_observer_epoch``, ``bits_schedule``
      (``qlib.qat.schedule``), ``per_layer`` (``{layer name: QuantConfig or None}``);
    - ``calibration_batches`` (4) before training, ``early_stop_margin`` (None, or accuracy
      points: stop once validation is that close to fp32), ``progress`` (a tqdm bar);
    - ``kd_weight`` (0: plain cross-entropy; in (0, 1]: distillation from the float model,
      ``qlib.qat.losses.kd_objective``) and ``kd_temperature`` (4.0);
    - ``dampening`` (0: off; Nagel et al.'s oscillation dampening weight), ``freeze_threshold``
      (None: off; iterative freezing of weights whose oscillation frequency exceeds it) and
      ``freeze_momentum`` (0.01: the averaging constant of that frequency), ``qlib.qat.oscillation``.
    """

    epochs: int = 15
    lr: float = 5e-4
    method: str = "ste"
    fold_bn: bool = True
    freeze_bn_epoch: int | None = None
    freeze_observer_epoch: int | None = None
    bits_schedule: dict | None = field(default=None, hash=False)
    early_stop_margin: float | None = None
    per_layer: dict | None = field(default=None, hash=False)
    lsq_init: str | None = None
    weight_decay: float = 1e-4
    batch_size: int = 64
    calibration_batches: int = 4
    loss_fn: object = None
    seed: int = 0
    progress: bool = True
    kd_weight: float = 0.0
    kd_temperature: float = 4.0
    dampening: float = 0.0
    freeze_threshold: float | None = None
    freeze_momentum: float = 0.01

    def __post_init__(self):
        from .prepare import METHODS

        _int("epochs", self.epochs)
        for name in ("lr", "weight_decay"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name} must be a number, got {type(value).__name__}")
            if not math.isfinite(value):
                raise ValueError(f"{name} must be finite, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        _int("freeze_bn_epoch", self.freeze_bn_epoch, none=True)
        _int("freeze_observer_epoch", self.freeze_observer_epoch, none=True)
        _int("batch_size", self.batch_size, 1)
        _int("calibration_batches", self.calibration_batches, 1)
        _int("seed", self.seed)
        margin = self.early_stop_margin
        if margin is not None and (isinstance(margin, bool) or not isinstance(margin, (int, float))):
            raise TypeError(f"early_stop_margin must be a number (accuracy points) or None, got {margin!r}")
        if margin is not None and not margin >= 0:
            raise ValueError(f"early_stop_margin must be >= 0 (accuracy points) or None, got {margin!r}")
        for name in ("bits_schedule", "per_layer"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), dict):
                raise TypeError(f"{name} must be a dict or None, got {type(getattr(self, name)).__name__}")
        if self.lsq_init is not None and not isinstance(self.lsq_init, str):
            raise TypeError(f"lsq_init must be None, 'lsq' or an observer name, got {type(self.lsq_init).__name__}")
        if self.loss_fn is not None and not callable(self.loss_fn):
            raise TypeError(f"loss_fn must be callable as loss_fn(model, x, y), got {type(self.loss_fn).__name__}")
        for name, low, high in (("kd_weight", 0, 1), ("dampening", 0, math.inf), ("freeze_momentum", 0, 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name} must be a number, got {type(value).__name__}")
            if not low <= value <= high or (name == "freeze_momentum" and value == 0):
                raise ValueError(f"{name} must lie in [{low}, {high}]{' and be > 0' if name == 'freeze_momentum' else ''}, "
                                 f"got {value!r}")
        t = self.kd_temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t < math.inf:
            raise ValueError(f"kd_temperature must be a finite number > 0, got {t!r}")
        f = self.freeze_threshold
        if f is not None and (isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f <= 1):
            raise ValueError(f"freeze_threshold must be None or a frequency in (0, 1], got {f!r}")
        if self.kd_weight > 0 and self.loss_fn is not None:
            raise ValueError("give either loss_fn or kd_weight > 0 (distillation builds its own loss), not both")
        if not isinstance(self.fold_bn, bool) or not isinstance(self.progress, bool):
            raise TypeError("fold_bn and progress must be True or False")

    @classmethod
    def build(cls, base: "QATConfig | None" = None, **options) -> "QATConfig":
        """``base`` (default ``QATConfig()``) with ``options`` replaced; options set to None are ignored
        only for ``epochs`` and ``lr`` (positional arguments of ``quantization_aware_training``)."""
        base = cls() if base is None else base
        if not isinstance(base, cls):
            raise TypeError(f"qat_config must be a QATConfig, got {type(base).__name__}")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise TypeError(f"unknown QAT option(s) {unknown}; expected some of {sorted(names)}")
        for name in ("epochs", "lr"):
            if options.get(name, 0) is None:
                del options[name]
        values = {f.name: getattr(base, f.name) for f in fields(cls)}
        values.update(options)
        return cls(**values)
