"""qlib.check.lab01: the reference implementations pass; typical wrong answers fail, with a hint.

Reference: qlib.qparams.quant_range / choose_qparams and qlib.quantize.quantize / dequantize
(themselves tested bit for bit against PyTorch in test_qparams.py and test_quantize.py); the
hidden checks compare with torch.ao.quantization.MinMaxObserver, torch.quantize_per_tensor and
torch.fake_quantize_per_tensor_affine. The wrong answers are the mistakes students make.
"""

from __future__ import annotations

import pytest
import torch

from qlib import check
from qlib.check import lab01
from qlib.qparams import choose_qparams, quant_range
from qlib.quantize import dequantize, quantize

EPS = torch.finfo(torch.float32).eps


def reference_qparams(min_val, max_val, quant_min, quant_max, symmetric):
    return choose_qparams(min_val, max_val, quant_min, quant_max, symmetric=symmetric)


def test_reference_answers_pass_every_check(capsys):
    lab01.quant_range(quant_range)
    lab01.quant_range_hidden(quant_range)
    lab01.choose_qparams_affine(reference_qparams)
    lab01.choose_qparams_affine_hidden(reference_qparams)
    lab01.choose_qparams_symmetric(reference_qparams)
    lab01.choose_qparams_symmetric_hidden(reference_qparams)
    lab01.quantize(quantize)
    lab01.quantize_hidden(quantize)
    lab01.dequantize(dequantize)
    lab01.dequantize_hidden(dequantize)
    assert capsys.readouterr().out.count("PASS") == 10


def test_hidden_checks_pass_again_on_fresh_random_cases():
    for seed in range(3):
        with check.seeded(seed):
            lab01.choose_qparams_affine_hidden(reference_qparams)
            lab01.choose_qparams_symmetric_hidden(reference_qparams)
            lab01.quantize_hidden(quantize)
            lab01.dequantize_hidden(dequantize)


def test_plain_written_answers_pass():
    """What a student writes from the lab's formulas, without qlib's input validation."""
    def quant_range_(bits, signed=True):
        return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)

    def choose(min_val, max_val, quant_min, quant_max, symmetric=False):
        min_neg = torch.clamp(min_val, max=0.0)
        max_pos = torch.clamp(max_val, min=0.0)
        eps = torch.tensor(torch.finfo(torch.float32).eps)
        if symmetric:
            scale = torch.maximum(torch.maximum(-min_neg, max_pos) / ((quant_max - quant_min) / 2), eps)
            return scale, torch.tensor(0)
        scale = torch.maximum((max_pos - min_neg) / (quant_max - quant_min), eps)
        zero_point = quant_min - torch.round(min_neg / scale).to(torch.int64)
        return scale, torch.clamp(zero_point, quant_min, quant_max)

    def quantize_(x, scale, zero_point, quant_min, quant_max):
        return torch.clamp(torch.round(x * (1.0 / scale)) + zero_point, quant_min, quant_max).to(torch.int64)

    def dequantize_(x_q, scale, zero_point):
        return (x_q.to(torch.int64) - zero_point).to(torch.float32) * scale

    lab01.quant_range_hidden(quant_range_)
    lab01.choose_qparams_affine_hidden(choose)
    lab01.choose_qparams_symmetric_hidden(choose)
    lab01.quantize_hidden(quantize_)
    lab01.dequantize_hidden(dequantize_)


# ------------------------------------------------------------------ wrong answers
@pytest.mark.parametrize("wrong, message", [
    (lambda b, s=True: (-(2 ** (b - 1)) + 1, 2 ** (b - 1) - 1) if s else (0, 2**b - 1),
     r"quant_range\(8, signed=True\): expected \(-128, 127\), got \(-127, 127\)"),
    (lambda b, s=True: (-(2 ** (b - 1)), 2 ** (b - 1)) if s else (0, 2**b),
     r"expected \(-128, 127\), got \(-128, 128\)"),
    (lambda b, s=True: (-(2.0 ** (b - 1)), 2.0 ** (b - 1) - 1) if s else (0.0, 2.0**b - 1),
     r"expected two Python ints"),
    (lambda b, s=True: torch.tensor([-(2 ** (b - 1)), 2 ** (b - 1) - 1]),
     r"expected a pair"),
])
def test_wrong_quant_range(wrong, message):
    with pytest.raises(check.CheckFailed, match=message):
        lab01.quant_range(wrong)


def affine_without_zero(min_val, max_val, quant_min, quant_max, symmetric=False):
    scale = torch.clamp((max_val - min_val) / (quant_max - quant_min), min=EPS)
    return scale, quant_min - torch.round(min_val / scale).to(torch.int64)


def symmetric_127(min_val, max_val, quant_min, quant_max, symmetric=True):
    scale = torch.maximum(min_val.abs(), max_val.abs()) / quant_max
    return torch.clamp(scale, min=EPS), torch.tensor(0)


def without_eps(min_val, max_val, quant_min, quant_max, symmetric=False):
    scale, zero_point = choose_qparams(min_val, max_val, quant_min, quant_max, symmetric=symmetric)
    return torch.where(scale == EPS, torch.tensor(0.0), scale), zero_point


def float_zero_point(min_val, max_val, quant_min, quant_max, symmetric=False):
    scale, zero_point = choose_qparams(min_val, max_val, quant_min, quant_max, symmetric=symmetric)
    return scale, zero_point.float()


def affine_zero_point_for_symmetric(min_val, max_val, quant_min, quant_max, symmetric=True):
    scale, _ = choose_qparams(min_val, max_val, quant_min, quant_max, symmetric=True)
    min_neg = torch.clamp(min_val, max=0.0)
    return scale, quant_min - torch.round(min_neg / scale).to(torch.int64)


@pytest.mark.parametrize("check_fn, wrong, message", [
    (lab01.choose_qparams_affine, affine_without_zero, r"expected scale .* the range must contain 0"),
    (lab01.choose_qparams_symmetric, symmetric_127, r"divide by \(quant_max - quant_min\) / 2"),
    (lab01.choose_qparams_affine, without_eps, r"scale would be 0; PyTorch uses max\(scale, eps\)"),
    (lab01.choose_qparams_symmetric, without_eps, r"max\(scale, eps\)"),
    (lab01.choose_qparams_affine, float_zero_point, r"zero_point: expected an integer"),
    (lab01.choose_qparams_symmetric, affine_zero_point_for_symmetric, r"expected zero_point 0, got -64\. Hint: symmetric .* zero_point 0"),
])
def test_wrong_choose_qparams(check_fn, wrong, message):
    with pytest.raises(check.CheckFailed, match=message):
        check_fn(wrong)


def python_floats(min_val, max_val, quant_min, quant_max, symmetric=False):
    """The formulas in float64 (Python floats): right in spirit, off in the last bit."""
    lo, hi = min(min_val.item(), 0.0), max(max_val.item(), 0.0)
    scale = max((hi - lo) / (quant_max - quant_min), EPS)
    zero_point = quant_min - round(lo / scale)
    return torch.tensor(scale), min(max(zero_point, quant_min), quant_max)


def test_float64_arithmetic_fails_visibly_with_a_hint():
    with pytest.raises(check.CheckFailed, match=r"(almost|off by one).*float32 tensors"):
        lab01.choose_qparams_affine(python_floats)


def zero_point_rounded_half_away(min_val, max_val, quant_min, quant_max, symmetric=False):
    """Right everywhere except at exact ties of min_neg / scale, which it rounds away from zero."""
    scale, _ = choose_qparams(min_val, max_val, quant_min, quant_max, symmetric=symmetric)
    if symmetric:
        return scale, torch.tensor(0)
    v = torch.clamp(min_val, max=0.0) / scale
    away = torch.sign(v) * torch.floor(v.abs() + 0.5)
    return scale, torch.clamp(quant_min - away.to(torch.int64), quant_min, quant_max)


@pytest.mark.parametrize("seed", range(3))
def test_hidden_qparams_catch_a_zero_point_rounded_half_away(seed):
    """Regression: the hidden draws never made min_neg / scale an exact tie, so rounding the zero
    point half away from zero (not half to even, as PyTorch) passed every hidden run."""
    with check.seeded(seed), pytest.raises(check.CheckFailed, match=r"expected zero_point .* off by one"):
        lab01.choose_qparams_affine_hidden(zero_point_rounded_half_away)


def test_hidden_qparams_catch_a_missing_zero():
    with pytest.raises(check.CheckFailed, match="random tensors vs torch MinMaxObserver"):
        lab01.choose_qparams_affine_hidden(affine_without_zero)


def no_clamp(x, scale, zp, qmin, qmax):
    return (torch.round(x * (1.0 / scale)) + zp).to(torch.int64)


def no_zero_point(x, scale, zp, qmin, qmax):
    return torch.clamp(torch.round(x * (1.0 / scale)), qmin, qmax).to(torch.int64)


def divides(x, scale, zp, qmin, qmax):
    return torch.clamp(torch.round(x / scale) + zp, qmin, qmax).to(torch.int64)


def half_away(x, scale, zp, qmin, qmax):
    return torch.clamp(torch.floor(x * (1.0 / scale) + 0.5) + zp, qmin, qmax).to(torch.int64)


def zero_point_before_rounding(x, scale, zp, qmin, qmax):
    return torch.clamp(torch.round(x * (1.0 / scale) + zp), qmin, qmax).to(torch.int64)


def truncates(x, scale, zp, qmin, qmax):
    return torch.clamp((x * (1.0 / scale)).to(torch.int64) + zp, qmin, qmax)


def returns_floats(x, scale, zp, qmin, qmax):
    return torch.clamp(torch.round(x * (1.0 / scale)) + zp, qmin, qmax)


@pytest.mark.parametrize("wrong, message", [
    (no_clamp, r"expected code 0, got -10.*clamp the codes"),
    (no_zero_point, r"add the zero_point"),
    (divides, r"multiply by the reciprocal"),
    (half_away, r"round ties to even"),
    (zero_point_before_rounding, r"round first, then add the zero_point"),
    (truncates, r"\.to\(int\) truncates"),
    (returns_floats, r"expected integer codes, got a torch.float32 tensor"),
])
def test_wrong_quantize(wrong, message):
    with pytest.raises(check.CheckFailed, match=message):
        lab01.quantize(wrong)


@pytest.mark.parametrize("wrong", [no_clamp, no_zero_point, divides, half_away, returns_floats])
def test_hidden_quantize_catches_the_same_mistakes(wrong):
    with pytest.raises(check.CheckFailed, match="vs torch.fake_quantize_per_tensor_affine"):
        lab01.quantize_hidden(wrong)


@pytest.mark.parametrize("wrong, message", [
    (lambda q, s, z: q.to(torch.float32) * s, r"subtract the zero_point before multiplying"),
    (lambda q, s, z: (q - z).to(torch.float32) * s, r"wraps around\. Convert first"),
    (lambda q, s, z: (q.double() - z) * s, r"expected a float32 tensor, got torch.float64"),
    (lambda q, s, z: ((q.to(torch.int64) - z) * s).tolist(), r"expected a tensor, got list"),
])
def test_wrong_dequantize(wrong, message):
    with pytest.raises(check.CheckFailed, match=message):
        lab01.dequantize(wrong)
    with pytest.raises(check.CheckFailed):
        lab01.dequantize_hidden(wrong)


def test_unimplemented_and_crashing_answers_are_reported():
    with pytest.raises(check.CheckFailed, match="not implemented yet"):
        lab01.quantize(check.not_implemented)

    def crashes(min_val, max_val, quant_min, quant_max, symmetric=False):
        return min_val.item() / 0

    with pytest.raises(check.CheckFailed, match="choose_qparams.*raised ZeroDivisionError"):
        lab01.choose_qparams_affine(crashes)


def test_checks_leak_no_deprecation_warnings(recwarn):
    lab01.choose_qparams_affine_hidden(reference_qparams)
    lab01.quantize_hidden(quantize)
    assert not [w for w in recwarn if "deprecat" in str(w.message).lower()]
