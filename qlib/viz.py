"""Plots for the lessons: what quantization does to numbers, drawn with matplotlib.

Every helper takes an optional ``ax`` (draws into it) or makes its own figure, puts a
title and axis labels on it, and returns the ``Axes`` (``ax.figure`` is the Figure), so a
lesson can add to the plot or save it. Nothing here computes a result a lesson reports:
the lessons measure, these functions only draw what they are given, except for
:func:`plot_staircase`, which draws the quantizer itself with :func:`qlib.quantize.fake_quantize`.

================================  ================================================================
``plot_bit_layout``               sign / exponent / mantissa fields of number formats
``plot_spacing``                  gap between neighbouring representable numbers vs magnitude
``plot_staircase``                the quantizer ``x -> x_dq``: a staircase, flat where it clips
``plot_histogram_with_range``     a tensor's histogram, the clipping range and the grid of levels
``plot_error_vs_range``           rounding vs clipping error as the clipping range grows
``plot_error_vs_bits``            error (or SQNR) as the bit width shrinks
``plot_grouped_bars``             one bar per (category, series): per-layer errors, speed ratios
================================  ================================================================
"""

from __future__ import annotations

from typing import Mapping, Sequence

import matplotlib.pyplot as plt
import torch

from .quantize import fake_quantize

__all__ = ["plot_bit_layout", "plot_spacing", "plot_staircase", "plot_histogram_with_range",
           "plot_error_vs_range", "plot_error_vs_bits", "plot_grouped_bars"]

FIELD_COLORS = {"sign": "tab:red", "exponent": "tab:green", "mantissa": "tab:blue",
                "integer": "tab:purple"}


def _axes(ax, figsize=(6.4, 3.6)):
    """The given Axes, or a new one in a new figure."""
    if ax is None:
        _, ax = plt.subplots(figsize=figsize)
    return ax


def _numbers(values) -> list[float]:
    """A tensor, list or array as a list of Python floats (for matplotlib)."""
    if isinstance(values, torch.Tensor):
        return values.detach().double().flatten().tolist()
    return [float(v) for v in values]


def plot_bit_layout(formats: Mapping[str, tuple[int, int, int]], ax=None):
    """Draw each format as a row of bits: ``{"float16": (sign, exponent, mantissa)}``.

    A float with ``e`` exponent and ``m`` mantissa bits stores ``(-1)**s * 1.m * 2**(E - bias)``.
    Integer formats have no exponent: pass ``(1, 0, 7)`` for int8 (two's complement) and the
    7 value bits are drawn as "integer" bits.
    """
    ax = _axes(ax, figsize=(9, 0.55 * len(formats) + 1.2))
    width = max(sum(f) for f in formats.values())
    for row, (name, (s, e, m)) in enumerate(formats.items()):
        y = len(formats) - 1 - row
        start = 0
        fields = [("sign", s), ("exponent", e), ("mantissa" if e else "integer", m)]
        for field, n in fields:
            if n:
                ax.barh(y, n, left=start, color=FIELD_COLORS[field], edgecolor="white", height=0.7)
                ax.text(start + n / 2, y, str(n), ha="center", va="center", color="white", fontsize=9)
            start += n
        ax.text(-0.5, y, f"{name} ({s + e + m} bits)", ha="right", va="center")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in FIELD_COLORS.values()]
    ax.legend(handles, list(FIELD_COLORS), ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.08),
              frameon=False)
    ax.set_xlim(0, width)
    ax.set_yticks([])
    ax.set_xticks([])
    for side in ("top", "right", "left", "bottom"):
        ax.spines[side].set_visible(False)
    ax.set_title("bit layout: sign, exponent and mantissa fields (number = bits per field)")
    return ax


def plot_spacing(magnitudes, spacings: Mapping[str, object], ax=None, relative: bool = False):
    """Log-log plot of the gap to the next representable number, one line per format.

    ``spacings[label]`` holds one gap per entry of ``magnitudes`` (NaN where the format
    cannot represent that magnitude). Floats give a rising staircase (constant *relative*
    gap); a scaled integer grid gives a flat line (constant *absolute* gap).
    ``relative=True`` plots ``gap / magnitude`` instead.
    """
    ax = _axes(ax)
    xs = _numbers(magnitudes)
    for label, gaps in spacings.items():
        ys = _numbers(gaps)
        if relative:
            ys = [g / x for g, x in zip(ys, xs)]
        ax.plot(xs, ys, label=label, drawstyle="steps-post")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("magnitude |x|")
    ax.set_ylabel("relative gap (gap / |x|)" if relative else "gap to the next number")
    ax.set_title("relative spacing of representable numbers" if relative
                 else "spacing of representable numbers")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8)
    return ax


def plot_staircase(scale, zero_point, quant_min: int, quant_max: int, x_min=None, x_max=None,
                   ax=None, num: int = 2001, label: str | None = None):
    """Draw the quantizer ``x -> fake_quantize(x)`` on ``[x_min, x_max]`` against the identity.

    The levels run from ``(quant_min - zp) * scale`` to ``(quant_max - zp) * scale`` in steps
    of ``scale``. Inputs up to half a step beyond the outer levels are rounded onto them;
    further out (shaded) the output is flat: those inputs are clipped. The default x range
    extends a quarter of the levels' span on each side.
    """
    ax = _axes(ax)
    scale_f, zp = float(scale), int(zero_point)
    lo, hi = (quant_min - zp - 0.5) * scale_f, (quant_max - zp + 0.5) * scale_f
    pad = 0.25 * (hi - lo)
    x_min = lo - pad if x_min is None else float(x_min)
    x_max = hi + pad if x_max is None else float(x_max)
    x = torch.linspace(x_min, x_max, num)
    x_dq = fake_quantize(x, torch.tensor(scale_f), torch.tensor(zp), quant_min, quant_max)
    ax.plot(x.tolist(), x.tolist(), "--", color="gray", lw=1, label="identity (no quantization)")
    ax.plot(x.tolist(), x_dq.tolist(), color="tab:blue", lw=1.5,
            label=label or f"{quant_max - quant_min + 1} levels, scale={scale_f:.3g}, zp={zp}")
    label = "clipped"
    if lo > x_min:
        ax.axvline(lo, color="tab:red", lw=1, alpha=0.6)
        ax.axvspan(x_min, lo, color="tab:red", alpha=0.08, label=label)
        label = None
    if hi < x_max:
        ax.axvline(hi, color="tab:red", lw=1, alpha=0.6)
        ax.axvspan(hi, x_max, color="tab:red", alpha=0.08, label=label)
    ax.set_xlim(x_min, x_max)
    ax.set_xlabel("x (float input)")
    ax.set_ylabel("x_dq = dequantize(quantize(x))")
    ax.set_title("the quantizer is a staircase")
    ax.legend(fontsize=8, loc="upper left")
    return ax


def plot_histogram_with_range(x, lo: float, hi: float, levels=None, ax=None, bins: int = 100,
                              log: bool = True, title: str | None = None):
    """Histogram of ``x`` with the clipping range ``[lo, hi]`` and the quantization grid.

    Values outside ``[lo, hi]`` (shaded) are clipped; ``levels`` (the dequantized codes,
    e.g. ``(arange(qmin, qmax+1) - zp) * scale``) are drawn as ticks along the bottom: every
    value is rounded to the nearest tick. For a quantizer, ``lo`` and ``hi`` are half a step
    beyond the outer levels: ``(qmin - zp - 0.5) * scale`` and ``(qmax - zp + 0.5) * scale``.
    """
    ax = _axes(ax)
    values = x.detach().flatten().float()
    lo, hi = float(lo), float(hi)
    clipped = ((values < lo) | (values > hi)).float().mean().item()
    ax.hist(values.tolist(), bins=bins, color="tab:gray", alpha=0.8, log=log)
    x0 = min(values.min().item(), lo)
    x1 = max(values.max().item(), hi)
    span = x1 - x0 or 1.0
    x0, x1 = x0 - 0.03 * span, x1 + 0.03 * span
    ax.axvspan(x0, lo, color="tab:red", alpha=0.1)
    ax.axvspan(hi, x1, color="tab:red", alpha=0.1, label=f"clipped: {100 * clipped:.2f}% of values")
    ax.axvline(lo, color="tab:red")
    ax.axvline(hi, color="tab:red")
    if levels is not None:
        for v in _numbers(levels):
            ax.axvline(v, ymax=0.06, color="tab:blue", lw=1)
        ax.plot([], [], color="tab:blue", label=f"{len(_numbers(levels))} levels")
    ax.set_xlim(x0, x1)
    ax.set_xlabel("value")
    ax.set_ylabel("count (log)" if log else "count")
    ax.set_title(title or "histogram, clipping range and quantization levels")
    ax.legend(fontsize=8)
    return ax


def plot_error_vs_range(clip_values, total, rounding=None, clipping=None, ax=None,
                        xlabel: str = "clipping range c (quantize [-c, c])", ylabel: str = "MSE",
                        title: str | None = None):
    """The rounding/clipping trade-off: error as a function of the clipping range.

    ``total`` is the error at each entry of ``clip_values``; ``rounding`` and ``clipping``,
    if given, are its two parts (values inside the range, values outside it). The minimum
    of ``total`` is marked.
    """
    ax = _axes(ax)
    xs, tot = _numbers(clip_values), _numbers(total)
    ax.plot(xs, tot, color="black", lw=2, label="total")
    if rounding is not None:
        ax.plot(xs, _numbers(rounding), "--", color="tab:blue", label="rounding (inside the range)")
    if clipping is not None:
        ax.plot(xs, _numbers(clipping), "--", color="tab:red", label="clipping (outside the range)")
    best = min(range(len(tot)), key=tot.__getitem__)
    ax.plot([xs[best]], [tot[best]], "o", color="tab:green", label=f"best c = {xs[best]:.3g}")
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title or "rounding vs clipping: the error of a clipping range")
    ax.legend(fontsize=8)
    return ax


def plot_error_vs_bits(bits: Sequence[int], errors: Mapping[str, object], ax=None,
                       ylabel: str = "MSE", logy: bool = True, title: str | None = None):
    """Error against the bit width, one line per method (``{"per-tensor": [...], ...}``)."""
    ax = _axes(ax)
    xs = [int(b) for b in bits]
    for label, ys in errors.items():
        ax.plot(xs, _numbers(ys), "o-", label=label)
    if logy:
        ax.set_yscale("log")
    ax.set_xticks(xs)
    ax.set_xlabel("bits")
    ax.set_ylabel(ylabel)
    ax.set_title(title or f"{ylabel} vs bit width")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return ax


def plot_grouped_bars(categories: Sequence[str], series: Mapping[str, object], ax=None,
                      ylabel: str = "", title: str = "", logy: bool = False):
    """Grouped bar chart: one group per category, one bar per series in each group."""
    ax = _axes(ax, figsize=(min(12.0, max(6.4, 0.9 * len(categories) + 2)), 3.6))
    n = max(len(series), 1)
    width = 0.8 / n
    for i, (label, values) in enumerate(series.items()):
        xs = [c + (i - (n - 1) / 2) * width for c in range(len(categories))]
        ax.bar(xs, _numbers(values), width=width, label=label)
    ax.set_xticks(range(len(categories)))
    ax.set_xticklabels(list(categories), rotation=20 if len(categories) > 4 else 0)
    if logy:
        ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    return ax
