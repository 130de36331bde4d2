"""Printed digits: a different *source* of the same ten classes, built offline from fonts.

Corruptions (``shifts``) damage the handwritten digits; a different-source domain is a new
way of producing the images. Here the digits 0-9 are typeset with the TrueType fonts that
every matplotlib installation ships (DejaVu Sans / Serif / Sans Mono, STIX and Computer
Modern, in their bold and slanted variants), then made to look like scikit-learn's digits:

1. render each glyph black on white at 64x64 with matplotlib's Agg backend (no display, no
   network); ``u`` = ink in [0, 1];
2. keep or thicken the strokes (grey dilation: one or two 3x3 max-pools at 64x64), then a
   random affine jitter per image (rotation +-8 degrees, scale 0.85-1.05, shift +-2 pixels,
   shear +-0.15), all drawn from one seeded ``torch.Generator``;
3. crop to the ink's bounding box, fit it into 32x32 keeping the aspect ratio (the NIST
   preprocessing behind sklearn's digits), average 4x4 blocks to 8x8 and round to 17 grey
   levels (sklearn's digits are counts 0-16 of a 4x4 block);
4. resize to the zoo's image size (8 or 16) and standardize with the **handwritten training
   set's** mean and std, exactly as ``qlib.data.load_digits`` does. A model trained on the
   handwritten digits therefore sees the printed ones on the scale it knows.

The split is fixed (``PRINTED_SEED``): ``variants`` jittered copies per (font, digit), split
60/20/20 into train / val / test with a seeded permutation, the same for every call.

Shapes and dtypes: ``Splits`` of float32 ``(N, 1, S, S)`` images and int64 labels.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from ..data import Splits, resize, split_indices

__all__ = ["FONTS", "PRINTED_SEED", "font_paths", "render_glyphs", "jitter", "to_digits_format",
           "load_printed", "handwritten_stats"]

PRINTED_SEED = 0
"""The printed split and its jitter are drawn with this seed, never another."""

FONTS = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSans-BoldOblique.ttf",
         "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf", "DejaVuSerif-BoldItalic.ttf",
         "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf", "DejaVuSansMono-Oblique.ttf",
         "DejaVuSansMono-BoldOblique.ttf", "STIXGeneral.ttf", "STIXGeneralBol.ttf", "STIXGeneralItalic.ttf",
         "STIXGeneralBolIta.ttf", "cmr10.ttf", "cmb10.ttf", "cmss10.ttf", "cmtt10.ttf", "cmti10.ttf")
"""Font files of matplotlib's ``mpl-data/fonts/ttf`` (those present are used)."""

RENDER = 64


def font_paths() -> list[str]:
    """Absolute paths of the ``FONTS`` that this matplotlib ships (raises if none)."""
    import matplotlib

    folder = os.path.join(matplotlib.get_data_path(), "fonts", "ttf")
    paths = [os.path.join(folder, f) for f in FONTS if os.path.exists(os.path.join(folder, f))]
    if not paths:
        raise FileNotFoundError(f"none of the fonts {FONTS[:3]}... were found in {folder}")
    return paths


@functools.lru_cache(maxsize=4)
def _render_cached(paths: tuple[str, ...]) -> torch.Tensor:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.font_manager import FontProperties

    fig = Figure(figsize=(1, 1), dpi=RENDER)
    canvas = FigureCanvasAgg(fig)
    out = torch.zeros(len(paths), 10, RENDER, RENDER)
    for i, path in enumerate(paths):
        prop = FontProperties(fname=path, size=36)
        for d in range(10):
            fig.clear()
            fig.text(0.5, 0.5, str(d), fontproperties=prop, ha="center", va="center")
            canvas.draw()
            rgba = torch.frombuffer(bytearray(canvas.buffer_rgba()), dtype=torch.uint8)
            grey = rgba.view(RENDER, RENDER, 4)[..., :3].float().mean(-1) / 255.0
            out[i, d] = 1.0 - grey  # ink = 1
    return out


def render_glyphs(paths=None) -> torch.Tensor:
    """Ink images ``(fonts, 10, 64, 64)`` in [0, 1] of the digits 0-9 in every font."""
    paths = tuple(font_paths() if paths is None else paths)
    return _render_cached(paths).clone()


def jitter(ink: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random stroke width and affine jitter of ``(N, 1, 64, 64)`` ink images (module docstring)."""
    n = ink.shape[0]
    stroke = torch.randint(0, 3, (n,), generator=generator).view(n, 1, 1, 1)  # 0: as is, 1, 2: bolder
    bold = F.max_pool2d(ink, 3, stride=1, padding=1)
    bolder = F.max_pool2d(bold, 3, stride=1, padding=1)
    ink = torch.where(stroke == 1, bold, torch.where(stroke == 2, bolder, ink))
    u = lambda lo, hi: lo + (hi - lo) * torch.rand(n, generator=generator)  # noqa: E731
    angle = torch.deg2rad(u(-8.0, 8.0))
    scale = u(0.85, 1.05)
    shear = u(-0.15, 0.15)
    tx, ty = u(-2.0, 2.0) * 2 / RENDER, u(-2.0, 2.0) * 2 / RENDER
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    mat = torch.stack([torch.stack([cos, -sin + shear, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    grid = F.affine_grid(mat, [n, 1, RENDER, RENDER], align_corners=False)
    return F.grid_sample(ink, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _fit_box(img: torch.Tensor, size: int = 32) -> torch.Tensor:
    """Crop one ``(H, W)`` ink image to its bounding box and fit it, centred, into ``size``."""
    rows = torch.nonzero(img.amax(1) > 0.1).flatten()
    cols = torch.nonzero(img.amax(0) > 0.1).flatten()
    if len(rows) == 0:
        return torch.zeros(size, size)
    crop = img[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    h, w = crop.shape
    f = size / max(h, w)
    nh, nw = max(1, min(size, round(h * f))), max(1, min(size, round(w * f)))
    crop = F.interpolate(crop[None, None], size=(nh, nw), mode="area")[0, 0]
    out = torch.zeros(size, size)
    top, left = (size - nh) // 2, (size - nw) // 2
    out[top:top + nh, left:left + nw] = crop
    return out


def to_digits_format(ink: torch.Tensor) -> torch.Tensor:
    """``(N, 1, 64, 64)`` ink -> ``(N, 1, 8, 8)`` in [0, 1] with 17 grey levels, like sklearn's digits."""
    boxed = torch.stack([_fit_box(img[0]) for img in ink]).unsqueeze(1)
    small = F.avg_pool2d(boxed.clamp(0, 1), 4)
    return torch.round(small * 16) / 16


@functools.lru_cache(maxsize=4)
def handwritten_stats(image_size: int = 8) -> tuple[float, float]:
    """Mean and std of the handwritten *training* images at ``image_size`` (``qlib.data``'s split)."""
    from sklearn.datasets import load_digits as sk_digits

    x = torch.tensor(sk_digits().images, dtype=torch.float32).unsqueeze(1) / 16.0
    i_tr, _, _ = split_indices(len(x))
    x_tr = resize(x, image_size)[i_tr]
    return float(x_tr.mean()), float(x_tr.std())


def load_printed(image_size: int = 8, variants: int = 6, seed: int = PRINTED_SEED) -> Splits:
    """The printed-digit domain as ``Splits`` (train / val / test, fixed split, standardized).

    ``variants`` jittered copies of every (font, digit): with the 21 default fonts and 6
    variants, 1260 images (756 / 252 / 252). ``image_size``: 8 or 16 (the zoo's sizes).
    """
    if not isinstance(image_size, int) or image_size < 8:
        raise ValueError(f"image_size must be an int >= 8 (the zoo uses 8 and 16), got {image_size!r}")
    if isinstance(variants, bool) or not isinstance(variants, int) or variants < 1:
        raise ValueError(f"variants must be a positive int, got {variants!r}")
    glyphs = render_glyphs()                                   # (fonts, 10, 64, 64)
    n_fonts = glyphs.shape[0]
    ink = glyphs.reshape(n_fonts * 10, 1, RENDER, RENDER).repeat(variants, 1, 1, 1)
    labels = torch.arange(10).repeat(n_fonts).repeat(variants)
    g = torch.Generator().manual_seed(seed)
    x = to_digits_format(jitter(ink, g))
    x = resize(x, image_size)
    mean, std = handwritten_stats(image_size)
    x = (x - mean) / std
    i_tr, i_va, i_te = split_indices(len(x), seed=seed)
    return Splits(TensorDataset(x[i_tr], labels[i_tr]), TensorDataset(x[i_va], labels[i_va]),
                  TensorDataset(x[i_te], labels[i_te]), num_classes=10, name="printed")

