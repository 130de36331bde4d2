"""Tests of qlib.export. References: qlib's integer model (qlib.intmodel.convert_to_integer) for
the QDQ graph run by ONNX Runtime (>= 99.9% equal predictions at W8A8, logits within one 8-bit
step of their range), PyTorch's float model for the float export, and the ONNX QDQ operator
definitions (QuantizeLinear / DequantizeLinear, opset 17). LiteRT (qlib.litert, re-exported by
qlib.export) has its own tests: tests/test_litert.py."""

import os

import pytest
import torch
from torch import nn

from qlib import convert_to_integer, data, models, ptq
from qlib.export import ort_predict, ort_quantize_static, ort_session, qdq_nodes, to_onnx
from qlib.mixed import to_per_layer
from qlib.modules import QuantConfig, QuantConv2d, QuantLinear, quant_layers


@pytest.fixture(scope="module")
def digits16():
    return data.load_digits(16)


@pytest.mark.parametrize("name", ["cnn16", "res16", "dsc16"])  # dsc16: depthwise convs, ReLU6 (Clip)
def test_onnx_runtime_agrees_with_qlib_integer_model_w8a8(name, digits16, tmp_path):
    model = models.pretrained(name, 0)
    calib = data.calibration_batches(digits16.train, 256, seed=0)
    q = ptq.quantize_static(model, calib)
    x = digits16.test.tensors[0]
    path = tmp_path / "m.onnx"
    to_onnx(q, x[:2], path)
    got = ort_predict(ort_session(path), digits16.test)
    ref = convert_to_integer(q)(x)
    agree = (got.argmax(1) == ref.argmax(1)).float().mean().item()
    assert agree >= 0.999, agree
    step = float(ref.max() - ref.min()) / 255  # one step of an 8-bit quantizer of the logits
    assert (got - ref).abs().max().item() <= step
    layers = len(quant_layers(model))
    kinds = [k for k, _ in qdq_nodes(path)]
    assert kinds.count("QuantizeLinear") == layers  # one per layer input
    no_bias = sum(m.bias is None for m in q.modules() if isinstance(m, (QuantConv2d, QuantLinear)))
    assert kinds.count("DequantizeLinear") == 3 * layers - no_bias  # input, weight and bias of each layer


@pytest.mark.parametrize("name", ["res16", "dsc16"])
def test_float_export_matches_pytorch(name, digits16):
    model = models.pretrained(name, 1)
    x = digits16.test.tensors[0][:64]
    got = ort_predict(ort_session(to_onnx(model, x[:2])), x)
    with torch.no_grad():
        ref = model(x)
    assert torch.allclose(got, ref, atol=1e-4, rtol=1e-4)
    assert qdq_nodes(to_onnx(model, x[:2])) == []


def test_mixed_precision_and_float_layers_export(digits16):
    """W4 weights / A6 activations on some layers, one layer kept in float: still the integer model's numbers."""
    model = models.pretrained("cnn16", 2)
    calib = data.calibration_batches(digits16.train, 128, seed=1)
    per_layer = to_per_layer({"0": 8, "3": 4, "7": 3}, act_bits={"7": 6})
    per_layer["12"] = None
    q = ptq.quantize_static(model, calib, per_layer=per_layer)
    x = digits16.test.tensors[0][:128]
    proto = to_onnx(q, x[:2])
    got = ort_predict(ort_session(proto), x)
    ref = convert_to_integer(q)(x)
    assert (got.argmax(1) == ref.argmax(1)).float().mean().item() >= 0.99
    assert any(n.op_type == "Clip" for n in proto.graph.node)  # 6-bit codes clamped to 0..63
    codes = [init for init in proto.graph.initializer if init.data_type == 3]  # INT8 weight codes
    from onnx import numpy_helper
    spans = sorted(int(numpy_helper.to_array(c).max()) - int(numpy_helper.to_array(c).min()) for c in codes)
    assert spans[0] <= 7  # a 3-bit layer: codes within [-4, 3]


def test_relu6_is_a_clip_to_0_6_in_float_and_qdq_graphs():
    """Regression (issue 11): ReLU6 (module and F.relu6) had no ONNX rule. It is ``Clip(x, 0, 6)``:
    in float, equal to PyTorch; in the QDQ graph, before the next layer's QuantizeLinear, equal to
    qlib's integer model (which clamps the requantized codes at q(6)) on inputs that pass 6."""
    import torch.nn.functional as F
    from onnx import numpy_helper

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.act = nn.Conv2d(2, 4, 3, padding=1), nn.ReLU6()
            self.dw, self.fc = nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.Linear(4 * 5 * 5, 3)

        def forward(self, x):
            return self.fc(torch.flatten(F.relu6(self.dw(self.act(self.conv(x)))), 1))
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(64, 2, 5, 5, generator=g) * 8
    with torch.no_grad():
        model.conv.weight.mul_(4), model.dw.weight.mul_(4)
        assert (model.conv(x) > 6).float().mean() > 0.1  # both clamps bite: outputs past 6...
        assert (model.dw(model.act(model.conv(x))) > 6).float().mean() > 0.1
        want = model(x)
    proto = to_onnx(model, x[:2])
    clips = [n for n in proto.graph.node if n.op_type == "Clip"]
    assert len(clips) == 2  # the module and the function
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    assert all((inits[c.input[1]].shape, inits[c.input[2]].shape) == ((), ()) for c in clips)  # scalars (ONNX spec)
    assert all((float(inits[c.input[1]]), float(inits[c.input[2]])) == (0.0, 6.0) for c in clips)
    assert torch.allclose(ort_predict(ort_session(proto), x), want, atol=1e-4, rtol=1e-4)
    q = ptq.quantize_static(model, x[:32])
    got = ort_predict(ort_session(to_onnx(q, x[:2])), x)
    ref = convert_to_integer(q)(x)
    step = float(ref.max() - ref.min()) / 255
    assert (got - ref).abs().max().item() <= step


def test_clip_keeps_low_bit_codes_in_range():
    """A single QuantLinear at A4: ORT's uint8 QuantizeLinear would saturate at 255; the Clip stops it at 15."""
    torch.manual_seed(0)
    lin = nn.Sequential(nn.Linear(4, 3))
    cfg = QuantConfig(act_bits=4)
    q = ptq.quantize_static(lin, torch.rand(16, 4), cfg)
    x = torch.rand(8, 4) * 3  # three times past the calibrated range: the codes saturate
    got = ort_predict(ort_session(to_onnx(q, x[:2])), x)
    ref = convert_to_integer(q)(x)  # int32 bias, as in the graph
    assert torch.allclose(got, ref, atol=1e-5)
    s, z = q[0].input_fq.qparams()
    assert ((x / s).round() + z > 15).any()  # the inputs did leave the 4-bit range


def test_ort_own_quantizer_runs(digits16, tmp_path):
    model = models.pretrained("cnn16", 0)
    calib = data.calibration_batches(digits16.train, 128, seed=0)
    x = digits16.test.tensors[0]
    to_onnx(model, x[:2], tmp_path / "fp.onnx")
    out = ort_quantize_static(tmp_path / "fp.onnx", tmp_path / "q.onnx", calib)
    logits = ort_predict(ort_session(out), digits16.test)
    acc = (logits.argmax(1) == digits16.test.tensors[1]).float().mean().item()
    assert acc > 0.9
    assert qdq_nodes(out)
    assert os.path.getsize(out) < 0.5 * os.path.getsize(tmp_path / "fp.onnx")


def test_unsupported_and_bad_inputs():
    class Weird(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return torch.sigmoid(self.fc(x))
    with pytest.raises(NotImplementedError, match="no ONNX rule"):
        to_onnx(Weird(), torch.zeros(2, 4))
    with pytest.raises(TypeError, match="nn.Module"):
        to_onnx("model", torch.zeros(2, 4))
    with pytest.raises(TypeError, match="input batch"):
        to_onnx(nn.Linear(4, 2), torch.zeros(4))
    with pytest.raises(ValueError, match="empty"):
        ort_predict(ort_session(to_onnx(nn.Sequential(nn.Linear(4, 2)), torch.zeros(2, 4))), [])


def test_litert_names_are_still_importable_from_export():
    """LiteRT moved to qlib.litert; qlib.export re-exports its three names (lesson 13 and
    benchmarks/mixed.py call ``export.to_litert``), and ``qlib.litert`` loads lazily like the rest."""
    import qlib
    from qlib import export, litert
    for name in ("litert_available", "to_litert", "litert_predict"):
        assert getattr(export, name) is getattr(litert, name) and name in export.__all__, name
    assert "litert" in qlib.__all__ and qlib.litert is litert
