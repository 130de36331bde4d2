"""Fake-quantized layers: where observers and fake_quantize meet a real network.

A quantized layer computes ``y = W_q x_q + b`` with integer ``W_q`` and ``x_q``. In training
and in experiments we *simulate* that in float ("fake quantization")::

    x_dq = fake_quantize(x)          input activation: affine, per-tensor, unsigned codes
    w_dq = fake_quantize(W)          weight: symmetric, per-channel (output channels), signed
    y    = linear(x_dq, w_dq, b)     the bias stays float (the integer kernel keeps it in int32)

Each ``fake_quantize`` is a ``FakeQuantize`` module (``qlib.fakequant``: an observer and two
switches, ``observe`` and ``quantize``; re-exported here).

``QuantConfig`` says how to quantize (bits, symmetric, granularity, observer);
``swap_modules`` replaces every ``nn.Linear``/``nn.Conv2d`` of a model by
``QuantLinear``/``QuantConv2d`` built with ``from_float`` (``set_submodule`` does the surgery).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .fakequant import FakeQuantize
from .observers import make_observer
from .qparams import PerChannel, PerGroup, PerTensor

__all__ = ["QuantConfig", "FakeQuantize", "QuantLinear", "QuantConv2d", "QUANT_MODULES", "set_submodule",
           "swap_modules", "quant_layers", "fake_quantizers", "set_quant_mode"]

_GRANULARITIES = (PerTensor, PerChannel, PerGroup)


@dataclass(frozen=True)
class QuantConfig:
    """How to quantize a layer: weights and input activations.

    Defaults are PyTorch's x86 defaults: W8A8, weights symmetric per-channel signed
    (``qint8``), activations affine per-tensor unsigned (``quint8``), min-max observers.
    ``*_observer`` names a ``qlib.observers.make_observer`` observer ("minmax",
    "moving_average", "percentile", "mse", "entropy"); ``*_observer_kwargs`` are passed on.
    Make variants with ``dataclasses.replace(config, weight_bits=4)``.
    ``weight_signed``/``act_signed`` are explicit booleans, not ``None`` (``qparams.resolve_signed``):
    with ``act_symmetric=True`` the ``None`` rule would switch activations to signed codes, and at
    4 bits the unsigned symmetric grid (zero point 7: codes -7..8) differs from the signed one (-8..7).
    """

    weight_bits: int = 8
    act_bits: int = 8
    weight_symmetric: bool = True
    act_symmetric: bool = False
    weight_granularity: object = PerChannel(0)
    act_granularity: object = PerTensor()
    weight_observer: str = "minmax"
    act_observer: str = "minmax"
    weight_signed: bool = True
    act_signed: bool = False
    weight_observer_kwargs: dict = field(default_factory=dict, hash=False)
    act_observer_kwargs: dict = field(default_factory=dict, hash=False)

    def __post_init__(self):
        for name in ("weight_granularity", "act_granularity"):
            if not isinstance(getattr(self, name), _GRANULARITIES):
                raise TypeError(f"{name} must be PerTensor(), PerChannel(axis) or PerGroup(...), "
                                f"got {getattr(self, name)!r}")
        for name in ("weight_observer_kwargs", "act_observer_kwargs"):
            if not isinstance(getattr(self, name), dict):
                raise TypeError(f"{name} must be a dict, got {type(getattr(self, name)).__name__}")
        self.weight_observer_factory()  # build one of each now: bad bits or names fail here
        self.act_observer_factory()

    def weight_observer_factory(self) -> nn.Module:
        """A fresh observer for a weight tensor."""
        return make_observer(self.weight_observer, bits=self.weight_bits, symmetric=self.weight_symmetric,
                             granularity=self.weight_granularity, signed=self.weight_signed,
                             **self.weight_observer_kwargs)

    def act_observer_factory(self) -> nn.Module:
        """A fresh observer for an input activation."""
        return make_observer(self.act_observer, bits=self.act_bits, symmetric=self.act_symmetric,
                             granularity=self.act_granularity, signed=self.act_signed,
                             **self.act_observer_kwargs)


def _quantizers(config: QuantConfig) -> tuple[FakeQuantize, FakeQuantize]:
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a QuantConfig, got {type(config).__name__}")
    return FakeQuantize(config.act_observer_factory()), FakeQuantize(config.weight_observer_factory())


class QuantLinear(nn.Linear):
    """``nn.Linear`` that fake-quantizes its input (``input_fq``) and weight (``weight_fq``)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 config: QuantConfig | None = None, device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.config = QuantConfig() if config is None else config
        self.input_fq, self.weight_fq = _quantizers(self.config)

    @classmethod
    def from_float(cls, linear: nn.Linear, config: QuantConfig | None = None) -> "QuantLinear":
        """A ``QuantLinear`` with a copy of ``linear``'s weight and bias (``linear`` is unchanged)."""
        if not isinstance(linear, nn.Linear) or isinstance(linear, QuantLinear):
            raise TypeError(f"expected an nn.Linear, got {type(linear).__name__}")
        with torch.random.fork_rng(devices=[]):  # the throwaway init must not consume the global RNG
            q = cls(linear.in_features, linear.out_features, linear.bias is not None, config,
                    device=linear.weight.device, dtype=linear.weight.dtype)
        _copy_params(linear, q)
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.input_fq(x), self.weight_fq(self.weight), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, w{self.config.weight_bits}a{self.config.act_bits}"


class QuantConv2d(nn.Conv2d):
    """``nn.Conv2d`` that fake-quantizes its input (``input_fq``) and weight (``weight_fq``)."""

    def __init__(self, *args, config: QuantConfig | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.config = QuantConfig() if config is None else config
        self.input_fq, self.weight_fq = _quantizers(self.config)

    @classmethod
    def from_float(cls, conv: nn.Conv2d, config: QuantConfig | None = None) -> "QuantConv2d":
        """A ``QuantConv2d`` with ``conv``'s hyper-parameters and a copy of its weight and bias."""
        if not isinstance(conv, nn.Conv2d) or isinstance(conv, QuantConv2d):
            raise TypeError(f"expected an nn.Conv2d, got {type(conv).__name__}")
        with torch.random.fork_rng(devices=[]):
            q = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                    padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                    bias=conv.bias is not None, padding_mode=conv.padding_mode, config=config,
                    device=conv.weight.device, dtype=conv.weight.dtype)
        _copy_params(conv, q)
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.input_fq(x), self.weight_fq(self.weight), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, w{self.config.weight_bits}a{self.config.act_bits}"


def _copy_params(src: nn.Module, dst: nn.Module) -> None:
    with torch.no_grad():
        dst.weight.copy_(src.weight)
        if src.bias is not None:
            dst.bias.copy_(src.bias)
    dst.train(src.training)


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    """``root.<name> = module`` for a dotted name such as ``"layer1.0.bn1"`` (module surgery).

    ``name`` must name an existing submodule (``root.get_submodule(name)``); the empty name
    (``root`` itself) cannot be replaced in place: use the returned module instead.
    """
    if not isinstance(root, nn.Module) or not isinstance(module, nn.Module):
        raise TypeError(f"root and module must be nn.Modules, got {type(root).__name__} and {type(module).__name__}")
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty dotted submodule name, got {name!r}")
    root.get_submodule(name)  # AttributeError naming the missing part if it does not exist
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


QUANT_MODULES = {nn.Linear: QuantLinear, nn.Conv2d: QuantConv2d}
"""Float class -> fake-quant class. Matched by exact type, as torch.ao's mappings are."""


def _module(model) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    return model


def quant_layers(model: nn.Module) -> dict[str, nn.Module]:
    """``{name: module}`` of the float layers ``swap_modules`` would replace."""
    return {name: m for name, m in _module(model).named_modules() if type(m) in QUANT_MODULES}


def fake_quantizers(model: nn.Module) -> dict[str, FakeQuantize]:
    """``{name: FakeQuantize}`` of every fake quantizer in ``model``."""
    return {name: m for name, m in _module(model).named_modules() if isinstance(m, FakeQuantize)}


def set_quant_mode(model: nn.Module, observe: bool | None = None, quantize: bool | None = None) -> nn.Module:
    """Set the ``observe``/``quantize`` switches of every (non-dynamic) FakeQuantize; None keeps them.

    Switching ``observe`` on opens a calibration (eval-mode forwards record: module docstring).
    """
    for name, value in (("observe", observe), ("quantize", quantize)):
        if value is not None and not isinstance(value, bool):
            raise TypeError(f"{name} must be True, False or None, got {value!r}")
    for fq in fake_quantizers(model).values():
        if not fq.dynamic:
            fq.observe = fq.observe if observe is None else bool(observe)
            fq.quantize = fq.quantize if quantize is None else bool(quantize)
    return model


def swap_modules(model: nn.Module, config: QuantConfig | None = None,
                 per_layer: dict[str, QuantConfig | None] | None = None) -> nn.Module:
    """A copy of ``model`` with every ``nn.Linear``/``nn.Conv2d`` replaced by its fake-quant twin.

    ``per_layer`` maps layer names (as in ``model.named_modules()``) to their own
    ``QuantConfig``, or to ``None`` to keep that layer in float. ``model`` is unchanged.
    """
    _module(model)
    config = QuantConfig() if config is None else config
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a QuantConfig, got {type(config).__name__}")
    per_layer = dict(per_layer or {})
    layers = quant_layers(model)
    if not layers:
        raise ValueError("no layers to quantize: the model has no nn.Linear or nn.Conv2d "
                         "(already quantized layers are not swapped twice)")
    unknown = sorted(set(per_layer) - set(layers))
    if unknown:
        raise ValueError(f"per_layer names {unknown} are not quantizable layers; expected some of {sorted(layers)}")
    for name, cfg in per_layer.items():
        if cfg is not None and not isinstance(cfg, QuantConfig):
            raise TypeError(f"per_layer[{name!r}] must be a QuantConfig or None, got {type(cfg).__name__}")
    model = copy.deepcopy(model)
    for name, layer in quant_layers(model).items():
        cfg = per_layer.get(name, config)
        if cfg is None:
            continue
        quantized = QUANT_MODULES[type(layer)].from_float(layer, cfg)
        if name == "":
            return quantized  # the model is a single layer
        set_submodule(model, name, quantized)
    return model
