"""qlib.check.mistakes and qlib.check.references: every typical mistake can be told apart from
the right answer on the inputs the checks use, and the references are PyTorch's answers.

Reference: the quantizer written in the module docstring of qlib.check.mistakes, qlib.qparams
and qlib.quantize (bit-exact with PyTorch, tested in test_qparams.py and test_quantize.py).
"""

from __future__ import annotations

import pytest
import torch

from qlib.check import mistakes, references
from qlib.qparams import choose_qparams, quant_range
from qlib.quantize import fake_quantize, quantize


def test_division_traps_split_division_from_the_reciprocal():
    traps = mistakes.division_traps(torch.tensor(0.0251))
    assert len(traps) > 0
    assert not torch.equal(torch.round(traps / 0.0251), torch.round(traps * (1.0 / torch.tensor(0.0251))))
    assert len(mistakes.division_traps(torch.tensor(0.25))) == 0  # a power of two divides exactly


LAB01_VISIBLE = [  # the cases of check.lab01.quantize: (x, scale, zero_point, quant_min, quant_max)
    (torch.tensor([-3.0, -1.0, -0.5, 0.0, 0.1, 0.3, 0.5, 1.2, 2.0, 5.0]), torch.tensor(0.2), torch.tensor(5), 0, 15),
    (torch.tensor([0.25, 0.75, 1.25, -0.25, -0.75, 3.0]), torch.tensor(0.5), torch.tensor(1), -8, 7),
    (torch.tensor([-1.0, -0.25, 0.0, 0.126, 0.5, 0.99]), torch.tensor(1.0 / 127.5), torch.tensor(0), -128, 127),
    (mistakes.division_traps(torch.tensor(0.0251)), torch.tensor(0.0251), torch.tensor(3), -128, 127),
]


def test_each_wrong_quantizer_is_caught_by_the_visible_quantize_cases():
    caught = set()
    for x, s, z, qmin, qmax in LAB01_VISIBLE:
        right = quantize(x, s, z, qmin, qmax).to(torch.float32)
        caught |= {k for k, codes in mistakes.wrong_codes(x, s, z, qmin, qmax).items() if not torch.equal(codes, right)}
    assert caught == set(mistakes.HINTS)


def test_each_wrong_fake_quantizer_and_gradient_is_caught_by_the_visible_ste_cases():
    from qlib.check.lab04 import _worked_ste_cases

    caught_values, caught_grads, hints, grad_hints = set(), set(), set(), set()
    for x, s, z, qmin, qmax, _ in _worked_ste_cases():
        dy = torch.linspace(0.5, 1.5, x.numel())
        right_y, right_g = references.fake_quantize(x, s, z, qmin, qmax, dy)
        for hint, values in mistakes.fake_quantize_mistakes(x, s, z, qmin, qmax):
            hints.add(hint)
            if not torch.equal(values, right_y):
                caught_values.add(hint)
        for hint, grad in mistakes.ste_gradient_mistakes(x, s, z, qmin, qmax, dy):
            grad_hints.add(hint)
            if not torch.equal(grad, right_g):
                caught_grads.add(hint)
    assert caught_values == hints and caught_grads == grad_hints


def test_references_match_qlib():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(500, generator=gen) * 3 + 1
    for bits, signed, symmetric in [(8, False, False), (4, True, True), (3, False, False), (8, True, True)]:
        qmin, qmax = quant_range(bits, signed)
        want = choose_qparams(x.min(), x.max(), qmin, qmax, symmetric=symmetric)
        got = references.minmax_qparams(x, bits, signed, symmetric)
        assert torch.equal(got[0].reshape(()), want[0].reshape(())) and int(got[1]) == int(want[1])
    scale, zp = choose_qparams(x.min(), x.max(), 0, 255)
    assert torch.equal(references.fake_quantize(x, scale, zp, 0, 255), fake_quantize(x, scale, zp, 0, 255))
    assert torch.equal(references.int8_codes(x, scale, zp, signed=False), quantize(x, scale, zp, 0, 255).to(torch.int64))


@pytest.mark.parametrize("grad_factor", [1.0, 0.1])
def test_lsq_reference_is_the_written_gradient(grad_factor):
    gen = torch.Generator().manual_seed(1)
    x, dy = torch.randn(300, generator=gen) * 2, torch.randn(300, generator=gen)
    s, z = torch.tensor([0.1]), torch.tensor([7.0])
    term = mistakes.lsq_terms(x, s, z, 0, 15)[0]
    want = grad_factor * (dy.double() * term.double()).sum()
    got = references.lsq_scale_grad(x, s, z, 0, 15, dy, grad_factor)
    assert abs(got.item() - want.item()) <= 1e-4 * grad_factor * (dy * term).abs().sum().item()
