"""``FakeQuantize``: an observer and ``fake_quantize`` behind two switches.

A fake-quant layer (``qlib.modules``) has one ``FakeQuantize`` for its input and one for its
weight. Each holds an observer (``qlib.observers``) and two switches, as in
``torch.ao.quantization.FakeQuantize``:

- ``observe``: the observer records the tensors that flow by;
- ``quantize``: the tensor is replaced by ``fake_quantize(x, scale, zero_point)``.

*When* it records: in training mode (QAT) whenever ``observe`` is on; in eval mode only
while calibrating. Switching ``observe`` on opens a calibration (``calibrating = True``), so
"set ``observe=True``, run the batches in eval mode" calibrates; ``qlib.ptq.calibrate`` closes
it when it returns (``calibrating = False``), so evaluating a prepared model afterwards never
moves its ranges. ``freeze()`` ends observing for good.

PTQ calibrates with ``observe=True, quantize=False``, then freezes (``observe=False,
quantize=True``: the qparams are computed once and kept in the buffers ``frozen_scale`` /
``frozen_zero_point``, so they travel with ``state_dict``, ``load_state_dict`` and ``.to()``).
QAT uses both switches at once. ``dynamic=True`` instead computes min-max qparams from every
incoming batch.

Example (what ``qlib.ptq`` does for every quantizer of a model)::

    fq = FakeQuantize(make_observer("minmax", bits=8))
    fq.eval()
    for x in calibration_batches:
        fq(x)                          # observe=True: records, returns x unchanged
    fq.freeze()                        # observe=False, quantize=True
    x_dq = fq(x)                       # fake-quantized with the frozen (scale, zero_point)
"""

from __future__ import annotations

import torch
from torch import nn

from .qparams import PerChannel, PerGroup, minmax_qparams
from .quantize import fake_quantize

__all__ = ["FakeQuantize"]


class FakeQuantize(nn.Module):
    """Observer + ``fake_quantize``, switched by ``observe``/``quantize`` (module docstring).

    ``forward(x)`` returns a tensor of ``x``'s shape and dtype. ``calculate_qparams()`` (alias
    ``qparams()``) gives the ``(scale float32, zero_point int64)`` in use; once ``observe`` is off
    they are computed once and kept in buffers. ``observed_batches`` counts the tensors the
    observer has recorded (a buffer, so it survives ``state_dict``).
    """

    def __init__(self, observer: nn.Module, dynamic: bool = False):
        super().__init__()
        if not isinstance(observer, nn.Module) or not hasattr(observer, "calculate_qparams"):
            raise TypeError(f"observer must be a qlib observer module, got {type(observer).__name__}")
        self.observer = observer
        self.dynamic = bool(dynamic)
        self.register_buffer("observed_batches", torch.tensor(0))
        self.register_buffer("frozen_scale", torch.empty(0))           # empty: not frozen yet
        self.register_buffer("frozen_zero_point", torch.empty(0, dtype=torch.int64))
        self.observe = not dynamic
        self.quantize = self.dynamic

    quant_min = property(lambda self: self.observer.quant_min)
    quant_max = property(lambda self: self.observer.quant_max)
    bits = property(lambda self: self.observer.bits)
    granularity = property(lambda self: self.observer.granularity)

    @property
    def observe(self) -> bool:
        """Whether the observer is on. Switching it on opens a calibration (``calibrating``)."""
        return self._observe

    @observe.setter
    def observe(self, on: bool) -> None:
        self._observe = bool(on)
        self.calibrating = self._observe
        if self._observe:
            self.clear_frozen()

    def clear_frozen(self) -> None:
        """Forget the frozen qparams: the next ``qparams()`` computes them from the observer."""
        self.frozen_scale = self.frozen_scale.new_empty(0)
        self.frozen_zero_point = self.frozen_zero_point.new_empty(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dynamic:
            return self._fake_quantize(x, *self.batch_qparams(x))
        if self.observe and (self.training or self.calibrating):
            self.observer(x.detach())
            self.observed_batches += 1
        if not self.quantize:
            return x
        return self._fake_quantize(x, *self.qparams())

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale float32, zero_point int64)`` from the observer; computed once when frozen."""
        if self.dynamic:
            raise ValueError("a dynamic FakeQuantize has no fixed qparams: they come from each batch")
        if int(self.observed_batches) == 0:
            raise ValueError("this observer has seen no data: run calibration (qlib.ptq.calibrate) first")
        if self.observe:
            return self.observer.calculate_qparams()
        if self.frozen_scale.numel() == 0:
            scale, zero_point = self.observer.calculate_qparams()
            self.frozen_scale = scale.to(torch.float32, copy=True)
            self.frozen_zero_point = zero_point.to(torch.int64, copy=True)
        return self.frozen_scale, self.frozen_zero_point

    qparams = calculate_qparams  # qlib's older name

    def _apply(self, fn, *args, **kwargs):
        """``.to()``, ``.cuda()``, ``.double()``...: the frozen qparams follow the device but keep
        their dtypes (a scale cast to bfloat16 and back would move the grid)."""
        scale, zero_point = self.frozen_scale, self.frozen_zero_point
        super()._apply(fn, *args, **kwargs)
        self.frozen_scale = scale.to(self.frozen_scale.device)
        self.frozen_zero_point = zero_point.to(self.frozen_zero_point.device)
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in ("frozen_scale", "frozen_zero_point"):  # the shape comes with the data
            current = getattr(self, name)
            saved = state_dict.setdefault(prefix + name, current.new_empty(0))  # older checkpoints
            if saved.shape != current.shape:
                setattr(self, name, current.new_empty(saved.shape))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def batch_qparams(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Min-max qparams of ``x`` alone (dynamic quantization), with the observer's settings:
        ``qlib.qparams.minmax_qparams``."""
        return minmax_qparams(x.detach(), self.quant_min, self.quant_max, self.observer.symmetric,
                              self.granularity)

    def freeze(self) -> "FakeQuantize":
        """Stop observing, start quantizing with the qparams computed now."""
        if not self.dynamic:
            self.observe, self.quantize = False, True
            self.clear_frozen()
            self.qparams()
        return self

    def _fake_quantize(self, x, scale, zero_point):
        g = self.granularity
        if isinstance(g, PerChannel):
            return fake_quantize(x, scale, zero_point, self.quant_min, self.quant_max, axis=g.axis)
        if isinstance(g, PerGroup):
            return fake_quantize(x, scale, zero_point, self.quant_min, self.quant_max,
                                 axis=g.axis, group_size=g.group_size)
        return fake_quantize(x, scale, zero_point, self.quant_min, self.quant_max)

    def extra_repr(self) -> str:
        mode = "dynamic" if self.dynamic else f"observe={self.observe}, quantize={self.quantize}"
        if self.observe and not self.calibrating:
            mode += " (eval mode: not recording)"
        return f"bits={self.bits}, {mode}"
