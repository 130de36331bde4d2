"""Lab 04, Q3: quantization-aware training that runs the *student's* STE and LSQ gradient.

Lab 04 asks for two gradients: ``FakeQuantSTE`` (a ``torch.autograd.Function``: fake
quantization forward, straight-through gradient for ``x``) and ``lsq_scale_grad`` (LSQ's
gradient for the step size, summed and scaled by ``grad_factor``). :func:`own_qat_model` puts
both into a real network: a copy of the float model (BatchNorm folded, as
``qlib.qat.prepare_qat`` does) whose every conv and linear layer quantizes its weight and its
input with an :class:`OwnFakeQuant`, per tensor:

- ``method="ste"``: the weight's scale is chosen by min-max (symmetric, signed codes) from the
  *current* weight at every forward; the input's scale and zero point (affine, unsigned codes)
  are fixed by min-max on 256 training images. Only the weights learn, through the STE.
- ``method="lsq"``: the same start, then every scale is an ``nn.Parameter`` whose gradient is the
  student's ``lsq_scale_grad`` with LSQ's ``g = 1 / sqrt(N * quant_max)`` (``N``: elements of the
  weight, or features of one sample for an input); zero points stay fixed integers.

Forward values and the gradient for ``x`` always come from ``FakeQuantSTE.apply``; the scale's
gradient comes from ``lsq_scale_grad`` (an identity autograd node, :class:`_ScaleGradient`,
adds it). Shapes: any ``x``; ``scale`` float32 of shape ``(1,)``; zero point an int64 ``(1,)``
tensor for the STE and the same value as float32 for ``lsq_scale_grad``.

The returned model also enforces the question's rules while it is in training mode (a forward
pre-hook on the whole model): at most :data:`TRAIN_BUDGET` training images in total (100 steps
of 64), and never an image of the test split (``ValueError`` on either).
"""

from __future__ import annotations

import torch
from torch import nn

from ..modules import QuantConfig
from ..qat import prepare_qat, qat_layers
from ..qparams import choose_qparams, quant_range

__all__ = ["METHODS", "TRAIN_BUDGET", "OwnFakeQuant", "own_qat_model", "images_seen"]

METHODS = ("ste", "lsq")
TRAIN_BUDGET = 6400
"""Training images the Q3 model may see in training mode (100 steps of 64 images)."""
CALIBRATION_IMAGES = 256


class _ScaleGradient(torch.autograd.Function):
    """Identity on ``y`` forward; backward passes ``grad_output`` to ``y`` and gives ``scale``
    the gradient ``lsq_grad(x, scale, zero_point, quant_min, quant_max, grad_output, g)``."""

    @staticmethod
    def forward(ctx, y, x, scale, zero_point, quant_min, quant_max, grad_factor, lsq_grad):
        ctx.save_for_backward(x, scale, zero_point)
        ctx.rest = (quant_min, quant_max, grad_factor, lsq_grad)
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad_output):
        x, scale, zero_point = ctx.saved_tensors
        quant_min, quant_max, grad_factor, lsq_grad = ctx.rest
        with torch.enable_grad():  # backward runs without grad mode; an answer may use autograd inside
            got = lsq_grad(x, scale.detach().clone(), zero_point.clone(), quant_min, quant_max, grad_output,
                           grad_factor)
        grad = torch.as_tensor(got, dtype=scale.dtype, device=scale.device).detach()
        if grad.numel() != 1:
            raise ValueError(f"lsq_scale_grad returned {grad.numel()} values; one scale has one gradient (a sum)")
        return grad_output, None, grad.reshape(scale.shape), None, None, None, None, None


class OwnFakeQuant(nn.Module):
    """Per-tensor fake quantization by the student's ``ste`` class, the scale learned with the
    student's ``lsq_grad`` when ``learn_scale`` (module docstring). ``weight=True``: symmetric
    signed codes (the scale follows the weight under the STE); else affine unsigned codes."""

    def __init__(self, ste, lsq_grad, bits: int, weight: bool, learn_scale: bool):
        super().__init__()
        self.ste, self.lsq_grad = ste, lsq_grad
        self.bits, self.is_weight, self.learn_scale = bits, weight, learn_scale
        self.quant_min, self.quant_max = quant_range(bits, signed=weight)
        self.scale = nn.Parameter(torch.ones(1), requires_grad=learn_scale)
        self.register_buffer("zero_point", torch.zeros(1, dtype=torch.int64))
        self.register_buffer("ready", torch.tensor(False))

    def reset(self, x: torch.Tensor) -> None:
        """Min-max qparams of ``x`` (the start of both methods; the STE's weights at every step)."""
        x = x.detach()
        s, z = choose_qparams(x.min(), x.max(), self.quant_min, self.quant_max, symmetric=self.is_weight)
        with torch.no_grad():
            self.scale.copy_(s.reshape(1).to(self.scale.device))
            self.zero_point.copy_(z.reshape(1).to(self.zero_point.device))
        self.ready.fill_(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not bool(self.ready) or (self.is_weight and not self.learn_scale):
            self.reset(x)
        y = self.ste.apply(x, self.scale.detach(), self.zero_point, self.quant_min, self.quant_max)
        if not isinstance(y, torch.Tensor):
            raise TypeError(f"FakeQuantSTE.apply returned {type(y).__name__}, not a tensor")
        if self.learn_scale and torch.is_grad_enabled():
            n = x.numel() if self.is_weight else x[0].numel()
            g = 1.0 / (n * self.quant_max) ** 0.5
            y = _ScaleGradient.apply(y, x.detach(), self.scale, self.zero_point.to(torch.float32),
                                     self.quant_min, self.quant_max, g, self.lsq_grad)
        return y

    def extra_repr(self) -> str:
        return f"bits={self.bits}, {'weight' if self.is_weight else 'input'}, learn_scale={self.learn_scale}"


def _split(digits, name: str) -> torch.Tensor:
    part = getattr(digits, name, None)
    if part is None or not hasattr(part, "tensors"):
        raise TypeError(f"digits must be qlib.data.load_digits(8) (with .train and .test TensorDatasets), "
                        f"got {type(digits).__name__}")
    return part.tensors[0]


def _guard(test_images: torch.Tensor, budget: int):
    test_rows = test_images.flatten(1)

    def hook(model, args):
        if not model.training or not args or not isinstance(args[0], torch.Tensor):
            return
        x = args[0].detach()
        model.own_qat_images_seen += x.shape[0]
        if model.own_qat_images_seen > budget:
            raise ValueError(f"training budget exceeded: {model.own_qat_images_seen} images seen in training mode, "
                             f"at most {budget} (100 steps of 64); put the model in eval mode to evaluate it")
        rows = x.flatten(1).to(test_rows.device, test_rows.dtype)
        if rows.shape[1] == test_rows.shape[1] and bool((torch.cdist(rows, test_rows).min(dim=1).values < 1e-4).any()):
            raise ValueError("this batch holds images of the test split: train on digits.train only (the test "
                             "split measures the result, it never trains)")
    return hook


def own_qat_model(model: nn.Module, digits, ste, lsq_grad, method: str = "lsq", weight_bits: int = 2,
                  act_bits: int = 4, seed: int = 0) -> nn.Module:
    """A train-mode QAT copy of ``model`` quantized by the student's ``ste`` and ``lsq_grad``.

    ``digits``: ``qlib.data.load_digits(8)``; ``CALIBRATION_IMAGES`` training images (drawn
    with ``seed``) set the starting qparams. ``method``: ``"ste"`` or ``"lsq"`` (module
    docstring). ``model`` is unchanged. Count of training images seen: :func:`images_seen`.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not (isinstance(ste, type) and issubclass(ste, torch.autograd.Function)):
        raise TypeError(f"ste must be your FakeQuantSTE class (a torch.autograd.Function), got {ste!r}")
    if not callable(lsq_grad):
        raise TypeError(f"lsq_grad must be your lsq_scale_grad function, got {type(lsq_grad).__name__}")
    train, test = _split(digits, "train"), _split(digits, "test")
    qmodel = prepare_qat(model, QuantConfig(weight_bits=weight_bits, act_bits=act_bits))
    for layer in qat_layers(qmodel).values():
        layer.weight_fq = OwnFakeQuant(ste, lsq_grad, weight_bits, weight=True, learn_scale=method == "lsq")
        layer.input_fq = OwnFakeQuant(ste, lsq_grad, act_bits, weight=False, learn_scale=method == "lsq")
    pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:CALIBRATION_IMAGES]
    with torch.no_grad():
        qmodel.eval()(train[pick])  # every quantizer takes its first (min-max) qparams
    qmodel.own_qat_method = method
    qmodel.own_qat_images_seen = 0
    qmodel.register_forward_pre_hook(_guard(test, TRAIN_BUDGET))
    return qmodel.train()


def images_seen(qmodel: nn.Module) -> int:
    """Training images an :func:`own_qat_model` has seen in training mode."""
    return int(getattr(qmodel, "own_qat_images_seen", 0))
