"""Integer layers: ``IntLinear`` and ``IntConv2d``, built from converted fake-quant layers.

A layer holds int8 weight codes, an int32 bias on the accumulator's grid and the qparams
of the input codes it expects; ``forward`` maps input codes to the int32 accumulator::

    acc = sum_k (x_q - z_x) * (w_q - z_w) + b_q,      b_q = round(b / (s_x * s_w))
    real value of acc = acc * s_x * s_w  (``acc_scale``, one per output channel)

The products run through ``qlib.intops`` (``backend``: the int8 kernels by default, or the
int64 ``"reference"``; both give the same integers). A grouped convolution (``groups = G``;
depthwise when ``G = C``, MobileNet's 3x3 layers) is ``G`` independent convolutions, each
seeing ``C / G`` input channels and producing ``C_out / G`` outputs;
``qlib.intops.int_conv2d_grouped`` computes them with the same integers (see there; importable
from here too). ``requantize`` maps an accumulator to
some next layer's codes with ``qlib.requant.requantize_scaled``, the one requantization that
``qlib.intmodel`` uses too (``double_rounding``: gemmlowp's two roundings instead of TFLite's one).

Buffers (all in ``state_dict``): ``weight_q`` (int8 codes ``(C_out, ...)``; a convolution's
``(C_out, C / G, kh, kw)``), ``weight_scale``
float32 and ``weight_zero_point`` int64 (one per output channel), ``bias_q`` int32 ``(C_out,)``
or None, ``input_scale`` float32 and ``input_zero_point`` int64 (0-dim); plain attributes
``input_quant_min``/``input_quant_max``, ``backend``, ``double_rounding`` (and a convolution's
``stride``, ``padding``, ``dilation``, ``groups``).
"""

from __future__ import annotations

import torch
from torch import nn

from .intops import _check_backend, int_conv2d_grouped, int_matmul
from .modules import FakeQuantize, QuantConv2d, QuantLinear
from .qparams import PerChannel, PerTensor
from .quantize import quantize
from .requant import _check_int32, requantize_scaled

__all__ = ["IntLinear", "IntConv2d", "int_conv2d_grouped"]


class _IntLayer(nn.Module):
    """Shared parts of ``IntLinear``/``IntConv2d``: codes, qparams, bias and requantization."""

    backend: str | None = None
    double_rounding: bool = False

    def _init_from(self, qlayer: nn.Module, backend, double_rounding: bool) -> None:
        _check_backend(backend)
        if not isinstance(double_rounding, bool):
            raise TypeError(f"double_rounding must be a bool, got {type(double_rounding).__name__}")
        in_fq, w_fq = qlayer.input_fq, qlayer.weight_fq
        if getattr(in_fq, "dynamic", False):
            raise ValueError("dynamic quantization has no fixed input qparams to build integer "
                             "layers from; use static PTQ (qlib.ptq.quantize_static)")
        for name, fq in (("input", in_fq), ("weight", w_fq)):
            if not isinstance(fq, FakeQuantize) or fq.observe or not fq.quantize:
                raise ValueError(f"the {name} quantizer of {type(qlayer).__name__} is not frozen: "
                                 "convert the model first (qlib.ptq.convert or quantize_static)")
        if not isinstance(in_fq.granularity, PerTensor):
            raise NotImplementedError("integer inference needs per-tensor activation qparams")
        per_channel = isinstance(w_fq.granularity, PerChannel)
        if not (isinstance(w_fq.granularity, PerTensor)
                or (per_channel and w_fq.granularity.axis % qlayer.weight.dim() == 0)):
            raise NotImplementedError("integer inference needs per-tensor or per-output-channel "
                                      "(PerChannel(0)) weights")
        self.backend, self.double_rounding = backend, double_rounding
        s_x, z_x = in_fq.qparams()
        s_w, z_w = w_fq.qparams()
        c_out, axis = qlayer.weight.shape[0], (0 if per_channel else None)
        w_q = quantize(qlayer.weight.detach(), s_w, z_w, w_fq.quant_min, w_fq.quant_max, axis=axis)
        self.register_buffer("weight_q", w_q)
        self.register_buffer("weight_scale", s_w.reshape(-1).expand(c_out).to(torch.float32).clone())
        self.register_buffer("weight_zero_point", z_w.reshape(-1).expand(c_out).to(torch.int64).clone())
        self.register_buffer("input_scale", s_x.reshape(()).to(torch.float32))
        self.register_buffer("input_zero_point", z_x.reshape(()).to(torch.int64))
        self.input_quant_min, self.input_quant_max = in_fq.quant_min, in_fq.quant_max
        bias_q = None
        if qlayer.bias is not None:
            bias_q = torch.round(qlayer.bias.detach().double() / self.acc_scale).to(torch.int64)
            bias_q = _check_int32(bias_q, "quantized bias").to(torch.int32)
        self.register_buffer("bias_q", bias_q)

    @property
    def acc_scale(self) -> torch.Tensor:
        """float64 ``(C_out,)``: the real value of one accumulator unit, ``s_x * s_w``."""
        return self.input_scale.double() * self.weight_scale.double()

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """Float input -> the codes this layer expects (the model's entry point)."""
        return quantize(x, self.input_scale, self.input_zero_point, self.input_quant_min, self.input_quant_max)

    def requantize(self, acc, scale, zero_point, quant_min: int, quant_max: int) -> torch.Tensor:
        """This layer's accumulator -> codes of the qparams ``(scale, zero_point)`` (e.g. the next layer's input)."""
        shape = (-1,) + (1,) * (acc.dim() - 2)
        return requantize_scaled(acc, self.acc_scale.reshape(shape), scale, zero_point, quant_min, quant_max,
                                 self.double_rounding)

    def dequantize(self, acc: torch.Tensor) -> torch.Tensor:
        """Accumulator -> float32 real values (the end of the integer part of the model)."""
        shape = (-1,) + (1,) * (acc.dim() - 2)
        return (acc.double() * self.acc_scale.reshape(shape)).to(torch.float32)


class IntLinear(_IntLayer):
    """Integer linear layer: input codes ``(N, in)`` -> int32 accumulator ``(N, out)``."""

    @classmethod
    def from_float(cls, qlinear: nn.Module, backend: str | None = None,
                   double_rounding: bool = False) -> "IntLinear":
        """Build from a converted (frozen) ``qlib.modules.QuantLinear`` (torchao's name: ``from_float``)."""
        if not isinstance(qlinear, QuantLinear):
            raise TypeError(f"expected a QuantLinear, got {type(qlinear).__name__}")
        layer = cls()
        layer._init_from(qlinear, backend, double_rounding)
        layer.in_features, layer.out_features = qlinear.in_features, qlinear.out_features
        return layer

    from_quant = from_float  # the earlier name

    def forward(self, x_q: torch.Tensor) -> torch.Tensor:
        return int_matmul(x_q, self.weight_q.T, self.input_zero_point, self.weight_zero_point, self.bias_q,
                          backend=self.backend)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class IntConv2d(_IntLayer):
    """Integer 2-D convolution: input codes ``(N, C, H, W)`` -> int32 ``(N, C_out, H', W')``."""

    @classmethod
    def from_float(cls, qconv: nn.Module, backend: str | None = None,
                   double_rounding: bool = False) -> "IntConv2d":
        """Build from a converted (frozen) ``qlib.modules.QuantConv2d`` (any ``groups``, zero padding)."""
        if not isinstance(qconv, QuantConv2d):
            raise TypeError(f"expected a QuantConv2d, got {type(qconv).__name__}")
        if qconv.padding_mode != "zeros" or isinstance(qconv.padding, str):
            raise NotImplementedError("IntConv2d supports numeric zero padding only "
                                      f"(got padding={qconv.padding!r}, padding_mode={qconv.padding_mode!r})")
        layer = cls()
        layer._init_from(qconv, backend, double_rounding)
        layer.stride, layer.padding, layer.dilation = qconv.stride, qconv.padding, qconv.dilation
        layer.groups = qconv.groups
        return layer

    from_quant = from_float  # the earlier name

    groups: int = 1

    def forward(self, x_q: torch.Tensor) -> torch.Tensor:
        return int_conv2d_grouped(x_q, self.weight_q, self.input_zero_point, self.weight_zero_point, self.stride,
                                  self.padding, self.dilation, self.groups, self.bias_q, backend=self.backend)

    def extra_repr(self) -> str:
        c_out, c_in_g, kh, kw = self.weight_q.shape
        groups = f", groups={self.groups}" if self.groups != 1 else ""
        return (f"{c_in_g * self.groups}, {c_out}, kernel_size=({kh}, {kw}), stride={self.stride}, "
                f"padding={self.padding}{groups}")
