"""Tests for qlib.intmodel (convert_to_integer: whole models in integer arithmetic). The
Accumulator and its rules (qlib.accumulator) have their own tests: tests/test_accumulator.py.

Reference: the converted fake-quant model (qlib.ptq.quantize_static) that the integer model
implements, Jacob et al. 2018; for ReLU6's code clamp, PyTorch's quantized ReLU6
(``torch.ao.nn.quantized.ReLU6``: codes clamped to ``[z, quantize(6)]``). The integer and the
fake-quant model differ only by the int32 bias rounding (half an accumulator unit) and the Q31 multiplier (2**-31 relative), which now and then move an
intermediate code by one (0.05% of the codes after the first layer, a few % after ten).
Those flips propagate, so the whole-model bounds below are measured, not derived: each is
about twice the largest value seen over 100 seeds (``MAX_STEPS``, ``MEAN_RATIO``). Between
the two backends of qlib.intops (int8 kernels and the int64 reference) there is no tolerance:
the integer outputs are equal (torch.equal). Torch draws use generators seeded from
``QLIB_TEST_SEED`` (default 0).
"""

import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qlib.intlayers import IntConv2d, IntLinear
from qlib.intmodel import IntegerModel, activation_code, convert_to_integer
from qlib.models import ALL_MODELS, BasicBlock, create
from qlib.modules import QuantConfig
from qlib.ptq import prepare, quantize_dynamic, quantize_static
from qlib.quantize import quantize

SEED = int(os.environ.get("QLIB_TEST_SEED", "0"))
# About twice the largest values measured over seeds 0-99 of every test below (8 bits: 1.30 steps,
# mean ratio 0.41; 4 bits: 1.68 steps, ratio 0.65). A broken requantization is off by many steps.
MAX_STEPS = {8: 2.6, 4: 3.4}   # largest |int - fake-quant| in output steps
MEAN_RATIO = {8: 0.8, 4: 1.3}  # mean |int - fake-quant| / mean |fake-quant - fp32|


def gen(offset: int) -> torch.Generator:
    return torch.Generator().manual_seed(SEED * 1000 + offset)


def randn(g, *shape):
    return torch.randn(*shape, generator=g)


def randomize_bn(model, g):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(randn(g, *m.running_mean.shape) * 0.3)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) * 1.5 + 0.5)
                m.weight.copy_(randn(g, *m.weight.shape) * 0.2 + 1)
                m.bias.copy_(randn(g, *m.bias.shape) * 0.2)
    return model


def zoo_model(name, g):
    return randomize_bn(create(name, seed=int(torch.randint(0, 2**31 - 1, (1,), generator=g))), g).eval()


def steps(fq_model, int_model, x, bits=8, fp_model=None):
    """Integer output vs fake-quant output in steps of a ``bits``-bit grid over the output range,
    and (with ``fp_model``) the mean quantization error of the fake-quant model in the same steps."""
    with torch.no_grad():
        ref, out = fq_model(x), int_model(x)
        quant_error = ((fp_model(x) - ref).abs() if fp_model is not None else None)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    step = (ref.max() - ref.min()) / (2**bits - 1)
    diff = (out - ref).abs() / step
    return diff, (quant_error / step).mean() if quant_error is not None else None


def assert_integer_matches(fq_model, x, fp_model=None, bits=8, **kwargs):
    """Every output within ``MAX_STEPS[bits]`` steps; the mean difference at most ``MEAN_RATIO[bits]``
    times the fake-quant model's own mean error against fp32."""
    int_model = convert_to_integer(fq_model, **kwargs)
    diff, quant_error = steps(fq_model, int_model, x, bits, fp_model)
    assert diff.max() <= MAX_STEPS[bits], f"max difference {diff.max():.2f} steps"
    if fp_model is not None:
        assert diff.mean() <= MEAN_RATIO[bits] * quant_error, \
            f"mean {diff.mean():.3f} vs quantization error {quant_error:.3f}"
    return int_model


def size(name):
    return ALL_MODELS[name][1]


@pytest.mark.parametrize("name", sorted(ALL_MODELS))  # dsc16 included: grouped convolutions, ReLU6
def test_zoo_models_w8a8(name):
    g = gen(1)
    model = zoo_model(name, g)
    n = size(name)
    q = quantize_static(model, [randn(g, 32, 1, n, n) for _ in range(2)])
    int_model = assert_integer_matches(q, randn(g, 32, 1, n, n), model)
    layers = [m for m in int_model.modules() if isinstance(m, (IntLinear, IntConv2d))]
    assert len(layers) == sum(isinstance(m, (nn.Linear, nn.Conv2d)) for m in model.modules())


@pytest.mark.parametrize("name", sorted(ALL_MODELS))
@pytest.mark.parametrize("bits", [8, 4])
def test_zoo_models_both_backends_are_bit_identical(name, bits, digits8, digits16):
    """The int8-kernel path and the int64 reference give equal outputs (shipped weights where present)."""
    from qlib.models import pretrained, weights_path
    g = gen(2)
    model = pretrained(name) if weights_path(name, 0).exists() else zoo_model(name, g)
    digits = digits8 if size(name) == 8 else digits16
    q = quantize_static(model, digits.train.tensors[0][:128], QuantConfig(weight_bits=bits, act_bits=bits))
    x = digits.test.tensors[0][:96]
    fast, ref = convert_to_integer(q), convert_to_integer(q, backend="reference")
    assert all(m.backend is None for m in fast.modules() if isinstance(m, (IntLinear, IntConv2d)))
    with torch.no_grad():
        assert torch.equal(fast(x), ref(x))


def test_cnn8_w4a4():
    g = gen(3)
    model = zoo_model("cnn8", g)
    q = quantize_static(model, randn(g, 64, 1, 8, 8), QuantConfig(weight_bits=4, act_bits=4))
    assert_integer_matches(q, randn(g, 32, 1, 8, 8), model, bits=4)


def test_double_rounding_reaches_the_layers():
    """``convert_to_integer(double_rounding=True)``: gemmlowp's rounding in every requantization."""
    g = gen(4)
    model = zoo_model("cnn8", g)
    q = quantize_static(model, randn(g, 64, 1, 8, 8), QuantConfig(weight_bits=4, act_bits=4))
    single, double = convert_to_integer(q), convert_to_integer(q, double_rounding=True)
    assert all(m.double_rounding for m in double.modules() if isinstance(m, (IntLinear, IntConv2d)))
    x = randn(g, 256, 1, 8, 8)
    with torch.no_grad():
        assert not torch.equal(single(x), double(x))  # 4-bit multipliers: the roundings differ somewhere
    assert_integer_matches(q, x, model, bits=4, double_rounding=True)


def layer_input_codes(q, int_model, x):
    """Run both models on ``x`` and keep each quantized layer's input codes, in order:
    ``(fake-quant codes, integer-model codes, (fake-quant output, integer output))``."""
    fq_codes, int_codes = [], []
    hooks = [m.input_fq.register_forward_hook(lambda mod, i, out: fq_codes.append(
        quantize(out, *mod.qparams(), mod.quant_min, mod.quant_max).long()))
        for m in q.modules() if hasattr(m, "input_fq")]
    hooks += [m.register_forward_hook(lambda mod, i, out: int_codes.append(i[0].long()))
              for m in int_model.modules() if isinstance(m, (IntLinear, IntConv2d))]
    try:
        with torch.no_grad():
            outputs = q(x), int_model(x)
    finally:
        for h in hooks:
            h.remove()
    return fq_codes, int_codes, outputs


def test_intermediate_codes_agree():
    """Each layer's input codes: equal almost everywhere, never more than one apart at 8 bits."""
    g = gen(5)
    model = zoo_model("cnn8", g)
    q = quantize_static(model, randn(g, 64, 1, 8, 8))
    fq_codes, int_codes, _ = layer_input_codes(q, convert_to_integer(q), randn(g, 32, 1, 8, 8))
    assert len(fq_codes) == len(int_codes) == 4
    assert torch.equal(fq_codes[0], int_codes[0])  # the model input: the same quantize
    for a, b in zip(fq_codes, int_codes):
        assert (a - b).abs().max() <= 1 and (a == b).float().mean() > 0.98


def test_pretrained_cnn8_predictions_agree(digits8):
    from qlib.models import pretrained, weights_path
    if not weights_path("cnn8", 0).exists():
        pytest.skip("no shipped cnn8 weights")
    model = pretrained("cnn8")
    q = quantize_static(model, digits8.train.tensors[0][:256])
    x = digits8.test.tensors[0]
    int_model = assert_integer_matches(q, x, model)
    with torch.no_grad():
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
    g = gen(6)
    torch.manual_seed(SEED)
    model = Functional().eval()
    q = quantize_static(model, [randn(g, 32, 1, 8, 8) for _ in range(2)])
    int_model = assert_integer_matches(q, randn(g, 32, 1, 8, 8), model)
    x = randn(g, 8, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(int_model(x), convert_to_integer(q, backend="reference")(x))


def test_residual_block_and_float_layers():
    g = gen(7)
    torch.manual_seed(SEED)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          BasicBlock(8, 8), BasicBlock(8, 16, stride=2),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))
    model = randomize_bn(model, g).eval()
    calib = randn(g, 32, 1, 8, 8)
    # the first and last layers kept in float, as in mixed-precision recipes
    q = quantize_static(model, calib, per_layer={"0": None, "7": None})
    int_model = assert_integer_matches(q, randn(g, 16, 1, 8, 8), model)
    assert isinstance(int_model.graph_module.get_submodule("7"), nn.Linear)


def test_errors():
    g = gen(9)
    model = create("cnn8", seed=SEED)
    with pytest.raises(ValueError, match="not frozen"):
        convert_to_integer(prepare(model))
    with pytest.raises(ValueError, match="no layers to quantize"):
        convert_to_integer(model)
    with pytest.raises(ValueError, match="dynamic"):
        convert_to_integer(quantize_dynamic(model))
    with pytest.raises(TypeError, match="nn.Module"):
        convert_to_integer("model")
    with pytest.raises(ValueError, match="backend"):
        convert_to_integer(quantize_static(model, randn(g, 8, 1, 8, 8)), backend="fast")
    tanh = quantize_static(nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2)), randn(g, 8, 4))
    int_model = convert_to_integer(tanh)
    assert isinstance(int_model, IntegerModel)
    with pytest.raises(NotImplementedError, match="Tanh"):
        int_model(randn(g, 2, 4))
    ceil = quantize_static(nn.Sequential(nn.Conv2d(1, 2, 3), nn.AvgPool2d(2, ceil_mode=True), nn.Flatten(),
                                         nn.Linear(8, 2)), randn(g, 8, 1, 5, 5))
    with pytest.raises(NotImplementedError, match="windows"):
        convert_to_integer(ceil)(randn(g, 2, 1, 5, 5))


# ------------------------------------------------------------------ ReLU6 and depthwise (MobileNet)
class MobileBlock(nn.Module):
    """Stem, depthwise 3x3 + BN + ReLU6 (module), max-pool, pointwise + F.relu6, mean, head."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.dw, self.bn1 = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8)
        self.act = nn.ReLU6()
        self.pw = nn.Conv2d(8, 16, 1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = F.relu6(self.bn0(self.stem(x)))
        x = F.max_pool2d(self.act(self.bn1(self.dw(x))), 2)  # the 6 stays pending through the max
        x = F.relu6(self.pw(x)).mean((2, 3))                   # ...and is applied before a mean
        return self.fc(x)


def mobile_block(g):
    """A ``MobileBlock`` whose BN gains are 4x larger, so that many activations pass 6."""
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=g)))
    model = randomize_bn(MobileBlock(), g).eval()
    with torch.no_grad():
        model.bn0.weight.mul_(4), model.bn1.weight.mul_(4)
    return model


def test_relu6_depthwise_model_matches_fake_quant():
    """Regression: ReLU6 (module and F.relu6) and depthwise convolutions used to raise
    NotImplementedError. After a ReLU6, min-max calibration gives the next layer the range
    [0, 6], where q(6) is quant_max and the clamp hides in the range's own; so the layers after
    a ReLU6 get the range [0, 10] here (as learned ranges or a shared range can give), q(6) = 153.
    Layer inputs: the model's input identical; the stem's output (one requantization of the
    same codes, then the clamp) never more than one code apart; the next, after a depthwise
    layer, at most two (a flipped input code moves a depthwise output by up to |w| codes);
    equal almost everywhere, and many codes at q(6), none above."""
    g = gen(14)
    model = mobile_block(g)
    q = quantize_static(model, [randn(g, 32, 1, 8, 8) for _ in range(2)])
    for name in ("dw", "pw", "fc"):
        q.get_submodule(name).input_fq.frozen_scale.fill_(10 / 255)
        q.get_submodule(name).input_fq.frozen_zero_point.fill_(0)
    int_model = convert_to_integer(q)
    tops = [int(activation_code(6.0, m.input_scale, m.input_zero_point, m.input_quant_min, m.input_quant_max))
            for m in int_model.modules() if isinstance(m, (IntLinear, IntConv2d))]
    fq_codes, int_codes, (out_fq, out_int) = layer_input_codes(q, int_model, randn(g, 32, 1, 8, 8))
    assert len(fq_codes) == len(int_codes) == 4 and tops[1:] == [153, 153, 153]
    assert torch.equal(fq_codes[0], int_codes[0])
    for i, max_diff in ((1, 1), (2, 2), (3, 2)):
        a, b = fq_codes[i], int_codes[i]
        assert (a - b).abs().max() <= max_diff and (a == b).float().mean() > 0.99, i
        assert b.max() <= tops[i]
    assert (int_codes[1] == 153).float().mean() > 0.002 and (int_codes[2] == 153).float().mean() > 0.01
    assert (out_fq.argmax(1) == out_int.argmax(1)).float().mean() >= 0.9


def test_pretrained_dsc16_on_the_test_digits(digits16):
    """The MobileNet-style zoo model end to end on the 360 test digits, W8A8: within the bounds
    the other zoo models meet (outputs within MAX_STEPS, argmax agreement >= 99% and accuracy
    within 0.6 points of the fake-quant model, as benchmarks/ptq.py's integer_path requires)."""
    from qlib.models import pretrained
    model = pretrained("dsc16")
    q = quantize_static(model, digits16.train.tensors[0][:256])
    x, y = digits16.test.tensors
    int_model = convert_to_integer(q)
    assert sum(isinstance(m, IntConv2d) and m.groups > 1 for m in int_model.modules()) == 4
    with torch.no_grad():
        out_int, out_fq, out_fp = int_model(x), q(x), model(x)
    step = (out_fq.max() - out_fq.min()) / 255  # as assert_integer_matches measures
    diff, quant_error = (out_int - out_fq).abs() / step, ((out_fp - out_fq).abs() / step).mean()
    assert diff.max() <= MAX_STEPS[8] and diff.mean() <= MEAN_RATIO[8] * quant_error
    agreement = (out_int.argmax(1) == out_fq.argmax(1)).float().mean()
    acc_int, acc_fq = (100 * (o.argmax(1) == y).float().mean() for o in (out_int, out_fq))
    assert agreement >= 0.99 and abs(acc_int - acc_fq) <= 0.6, (agreement, acc_int, acc_fq)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_relu6_depthwise_model_on_cuda_equals_the_cpu():
    g = gen(15)
    q = quantize_static(mobile_block(g), randn(g, 32, 1, 8, 8))
    x = randn(g, 16, 1, 8, 8)
    cpu = convert_to_integer(q)
    with torch.no_grad():
        want, got = cpu(x), convert_to_integer(q).cuda()(x.cuda())
    assert got.device.type == "cuda" and torch.equal(got.cpu(), want)


def test_accumulator_names_are_still_importable_from_intmodel():
    """The Accumulator and its rules moved to qlib.accumulator; qlib.intmodel re-exports each of
    them (the same objects), and ``qlib.accumulator`` is one of qlib's lazily loaded submodules."""
    import qlib
    from qlib import accumulator, intmodel
    names = ["Accumulator", "activation_code", "to_codes", "_MODULE_RULES", "_FUNCTION_RULES", "_METHOD_RULES",
             "_add", "_adaptive_avg_pool", "_avg_pool", "_common_scale", "_mean", "_monotone", "_per_channel",
             "_pooled", "_relu", "_relu6", "_reshape"]
    assert [n for n in names if getattr(intmodel, n, None) is not getattr(accumulator, n)] == []
    assert {"Accumulator", "activation_code", "to_codes"} <= set(intmodel.__all__)
    assert "accumulator" in qlib.__all__ and qlib.accumulator is accumulator
