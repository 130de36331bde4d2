"""Integer layers: ``IntLinear`` and ``IntConv2d``, built from converted fake-quant layers.

A layer holds int8 weight codes, an int32 bias on the accumulator's grid and the qparams
of the input codes it expects; ``forward`` maps input codes to the int32 accumulator::

    acc = sum_k (x_q - z_x) * (w_q - z_w) + b_q,      b_q = round(b / (s_x * s_w))
    real value of acc = acc * s_x * s_w  (``acc_scale``, one per output channel)

The products run through ``qlib.intops`` (``backend``: the int8 kernels by default, or the
int64 ``"reference"``; both give the same integers). A grouped convolution (``groups = G``;
depthwise when ``G = C``, MobileNet's 3x3 layers) is ``G`` independent convolutions, each
seeing ``C / G`` input channels and producing ``C_out / G`` outputs; ``int_conv2d_grouped``
computes them with the same integers (see there). ``requantize`` maps an accumulator to
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
import torch.nn.functional as F
from torch import nn

from .intops import _check_backend, im2col, int_conv2d, int_matmul
from .kernels import BACKENDS as KERNEL_BACKENDS
from .modules import FakeQuantize, QuantConv2d, QuantLinear
from .qparams import PerChannel, PerTensor
from .quantize import quantize
from .requant import INT32_MAX, _check_int32, _int_tensor, _require_int, requantize_scaled

__all__ = ["IntLinear", "IntConv2d", "int_conv2d_grouped"]


def _float32_exact(device: torch.device, bound: int, lo: int, hi: int, z_x: int) -> bool:
    """Whether a float32 convolution gives the exact integers: every number below ``2**24``
    (8-bit depthwise: ``9 * 255 * 128``), and full IEEE float32 arithmetic. Only on the CPU
    with oneDNN at its default precision: cuDNN rounds float32 convolutions to TF32 (10-bit
    mantissa) by default on Ampere and later, so CUDA takes float64."""
    precision = getattr(getattr(torch.backends.mkldnn, "conv", None), "fp32_precision", "none")  # torch >= 2.9
    return (device.type == "cpu" and precision in ("none", "ieee")
            and bound < 2**24 and max(abs(lo), abs(hi), abs(z_x)) < 2**24)


def int_conv2d_grouped(x_q: torch.Tensor, w_q: torch.Tensor, x_zp=0, w_zp=0, stride=1, padding=0, dilation=1,
                       groups: int = 1, bias=None, backend: str | None = None) -> torch.Tensor:
    """Grouped 2-D convolution of codes with int32 accumulation: ``qlib.intops.int_conv2d`` per group.

    ``x_q (N, C, H, W)``, ``w_q (C_out, C / G, kh, kw)``, ``G = groups`` dividing ``C`` and
    ``C_out`` -> int32 ``(N, C_out, H', W')``. Output channel ``o`` belongs to group
    ``g = o // (C_out / G)`` and sees only input channels ``g * C / G ... (g + 1) * C / G - 1``::

        acc[n, o, i, j] = sum_{c in group g, u, v} (x_q[n, c, .., ..] - x_zp) * (w_q[o, c', u, v] - w_zp[o]) + bias[o]

    The input zero point is one number (per-tensor activations); ``w_zp`` is an int or one per
    output channel, so each group takes its own slice of zero points and biases. Depthwise
    (``G = C``, ``w_q (C, 1, 3, 3)``): each output is a 9-term dot product of one channel.

    All backends give the same integers. ``backend``: a kernel name of ``qlib.kernels.BACKENDS``
    runs one ``int_conv2d`` (im2col + int8 GEMM) per group; ``"reference"`` forms the int64
    patches of every group at once (``im2col``) and multiplies them group by group (a batched
    int64 matmul); ``None`` runs ``F.conv2d(groups=G)`` on the zero-point-shifted codes in
    floating point, which is exact: every term and every partial sum is an integer of magnitude
    at most ``bound = K * max|x - x_zp| * max|w - w_zp| < 2**31`` (``K = C / G * kh * kw``,
    checked first: OverflowError otherwise), so float64 (53-bit significand) adds them without
    rounding, in any order; so does float32 (24 bits) when ``bound < 2**24``, which it then uses
    on the CPU (not on CUDA, where cuDNN computes float32 convolutions in TF32 by default). An
    int8 GEMM per group does not pay for depthwise layers: ``K = 9``, one output column.
    """
    _check_backend(backend)
    for name, t in (("x_q", x_q), ("w_q", w_q)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        _require_int(t, name)
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be an int >= 1, got {groups!r}")
    if (x_q.dim() != 4 or w_q.dim() != 4 or x_q.shape[1] != w_q.shape[1] * groups
            or w_q.shape[0] % groups):
        raise ValueError(f"expected x_q (N, C, H, W) and w_q (C_out, C / groups, kh, kw) with groups={groups} "
                         f"dividing C and C_out, got {tuple(x_q.shape)} and {tuple(w_q.shape)}")
    if groups == 1:
        return int_conv2d(x_q, w_q, x_zp, w_zp, stride, padding, dilation, bias, backend)
    c_out = w_q.shape[0]
    w_zp = _int_tensor(w_zp, "w_zp", w_q.device).reshape(-1).expand(c_out)
    bias = None if bias is None else _int_tensor(bias, "bias", w_q.device).reshape(-1).expand(c_out)
    if backend in KERNEL_BACKENDS:  # one int8 GEMM per group, as asked
        c_in_g, c_out_g = w_q.shape[1], c_out // groups
        parts = [int_conv2d(x_q[:, g * c_in_g:(g + 1) * c_in_g], w_q[g * c_out_g:(g + 1) * c_out_g], x_zp,
                            w_zp[g * c_out_g:(g + 1) * c_out_g], stride, padding, dilation,
                            None if bias is None else bias[g * c_out_g:(g + 1) * c_out_g], backend)
                 for g in range(groups)]
        return torch.cat(parts, dim=1)
    z_x = int(_int_tensor(x_zp, "x_zp"))
    w = _int_tensor(w_q, "w_q") - w_zp.reshape(-1, 1, 1, 1)
    k = w[0].numel()
    bound, lo, hi = 0, 0, 0
    if x_q.numel() and w.numel():
        lo, hi = (int(v) for v in torch.aminmax(x_q))
        bound = k * max(abs(hi - z_x), abs(lo - z_x)) * int(w.abs().max())
    if bound > INT32_MAX:
        raise OverflowError(f"int32 accumulation may overflow: K * max|x - x_zp| * max|w - w_zp| "
                            f"= {bound} >= 2**31")
    if backend == "reference":  # int64 patches (N, H', W', G, K) times the filters (G, C_out / G, K)
        cols = im2col(_int_tensor(x_q, "x_q") - z_x, w.shape[2:], stride, padding, dilation)
        cols = cols.reshape(*cols.shape[:3], groups, k)
        filters = w.reshape(groups, c_out // groups, k)
        if x_q.device.type == "cpu":
            acc = torch.einsum("nhwgk,gok->nhwgo", cols, filters)
        else:  # no integer matmul on CUDA: float64 is exact here (the bound above)
            acc = torch.einsum("nhwgk,gok->nhwgo", cols.double(), filters.double()).to(torch.int64)
        acc = acc.reshape(*acc.shape[:3], c_out).permute(0, 3, 1, 2)
    else:
        dtype = torch.float32 if _float32_exact(x_q.device, bound, lo, hi, z_x) else torch.float64
        acc = F.conv2d(x_q.to(dtype) - z_x, w.to(dtype), None, stride, padding, dilation, groups).to(torch.int64)
    if bias is not None:
        acc = acc + bias.reshape(-1, 1, 1)
    return _check_int32(acc, "accumulator + bias").to(torch.int32)


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
