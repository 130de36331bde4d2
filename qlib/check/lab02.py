"""Checks for lab 02 (calibration): percentile range, quantization MSE, MSE range search,
collecting a layer's input activations, and comparing the three ranges on them.

References: ``qlib.observers.percentile_range`` and ``qlib.observers.mse_range`` (the pure
functions behind qlib's percentile and MSE observers), ``qlib.qparams.choose_qparams`` and
``qlib.quantize.fake_quantize`` (bit-exact with PyTorch), and a forward hook for the
activations. Activations are quantized **affine with unsigned codes** (``quant_range(bits,
signed=False)``), as PyTorch quantizes activations.

Tolerances: ranges and errors are compared with a relative tolerance of ``1e-4`` (the
student may sort, interpolate or sum in another order than the reference, which moves the
last float32 bits). The MSE search is judged by its error, not by its exact range: a tie
between two candidates may be broken either way, so the check asks that the student's range
is one of the candidates and that its error is no larger than the reference's (to ``1e-4``).
"""

from __future__ import annotations

import torch
from torch import nn

from . import mistakes
from .core import (CheckFailed, as_number, call, changed_entries, expect, expect_pair, hooks_left,
                   layer_activations, run, snapshot)
from .draws import Draw, heavy_tailed, hidden, relu_like
from .. import observers as ref_observers
from ..data import calibration_batches, load_digits
from ..fold import fold_batchnorm
from ..models import pretrained
from ..qparams import choose_qparams, quant_range
from ..quantize import fake_quantize

RTOL = 1e-4
PERCENTILE = 99.99
"""The percentile Q5 uses (``percentile_range(x, 99.99)``)."""


# ------------------------------------------------------------------ references
def reference_percentile_range(x: torch.Tensor, p: float) -> tuple[float, float]:
    """``(P_{100-p}(x), P_p(x))`` over all values of ``x``, linear interpolation."""
    lo, hi = ref_observers.percentile_range(x.detach().reshape(1, -1).float(), p)
    return lo.item(), hi.item()


def reference_quant_mse(x: torch.Tensor, lo: float, hi: float, bits: int) -> float:
    """MSE of fake-quantizing ``x`` on ``[lo, hi]`` with affine unsigned ``bits``-bit codes."""
    qmin, qmax = quant_range(bits, signed=False)
    scale, zp = choose_qparams(torch.tensor(float(lo)), torch.tensor(float(hi)), qmin, qmax)
    x = x.detach().float()
    return (fake_quantize(x, scale, zp, qmin, qmax) - x).pow(2).mean().item()


def reference_mse_clip_range(x: torch.Tensor, bits: int, grid: int = 100) -> tuple[float, float]:
    """The range ``[a*min, a*max]``, ``a = k/grid``, with the smallest :func:`reference_quant_mse`."""
    qmin, qmax = quant_range(bits, signed=False)
    lo, hi = ref_observers.mse_range(x.detach().reshape(1, -1).float(), qmin, qmax, False, grid)
    return lo.item(), hi.item()


def reference_layer_inputs(model: nn.Module, layer_name: str, batches) -> torch.Tensor:
    """What ``model.<layer_name>`` receives as input over all ``batches`` (eval mode), concatenated."""
    return layer_activations(model.eval(), layer_name, batches)


def reference_compare_ranges(x: torch.Tensor, bits: int) -> dict[str, tuple[float, float, float]]:
    """``{"minmax" | "percentile" | "mse": (lo, hi, mse)}`` as Q5 asks."""
    x = x.detach().float()
    ranges = {"minmax": (x.min().item(), x.max().item()),
              "percentile": reference_percentile_range(x, PERCENTILE),
              "mse": reference_mse_clip_range(x, bits)}
    return {k: (lo, hi, reference_quant_mse(x, lo, hi, bits)) for k, (lo, hi) in ranges.items()}


# ------------------------------------------------------------------ helpers
def _pair(got, what: str) -> tuple[float, float]:
    lo, hi = expect_pair(got, what)
    return as_number(lo, f"{what}[0] (lo)"), as_number(hi, f"{what}[1] (hi)")


def _close(a: float, b: float, scale: float = 1.0) -> bool:
    return abs(a - b) <= RTOL * max(abs(b), 1e-12) + 1e-6 * scale


# ------------------------------------------------------------------ Q1 percentile_range
def _check_percentile(fn, x: torch.Tensor, p: float, what: str) -> None:
    got = _pair(call(fn, x.clone(), p, what="percentile_range"), what)
    want = reference_percentile_range(x, p)
    span = (x.max() - x.min()).item()
    if not (_close(got[0], want[0], span) and _close(got[1], want[1], span)):
        hint = mistakes.percentile_hint(got, want, x, p, lambda a, b: _close(a, b, span))
        raise CheckFailed(f"{what}: expected (lo, hi) = ({want[0]:.6g}, {want[1]:.6g}), "
                          f"got ({got[0]:.6g}, {got[1]:.6g}){hint}. Use linear interpolation "
                          "between neighbouring sorted values (torch.quantile's default).")


def percentile_range(fn) -> None:
    """Q1 visible: 0..100 at p = 90, 99 and 100; a shuffled 2-D tensor."""
    def body():
        x = torch.arange(101, dtype=torch.float32)
        for p, want in [(90, (10.0, 90.0)), (99, (1.0, 99.0)), (100, (0.0, 100.0))]:
            _check_percentile(fn, x, p, f"percentile_range(arange(101), {p}) (want {want})")
        gen = torch.Generator().manual_seed(2)
        shuffled = x[torch.randperm(101, generator=gen)].reshape(1, 101)
        _check_percentile(fn, shuffled, 95, "percentile_range(shuffled 0..100 as (1, 101), 95)")
        _check_percentile(fn, torch.tensor([0.0, 1.0, 2.0, 10.0]), 90,
                          "percentile_range([0, 1, 2, 10], 90) (interpolates between 2 and 10)")
    run("percentile_range: worked cases", body)


def percentile_range_hidden(fn) -> None:
    """Q1 hidden: fresh random tensors (Gaussian, heavy-tailed, ReLU-like) of several shapes."""
    def body(draw: Draw):
        gen = draw.gen
        cases = [(torch.randn(4000, generator=gen), 99.9), (heavy_tailed(5000, gen), 99.0),
                 (relu_like(6000, gen).reshape(10, 6, 10, 10), 99.99),
                 (torch.randn(3, 7, 11, generator=gen) * 5 + 2, 75.0),
                 (heavy_tailed(2048, gen).reshape(32, 64), 100.0)]
        for x, p in cases:
            _check_percentile(fn, x, p, f"percentile_range(random {tuple(x.shape)}, {p})")
    hidden("percentile_range: random tensors", body)


# ------------------------------------------------------------------ Q2 quant_mse
def _check_quant_mse(fn, x: torch.Tensor, lo: float, hi: float, bits: int, what: str) -> None:
    got = as_number(call(fn, x.clone(), lo, hi, bits, what="quant_mse"), what)
    want = reference_quant_mse(x, lo, hi, bits)
    if _close(got, want, 1e-12):
        return
    hint = mistakes.quant_mse_hint(got, want, x, lo, hi, bits, lambda a, b: _close(a, b, 1e-12))
    raise CheckFailed(f"{what}: expected MSE {want:.6g}, got {got:.6g}{hint}")


def quant_mse(fn) -> None:
    """Q2 visible: a worked 2-bit case, and a Gaussian at 8 and 4 bits with and without clipping."""
    def body():
        x = torch.tensor([0.0, 0.4, 1.0, 2.0, 3.5])
        _check_quant_mse(fn, x, 0.0, 3.0, 2, "quant_mse([0, 0.4, 1, 2, 3.5], 0, 3, bits=2) "
                         "(levels 0, 1, 2, 3: errors 0, 0.4, 0, 0, 0.5 -> 0.082)")
        gen = torch.Generator().manual_seed(3)
        g = torch.randn(1000, generator=gen)
        for lo, hi, bits in [(g.min().item(), g.max().item(), 8), (-1.0, 1.0, 4), (-2.0, 2.5, 4)]:
            _check_quant_mse(fn, g, lo, hi, bits, f"quant_mse(randn(1000), {lo:.3g}, {hi:.3g}, bits={bits})")
    run("quant_mse: worked cases", body)


def quant_mse_hidden(fn) -> None:
    """Q2 hidden: random data, ranges that clip and ranges that do not, 2 to 8 bits."""
    def body(draw: Draw):
        gen = draw.gen
        for bits in (2, 3, 4, 6, 8):
            for x in (heavy_tailed(3000, gen), relu_like(3000, gen).reshape(30, 100)):
                lo, hi = x.min().item(), x.max().item()
                f = 0.1 + 0.9 * torch.rand((), generator=gen).item()
                _check_quant_mse(fn, x, f * lo, f * hi, bits,
                                 f"quant_mse(random {tuple(x.shape)}, {f:.2f} * (min, max), bits={bits})")
    hidden("quant_mse: random cases", body)


# ------------------------------------------------------------------ Q3 mse_clip_range
def _check_mse_range(fn, x: torch.Tensor, bits: int, grid: int, what: str) -> None:
    got = _pair(call(fn, x.clone(), bits, grid, what="mse_clip_range"), what)
    x_min, x_max = x.min().item(), x.max().item()
    # which candidate a = k / grid is it?
    ref_end = x_max if abs(x_max) >= abs(x_min) else x_min
    got_end = got[1] if abs(x_max) >= abs(x_min) else got[0]
    k = round(got_end / ref_end * grid) if ref_end != 0 else grid
    expect(1 <= k <= grid and _close(got[0], k / grid * x_min, abs(x_min) + abs(x_max))
           and _close(got[1], k / grid * x_max, abs(x_min) + abs(x_max)),
           f"{what}: ({got[0]:.6g}, {got[1]:.6g}) is not one of the candidate ranges "
           f"[a * min(x), a * max(x)] = [a * {x_min:.6g}, a * {x_max:.6g}] for a in 1/{grid}, 2/{grid}, ..., 1")
    want = reference_mse_clip_range(x, bits, grid)
    err_got = reference_quant_mse(x, *got, bits)
    err_want = reference_quant_mse(x, *want, bits)
    err_minmax = reference_quant_mse(x, x_min, x_max, bits)
    expect(err_got <= err_want * (1 + RTOL) + 1e-12,
           f"{what}: your range [{got[0]:.6g}, {got[1]:.6g}] (a = {k}/{grid}) has MSE {err_got:.6g}, but "
           f"[{want[0]:.6g}, {want[1]:.6g}] (a = {round(want[1] / x_max * grid) if x_max else '?'}/{grid}) "
           f"has {err_want:.6g}: try every a = 1/{grid} ... {grid}/{grid} and keep the smallest error")
    expect(err_got <= err_minmax * (1 + RTOL) + 1e-12,
           f"{what}: the MSE-searched range should never be worse than min-max (a = 1 is a candidate), "
           f"got {err_got:.6g} > {err_minmax:.6g}")


def mse_clip_range(fn) -> None:
    """Q3 visible: a Gaussian and a ReLU-like tensor at 4 bits, an outlier at 8 bits."""
    def body():
        gen = torch.Generator().manual_seed(4)
        _check_mse_range(fn, torch.randn(2000, generator=gen), 4, 100, "mse_clip_range(randn(2000), 4, 100)")
        _check_mse_range(fn, relu_like(2000, gen), 4, 50, "mse_clip_range(relu-like(2000), 4, 50)")
        spike = torch.cat([torch.rand(999, generator=gen), torch.tensor([40.0])])
        _check_mse_range(fn, spike, 8, 100, "mse_clip_range(999 values in [0, 1) and one 40.0, 8, 100)")
    run("mse_clip_range: worked cases", body)


def mse_clip_range_hidden(fn) -> None:
    """Q3 hidden: fresh heavy-tailed and ReLU-like tensors, 2 to 8 bits, several grids."""
    def body(draw: Draw):
        gen = draw.gen
        for i, (bits, grid) in enumerate([(2, 40), (3, 100), (4, 100), (6, 64), (8, 100)]):
            x = heavy_tailed(1500, gen) if i % 2 else relu_like(1500, gen).reshape(15, 100)
            _check_mse_range(fn, x, bits, grid, f"mse_clip_range(random {tuple(x.shape)}, {bits}, {grid})")
    hidden("mse_clip_range: random tensors", body)


# ------------------------------------------------------------------ Q4 layer_inputs
def _check_layer_inputs(fn, model: nn.Module, layer: str, batches, what: str) -> torch.Tensor:
    state = snapshot(model)
    got = call(fn, model, layer, batches, what="layer_inputs")
    changed = changed_entries(model, state)
    expect(not changed, f"{what}: the model's state changed ({changed[:3]}): run it in eval mode "
                        "(model.eval()) under torch.no_grad(); in train mode BatchNorm updates its statistics")
    expect(not hooks_left(model), f"{what}: remove your hook when done (handle.remove()), or it keeps collecting")
    expect(isinstance(got, torch.Tensor), f"{what}: expected one tensor (torch.cat of the batches), "
                                          f"got {type(got).__name__}")
    want = reference_layer_inputs(model, layer, batches)
    if got.shape != want.shape or not torch.allclose(got.float(), want, rtol=1e-5, atol=1e-6):
        out = layer_activations(model, layer, batches, output=True)
        expect(out.shape != got.shape or not torch.allclose(got.float(), out, rtol=1e-5, atol=1e-6),
               f"{what}: that is the layer's output; the observer of a layer sees its input: use a "
               "forward pre-hook, or the hook's input argument")
        expect(got.shape == want.shape, f"{what}: expected shape {tuple(want.shape)} (all batches "
                                        f"concatenated along dim 0), got {tuple(got.shape)}")
        raise CheckFailed(f"{what}: values differ from the input of model.{layer} by up to "
                          f"{(got.float() - want).abs().max().item():.3g}")
    return got


def layer_inputs(fn) -> None:
    """Q4 visible: the input of conv ``7`` of the folded cnn16 over two batches; the mlp, whose
    BatchNorms would change in train mode, passed in train mode."""
    def body():
        model = fold_batchnorm(pretrained("cnn16", 0))
        batches = calibration_batches(load_digits(16).train, 64, 32, seed=1)
        _check_layer_inputs(fn, model, "7", batches, "layer_inputs(folded cnn16, '7', 2 batches)")
        batches8 = calibration_batches(load_digits(8).train, 64, 32, seed=1)
        _check_layer_inputs(fn, pretrained("mlp", 0).train(), "4", batches8,
                            "layer_inputs(mlp with BatchNorm1d, passed in train mode, '4', 2 batches)")
    run("layer_inputs: folded cnn16 layer 7, the mlp in train mode", body)


def layer_inputs_hidden(fn) -> None:
    """Q4 hidden: another model (mlp, in train mode with BatchNorm) and other layers."""
    def body(draw: Draw):
        mlp = pretrained("mlp", 1).train()
        batches = calibration_batches(load_digits(8).train, 96, 32, seed=draw.integer(1000))
        _check_layer_inputs(fn, mlp, "4", batches, "layer_inputs(mlp, '4', 3 batches)")
        cnn = pretrained("cnn8", 2)
        _check_layer_inputs(fn, cnn, "0", batches, "layer_inputs(cnn8, '0', 3 batches)")
        _check_layer_inputs(fn, cnn, "12", batches, "layer_inputs(cnn8, '12', 3 batches)")
    hidden("layer_inputs: other models and layers", body)


# ------------------------------------------------------------------ Q5 compare_ranges
def _check_compare(fn, x: torch.Tensor, bits: int, what: str) -> dict:
    got = call(fn, x.clone(), bits, what="compare_ranges")
    want = reference_compare_ranges(x, bits)
    expect(isinstance(got, dict) and set(got) == set(want),
           f"{what}: expected a dict with keys {sorted(want)}, got "
           f"{sorted(got) if isinstance(got, dict) else type(got).__name__}")
    span = (x.max() - x.min()).item()
    for name in ("minmax", "percentile"):
        g = got[name]
        expect(isinstance(g, (tuple, list)) and len(g) == 3,
               f"{what}[{name!r}]: expected (lo, hi, mse), got {g!r}"[:300])
        lo, hi, err = (as_number(v, f"{what}[{name!r}]") for v in g)
        w = want[name]
        expect(_close(lo, w[0], span) and _close(hi, w[1], span),
               f"{what}[{name!r}]: expected range ({w[0]:.6g}, {w[1]:.6g}), got ({lo:.6g}, {hi:.6g})"
               + (f" (percentile is p = {PERCENTILE})" if name == "percentile" else ""))
        # the MSE of the student's own range: a range equal up to float rounding (torch.quantile
        # vs a sort) can flip a few roundings at low bits, so its MSE is not the reference's
        own = reference_quant_mse(x, lo, hi, bits)
        expect(_close(err, own, 1e-12), f"{what}[{name!r}]: expected MSE {own:.6g} for that range "
                                        f"at {bits} bits, got {err:.6g}")
    g = got["mse"]
    expect(isinstance(g, (tuple, list)) and len(g) == 3, f"{what}['mse']: expected (lo, hi, mse), got {g!r}"[:300])
    lo, hi, err = (as_number(v, f"{what}['mse']") for v in g)
    expect(_close(err, reference_quant_mse(x, lo, hi, bits), 1e-12),
           f"{what}['mse']: the MSE {err:.6g} does not belong to the range ({lo:.6g}, {hi:.6g})")
    expect(err <= want["mse"][2] * (1 + RTOL) + 1e-12,
           f"{what}['mse']: MSE {err:.6g}, but the search (grid 100) reaches {want['mse'][2]:.6g}")
    expect(err <= want["minmax"][2] * (1 + RTOL),
           f"{what}: the MSE search ({err:.6g}) must not be worse than min-max ({want['minmax'][2]:.6g})")
    return got


def compare_ranges(fn, x: torch.Tensor, bits: int = 4) -> None:
    """Q5 visible: on the activations you collected in Q4 (checked against the reference too)."""
    def body():
        _check_compare(fn, x, bits, f"compare_ranges(layer-7 activations, {bits})")
    run(f"compare_ranges: real activations at {bits} bits", body)


def compare_ranges_hidden(fn) -> None:
    """Q5 hidden: the true input of cnn16's layer 3 and fresh heavy-tailed data, 3 and 8 bits."""
    def body(draw: Draw):
        model = fold_batchnorm(pretrained("cnn16", 1))
        x = reference_layer_inputs(model, "3", calibration_batches(load_digits(16).train, 32, 32, seed=5))
        _check_compare(fn, x, 3, "compare_ranges(cnn16 layer-3 activations, 3)")
        _check_compare(fn, heavy_tailed(4000, draw.gen), 8, "compare_ranges(heavy-tailed random, 8)")
    hidden("compare_ranges: other layers and data", body)
