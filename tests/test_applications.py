"""Tests of qlib.applications.

References: ECE against a direct loop over bins written from Guo et al. (2017); per-class
recall against counting by hand; the C check against qlib.intops (bit-exact int32
accumulators), skipped cleanly without a C compiler; byte counts against their formulas.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qlib import applications as A
from qlib.intmodel import convert_to_integer
from qlib.ptq import quantize_static


def _logits(n=200, c=3):
    g = torch.Generator().manual_seed(int(torch.randint(0, 9999, ())))
    return torch.randn(n, c, generator=g) * 2, torch.randint(0, c, (n,), generator=g)


def test_per_class_recall():
    lg, y = _logits()
    pred = lg.argmax(1)
    r = A.per_class_recall(lg, y)
    for c in range(3):
        want = 100 * ((pred == c) & (y == c)).sum().item() / (y == c).sum().item()
        assert abs(r[c].item() - want) < 1e-9


def test_ece_matches_loop():
    lg, y = _logits()
    p = F.softmax(lg.double(), 1)
    conf, pred = p.max(1)
    ece = 0.0
    for b in range(10):
        lo, hi = b / 10, (b + 1) / 10
        m = (conf >= lo) & ((conf < hi) if b < 9 else (conf <= hi))
        if m.any():
            ece += m.double().mean() * abs((pred[m] == y[m]).double().mean() - conf[m].mean())
    assert abs(A.expected_calibration_error(lg, y) - 100 * float(ece)) < 1e-9
    # a model that is always right with confidence ~1 has ECE ~0
    sure = F.one_hot(y, 3).float() * 50
    assert A.expected_calibration_error(sure, y) < 1e-6


def test_corrupt_and_bytes():
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(A.corrupt(x, "noise", 0.0), x)
    assert A.corrupt(x, "blur", 1).std() < x.std()
    m = nn.Sequential(nn.Linear(30, 16), nn.ReLU(), nn.Linear(16, 2))
    assert A.packed_weight_bytes(m, 4) == (240 + 64 + 64) + (16 + 8 + 8)
    with pytest.raises(ValueError, match="kind"):
        A.corrupt(x, "fog", 1)


def test_c_header_and_compile_check():
    m = nn.Sequential(nn.Linear(30, 16), nn.ReLU(), nn.Linear(16, 2)).eval()
    x = torch.randn(64, 30)
    im = convert_to_integer(quantize_static(m, [x]))
    h = A.c_header(im)
    assert "int8_t qmodel_l0_w[480]" in h and "qmodel_l0_mult[16]" in h
    peak = A.peak_activation_bytes(m, x)
    assert peak["peak"] == 30 + 4 * 16
    ok = A.c_check_first_layer(im, x[:4])
    if ok is None:
        pytest.skip("no C compiler on this machine")
    assert ok is True
