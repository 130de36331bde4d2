"""Checks of lab 10 (qlib/check/lab10.py) pass the reference answers and fail typical mistakes.

Reference: qlib.federated.codec and qlib.federated.fedavg.aggregate (the module docstring of
qlib/check/lab10.py states the formulas); each wrong answer below is one named mistake.
"""

import math

import pytest
import torch

from qlib import check
from qlib.check import CheckFailed


def good_encode(d, bits, generator):
    qmax = 2 ** (bits - 1) - 1
    amax = d.abs().max().float()
    scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
    u = torch.rand(d.shape, generator=generator)
    return torch.floor(d * (1 / scale) + u).clamp(-qmax, qmax).to(torch.int8), scale


def nearest_encode(d, bits, generator):
    qmax = 2 ** (bits - 1) - 1
    scale = d.abs().max() / qmax
    return torch.round(d / scale).clamp(-qmax, qmax).to(torch.int8), scale


def fedavg_good(g, ups, ns):
    n = sum(ns)
    return {k: w + sum(u[k] * (nk / n) for u, nk in zip(ups, ns)) for k, w in g.items()}


def test_reference_answers_pass():
    check.lab10.encode(good_encode)
    check.lab10.encode_hidden(good_encode)
    check.lab10.decode(lambda c, s: c.float() * s)
    check.lab10.update_bytes(lambda shape, bits: math.ceil(math.prod(shape) * bits / 8) + 4)
    check.lab10.fedavg(fedavg_good)
    check.lab10.fedavg_hidden(fedavg_good)


def test_nearest_rounding_is_caught():
    with pytest.raises(CheckFailed, match="unbiased|floor"):
        check.lab10.encode(nearest_encode)


def test_wrong_bytes_and_fedavg_are_caught():
    with pytest.raises(CheckFailed, match="scale travels"):
        check.lab10.update_bytes(lambda shape, bits: math.ceil(math.prod(shape) * bits / 8))
    with pytest.raises(CheckFailed, match="ceil"):
        check.lab10.update_bytes(lambda shape, bits: math.prod(shape) * bits // 8 + 4)
    with pytest.raises(CheckFailed, match="weighted"):
        check.lab10.fedavg(lambda g, ups, ns: {k: w + sum(u[k] for u in ups) / len(ups) for k, w in g.items()})
    with pytest.raises(CheckFailed, match="not implemented"):
        check.lab10.decode(check.not_implemented)
