"""qlib.check.lab01_debug: lab 01's broken per-channel quantizer and its check.

Reference: torch.ao.quantization.PerChannelMinMaxObserver (ch_axis=0, per_channel_affine)
and torch.fake_quantize_per_channel_affine. Every answer that keeps one, two or all three of
the bugs fails the *visible* check, each with a message that describes the symptom; the fixed
quantizer passes both checks; the notebook's broken code is the module's.
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest
import torch

from qlib.check import lab01
from qlib.check import lab01_debug as D
from qlib.qparams import PerChannel, choose_qparams
from qlib.quantize import quantize

ROOT = Path(__file__).resolve().parents[1]


def quantize_weight(w, bits, off_by_one=False, wrong_axis=False, truncated=False):
    """The lab's quantizer with any subset of its three bugs."""
    quant_min, quant_max = 0, 2**bits - (0 if off_by_one else 1)
    dim = 0 if wrong_axis else 1
    min_neg = torch.clamp(w.amin(dim=dim), max=0.0)
    max_pos = torch.clamp(w.amax(dim=dim), min=0.0)
    scale = torch.clamp((max_pos - min_neg) / (quant_max - quant_min), min=torch.finfo(torch.float32).eps)
    zero_point = (quant_min - (min_neg / scale if truncated else torch.round(min_neg / scale))).to(torch.int64)
    zero_point = torch.clamp(zero_point, quant_min, quant_max)
    s, z = (scale, zero_point) if wrong_axis else (scale[:, None], zero_point[:, None])
    w_q = torch.clamp(torch.round(w * (1.0 / s)) + z, quant_min, quant_max).to(torch.int64)
    return w_q, scale, zero_point


def test_fixed_quantizer_passes_both_checks(capsys):
    lab01.quantize_weight(quantize_weight)
    lab01.quantize_weight_hidden(quantize_weight)
    assert capsys.readouterr().out.count("PASS") == 2


def test_reference_is_pytorch_and_qlib_per_channel():
    w = D._weight(torch.Generator().manual_seed(3), 12, 30)
    for bits in (2, 4, 8):
        w_q, scale, zp = D.reference_quantize_weight(w, bits)
        s2, z2 = choose_qparams(w.amin(1), w.amax(1), 0, 2**bits - 1)
        assert torch.equal(scale, s2) and torch.equal(zp, z2.to(torch.int64))
        assert torch.equal(w_q, quantize(w, scale, zp, 0, 2**bits - 1, granularity=PerChannel(0)).to(torch.int64))


@pytest.mark.parametrize("bugs", [b for b in itertools.product([False, True], repeat=3) if any(b)])
def test_every_subset_of_the_bugs_fails_the_visible_check(bugs):
    with pytest.raises(AssertionError, match="FAIL  quantize_weight: worked case"):
        lab01.quantize_weight(lambda w, bits: quantize_weight(w, bits, *bugs))


@pytest.mark.parametrize("bugs, symptom", [
    ((True, False, False), r"Every scale is 3/4 of the expected one"),
    ((False, True, False), r"expected one scale per output channel, shape \(2,\) .* follow the columns"),
    ((False, False, True), r"zero_point of channel 0 is 0, expected 1: 0.0 lands 0.8000 codes .* \*nearest\*"),
])
def test_each_bug_gets_a_symptom_message(bugs, symptom):
    with pytest.raises(AssertionError, match=symptom):
        lab01.quantize_weight(lambda w, bits: quantize_weight(w, bits, *bugs))


def test_wrong_axis_on_a_square_weight_is_named_as_columns():
    w = D._weight(torch.Generator().manual_seed(4), 8, 8)
    with pytest.raises(AssertionError, match="follow the columns"):
        D._check(lambda w, bits: quantize_weight(w, bits, wrong_axis=True), w, 4, "square")


def test_codes_beyond_the_range_are_named():
    def clamps_to_2_pow_bits(w, bits):
        w_q, scale, zp = quantize_weight(w, bits)
        codes = torch.clamp(torch.round(w * (1.0 / scale[:, None])) + zp[:, None] + 1, 0, 2**bits)
        return codes.to(torch.int64), scale, zp
    with pytest.raises(AssertionError, match=r"Codes reach 4, but a 2-bit unsigned code holds 0 .. 3"):
        lab01.quantize_weight(clamps_to_2_pow_bits)


def test_the_notebook_shows_the_modules_broken_code():
    import ast
    import inspect

    src = (ROOT / "solutions" / "lab01_linear_quantization" / "lab01_linear_quantization.py").read_text()
    notebook = ast.parse(re.search(r"^def broken_quantize_weight\(w, bits\):\n.*?(?=\n\n)", src, re.S | re.M).group(0))
    module = ast.parse(inspect.getsource(D.broken_quantize_weight)).body[0]
    module.body = module.body[1:]  # without the docstring
    assert ast.dump(notebook.body[0]) == ast.dump(module)
    w = D._weight(torch.Generator().manual_seed(6), 5, 5)
    assert all(torch.equal(a, b) for a, b in zip(D.broken_quantize_weight(w, 4), quantize_weight(w, 4, True, True, True)))
