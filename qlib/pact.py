"""PACT: a learned clipping level for activations (Choi et al. 2018).

A ReLU's output is unbounded, so a min-max activation range is set by a few large values and
wastes most codes. PACT ("PArameterized Clipping acTivation") replaces the ReLU's open top by
a clipping level ``alpha`` that is **learned** with the network, then quantizes the clipped
value uniformly with ``2**bits - 1`` steps (paper, eq. 1-3)::

    y   = clip(x, 0, alpha) = 0.5 (|x| - |x - alpha| + alpha)
    y_q = round(y * (2**bits - 1) / alpha) * alpha / (2**bits - 1)

    d y_q / d x     = 1 for 0 <= x < alpha, else 0           (STE through round)
    d y_q / d alpha = 1 for x >= alpha, else 0               (only the clipped values)

So ``alpha`` is pulled down by the loss through the clipped values only, and pushed up when
clipping hurts: the paper adds an L2 penalty on ``alpha`` (here: the optimizer's weight decay).
Compare LSQ (``qlib.lsq``), which learns the *step* ``s`` and whose gradient also flows from
the values inside the range (the rounding-error sawtooth): PACT's step ``alpha / (2**b - 1)``
follows ``alpha`` without its own gradient.

Inputs that can be negative (the normalized images entering a first layer) do not fit a clip
at 0: ``lower`` is then a fixed lower clipping level (the calibrated minimum, not learned), and
the grid is affine: ``scale = (alpha - lower) / (2**b - 1)``, ``zero_point = round(-lower / scale)``
(0.0 stays exact, so the levels may sit up to ``scale / 2`` beyond ``[lower, alpha]``).
With ``lower = 0`` (every ReLU output) this is exactly the paper's PACT. The forward values are
``qlib.quantize.fake_quantize``'s (PyTorch's bits) on ``clip(x, lower, alpha)``.
"""

from __future__ import annotations

import torch
from torch import nn

from .lsq import DataInitialized
from .observers import make_observer
from .qparams import PerTensor, check_tensor, quant_range
from .quantize import fake_quantize

__all__ = ["pact_qparams", "PACTFn", "pact_fake_quantize", "PACTFakeQuantize"]


def pact_qparams(alpha: torch.Tensor, lower, quant_max: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale float32, zero_point int64)`` of the grid of ``2**b`` levels on ``[lower, alpha]``."""
    alpha = alpha.detach().to(torch.float32)
    lower = torch.as_tensor(lower, dtype=torch.float32, device=alpha.device)
    scale = ((alpha - lower) / quant_max).clamp_min(torch.finfo(torch.float32).eps)
    zero_point = torch.round(-lower / scale).clamp(0, quant_max).to(torch.int64)
    return scale, zero_point


class PACTFn(torch.autograd.Function):
    """Forward: fake quantization of ``clip(x, lower, alpha)``; backward: the paper's gradients."""

    @staticmethod
    def forward(ctx, x, alpha, lower, quant_max):
        scale, zero_point = pact_qparams(alpha, lower, quant_max)
        clipped = torch.minimum(torch.clamp(x, min=float(lower)), alpha.detach().to(x.dtype))
        ctx.save_for_backward(x, alpha)
        ctx.lower = float(lower)
        return fake_quantize(clipped, scale, zero_point, 0, quant_max)

    @staticmethod
    def backward(ctx, grad_output):
        x, alpha = ctx.saved_tensors
        above = x >= alpha
        inside = (x >= ctx.lower) & ~above
        d_alpha = (grad_output * above).sum().reshape(alpha.shape).to(alpha.dtype)
        return grad_output * inside, d_alpha, None, None


def pact_fake_quantize(x: torch.Tensor, alpha: torch.Tensor, bits: int = 8, lower: float = 0.0) -> torch.Tensor:
    """PACT on ``x`` (float32 math, returned in ``x.dtype``): clip to ``[lower, alpha]``, quantize to ``bits``.

    ``alpha``: a 1-element floating tensor (a parameter, to learn it), ``> lower``; ``lower``
    <= 0 (0: the paper). Gradients as in the module docstring.
    """
    check_tensor(x)
    _, quant_max = quant_range(bits, signed=False)
    if not isinstance(alpha, torch.Tensor) or not alpha.is_floating_point() or alpha.numel() != 1:
        raise TypeError("alpha must be a 1-element floating-point tensor (a parameter, to learn it)")
    lower = float(lower)
    if lower > 0:
        raise ValueError(f"lower must be <= 0 (0 for ReLU outputs), got {lower}")
    if not (torch.isfinite(alpha.detach()).all() and float(alpha.detach()) > lower):
        raise ValueError(f"alpha must be finite and above lower={lower}, got {float(alpha.detach())}")
    y = PACTFn.apply(x.to(torch.float32), alpha.to(torch.float32), lower, quant_max)
    return y.to(x.dtype)


class PACTFakeQuantize(DataInitialized):
    """An activation quantizer with a learned clipping level ``alpha`` (PACT), for QAT.

    Starts like ``qlib.lsq.LSQFakeQuantize``: forwards with ``calibrating = True`` only record
    the data (an observer of the config, min-max by default), ``initialize()`` then sets
    ``alpha`` to the observed maximum (or ``init_alpha``, e.g. the paper's 10.0) and ``lower``
    to ``min(observed minimum, 0)``. ``qparams()`` gives the grid in use, so a trained model
    converts like any other (``qlib.qat.convert_qat``). Unsigned codes, per tensor.
    """

    symmetric, granularity, signed = False, PerTensor(), False

    def __init__(self, bits: int = 8, init: str = "minmax", init_alpha: float | None = None):
        super().__init__()
        self.quant_min, self.quant_max = quant_range(bits, signed=False)
        self.bits, self.init, self.init_alpha = bits, init, init_alpha
        self.observer = make_observer(init, bits=bits, symmetric=False, granularity=PerTensor(), signed=False)
        self.alpha = nn.Parameter(torch.ones(()))
        self.register_buffer("lower", torch.zeros(()))
        self.register_buffer("initialized", torch.tensor(False))
        self.calibrating = False

    def record(self, x: torch.Tensor) -> None:
        self.observer(x.detach())

    @torch.no_grad()
    def initialize(self) -> "PACTFakeQuantize":
        """``alpha`` from the recorded data (the top of the observer's range, or ``init_alpha``)."""
        if int(self.observer.num_batches) == 0:
            raise ValueError("PACTFakeQuantize has seen no data: forward some batches first")
        scale, zero_point = self.observer.calculate_qparams()
        lower = ((self.quant_min - zero_point) * scale).reshape(()).to(torch.float32).clamp(max=0)
        top = ((self.quant_max - zero_point) * scale).reshape(()).to(torch.float32)
        alpha = torch.as_tensor(self.init_alpha, dtype=torch.float32) if self.init_alpha is not None else top
        self.lower.copy_(lower)
        self.alpha.data = alpha.to(self.lower.device).clamp_min(float(lower) + 1e-6).clone()
        self.initialized.fill_(True)
        return self

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """Clip ``x`` to ``[lower, alpha]`` and fake-quantize it (PACT's gradient for ``alpha``)."""
        return pact_fake_quantize(x, self.alpha, self.bits, float(self.lower))

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale float32, zero_point int64)`` of the grid in use now."""
        if not bool(self.initialized):
            raise ValueError("PACTFakeQuantize is not initialized: forward some data first")
        return pact_qparams(self.alpha, self.lower, self.quant_max)

    calculate_qparams = qparams

    def set_bits(self, bits: int) -> "PACTFakeQuantize":
        """Change the bit width; the clipping range ``[lower, alpha]`` stays."""
        self.quant_min, self.quant_max = quant_range(bits, signed=False)
        self.bits = bits
        self.observer.quant_min, self.observer.quant_max, self.observer.bits = self.quant_min, self.quant_max, bits
        return self

    def extra_repr(self) -> str:
        return f"bits={self.bits}, alpha={float(self.alpha.detach()):.4g}, lower={float(self.lower):.4g}"
