"""Checks of lab 11 (qlib/check/lab11.py) pass the reference answers and fail typical mistakes.

Reference: qlib.llm.weight_only.quantize_groups (torchao's asymmetric convention) and
qlib.llm.gptq.gptq_quantize (the docstring of qlib/check/lab11.py states the formulas); each
wrong answer below is one named mistake.
"""

import pytest
import torch

from qlib import check
from qlib.check import CheckFailed
from qlib.llm import gptq, weight_only


def good_quantize(w, bits, g):
    return weight_only.quantize_groups(w, bits, g, symmetric=False)


def no_zero_in_range(w, bits, g):
    out, n = w.shape
    groups = w.reshape(out, n // g, g)
    lo, hi = groups.amin(-1), groups.amax(-1)
    scale = (hi - lo) / (2 ** bits - 1)
    zp = torch.round(-lo / scale).clamp(0, 2 ** bits - 1).long()
    q = torch.clamp(torch.round(groups / scale[..., None]) + zp[..., None], 0, 2 ** bits - 1)
    return q.long().reshape(out, n), scale, zp


def good_gptq(W, H, bits, g):
    return gptq.gptq_quantize(W, H, bits, g, act_order=False).weight_dq


def rtn_gptq(W, H, bits, g):
    return weight_only.fake_quantize_groups(W, bits, g)


def in_place_gptq(W, H, bits, g):
    q = good_gptq(W, H, bits, g)
    W.copy_(q)
    return q


def test_reference_answers_pass():
    check.lab11.quantize_groups(good_quantize)
    check.lab11.quantize_groups_hidden(good_quantize)
    check.lab11.gptq_layer(good_gptq)
    check.lab11.gptq_layer_hidden(good_gptq)


def test_typical_mistakes_are_caught():
    with pytest.raises(CheckFailed, match="include 0"):
        check.lab11.quantize_groups(no_zero_in_range)
    with pytest.raises(CheckFailed, match="round-to-nearest"):
        check.lab11.gptq_layer(rtn_gptq)
    with pytest.raises(CheckFailed, match="must not modify"):
        check.lab11.gptq_layer(in_place_gptq)
    with pytest.raises(CheckFailed, match="distinct values"):
        check.lab11.gptq_layer(lambda W, H, b, g: W.clone())
    with pytest.raises(CheckFailed, match="not implemented"):
        check.lab11.gptq_layer(check.not_implemented)
