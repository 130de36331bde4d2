"""Learned step size quantization (LSQ, Esser et al. 2020): the scale is a parameter.

STE fake quantization (``quantize.py``) trains the *weights* through ``round``, while an
observer picks ``scale``. LSQ lets gradient descent pick the step size too: ``scale`` (and,
for affine ranges, the zero point ``z``) become parameters. With ``z_r = clamp(round(z),
quant_min, quant_max)`` and ``q = round(x / s) + z_r``::

    forward     x_fq = (clamp(q, quant_min, quant_max) - z_r) * s        (= fake_quantize)
    d x_fq/d x  = 1 inside [quant_min, quant_max], 0 outside             (STE)
    d x_fq/d s  = (x_fq - x) / s  = round(x/s) - x/s   inside            (a sawtooth in x)
                = quant_min - z_r   below,   quant_max - z_r   above     (the clipped ends)
    d x_fq/d z  = 0 inside, -s outside

The scale gradient sums over every element, so it is much larger than a weight's: LSQ
multiplies the scale and zero-point gradients by ``g = 1 / sqrt(N * quant_max)`` (``N``:
elements of a weight tensor, features of one sample for an activation). The step size
starts at ``s0 = 2 * mean(|x|) / sqrt(quant_max)`` (the paper) or at an observer's scale.

Reference: ``torch._fake_quantize_learnable_per_tensor_affine`` and ``..._per_channel_affine``
(the kernels of ``torch.ao.quantization._LearnableFakeQuantize``); ``grad_factor`` is ``g``
and the zero point is a float tensor. We give the same bits, with two notes:

- PyTorch's CPU kernel is compiled with fused multiply-add (on x86 AVX2/AVX512 builds):
  ``round(x/s + z)`` and ``x_fq - x = (q - z) * s - x`` are each rounded *once*. We compute
  those two expressions in float64 (exact here) and round once to float32 (``_fma``).
- PyTorch's per-tensor *backward* rounds the zero point as ``trunc(z + 0.5)`` while its
  forward uses ``round(z)``: the two differ for negative zero points (``-2 -> -1``). We use
  the forward's zero point in both passes. qlib's activations use unsigned ranges (``z >= 0``)
  and its weights ``z = 0``, where the two agree.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .observers import make_observer
from .qparams import (PerChannel, PerTensor, affine_zero_point, check_quant_range, check_tensor, quant_range,
                      resolve_signed, to_rows)
from .quantize import fake_quantize

__all__ = ["lsq_grad_factor", "lsq_init_scale", "lsq_gradients", "LearnableFakeQuantizeFn",
           "lsq_fake_quantize", "LSQFakeQuantize"]

EPS = torch.finfo(torch.float32).eps


def lsq_grad_factor(numel: int, quant_max: int) -> float:
    """LSQ's gradient scale ``g = 1 / sqrt(numel * quant_max)`` (Esser et al., sec. 2.2)."""
    for name, v in (("numel", numel), ("quant_max", quant_max)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if numel < 1 or quant_max < 1:
        raise ValueError(f"numel and quant_max must be >= 1, got {numel} and {quant_max}")
    return 1.0 / math.sqrt(numel * quant_max)


def lsq_init_scale(x: torch.Tensor, quant_max: int, axis: int | None = None) -> torch.Tensor:
    """LSQ's initial step size ``2 * mean(|x|) / sqrt(quant_max)``: float32, shape ``()`` or
    ``(x.shape[axis],)`` (one per channel). Never below float32 eps."""
    check_tensor(x)
    a = x.detach().abs().to(torch.float32)
    mean = a.mean() if axis is None else to_rows(a, PerChannel(axis)).mean(dim=1)
    return (2.0 * mean / math.sqrt(quant_max)).clamp_min(EPS)


def _fma(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``a * b + c`` rounded once to float32, as a fused multiply-add (float64 holds it exactly)."""
    return (a.double() * b.double() + c.double()).to(torch.float32)


def lsq_gradients(x, grad_output, scale, zero_point, quant_min: int, quant_max: int):
    """Elementwise ``(d/dx, d/ds, d/dz)`` of LSQ times ``grad_output`` (module docstring).

    ``scale``/``zero_point`` float32, broadcastable to ``x`` (``zero_point`` already rounded
    and clamped). Returns three tensors of ``x.shape``; summing the last two over the
    elements that share a scale gives the parameter gradients. Plot ``d/ds`` against ``x``
    with ``grad_output = 1`` to see LSQ's sawtooth.
    """
    inv_scale = 1.0 / scale
    q = torch.round(_fma(x, inv_scale, zero_point))
    inside = (q >= quant_min) & (q <= quant_max)
    below = q < quant_min
    err = _fma(q.clamp(quant_min, quant_max) - zero_point, scale, -x)    # x_fq - x
    d_scale = torch.where(inside, grad_output * err * inv_scale,
                          torch.where(below, grad_output * (quant_min - zero_point),
                                      grad_output * (quant_max - zero_point)))
    d_zero_point = torch.where(inside, torch.zeros_like(x), -grad_output * scale)
    return grad_output * inside, d_scale, d_zero_point


class LearnableFakeQuantizeFn(torch.autograd.Function):
    """Fake quantization with gradients for ``x``, ``scale`` and ``zero_point`` (LSQ).

    ``scale``/``zero_point``: float32, shaped to broadcast against ``x`` (all ones but the
    channel axis). ``grad_factor`` multiplies the scale and zero-point gradients.
    """

    @staticmethod
    def forward(ctx, x, scale, zero_point, quant_min, quant_max, axis, grad_factor):
        z = zero_point.round().clamp(quant_min, quant_max)
        ctx.save_for_backward(x, scale, z)
        ctx.quant_range, ctx.grad_factor = (quant_min, quant_max), grad_factor
        zp = z.reshape(-1).to(torch.int64)
        return fake_quantize(x, scale.reshape(-1), zp, quant_min, quant_max, axis=axis)

    @staticmethod
    def backward(ctx, grad_output):
        x, scale, z = ctx.saved_tensors
        d_x, d_scale, d_zp = lsq_gradients(x, grad_output, scale, z, *ctx.quant_range)
        g = torch.tensor(ctx.grad_factor, dtype=torch.float32, device=x.device)
        dims = [d for d in range(x.dim()) if scale.shape[d] == 1]      # all but the channel axis
        d_scale = (d_scale * g).sum(dims, keepdim=True) if dims else d_scale * g
        d_zp = (d_zp * g).sum(dims, keepdim=True) if dims else d_zp * g
        return d_x, d_scale, d_zp, None, None, None, None


def lsq_fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point, quant_min: int, quant_max: int,
                      axis: int | None = None, grad_factor: float = 1.0) -> torch.Tensor:
    """Fake-quantize ``x`` with a learnable ``scale`` (and zero point): LSQ.

    ``x``: any floating dtype (float32, float64, bfloat16, float16: autocast works). As in
    :func:`qlib.quantize.fake_quantize`, the arithmetic is float32, the bits of PyTorch's
    kernels: ``x`` is cast to float32 on the way in and the result back to ``x.dtype`` (so the
    gradient for ``x`` arrives in ``x.dtype``). ``scale``: a floating tensor (a parameter, to
    learn it) of 1 element (``axis=None``) or ``(x.shape[axis],)``; ``zero_point`` the same
    shape, float (learnable) or integer; their gradients arrive in their own dtypes. Same
    values as :func:`qlib.quantize.fake_quantize`.
    """
    check_tensor(x)
    check_quant_range(quant_min, quant_max)
    if not isinstance(scale, torch.Tensor) or not scale.is_floating_point():
        raise TypeError("scale must be a floating-point tensor (a parameter, to learn it)")
    zero_point = torch.as_tensor(zero_point, device=x.device)
    zero_point = zero_point.to(torch.float32) if not zero_point.is_floating_point() else zero_point
    if not (torch.isfinite(scale).all() and (scale > 0).all()):
        raise ValueError("scale must be finite and > 0 everywhere")
    if not torch.isfinite(zero_point).all():
        raise ValueError("zero_point must be finite")
    if isinstance(grad_factor, bool) or not isinstance(grad_factor, (int, float)) or not 0 <= grad_factor < math.inf:
        raise ValueError(f"grad_factor must be finite and >= 0, got {grad_factor}")
    view = [1] * x.dim()
    if axis is not None:
        if not -x.dim() <= axis < x.dim():
            raise ValueError(f"axis {axis} is out of range for a tensor with {x.dim()} dims")
        axis %= x.dim()
        view[axis] = -1
    n = 1 if axis is None else x.shape[axis]
    for name, t in (("scale", scale), ("zero_point", zero_point)):
        if t.numel() != n:
            raise ValueError(f"{name} must hold {n} value(s) ({'per-tensor' if axis is None else 'one per channel'}), "
                             f"got shape {tuple(t.shape)}")
    f32 = torch.float32  # .to() is differentiable: each gradient goes back in its tensor's dtype
    y = LearnableFakeQuantizeFn.apply(x.to(f32), scale.to(f32).reshape(view), zero_point.to(f32).reshape(view),
                                      quant_min, quant_max, axis, float(grad_factor))
    return y.to(x.dtype)


class DataInitialized(nn.Module):
    """The start shared by the learned-range quantizers (LSQ here, PACT in ``qlib.pact``).

    Their parameters (scale, clipping level) are created from the first data they see. Forwards
    with ``calibrating = True`` only ``record(x)`` and return ``x`` unchanged; otherwise the first
    forward records ``x`` and calls ``initialize()``, and every forward returns ``quantize(x)``.
    A subclass sets ``calibrating`` and an ``initialized`` bool buffer in ``__init__`` and defines
    ``record``, ``initialize`` and ``quantize``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.calibrating:
            self.record(x)
            return x
        if not bool(self.initialized):
            self.record(x)
            self.initialize()
        return self.quantize(x)


class LSQFakeQuantize(DataInitialized):
    """A fake quantizer whose ``scale`` (and affine ``zero_point``) are learned.

    ``granularity``: ``PerTensor()`` (activations) or ``PerChannel(axis)`` (weights).
    ``init``: ``"lsq"`` (``2 mean|x| / sqrt(quant_max)``) or an observer name of
    ``qlib.observers.make_observer`` (``"minmax"``, ``"mse"``, ...): the initial scale and
    zero point are those the observer would choose. The parameters are created from the
    first data: either the first ``forward`` or, after ``calibrating = True`` forwards (which
    only record and return ``x`` unchanged), ``initialize()``.
    ``batch_axis``: for activations, the batch dimension (``N`` of the gradient scale counts
    one sample); ``None`` for weights. ``grad_scaling=False`` uses ``g = 1``.
    ``signed``: ``None`` means signed codes when ``symmetric``, unsigned when affine (the one
    rule of ``qlib.qparams.resolve_signed``, as for the observers).
    """

    def __init__(self, bits: int = 8, symmetric: bool = False, granularity=PerTensor(), signed: bool | None = None,
                 init: str = "lsq", learn_zero_point: bool | None = None, grad_scaling: bool = True,
                 batch_axis: int | None = None):
        super().__init__()
        if not isinstance(granularity, (PerTensor, PerChannel)):
            raise TypeError(f"LSQ supports PerTensor() or PerChannel(axis), got {granularity!r}")
        self.signed = resolve_signed(signed, bool(symmetric))  # None: signed iff symmetric
        self.quant_min, self.quant_max = quant_range(bits, self.signed)
        self.bits, self.symmetric, self.granularity = bits, bool(symmetric), granularity
        self.init, self.grad_scaling, self.batch_axis = init, grad_scaling, batch_axis
        self.learn_zero_point = (not symmetric) if learn_zero_point is None else bool(learn_zero_point)
        observer = "minmax" if init == "lsq" else init
        self.observer = make_observer(observer, bits=bits, symmetric=symmetric, granularity=granularity,
                                      signed=self.signed)
        self.scale = nn.Parameter(torch.ones(()))  # real shape and value come with the data
        self.zero_point = nn.Parameter(torch.zeros(()), requires_grad=self.learn_zero_point)
        self.register_buffer("abs_sum", torch.zeros(()))
        self.register_buffer("count", torch.tensor(0))
        self.register_buffer("initialized", torch.tensor(False))
        self.calibrating = False

    @property
    def axis(self) -> int | None:
        return self.granularity.axis if isinstance(self.granularity, PerChannel) else None

    def record(self, x: torch.Tensor) -> None:
        """Add ``x`` to the statistics the initial step size comes from."""
        x = x.detach()
        self.observer(x)
        a = x.abs().to(torch.float32)
        rows = a.sum() if self.axis is None else to_rows(a, self.granularity).sum(dim=1)
        self.abs_sum = rows if int(self.count) == 0 else self.abs_sum + rows
        self.count += x.numel() // (1 if self.axis is None else x.shape[self.axis])

    @torch.no_grad()
    def initialize(self) -> "LSQFakeQuantize":
        """Set ``scale`` and ``zero_point`` from the recorded data (see ``init``)."""
        if int(self.count) == 0:
            raise ValueError("LSQFakeQuantize has seen no data: forward some batches first")
        scale, zero_point = self.observer.calculate_qparams()
        if self.init == "lsq":
            scale = (2.0 * self.abs_sum / int(self.count) / math.sqrt(self.quant_max)).clamp_min(EPS)
            if not self.symmetric:  # start the range at the data's minimum, as far as the codes reach
                min_neg = self.observer.min_val.clamp(max=0)
                zero_point = affine_zero_point(min_neg, scale, self.quant_min, self.quant_max)
        self.scale.data = scale.to(torch.float32).clone()
        self.zero_point.data = zero_point.to(torch.float32).clone()
        self.initialized.fill_(True)
        return self

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """Fake-quantize ``x`` with the learned scale (gradient scaled by ``g``, see the module)."""
        g = 1.0
        if self.grad_scaling:
            n = x.numel() if self.batch_axis is None else x.numel() // max(1, x.shape[self.batch_axis])
            g = lsq_grad_factor(n, self.quant_max)
        return lsq_fake_quantize(x, self.scale.clamp_min(EPS), self.zero_point, self.quant_min,
                                 self.quant_max, axis=self.axis, grad_factor=g)

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale float32, zero_point int64)`` in use now (zero point rounded and clamped)."""
        if not bool(self.initialized):
            raise ValueError("LSQFakeQuantize is not initialized: forward some data first")
        z = self.zero_point.detach().round().clamp(self.quant_min, self.quant_max)
        return self.scale.detach().clamp_min(EPS).to(torch.float32).clone(), z.to(torch.int64)

    calculate_qparams = qparams  # the torchao / torch.ao name (FakeQuantize has both too)

    @torch.no_grad()
    def set_bits(self, bits: int) -> "LSQFakeQuantize":
        """Change the bit width, keeping the learned clipping range ``[(qmin - z) s, (qmax - z) s]``."""
        quant_min, quant_max = quant_range(bits, self.signed)
        if bool(self.initialized):
            s, z = self.scale.data, self.zero_point.data
            lo = (self.quant_min - z) * s
            new_s = s * (self.quant_max - self.quant_min) / (quant_max - quant_min)
            self.scale.data = new_s
            self.zero_point.data = (quant_min - lo / new_s).clamp(quant_min, quant_max)
        self.quant_min, self.quant_max, self.bits = quant_min, quant_max, bits
        self.observer.quant_min, self.observer.quant_max, self.observer.bits = quant_min, quant_max, bits
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in ("scale", "zero_point", "abs_sum"):  # their shapes come with the data
            saved, current = state_dict.get(prefix + name), getattr(self, name)
            if saved is not None and saved.shape != current.shape:
                current.data = torch.empty_like(saved, device=current.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (f"bits={self.bits}, symmetric={self.symmetric}, granularity={self.granularity}, "
                f"init={self.init!r}, learn_zero_point={self.learn_zero_point}")
