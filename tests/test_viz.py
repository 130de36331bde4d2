"""qlib.viz and qlib.widgets: every helper runs headless and returns what it promises.

Reference: matplotlib's Agg backend (no display) and ipywidgets' widget classes; the numbers the
widgets report are checked against their definitions (MSE, SQNR, clipped fraction), and the
float bit fields against torch's own bit patterns (``Tensor.view``).
"""

from __future__ import annotations

import math
import os

os.environ.setdefault("MPLBACKEND", "Agg")

import matplotlib  # noqa: E402

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from qlib import viz, widgets  # noqa: E402
from qlib.qparams import quant_range  # noqa: E402


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


@pytest.fixture
def x():
    return torch.randn(2000, generator=torch.Generator().manual_seed(0))


def test_plot_bit_layout():
    ax = viz.plot_bit_layout({"float16": (1, 5, 10), "bfloat16": (1, 8, 7), "int8": (1, 0, 7)})
    assert isinstance(ax, Axes) and ax.get_title()
    assert len(ax.patches) == 3 + 3 + 2  # three fields per float, two for the integer


def test_plot_spacing_absolute_and_relative():
    mags = torch.logspace(-3, 3, 50, dtype=torch.float64)
    ax = viz.plot_spacing(mags, {"a": mags * 1e-3, "b": torch.full_like(mags, 0.01)})
    assert ax.get_xscale() == "log" and len(ax.get_lines()) == 2
    ax = viz.plot_spacing(mags, {"a": mags * 1e-3}, relative=True)
    assert ax.get_lines()[0].get_ydata() == pytest.approx([1e-3] * 50)


def test_plot_staircase_draws_the_quantizer():
    ax = viz.plot_staircase(torch.tensor(0.5), torch.tensor(0), -4, 3)
    identity, stairs = ax.get_lines()[:2]
    ys = set(round(y, 6) for y in stairs.get_ydata())
    assert ys == {0.5 * q for q in range(-4, 4)}  # one level per code, clipped at the ends
    assert ax.get_xlabel() and ax.get_ylabel() and ax.get_title()


def test_plot_histogram_with_range_reports_clipped_fraction(x):
    ax = viz.plot_histogram_with_range(x, -1.0, 1.0, levels=torch.linspace(-1, 1, 5))
    clipped = ((x < -1) | (x > 1)).float().mean().item()
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any(f"{100 * clipped:.2f}%" in label for label in labels)
    assert any("5 levels" in label for label in labels)


def test_plot_error_vs_range_marks_the_minimum():
    c = [0.1, 0.2, 0.3, 0.4]
    ax = viz.plot_error_vs_range(c, [4.0, 1.0, 2.0, 3.0], [1, 0.5, 1.5, 3], [3, 0.5, 0.5, 0])
    assert any("best c = 0.2" in t.get_text() for t in ax.get_legend().get_texts())
    assert ax.get_yscale() == "log"


def test_plot_error_vs_bits_and_grouped_bars():
    ax = viz.plot_error_vs_bits([8, 6, 4], {"a": [1e-5, 1e-4, 1e-3], "b": torch.tensor([2e-5, 2e-4, 2e-3])})
    assert len(ax.get_lines()) == 2
    ax = viz.plot_grouped_bars(["l1", "l2", "l3"], {"a": [1, 2, 3], "b": [3, 2, math.nan]}, ylabel="y", title="t")
    assert len(ax.patches) == 6 and ax.get_title() == "t"


def test_helpers_draw_into_a_given_axes():
    fig, axes = plt.subplots(1, 2)
    assert viz.plot_staircase(0.1, 0, 0, 15, ax=axes[1]) is axes[1]
    assert viz.plot_error_vs_bits([2, 3], {"a": [1, 2]}, ax=axes[0]) is axes[0]


@pytest.mark.parametrize("symmetric", [True, False])
def test_explorer_figure_numbers(x, symmetric):
    fig, stats = widgets.explorer_figure(x, bits=3, clip=0.5, symmetric=symmetric)
    assert isinstance(fig, Figure) and len(fig.axes) == 2
    qmin, qmax = quant_range(3, signed=symmetric)
    assert (stats["quant_min"], stats["quant_max"]) == (qmin, qmax)
    lo = (qmin - stats["zero_point"] - 0.5) * stats["scale"]  # half a step past the outer levels
    hi = (qmax - stats["zero_point"] + 0.5) * stats["scale"]
    want_clipped = ((x < lo) | (x > hi)).float().mean().item()
    assert stats["clipped_fraction"] == pytest.approx(want_clipped, abs=1e-6)
    assert 0 < stats["mse"] and stats["sqnr_db"] == pytest.approx(
        10 * math.log10(x.double().pow(2).mean().item() / stats["mse"]))


def test_clipped_qparams_shrinks_the_range(x):
    full = widgets.clipped_qparams(x, 4, 1.0, True)[0]
    half = widgets.clipped_qparams(x, 4, 0.5, True)[0]
    assert half.item() == pytest.approx(full.item() / 2, rel=1e-6)
    with pytest.raises(ValueError, match="clip"):
        widgets.clipped_qparams(x, 4, 0.0)


def test_quantization_explorer_builds_and_reacts(x):
    import ipywidgets

    box = widgets.quantization_explorer({"gauss": x, "relu": x.relu()})
    assert isinstance(box, ipywidgets.VBox)
    controls = box.children[0].children
    data, bits, clip, mode = controls
    bits.value, clip.value, mode.value, data.value = 2, 0.3, "affine", "relu"  # each triggers a redraw
    assert plt.get_fignums() == []  # the explorer closes its figures


def test_float_bits_matches_torch_bit_patterns():
    for dtype, int_dtype in [(torch.float32, torch.int32), (torch.float16, torch.int16),
                             (torch.bfloat16, torch.int16), (torch.float8_e4m3fn, torch.uint8)]:
        for value in (0.1, -2.5, 1.0, 3e-3):
            b = widgets.float_bits(value, dtype)
            bits = torch.finfo(dtype).bits
            raw = torch.tensor(value).to(dtype).view(int_dtype).item() & ((1 << bits) - 1)
            assert int(b["sign"] + b["exponent"] + b["mantissa"], 2) == raw
            assert b["stored"] == torch.tensor(value).to(dtype).float().item()
    assert len(widgets.float_bits(1.0, torch.float16)["exponent"]) == 5
    assert widgets.float_bits(-2.5, torch.bfloat16) == {"sign": "1", "exponent": "10000000", "mantissa": "0100000",
                                                        "stored": -2.5, "error": 0.0}


def test_float_format_explorer_updates():
    box = widgets.float_format_explorer(0.1)
    number, table = box.children
    number.value = 65504.0
    assert "65504" in table.value and "float8_e5m2" in table.value
