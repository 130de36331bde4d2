"""Tests for qlib.intmodel (convert_to_integer: whole models in integer arithmetic).

Reference: the converted fake-quant model (qlib.ptq.quantize_static) that the integer model
implements, Jacob et al. 2018. The two differ only by the int32 bias rounding (half an
accumulator unit) and the Q31 multiplier (2**-31 relative), which now and then move an
intermediate code by one (0.05% of the codes after the first layer, a few % after ten);
the outputs agree to about one step of their range (measured at most 1.2 steps).
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qlib.intmodel import Accumulator, IntegerModel, _add, convert_to_integer
from qlib.intops import IntConv2d, IntLinear
from qlib.models import BasicBlock, create
from qlib.modules import QuantConfig
from qlib.ptq import prepare, quantize_dynamic, quantize_static
from qlib.quantize import quantize


def randomize_bn(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_(0, 0.3)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_(1, 0.2)
                m.bias.normal_(0, 0.2)
    return model


def assert_integer_matches(fq_model, x, fp_model=None, bits=8, max_steps=2.0):
    """Integer output vs fake-quant output, in steps of a ``bits``-bit grid over the output range.

    Every output within ``max_steps``; on average the integer model must be closer to the
    fake-quant model than the fake-quant model is to fp32 (measured: 0.05-0.4 times as far
    at W8A8, deeper models higher, as rare one-code flips propagate; up to 0.45 at W4A4).
    """
    int_model = convert_to_integer(fq_model)
    ref, out = fq_model(x), int_model(x)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    step = (ref.max() - ref.min()) / (2**bits - 1)
    diff = (out - ref).abs() / step
    assert diff.max() <= max_steps, f"max difference {diff.max():.2f} steps"
    if fp_model is not None:
        quant_error = ((fp_model(x) - ref).abs() / step).mean()
        assert diff.mean() <= 0.75 * quant_error, f"mean {diff.mean():.3f} vs quantization error {quant_error:.3f}"
    return int_model


@pytest.mark.parametrize("name", ["mlp", "cnn8", "res16"])
def test_zoo_models_w8a8(name):
    size = 16 if name == "res16" else 8
    model = randomize_bn(create(name, seed=None)).eval()
    q = quantize_static(model, [torch.randn(32, 1, size, size) for _ in range(2)])
    int_model = assert_integer_matches(q, torch.randn(32, 1, size, size), model)
    layers = [m for m in int_model.modules() if isinstance(m, (IntLinear, IntConv2d))]
    assert len(layers) == sum(isinstance(m, (nn.Linear, nn.Conv2d)) for m in model.modules())


def test_cnn8_w4a4():
    model = randomize_bn(create("cnn8", seed=None)).eval()
    q = quantize_static(model, torch.randn(64, 1, 8, 8), QuantConfig(weight_bits=4, act_bits=4))
    assert_integer_matches(q, torch.randn(32, 1, 8, 8), model, bits=4)


def test_intermediate_codes_agree():
    """Each layer's input codes: equal almost everywhere, never more than one apart at 8 bits."""
    model = randomize_bn(create("cnn8", seed=None)).eval()
    q = quantize_static(model, torch.randn(64, 1, 8, 8))
    int_model = convert_to_integer(q)
    fq_codes, int_codes = [], []
    for m in q.modules():
        if hasattr(m, "input_fq"):
            m.input_fq.register_forward_hook(lambda mod, i, out: fq_codes.append(
                quantize(out, *mod.qparams(), mod.quant_min, mod.quant_max).long()))
    for m in int_model.modules():
        if isinstance(m, (IntLinear, IntConv2d)):
            m.register_forward_hook(lambda mod, i, out: int_codes.append(i[0].long()))
    x = torch.randn(32, 1, 8, 8)
    q(x), int_model(x)
    assert len(fq_codes) == len(int_codes) == 4
    assert torch.equal(fq_codes[0], int_codes[0])  # the model input: the same quantize
    for a, b in zip(fq_codes, int_codes):
        assert (a - b).abs().max() <= 1 and (a == b).float().mean() > 0.98


def test_pretrained_cnn8_predictions_agree():
    from qlib.data import load_digits
    from qlib.models import pretrained, weights_path
    if not weights_path("cnn8", 0).exists():
        pytest.skip("no shipped cnn8 weights")
    digits = load_digits(8)
    model = pretrained("cnn8")
    q = quantize_static(model, digits.train.tensors[0][:256])
    x = digits.test.tensors[0]
    int_model = assert_integer_matches(q, x, model)
    assert (int_model(x).argmax(1) == q(x).argmax(1)).float().mean() >= 0.99


class Functional(nn.Module):
    """Functional ops between layers: F.relu, pooling, view, size, flatten, mean, adds."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.skip = nn.Conv2d(8, 8, 1)
        self.fc1 = nn.Linear(8 * 4 * 4, 16)
        self.fc2 = nn.Linear(16, 5)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)                 # (N, 8, 4, 4)
        y = torch.relu(self.conv2(x) + self.skip(x))
        y = y + F.adaptive_avg_pool2d(y, 1)                        # broadcast add of a pooled map
        h = self.fc1(y.view(y.size(0), -1)).relu()
        g = torch.flatten(F.avg_pool2d(y, 4), 1).mean(1, keepdim=True)  # mean across channels
        return self.fc2(h) + g


def test_functional_model_converts():
    model = Functional().eval()
    q = quantize_static(model, [torch.randn(32, 1, 8, 8) for _ in range(2)])
    assert_integer_matches(q, torch.randn(32, 1, 8, 8), model)


def test_residual_block_and_float_layers():
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          BasicBlock(8, 8), BasicBlock(8, 16, stride=2),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))
    model = randomize_bn(model).eval()
    calib = torch.randn(32, 1, 8, 8)
    # the first and last layers kept in float, as in mixed-precision recipes
    q = quantize_static(model, calib, per_layer={"0": None, "7": None})
    int_model = assert_integer_matches(q, torch.randn(16, 1, 8, 8), model)
    assert isinstance(int_model.graph_module.get_submodule("7"), nn.Linear)


def test_accumulator_add_rescales_to_the_coarser_scale():
    a = Accumulator(torch.randint(-1000, 1000, (4, 3)), torch.tensor([0.01, 0.02, 0.04], dtype=torch.float64))
    b = Accumulator(torch.randint(-1000, 1000, (4, 3)), torch.tensor(0.03, dtype=torch.float64))
    s = _add(a, b)
    assert torch.equal(s.scale, torch.tensor([0.03, 0.03, 0.04], dtype=torch.float64))
    err = (s.dequantize().double() - (a.dequantize().double() + b.dequantize().double())).abs()
    assert (err <= s.scale + 1e-6).all()  # at most half a unit from each rescaled operand


def test_errors():
    model = create("cnn8", seed=None)
    with pytest.raises(ValueError, match="not frozen"):
        convert_to_integer(prepare(model))
    with pytest.raises(ValueError, match="no layers to quantize"):
        convert_to_integer(model)
    with pytest.raises(ValueError, match="dynamic"):
        convert_to_integer(quantize_dynamic(model))
    with pytest.raises(TypeError, match="nn.Module"):
        convert_to_integer("model")
    tanh = quantize_static(nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2)), torch.randn(8, 4))
    int_model = convert_to_integer(tanh)
    assert isinstance(int_model, IntegerModel)
    with pytest.raises(NotImplementedError, match="Tanh"):
        int_model(torch.randn(2, 4))
    ceil = quantize_static(nn.Sequential(nn.Conv2d(1, 2, 3), nn.AvgPool2d(2, ceil_mode=True), nn.Flatten(),
                                         nn.Linear(8, 2)), torch.randn(8, 1, 5, 5))
    with pytest.raises(NotImplementedError, match="windows"):
        convert_to_integer(ceil)(torch.randn(2, 1, 5, 5))
