"""Cross-domain evaluation: one accuracy per (shift, severity, bit width), over several seeds.

The question of lesson 10: *does quantization hurt more when the input distribution moves?*
The measurement is a grid::

    acc[shift][severity][bits] = accuracy of model (fp32 or quantized to ``bits``) on
                                 the test set corrupted by ``shift`` at ``severity``

and, to see quantization's own share, the drop relative to fp32 on the same corrupted set::

    drop[shift][severity][bits] = acc[shift][severity]["fp32"] - acc[shift][severity][bits]

Each cell is reported as ``{"mean", "min", "max", "n", "values"}`` over the models given
(one per seed, ``qlib.train.accuracy_over_seeds``): a difference smaller than that spread is
noise (one test digit is 0.28 points).

The quantized models are made by ``ptq_config(bits)`` static PTQ: weights symmetric
per-channel with MSE-searched ranges, activations affine per-tensor with the percentile
observer (the PTQ benchmark's most stable W4A4 recipe), calibrated on **source** data unless
told otherwise (``calibration_sources`` compares the alternatives).
"""

from __future__ import annotations

from torch import nn

from ..modules import QuantConfig
from ..ptq import quantize_static
from ..train import accuracy_over_seeds, evaluate
from .shifts import SEVERITIES, SHIFTS, corrupt_dataset

__all__ = ["ptq_config", "quantize", "summarize", "accuracy_grid", "drop_grid", "calibration_sources"]


def ptq_config(bits: int) -> QuantConfig:
    """W``bits``A``bits``: MSE weight ranges (per channel), 99.99th-percentile activation ranges."""
    return QuantConfig(weight_bits=bits, act_bits=bits, weight_observer="mse", act_observer="percentile")


def quantize(model: nn.Module, calibration, bits: int) -> nn.Module:
    """Static PTQ of ``model`` at W``bits``A``bits`` calibrated on ``calibration`` (batches)."""
    return quantize_static(model, calibration, ptq_config(bits))


def summarize(values) -> dict:
    """``accuracy_over_seeds`` plus the individual values (rounded to 0.01)."""
    values = list(values)
    out = accuracy_over_seeds(values)
    out["values"] = [round(v, 2) for v in values]
    return out


def _variants(model: nn.Module, calibration, bits) -> dict[str, nn.Module]:
    out = {}
    for b in bits:
        out["fp32" if b == 32 else f"W{b}A{b}"] = model if b == 32 else quantize(model, calibration, b)
    return out


def accuracy_grid(models, test_set, calibration, shifts=SHIFTS, severities=SEVERITIES, bits=(32, 8, 4),
                  seed: int = 0, bounds=None) -> dict:
    """``grid[shift][severity][variant]`` = accuracy summary over ``models`` (module docstring).

    ``models``: a list of float models (one per seed). ``calibration``: the batches every
    quantized variant is calibrated on (the same for all). ``bits``: 32 means fp32.
    ``shift "none"`` (severity 0) is always included: the clean test set. ``bounds``: pixel
    range for the corruptions (``shifts.corrupt``); give the training set's min and max.
    """
    models = list(models)
    if not models:
        raise ValueError("give at least one model")
    for shift in shifts:
        if shift not in SHIFTS:
            raise ValueError(f"unknown shift {shift!r}; expected some of {SHIFTS}")
    quantized = [_variants(m, calibration, bits) for m in models]
    names = list(quantized[0])
    sets = {("none", 0): test_set}
    for shift in shifts:
        for sev in severities:
            sets[(shift, sev)] = corrupt_dataset(test_set, shift, sev, seed=seed, bounds=bounds)
    grid: dict = {}
    for (shift, sev), ds in sets.items():
        cell = grid.setdefault(shift, {}).setdefault(str(sev), {})
        for name in names:
            cell[name] = summarize(evaluate(q[name], ds) for q in quantized)
    return grid


def drop_grid(grid: dict, reference: str = "fp32") -> dict:
    """``drop[shift][severity][variant]``: mean accuracy of ``reference`` minus that of the variant.

    Computed per seed (the same model's fp32 and quantized versions), then summarized.
    """
    out: dict = {}
    for shift, by_sev in grid.items():
        for sev, cell in by_sev.items():
            ref = cell[reference]["values"]
            for name, summ in cell.items():
                if name == reference:
                    continue
                out.setdefault(shift, {}).setdefault(sev, {})[name] = summarize(
                    r - v for r, v in zip(ref, summ["values"]))
    return out


def calibration_sources(models, sources: dict, target_test, bits: int = 4) -> dict:
    """Accuracy on ``target_test`` of W``bits``A``bits`` models calibrated on each source.

    ``sources``: ``{name: batches}``, e.g. source images, unlabeled target images, a mix,
    synthetic images (``qlib.datafree``); the same batches are used for every model (or
    ``{name: callable(model) -> batches}`` when the data depends on the model, like
    BN-statistics synthesis). Returns ``{name: summary over models}``.
    """
    models = list(models)
    out = {}
    for name, batches in sources.items():
        accs = []
        for m in models:
            calib = batches(m) if callable(batches) else batches
            accs.append(evaluate(quantize(m, calib, bits), target_test))
        out[name] = summarize(accs)
    return out
