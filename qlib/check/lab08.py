"""Checks for lab 08 (domain shift): a contrast corruption, AdaBN for a quantized model, and
a comparison of calibration sources.

References:

- Q1 ``contrast(x, factor, bounds)``: ``qlib.domain.shifts`` (``to_unit``, ``contrast``,
  ``from_unit``): pixels ``u = clamp((x - lo) / (hi - lo), 0, 1)``, per image
  ``u' = mean(u) + factor (u - mean(u))``, back to ``lo + clamp(u', 0, 1) (hi - lo)``.
- Q2 ``adabn_then_quantize(model, target, config)``: ``qlib.domain.adapt.adabn_quantized``
  with ``order="adabn"`` (AdaBN on the float model with a cumulative average, then static
  PTQ calibrated on the same target batches).
- Q3 ``compare_calibration(model, sources, test_set, bits)``: ``qlib.domain.evaluate.quantize``
  and ``qlib.train.evaluate`` for every source.

Q1 and Q2 run on small random models with fresh random BatchNorm statistics and inputs;
Q3 on the shipped ``cnn8`` and subsets of the test digits (W4A4 and W8A8 differ there, so a
wrong bit width is caught). Visible checks use fixed seeds, hidden ones fresh randomness.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from . import CheckFailed, call, expect, expect_close, run
from ..domain import adapt, shifts
from ..domain.evaluate import ptq_config, quantize
from ..modules import fake_quantizers
from ..train import evaluate


# ------------------------------------------------------------------ references and models
def reference_contrast(x: torch.Tensor, factor: float, bounds) -> torch.Tensor:
    """Q1's contrast corruption, built from ``qlib.domain.shifts``."""
    u, lo, hi = shifts.to_unit(x, bounds)
    return shifts.from_unit(shifts.contrast(u, factor), lo, hi)


def small_model(seed: int | None = None, classes: int = 4) -> nn.Sequential:
    """A conv net with two BatchNorms and made-up running statistics, in eval mode."""
    g = torch.Generator().manual_seed(seed if seed is not None else int(torch.randint(0, 2**31, (1,))))
    model = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
                          nn.Conv2d(6, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, classes))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        for bn in adapt.bn_modules(model).values():
            bn.running_mean.copy_(torch.randn(bn.num_features, generator=g))
            bn.running_var.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
    return model.eval()


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _unchanged(model: nn.Module, before: dict, what: str) -> None:
    after = model.state_dict()
    for k, v in before.items():
        if not torch.equal(after[k], v):
            raise CheckFailed(f"{what} changed the model you passed in ({k}); work on a copy "
                              f"(copy.deepcopy(model))")


# ------------------------------------------------------------------ Q1: contrast
def _check_contrast(fn, x: torch.Tensor, factor: float, bounds, what: str) -> None:
    x_in = x.clone()
    got = call(fn, x_in, factor, bounds, what="contrast")
    expect(torch.equal(x_in, x), f"{what}: contrast modified its input in place; return a new tensor")
    expect(isinstance(got, torch.Tensor), f"{what}: expected a tensor, got {type(got).__name__}")
    expect(got.shape == x.shape and got.dtype == x.dtype,
           f"{what}: expected shape {tuple(x.shape)} and dtype {x.dtype}, got {tuple(got.shape)} and {got.dtype}")
    want = reference_contrast(x, factor, bounds)
    lo, hi = bounds
    if not torch.allclose(got, want, atol=1e-5):
        hint = ""
        u, lo_t, hi_t = shifts.to_unit(x, bounds)
        whole = shifts.from_unit(u.mean() + factor * (u - u.mean()), lo_t, hi_t)  # batch mean: a typical slip
        if torch.allclose(got, whole, atol=1e-5):
            hint = " Hint: take the mean of each image (dims 1, 2, 3, keepdim=True), not of the whole batch."
        elif float(got.min()) < lo - 1e-5 or float(got.max()) > hi + 1e-5:
            hint = f" Hint: clamp u' into [0, 1] before mapping back; values left [{lo:.3g}, {hi:.3g}]."
        expect_close(got, want, f"{what}: contrast(x, {factor}, bounds)" + hint, rtol=0, atol=1e-5)
    expect(float(got.min()) >= lo - 1e-5 and float(got.max()) <= hi + 1e-5,
           f"{what}: the result leaves the bounds [{lo:.3g}, {hi:.3g}]")


def contrast(fn) -> None:
    """Q1 visible: fixed images, three factors (1 keeps the images, 0 makes them flat)."""
    def body():
        g = torch.Generator().manual_seed(0)
        x = torch.randn(8, 1, 8, 8, generator=g)
        bounds = (-1.5, 2.5)
        for factor in (1.0, 0.5, 0.0):
            _check_contrast(fn, x, factor, bounds, f"factor {factor}")
    run("contrast: fixed images", body)


def contrast_hidden(fn) -> None:
    """Q1 hidden: fresh images of other sizes and channels, float64, fresh factors and bounds."""
    def body():
        for shape, dtype in (((5, 1, 16, 16), torch.float32), ((3, 3, 7, 9), torch.float64)):
            x = (torch.randn(shape) * 1.5).to(dtype)
            lo, hi = float(x.min()) - float(torch.rand(1)), float(x.max()) + float(torch.rand(1))
            factor = float(torch.rand(1)) * 0.9 + 0.05
            _check_contrast(fn, x, factor, (lo, hi), f"random images {shape} {dtype}")
    run("contrast: random images", body)


# ------------------------------------------------------------------ Q2: AdaBN for a quantized model
def _check_adabn_quantized(fn, model: nn.Module, target: list, bits: int, what: str) -> None:
    config = ptq_config(bits)
    before = _state(model)
    got = call(fn, model, target, config, what="adabn_then_quantize")
    _unchanged(model, before, f"adabn_then_quantize on {what}")
    expect(isinstance(got, nn.Module), f"{what}: expected the quantized model (an nn.Module), "
                                       f"got {type(got).__name__}")
    fqs = fake_quantizers(got)
    expect(len(fqs) > 0 and all(fq.quantize for fq in fqs.values()),
           f"{what}: the returned model is not quantized; finish with qlib.ptq.quantize_static(adapted, "
           f"target, config)")
    expect(not adapt.bn_modules(got), f"{what}: the returned model still has BatchNorm layers; "
                                      f"quantize_static folds them")
    want = adapt.adabn_quantized(model, target, config, order="adabn")
    probe = torch.cat(target)[:32]
    with torch.no_grad():
        y_got, y_want = got(probe), want(probe)
        y_wrong_order = adapt.adabn_quantized(model, target, config, order="recalibrate")(probe)
    if not torch.allclose(y_got, y_want, atol=1e-4, rtol=1e-4):
        hint = ""
        if torch.allclose(y_got, y_wrong_order, atol=1e-4, rtol=1e-4):
            hint = (" Hint: your model equals a plain re-calibration: the BN statistics were not "
                    "re-estimated (reset them, momentum=None, BatchNorms in train mode, forward passes "
                    "under torch.no_grad()), or they were re-estimated after folding.")
        raise CheckFailed(f"{what}: outputs differ from AdaBN -> fold -> calibrate by up to "
                          f"{(y_got - y_want).abs().max().item():.3g}.{hint}")


def _target_batches(g: torch.Generator, n_batches: int = 3, shift: float = 1.0) -> list[torch.Tensor]:
    return [torch.randn(32, 1, 8, 8, generator=g) * 1.7 + shift for _ in range(n_batches)]


def adabn_quantized(fn) -> None:
    """Q2 visible: a small CNN, three target batches, W8A8 and W4A4."""
    def body():
        g = torch.Generator().manual_seed(3)
        model, target = small_model(seed=1), _target_batches(g)
        for bits in (8, 4):
            _check_adabn_quantized(fn, model, target, bits, f"small CNN, W{bits}A{bits}")
    run("adabn_then_quantize: small CNN", body)


def adabn_quantized_hidden(fn) -> None:
    """Q2 hidden: fresh random models and target batches (other sizes, another shift)."""
    def body():
        g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
        model = small_model(classes=6)
        target = _target_batches(g, n_batches=int(torch.randint(1, 5, (1,))), shift=-0.5)
        model.train()  # handed over in training mode: the result must not depend on it
        _check_adabn_quantized(fn, model, target, 8, "random CNN handed over in training mode")
    run("adabn_then_quantize: random models", body)


# ------------------------------------------------------------------ Q3: calibration sources
def _check_compare(fn, model: nn.Module, sources: dict, test_set, bits: int, what: str) -> None:
    before = _state(model)
    got = call(fn, model, sources, test_set, bits, what="compare_calibration")
    _unchanged(model, before, f"compare_calibration on {what}")
    expect(isinstance(got, dict), f"{what}: expected a dict {{source name: accuracy}}, got {type(got).__name__}")
    expect(set(got) == set(sources), f"{what}: expected the keys {sorted(sources)}, got {sorted(got)}")
    for name, batches in sources.items():
        want = evaluate(quantize(copy.deepcopy(model), batches, bits), test_set)
        expect_close(got[name], want, f"{what}: accuracy with calibration source {name!r} "
                                      f"(quantize with qlib.ptq.quantize_static(model, batches, ptq_config(bits)) "
                                      f"and measure with qlib.train.evaluate)", rtol=0, atol=1e-6)


def _digits_case(seed: int, idx: torch.Tensor):
    """``cnn8`` (a shipped seed) and a subset of the 8x8 test digits, with two calibration sources."""
    from .. import data, models

    digits = data.load_digits(8)
    x, y = digits.test.tensors
    test = torch.utils.data.TensorDataset(x[idx], y[idx])
    g = torch.Generator().manual_seed(seed)
    train_x = digits.train.tensors[0]
    sources = {"handwritten": [train_x[torch.randperm(len(train_x), generator=g)[:64]]],
               "noise": [torch.randn(64, 1, 8, 8, generator=g)]}
    return models.pretrained("cnn8", seed), test, sources


def compare_calibration(fn) -> None:
    """Q3 visible: ``cnn8`` seed 0 on 120 test digits, two sources, W4A4 and W8A8."""
    def body():
        model, test, sources = _digits_case(0, torch.arange(120))
        for bits in (4, 8):
            _check_compare(fn, model, sources, test, bits, f"cnn8, W{bits}A{bits}")
    run("compare_calibration: cnn8 on digits", body)


def compare_calibration_hidden(fn) -> None:
    """Q3 hidden: another shipped seed, a fresh random subset of test digits, renamed sources, W4A4."""
    def body():
        seed = int(torch.randint(0, 3, (1,)))
        model, test, sources = _digits_case(seed, torch.randperm(360)[:150])
        sources = {f"set {i}": b for i, b in enumerate(sources.values())}
        _check_compare(fn, model, sources, test, 4, f"cnn8 seed {seed}, W4A4")
    run("compare_calibration: cnn8, random digits", body)
