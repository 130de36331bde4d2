"""A generator of synthetic inputs, trained from the model alone (GDFQ).

ZeroQ (``synthetic.py``) optimizes a fixed set of images. GDFQ (Xu et al., ECCV 2020,
"Generative Low-bitwidth Data Free Quantization") instead trains a small *generator*
``G(z, y)``: noise ``z ~ N(0, I)`` and a class label ``y`` in, an image out. It learns from
the frozen full-precision *teacher* only, with two terms::

    L_G = ce_weight * CrossEntropy(teacher(G(z, y)), y)     the teacher must recognise y
        + bn_weight * L_BN(G(z, y))                         BatchNorm statistics (synthetic.py)

The cross-entropy term carries the class knowledge of the last layer (images the teacher
classifies confidently as ``y``); the BN term makes the intermediate activations look like
those of real training batches. Once trained, the generator yields as many fresh images as
one likes: calibration batches (``generator_batches``), or an endless stream for data-free
distillation (``qlib.distill``).

The architecture is GDFQ's, narrower: the label embedding multiplies ``z``; a linear layer
makes a ``(2w, H/4, W/4)`` map; two (upsample x2, 3x3 conv, BatchNorm, LeakyReLU) stages;
a 3x3 conv to the image channels and a BatchNorm without affine parameters, which makes
each batch's pixels mean 0 and std 1 like standardized data. Its BatchNorms always use
batch statistics (``track_running_stats=False``): sampling behaves as in training.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .. import runtime
from ..batching import check_seed, eval_mode
from .synthetic import _check_sizes, bn_layers, bn_statistics_loss, check_input_shape

__all__ = ["Generator", "train_generator", "generator_batches"]


class Generator(nn.Module):
    """GDFQ-style conditional generator: ``G(z, y)`` -> images ``(N, *shape)``.

    ``shape``: ``(C, H, W)`` with ``H`` and ``W`` divisible by 4; ``latent_dim``: size of
    ``z``; ``width``: channels of the last hidden stage (the first has ``2 * width``);
    ``input_range``: ``(lo, hi)`` clamps the pixels into the valid range of the
    preprocessed input (None: no clamp); ``seed``: the initial weights (None: global RNG).
    """

    def __init__(self, shape, num_classes: int = 10, latent_dim: int = 64, width: int = 16,
                 input_range: tuple[float, float] | None = None, seed: int | None = 0):
        super().__init__()
        shape = _check_sizes(shape, 1, 1)
        if len(shape) != 3 or shape[1] % 4 or shape[2] % 4:
            raise ValueError(f"shape must be (C, H, W) with H and W divisible by 4, got {shape}")
        if num_classes < 2 or latent_dim < 1 or width < 1:
            raise ValueError("need num_classes >= 2, latent_dim >= 1 and width >= 1")
        if input_range is not None and not (len(input_range) == 2 and input_range[0] < input_range[1]):
            raise ValueError(f"input_range must be (lo, hi) with lo < hi, got {input_range!r}")
        self.shape, self.num_classes, self.latent_dim = shape, num_classes, latent_dim
        self.input_range = input_range
        c, h, w = shape
        self.init_hw = (h // 4, w // 4)

        with torch.random.fork_rng(devices=[], enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(check_seed(seed))
            self._build(c, width)

    def _build(self, c: int, width: int) -> None:
        def bn(n, affine=True):
            return nn.BatchNorm2d(n, affine=affine, track_running_stats=False)

        self.embed = nn.Embedding(self.num_classes, self.latent_dim)
        self.fc = nn.Linear(self.latent_dim, 2 * width * self.init_hw[0] * self.init_hw[1])
        self.bn0 = bn(2 * width)
        self.block1 = nn.Sequential(nn.Conv2d(2 * width, 2 * width, 3, padding=1), bn(2 * width),
                                    nn.LeakyReLU(0.2))
        self.block2 = nn.Sequential(nn.Conv2d(2 * width, width, 3, padding=1), bn(width),
                                    nn.LeakyReLU(0.2))
        self.to_image = nn.Sequential(nn.Conv2d(width, c, 3, padding=1), bn(c, affine=False))

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``z`` ``(N, latent_dim)`` float, ``y`` ``(N,)`` int64 labels -> images ``(N, C, H, W)``."""
        if z.dim() != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(f"z must have shape (N, {self.latent_dim}), got {tuple(z.shape)}")
        if y.shape != (z.shape[0],) or y.dtype != torch.int64:
            raise ValueError(f"y must be int64 labels of shape ({z.shape[0]},), got {y.dtype} {tuple(y.shape)}")
        out = self.fc(self.embed(y) * z).view(len(z), -1, *self.init_hw)
        out = F.interpolate(self.bn0(out), scale_factor=2)
        out = F.interpolate(self.block1(out), scale_factor=2)
        x = self.to_image(self.block2(out))
        return x if self.input_range is None else x.clamp(*self.input_range)

    def sample(self, n: int, generator: torch.Generator | None = None,
               labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` images and their labels; labels are balanced (``i % num_classes``) by default.

        ``z`` is drawn on the CPU (``generator`` is a CPU ``torch.Generator``, so a seed gives
        the same images on any device), then moved to the generator's device and dtype.
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        w = self.fc.weight
        z = torch.randn(n, self.latent_dim, generator=generator).to(device=w.device, dtype=w.dtype)
        y = torch.arange(n) % self.num_classes if labels is None else labels
        if not isinstance(y, torch.Tensor):
            raise TypeError(f"labels must be an int64 tensor of shape ({n},), got {type(y).__name__}")
        return self(z, y.to(w.device)), y


def train_generator(generator: Generator, teacher: nn.Module, steps: int = 200, batch_size: int = 64,
                    lr: float = 5e-3, ce_weight: float = 1.0, bn_weight: float = 1.0,
                    input_mean: float | None = 0.0, input_std: float | None = 1.0, seed: int = 0,
                    progress: bool = True) -> dict[str, list[float]]:
    """Train ``generator`` in place on ``L_G`` (module docstring) against the frozen ``teacher``.

    Each step draws ``batch_size`` latent vectors and random labels (from a
    ``torch.Generator`` seeded with ``seed``), runs the teacher in eval mode, and takes one
    Adam step (``lr``, betas ``(0.5, 0.999)`` as GDFQ, which uses lr 1e-3 for many more
    steps) on the generator's parameters only.
    ``input_mean``/``input_std`` add the input-statistics term to ``L_BN``.
    Returns the history ``{"loss", "ce", "bn", "confidence"}`` (one value per step;
    ``confidence`` is the teacher's mean softmax probability of the asked-for class).
    """
    if not isinstance(generator, Generator):
        raise TypeError(f"generator must be a qlib Generator, got {type(generator).__name__}")
    bn_layers(teacher)
    for name, v in (("steps", steps), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    for name, v in (("lr", lr), ("ce_weight", ce_weight), ("bn_weight", bn_weight)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 \
                or (name == "lr" and v == 0):
            raise ValueError(f"need finite lr > 0, ce_weight >= 0 and bn_weight >= 0, got {name}={v!r}")
    g = torch.Generator().manual_seed(check_seed(seed))
    opt = torch.optim.Adam(generator.parameters(), lr=lr, betas=(0.5, 0.999))
    frozen = [p.requires_grad for p in teacher.parameters()]
    for p in teacher.parameters():
        p.requires_grad_(False)
    generator.train()
    history: dict[str, list[float]] = {"loss": [], "ce": [], "bn": [], "confidence": []}
    try:
        with eval_mode(teacher):  # every submodule's mode comes back, also on an error
            check_input_shape(teacher, generator.shape)
            for step in tqdm(range(steps), desc="generator", disable=not progress or runtime.quiet()):
                y = torch.randint(generator.num_classes, (batch_size,), generator=g)
                x, y = generator.sample(batch_size, g, labels=y)
                bn, logits = bn_statistics_loss(teacher, x, 1, input_mean, input_std, return_logits=True)
                ce = F.cross_entropy(logits, y.to(logits.device))
                loss = ce_weight * ce + bn_weight * bn.to(ce.dtype)
                if not torch.isfinite(loss):
                    raise ValueError(f"generator training diverged at step {step} (loss is NaN or "
                                     "infinite): lower lr")
                opt.zero_grad()
                loss.backward()
                opt.step()
                with torch.no_grad():
                    conf = logits.softmax(1).gather(1, y.to(logits.device)[:, None]).mean()
                for k, v in (("loss", loss), ("ce", ce), ("bn", bn), ("confidence", conf)):
                    history[k].append(v.item())
    finally:
        for p, r in zip(teacher.parameters(), frozen):
            p.requires_grad_(r)
    return history


@torch.no_grad()
def generator_batches(generator: Generator, num_samples: int = 256, batch_size: int = 64,
                      seed: int = 0) -> list[torch.Tensor]:
    """``num_samples`` generated images (balanced classes) in batches of ``batch_size``."""
    if not isinstance(generator, Generator):
        raise TypeError(f"generator must be a qlib Generator, got {type(generator).__name__}")
    _check_sizes(generator.shape, num_samples, batch_size)
    g = torch.Generator().manual_seed(check_seed(seed))
    out = []
    for start in range(0, num_samples, batch_size):
        n = min(batch_size, num_samples - start)
        labels = (torch.arange(start, start + n)) % generator.num_classes
        out.append(generator.sample(n, g, labels=labels)[0])
    return out
