"""Corruptions: the same digits, seen through a worse camera, at five severities.

A *domain shift* changes the input distribution ``p(x)`` while the task (which digit) stays
the same. The cheapest shifts to study are corruptions of the test images, in the spirit of
ImageNet-C (Hendrycks & Dietterich, ICLR 2019): each has five severities, from barely
visible (1) to hard (5). Here:

==================  ==========================================================================
``gaussian_noise``  ``u + sigma * N(0, 1)``, sigma = 0.02 ... 0.13 of the pixel range
``blur``            Gaussian blur, sigma = 0.3 ... 0.7 pixels at 8x8 (scaled with the size)
``rotation``        rotate about the centre by 5 ... 30 degrees (sign drawn per image)
``contrast``        ``mean + c * (u - mean)``, c = 0.95 ... 0.7
``inversion``       blend towards the negative ``(1 - a) u + a (1 - u)``, a = 0.02 ... 0.12
``elastic``         a smooth random displacement field, 0.15 ... 0.8 pixels at 8x8
==================  ==========================================================================

The severities are mild on purpose: the zoo's small models, trained without augmentation on
1078 digits, lose 30-60 points at severity 5 (``cnn16``), so the grid spans "barely hurts"
to "half the digits wrong" instead of jumping to chance level.

The images the models see are *standardized* (``qlib.data``: ``x = (pixel - mean) / std``),
so a corruption first maps them to pixel units ``u`` in [0, 1] with the range of the input,
``u = (x - lo) / (hi - lo)``, corrupts ``u``, clamps to [0, 1] and maps back. The result is
therefore *bounded*: it never leaves ``[lo, hi]`` (by default the min and max of ``x``; pass
``bounds=`` to use the training set's). Randomness (noise, rotation signs, displacement
fields) comes from a ``torch.Generator`` seeded with ``seed`` on the device of ``x``, so the
same call gives the same images, and nothing global is touched.

Shapes and dtypes: ``x`` is float ``(N, C, H, W)``; the result has the same shape, dtype and
device.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["SHIFTS", "SEVERITIES", "corrupt", "corrupt_dataset", "to_unit", "from_unit",
           "gaussian_noise", "blur", "rotation", "contrast", "inversion", "elastic"]

SEVERITIES = (1, 2, 3, 4, 5)

PARAMS = {
    "gaussian_noise": (0.02, 0.04, 0.06, 0.09, 0.13),
    "blur": (0.3, 0.4, 0.5, 0.6, 0.7),
    "rotation": (5.0, 10.0, 15.0, 20.0, 30.0),
    "contrast": (0.95, 0.9, 0.85, 0.8, 0.7),
    "inversion": (0.02, 0.04, 0.06, 0.08, 0.12),
    "elastic": (0.15, 0.3, 0.45, 0.6, 0.8),
}
"""Corruption -> its parameter at severities 1..5 (units in the module docstring)."""


def _check_images(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"images must be a float tensor (N, C, H, W), got shape {tuple(x.shape)} "
                         f"and dtype {x.dtype}")
    if x.numel() == 0:
        raise ValueError("images are empty")
    if not torch.isfinite(x).all():
        raise ValueError("images contain NaN or infinite values")


def to_unit(x: torch.Tensor, bounds=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(u, lo, hi)``: ``x`` mapped to [0, 1] with ``bounds=(lo, hi)`` (default: its min, max)."""
    if bounds is None:
        lo, hi = x.min(), x.max()
    else:
        lo, hi = (torch.as_tensor(b, dtype=x.dtype, device=x.device) for b in bounds)
        if not bool(hi > lo):
            raise ValueError(f"bounds must be (lo, hi) with hi > lo, got {bounds!r}")
    width = torch.clamp(hi - lo, min=torch.finfo(x.dtype).eps)
    return ((x - lo) / width).clamp(0, 1), lo, hi


def from_unit(u: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Inverse of ``to_unit``: clamp ``u`` to [0, 1], then ``lo + u (hi - lo)``."""
    return lo + u.clamp(0, 1) * (hi - lo)


def _generator(x: torch.Tensor, seed: int) -> torch.Generator:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    return torch.Generator(device=x.device).manual_seed(seed)


def gaussian_noise(u: torch.Tensor, sigma: float, seed: int = 0) -> torch.Tensor:
    """``u + sigma * N(0, 1)``, drawn with ``seed`` (pixel units, not clamped here)."""
    noise = torch.randn(u.shape, generator=_generator(u, seed), device=u.device, dtype=u.dtype)
    return u + sigma * noise


def gaussian_kernel1d(sigma: float, like: torch.Tensor) -> torch.Tensor:
    """A normalized 1-D Gaussian of radius ``ceil(2 sigma)`` on ``like``'s device and dtype."""
    radius = max(1, math.ceil(2 * sigma))
    t = torch.arange(-radius, radius + 1, device=like.device, dtype=like.dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def blur(u: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur with standard deviation ``sigma`` pixels (edges replicated)."""
    n, c, h, w = u.shape
    k = gaussian_kernel1d(sigma, u)
    r = (len(k) - 1) // 2
    flat = u.reshape(n * c, 1, h, w)
    flat = F.conv2d(F.pad(flat, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    flat = F.conv2d(F.pad(flat, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))
    return flat.reshape(n, c, h, w)


def _warp(u: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Sample ``u`` at ``grid`` (normalized coordinates); outside the image is background 0."""
    return F.grid_sample(u, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def rotation(u: torch.Tensor, degrees: float, seed: int = 0) -> torch.Tensor:
    """Rotate every image by ``+-degrees`` about its centre (the sign drawn with ``seed``)."""
    n = u.shape[0]
    sign = torch.randint(0, 2, (n,), generator=_generator(u, seed), device=u.device).to(u.dtype) * 2 - 1
    theta = sign * math.radians(degrees)
    cos, sin = torch.cos(theta), torch.sin(theta)
    zero = torch.zeros_like(cos)
    mat = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    grid = F.affine_grid(mat, list(u.shape), align_corners=False)
    return _warp(u, grid)


def contrast(u: torch.Tensor, factor: float) -> torch.Tensor:
    """Shrink every image towards its own mean: ``mean + factor * (u - mean)``."""
    mean = u.mean(dim=(1, 2, 3), keepdim=True)
    return mean + factor * (u - mean)


def inversion(u: torch.Tensor, amount: float) -> torch.Tensor:
    """Blend towards the negative: ``(1 - a) u + a (1 - u)``; ``a = 1`` is the full negative."""
    return (1 - amount) * u + amount * (1 - u)


def elastic(u: torch.Tensor, pixels: float, seed: int = 0) -> torch.Tensor:
    """Elastic deformation (Simard et al., 2003): a random displacement field, smoothed.

    Each pixel moves by a smooth field of typical size ``pixels`` (in pixels of this image).
    """
    n, _, h, w = u.shape
    field = torch.randn((n, 2, h, w), generator=_generator(u, seed), device=u.device, dtype=u.dtype)
    field = blur(field, sigma=max(h, w) / 6)
    field = field / field.flatten(1).std(dim=1).clamp_min(1e-6).view(n, 1, 1, 1)
    base = F.affine_grid(torch.eye(2, 3, device=u.device, dtype=u.dtype).expand(n, 2, 3),
                         list(u.shape), align_corners=False)
    scale = torch.as_tensor([2.0 / w, 2.0 / h], device=u.device, dtype=u.dtype)  # pixels -> grid units
    grid = base + pixels * field.permute(0, 2, 3, 1) * scale
    return _warp(u, grid)


def _parameter(shift: str, severity: int, size: int) -> float:
    if shift not in PARAMS:
        raise ValueError(f"unknown shift {shift!r}; expected one of {', '.join(SHIFTS)}")
    if isinstance(severity, bool) or severity not in SEVERITIES:
        raise ValueError(f"severity must be an int in 1..5, got {severity!r}")
    value = PARAMS[shift][severity - 1]
    if shift in ("blur", "elastic"):
        value = value * size / 8  # the same blur on 8x8 and 16x16 digits
    return value


def corrupt(x: torch.Tensor, shift: str, severity: int, seed: int = 0, bounds=None) -> torch.Tensor:
    """Corrupt standardized images ``x`` with ``shift`` at ``severity`` (1-5), deterministically.

    Returns a new tensor of ``x``'s shape, dtype and device, inside ``bounds`` (default:
    ``(x.min(), x.max())``). ``shift="none"`` returns a copy of ``x``.
    """
    _check_images(x)
    if shift == "none":
        return x.clone()
    value = _parameter(shift, severity, x.shape[-1])
    u, lo, hi = to_unit(x, bounds)
    if shift == "gaussian_noise":
        out = gaussian_noise(u, value, seed)
    elif shift == "blur":
        out = blur(u, value)
    elif shift == "rotation":
        out = rotation(u, value, seed)
    elif shift == "contrast":
        out = contrast(u, value)
    elif shift == "inversion":
        out = inversion(u, value)
    else:
        out = elastic(u, value, seed)
    return from_unit(out, lo, hi)


def corrupt_dataset(dataset, shift: str, severity: int, seed: int = 0, bounds=None):
    """A ``TensorDataset`` with corrupted images and the same labels."""
    from torch.utils.data import TensorDataset

    x, *rest = dataset.tensors
    return TensorDataset(corrupt(x, shift, severity, seed, bounds), *rest)


SHIFTS = tuple(PARAMS)
