"""Interactive explorers for the lessons (ipywidgets; never used in graded labs).

- :func:`quantization_explorer` quantizes a tensor with sliders for the bit width and the
  clipping range and a symmetric/affine toggle; it draws the staircase, the histogram with
  the levels, and reports the error.
- :func:`float_format_explorer` shows how one number is stored in float32, bfloat16,
  float16 and the two float8 formats: the bits of each field and the rounding error.
- :func:`interact` is ``ipywidgets.interact`` for the lessons: controls for a function's
  arguments, its printed text and figures shown below them.

No widget here writes through an ``ipywidgets.Output``: text goes to an ``HTML`` widget and
figures to ``Image`` widgets (PNG). An Output widget makes a headless executor (nbclient,
nbconvert, nbgrader) send a message back to the kernel for every captured output while it
waits for the cell's reply, which can leave it waiting forever on an idle kernel
(jupyter/nbclient#312; the mechanism is described in :mod:`qlib.grading`). Without Output
widgets the executor only listens, and lessons execute the same in JupyterLab and in CI.

The drawing and the numbers come from plain functions (:func:`clipped_qparams`,
:func:`explorer_figure`, :func:`float_bits`) that run without a browser, so tests and
lessons can call them directly; the widgets only wire sliders to them.
"""

from __future__ import annotations

import contextlib
import html
import io
import math
import traceback
from typing import Callable, Mapping

import matplotlib.pyplot as plt
import torch

from .qparams import choose_qparams, quant_range
from .quantize import dequantize, fake_quantize
from .viz import plot_histogram_with_range, plot_staircase

__all__ = ["clipped_qparams", "error_stats", "explorer_figure", "quantization_explorer",
           "float_bits", "float_format_explorer", "FLOAT_FORMATS", "figure_png", "render", "interact"]

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

    tensors: Mapping[str, torch.Tensor] = x if isinstance(x, Mapping) else {"x": x}
    data = w.Dropdown(options=list(tensors), description="data")
    bits_w = w.IntSlider(value=bits, min=2, max=8, description="bits")
    clip_w = w.FloatSlider(value=clip, min=0.05, max=1.0, step=0.01, description="clip",
                           readout_format=".2f")
    mode = w.ToggleButtons(options=["symmetric", "affine"], value="symmetric" if symmetric else "affine")
    out = w.Image(format="png")  # not an Output widget: see the module docstring

    def update(*_):
        fig, _stats = explorer_figure(tensors[data.value], bits_w.value, clip_w.value,
                                      mode.value == "symmetric", name=data.value)
        out.value = figure_png(fig)  # closes the figure

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


def figure_png(fig) -> bytes:
    """The PNG bytes of a matplotlib figure (for an ``ipywidgets.Image``); closes the figure."""
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png")
    finally:
        plt.close(fig)
    return buffer.getvalue()


def render(function: Callable, **kwargs) -> tuple[str, list[bytes]]:
    """Call ``function(**kwargs)``; return what it printed and the PNGs of the figures it drew.

    Figures are those opened during the call (``plt.show()`` inside it shows nothing, the
    figures are collected instead) plus a returned figure; all are closed afterwards. An
    exception becomes its traceback in the text, as ``ipywidgets.interact`` shows it.
    """
    before = set(plt.get_fignums())
    text = io.StringIO()
    show, plt.show = plt.show, lambda *args, **kw: None
    result = None
    try:
        with contextlib.redirect_stdout(text):
            result = function(**kwargs)
    except Exception:  # shown to the student, like interact does
        text.write(traceback.format_exc())
    finally:
        plt.show = show
    figures = [plt.figure(n) for n in plt.get_fignums() if n not in before]
    if isinstance(result, plt.Figure) and result not in figures:
        figures.append(result)
    return text.getvalue(), [figure_png(fig) for fig in figures]


def interact(function: Callable, **controls):
    """Controls for ``function``'s arguments; its printout and figures redrawn on every change.

    ``controls`` map argument names to ipywidgets (``bits=IntSlider(...)``) or to the
    abbreviations ``ipywidgets.interact`` accepts (``(2, 8)``, a list of choices, a value).
    Same call as ``ipywidgets.interact(function, **controls)``, drawn without an Output widget
    (module docstring). Returns the widget box: make it the last expression of a cell.
    """
    import ipywidgets as w
    from ipywidgets.widgets.interaction import interactive

    if not callable(function):
        raise TypeError(f"interact needs a function, got {type(function).__name__}")
    widgets = {name: c if isinstance(c, w.ValueWidget) else interactive.widget_from_abbrev(c)
               for name, c in controls.items()}
    for name, widget in widgets.items():
        if widget is None:
            raise ValueError(f"cannot make a control for {name}={controls[name]!r}")
        if not widget.description:
            widget.description = name
    text = w.HTML()
    pictures = w.VBox()
    pool: list = []  # Image widgets, reused from one redraw to the next

    def update(*_):
        printed, pngs = render(function, **{name: c.value for name, c in widgets.items()})
        text.value = f"<pre>{html.escape(printed)}</pre>" if printed else ""
        while len(pool) < len(pngs):
            pool.append(w.Image(format="png"))
        for image, png in zip(pool, pngs):
            image.value = png
        pictures.children = tuple(pool[:len(pngs)])

    for widget in widgets.values():
        widget.observe(update, names="value")
    update()
    return w.VBox([w.HBox(list(widgets.values())), pictures, text])
