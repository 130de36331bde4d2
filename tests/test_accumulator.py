"""Tests for qlib.accumulator: the ``Accumulator`` (int32 values, float64 scale) between integer
layers and the exact rules that replace float operations on it (``_add``, max-pooling, ReLU6's
pending clamp, ``to_codes``, ``activation_code``). Moved verbatim from tests/test_intmodel.py
(same seeds: ``gen(offset)`` as there), which tests the whole-model interpreter.

References: float64 arithmetic on ``values * scale`` (the real numbers an accumulator stands
for: the add within half a unit of each rescaled operand, max-pooling exact); PyTorch's
quantized ReLU6 (``torch.ao.nn.quantized.ReLU6``: codes clamped to ``[z, quantize(6)]``); the
fake-quant order for a pending ReLU6 (ReLU6 in float64, then ``qlib.quantize``), within one code
where the real value lies within float error of a tie. Torch draws use generators seeded from
``QLIB_TEST_SEED`` (default 0).
"""

import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qlib.accumulator import Accumulator, _add, activation_code, to_codes
from qlib.intmodel import convert_to_integer
from qlib.ptq import quantize_static
from qlib.quantize import quantize

SEED = int(os.environ.get("QLIB_TEST_SEED", "0"))


def gen(offset: int) -> torch.Generator:
    return torch.Generator().manual_seed(SEED * 1000 + offset)


def randn(g, *shape):
    return torch.randn(*shape, generator=g)


def test_accumulator_add_rescales_to_the_coarser_scale():
    g = gen(8)
    a = Accumulator(torch.randint(-1000, 1000, (4, 3), generator=g),
                    torch.tensor([0.01, 0.02, 0.04], dtype=torch.float64))
    b = Accumulator(torch.randint(-1000, 1000, (4, 3), generator=g), torch.tensor(0.03, dtype=torch.float64))
    s = _add(a, b)
    assert torch.equal(s.scale, torch.tensor([0.03, 0.03, 0.04], dtype=torch.float64))
    err = (s.dequantize().double() - (a.dequantize().double() + b.dequantize().double())).abs()
    assert (err <= s.scale + 1e-6).all()  # at most half a unit from each rescaled operand


@pytest.mark.parametrize("kw", [dict(kernel_size=2), dict(kernel_size=3, stride=2, padding=1),
                                dict(kernel_size=3, padding=1, dilation=2, ceil_mode=True)])
def test_integer_max_pool_equals_the_float64_one(kw):
    """Max-pooling int32 accumulators directly (CPU) gives what pooling their float64 copy gives."""
    from qlib.accumulator import _MODULE_RULES
    g = gen(10)
    values = torch.randint(-(2**31), 2**31 - 1, (2, 3, 7, 7), generator=g, dtype=torch.int64).to(torch.int32)
    a = Accumulator(values, torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64).reshape(3, 1, 1))
    out = _MODULE_RULES[nn.MaxPool2d](nn.MaxPool2d(**kw), a)
    assert torch.equal(out.values.long(), F.max_pool2d(values.double(), **kw).long())
    assert torch.equal(out.scale, a.scale)


def test_relu6_code_clamp_equals_pytorchs_quantized_relu6():
    """``clamp(codes, q(0), q(6))`` is what ``torch.ao.nn.quantized.ReLU6`` does to quantized codes,
    including scales where 6 lies beyond the code range (q(6) clipped to quant_max)."""
    import warnings
    import torch.ao.nn.quantized as nnq
    g = gen(11)
    for scale in [0.01, 0.023, 0.05, 6 / 255, 0.1, 0.3]:
        z = int(torch.randint(0, 120, (1,), generator=g))
        codes = torch.randint(0, 256, (1000,), generator=g).to(torch.uint8)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*deprecated")
            want = nnq.ReLU6()(torch._make_per_tensor_quantized_tensor(codes, scale, z)).int_repr()
        q0, q6 = activation_code(0.0, scale, z, 0, 255), activation_code(6.0, scale, z, 0, 255)
        assert int(q0) == z and int(q6) == min(255, z + round(6 / scale))
        assert torch.equal(codes.long().clamp(int(q0), int(q6)), want.long()), scale


def test_pending_relu6_is_fused_into_the_requantization():
    """``to_codes``: requantize first, then clamp the codes at q(6); equal to the fake-quant order
    (ReLU6 in float, then quantize) wherever the real value is not within float error of a tie."""
    from qlib.accumulator import _relu6
    g = gen(12)
    q = quantize_static(nn.Sequential(nn.Conv2d(3, 4, 1)), randn(g, 8, 3, 4, 4) * 5)  # range beyond 6
    layer = convert_to_integer(q).graph_module.get_submodule("0")
    q6 = int(activation_code(6.0, layer.input_scale, layer.input_zero_point, 0, 255))
    assert q6 < 255  # a clamp of its own, not the range's
    s_acc = torch.tensor([2e-4, 5e-4, 1e-3], dtype=torch.float64).reshape(3, 1, 1)
    a = Accumulator(torch.randint(-40000, 40000, (64, 3, 2, 2), generator=g), s_acc)
    fused = to_codes(_relu6(a), layer)
    real = (a.values.double() * s_acc).clamp(0, 6)  # ReLU6 in float64, then the layer's quantizer
    want = quantize(real.float(), layer.input_scale, layer.input_zero_point, 0, 255)
    assert (a.values.double() * s_acc > 6).any() and (fused.long() == q6).any() and fused.max() == q6
    assert (fused.long() - want.long()).abs().max() <= 1 and (fused == want).float().mean() > 0.99


def test_materialized_relu6_is_within_one_accumulator_unit():
    g = gen(13)
    scale = torch.tensor([1e-3, 3e-3, 7e-3], dtype=torch.float64).reshape(3, 1)
    a = Accumulator(torch.randint(0, 10000, (16, 3, 5), generator=g), scale, act_max=6.0)
    m = a.materialized()
    real, clipped = m.values.double() * scale, (a.values.double() * scale).clamp(max=6)
    assert m.act_max is None and (real <= 6).all() and (real > clipped - scale).all()
    assert torch.equal(m.values.long()[clipped < 6], a.values.long()[clipped < 6])
    assert torch.equal(a.dequantize(), (a.values.double() * scale).float().clamp(max=6))
