"""Interactive explorers for the lessons (ipywidgets; never used in graded labs).

- :func:`quantization_explorer` quantizes a tensor with sliders for the bit width and the
  clipping range and a symmetric/affine toggle; it draws the staircase, the histogram with
  the levels, and reports the error.
- :func:`float_format_explorer` shows how one number is stored in float32, bfloat16,
  float16 and the two float8 formats: the bits of each field and the rounding error.

The drawing and the numbers come from plain functions (:func:`clipped_qparams`,
:func:`explorer_figure`, :func:`float_bits`) that run without a browser, so tests and
lessons can call them directly; the widgets only wire sliders to them.
"""

from __future__ import annotations

import math
from typing import Mapping

import matplotlib.pyplot as plt
import torch

from .qparams import choose_qparams, quant_range
from .quantize import dequantize, fake_quantize
from .viz import plot_histogram_with_range, plot_staircase

__all__ = ["clipped_qparams", "error_stats", "explorer_figure", "quantization_explorer",
           "float_bits", "float_format_explorer", "FLOAT_FORMATS"]

FLOAT_FORMATS = (torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn, torch.float8_e5m2)


def clipped_qparams(x: torch.Tensor, bits: int, clip: float = 1.0, symmetric: bool = True):
    """Qparams that quantize ``x`` with its range shrunk by the factor ``clip`` (0 < clip <= 1).

    symmetric: signed codes, range ``[-c, c]`` with ``c = clip * max|x|``;
    affine: unsigned codes, range ``[clip * min(x), clip * max(x)]`` (0 always included).
    Returns ``(scale, zero_point, quant_min, quant_max)``.
    """
    if not 0 < clip <= 1:
        raise ValueError(f"clip must be in (0, 1], got {clip}")
    quant_min, quant_max = quant_range(bits, signed=symmetric)
    x = x.detach().float()
    if symmetric:
        c = clip * x.abs().max()
        lo, hi = -c, c
    else:
        lo, hi = clip * x.min(), clip * x.max()
    scale, zero_point = choose_qparams(lo, hi, quant_min, quant_max, symmetric=symmetric)
    return scale, zero_point, quant_min, quant_max


def error_stats(x: torch.Tensor, x_dq: torch.Tensor, clipped: torch.Tensor) -> dict[str, float]:
    """MSE, SQNR in dB (signal power over error power), max error and the clipped fraction."""
    x, x_dq = x.detach().double(), x_dq.detach().double()
    mse = (x - x_dq).pow(2).mean().item()
    signal = x.pow(2).mean().item()
    return {"mse": mse, "sqnr_db": 10 * math.log10(signal / mse) if mse > 0 else math.inf,
            "max_error": (x - x_dq).abs().max().item(),
            "clipped_fraction": clipped.float().mean().item()}


def explorer_figure(x: torch.Tensor, bits: int = 4, clip: float = 1.0, symmetric: bool = True,
                    name: str = "x"):
    """The explorer's picture: staircase (left) and histogram with levels (right).

    Returns ``(figure, stats)``; ``stats`` holds :func:`error_stats` plus the qparams.
    """
    scale, zero_point, quant_min, quant_max = clipped_qparams(x, bits, clip, symmetric)
    x = x.detach().float().flatten()
    x_dq = fake_quantize(x, scale, zero_point, quant_min, quant_max)
    # beyond half a step past the outer levels, values are clipped
    lo, hi = [((q - zero_point) * scale).item() for q in (quant_min - 0.5, quant_max + 0.5)]
    stats = error_stats(x, x_dq, (x < lo) | (x > hi))
    stats.update(scale=scale.item(), zero_point=int(zero_point), quant_min=quant_min, quant_max=quant_max)
    fig, (ax_l, ax_r) = plt.subplots(1, 2, figsize=(11, 3.8))
    x0, x1 = min(x.min().item(), lo), max(x.max().item(), hi)
    pad = 0.05 * (x1 - x0)
    plot_staircase(scale, zero_point, quant_min, quant_max, x_min=x0 - pad, x_max=x1 + pad, ax=ax_l)
    levels = dequantize(torch.arange(quant_min, quant_max + 1), scale, zero_point)
    plot_histogram_with_range(x, lo, hi, levels=levels if len(levels) <= 64 else None, ax=ax_r,
                              title=f"{name}: {x.numel()} values")
    kind = "symmetric, signed" if symmetric else "affine, unsigned"
    fig.suptitle(f"{bits} bits ({kind}), clip {clip:.2f}: MSE {stats['mse']:.3g}, "
                 f"SQNR {stats['sqnr_db']:.1f} dB, "
                 f"{100 * stats['clipped_fraction']:.2f}% of values outside the range")
    fig.tight_layout()
    return fig, stats


def quantization_explorer(x, bits: int = 4, clip: float = 1.0, symmetric: bool = True):
    """Sliders for bits (2..8) and clipping range, a symmetric/affine toggle, a data menu.

    ``x``: a tensor, or a dict ``{name: tensor}`` to choose from. Returns the widget box
    (display it, or make it the last expression of a cell).
    """
    import ipywidgets as w
    from IPython.display import display

    tensors: Mapping[str, torch.Tensor] = x if isinstance(x, Mapping) else {"x": x}
    data = w.Dropdown(options=list(tensors), description="data")
    bits_w = w.IntSlider(value=bits, min=2, max=8, description="bits")
    clip_w = w.FloatSlider(value=clip, min=0.05, max=1.0, step=0.01, description="clip",
                           readout_format=".2f")
    mode = w.ToggleButtons(options=["symmetric", "affine"], value="symmetric" if symmetric else "affine")
    out = w.Output()

    def update(*_):
        fig, _stats = explorer_figure(tensors[data.value], bits_w.value, clip_w.value,
                                      mode.value == "symmetric", name=data.value)
        with out:
            out.clear_output(wait=True)
            display(fig)
        plt.close(fig)

    for control in (data, bits_w, clip_w, mode):
        control.observe(update, names="value")
    update()
    controls = [data] if len(tensors) > 1 else []
    return w.VBox([w.HBox(controls + [bits_w, clip_w, mode]), out])


def float_bits(value: float, dtype: torch.dtype = torch.float16) -> dict:
    """How ``value`` is stored in the float format ``dtype``: its bit fields and its rounding.

    Returns ``{"sign", "exponent", "mantissa"}`` bit strings, the ``stored`` value (the
    nearest representable number, as a Python float) and the absolute ``error``.
    """
    info = torch.finfo(dtype)
    mantissa_bits = round(-math.log2(info.eps))
    exponent_bits = info.bits - 1 - mantissa_bits
    stored = torch.tensor(float(value), dtype=torch.float32).to(dtype)
    raw = stored.view({32: torch.int32, 16: torch.int16, 8: torch.uint8}[info.bits]).item()
    text = format(raw & ((1 << info.bits) - 1), f"0{info.bits}b")
    return {"sign": text[0], "exponent": text[1:1 + exponent_bits], "mantissa": text[1 + exponent_bits:],
            "stored": stored.float().item(), "error": abs(stored.double().item() - float(value))}


def float_format_explorer(value: float = 0.1):
    """Type a number, see its bits and rounding error in each float format."""
    import ipywidgets as w

    box = w.FloatText(value=value, description="number")
    table = w.HTML()

    def update(*_):
        rows = ["<tr><th>format</th><th>sign | exponent | mantissa</th><th>stored value</th>"
                "<th>abs. error</th></tr>"]
        for dtype in FLOAT_FORMATS:
            b = float_bits(box.value, dtype)
            bits = (f"<span style='color:#d62728'>{b['sign']}</span> "
                    f"<span style='color:#2ca02c'>{b['exponent']}</span> "
                    f"<span style='color:#1f77b4'>{b['mantissa']}</span>")
            rows.append(f"<tr><td>{str(dtype).removeprefix('torch.')}</td><td><code>{bits}</code></td>"
                        f"<td>{b['stored']:.10g}</td><td>{b['error']:.3g}</td></tr>")
        table.value = "<table>" + "".join(rows) + "</table>"

    box.observe(update, names="value")
    update()
    return w.VBox([box, table])
