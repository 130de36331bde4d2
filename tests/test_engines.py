"""Tests for qlib.engines (PyTorch's x86 int8 engine as the production reference).

Reference: torch.ao.quantization FX graph mode (prepare_fx / convert_fx with the default
x86 qconfig mapping) and the fp32 model; qlib's own W8A8 static PTQ for comparison.
"""

import warnings

import pytest
import torch
from torch import nn

from qlib.engines import compare_latency, model_latency, torch_x86_quantize
from qlib.models import create
from qlib.ptq import quantize_static

pytestmark = pytest.mark.skipif("x86" not in torch.backends.quantized.supported_engines,
                                reason="no x86 quantized engine in this PyTorch build")


def rel_error(y, ref):
    return ((y - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()).item()


def trained_like(name):
    model = create(name, seed=None).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_var.uniform_(0.5, 2.0)
    return model


def test_x86_int8_close_to_fp32_and_to_qlib():
    model = trained_like("cnn8")
    calib = [torch.randn(32, 1, 8, 8) for _ in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch.ao's deprecation noise must not leak out
        q = torch_x86_quantize(model, calib)
    x = torch.randn(64, 1, 8, 8)
    ref = model(x)
    out = q(x)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert rel_error(out, ref) < 0.1  # 7-bit activations (reduce_range) and histogram observer
    assert rel_error(quantize_static(model, calib)(x), ref) < 0.1
    assert any(type(m).__module__.startswith("torch.ao.nn.intrinsic.quantized") for m in q.modules())  # fused conv-relu


def test_x86_errors():
    model = create("mlp", seed=None)
    with pytest.raises(ValueError, match="empty"):
        torch_x86_quantize(model, [])
    with pytest.raises(RuntimeError, match="not available"):
        torch_x86_quantize(model, torch.randn(4, 1, 8, 8), engine="nope")
    with pytest.raises(TypeError, match="nn.Module"):
        torch_x86_quantize("model", torch.randn(4, 1, 8, 8))


def test_latency_side_by_side():
    model = trained_like("mlp")
    x = torch.randn(64, 1, 8, 8)
    q = torch_x86_quantize(model, x)
    times = compare_latency({"fp32": model, "int8": q}, x, repeats=5, warmup=1)
    assert set(times) == {"fp32", "int8"} and all(t > 0 for t in times.values())
    assert model_latency(model, x, repeats=3) > 0
    with pytest.raises(ValueError, match="repeats"):
        model_latency(model, x, repeats=0)


def test_compare_latency_sees_ten_times_the_work():
    """Reference: a chain of ten equal linear layers does ten times the multiply-adds of one."""
    torch.manual_seed(0)
    one = nn.Linear(256, 256)
    ten = nn.Sequential(*[nn.Linear(256, 256) for _ in range(10)])
    x = torch.randn(64, 256)
    times = compare_latency({"one": one, "ten": ten}, x, repeats=9, warmup=2)
    assert times["ten"] > 3 * times["one"]
    assert model_latency(ten, x, repeats=5) > 3 * model_latency(one, x, repeats=5)
    with pytest.raises(TypeError, match="tensor"):
        compare_latency({"one": one}, [x])
    with pytest.raises(TypeError, match="dict"):
        compare_latency([one], x)


def test_x86_quantize_accepts_every_data_form_and_float64_models():
    """Before: a TensorDataset was iterated sample by sample, and a float64 model crashed
    inside torch.ao; now every form goes through qlib.batching and the copy is float32."""
    model = trained_like("mlp")
    x = torch.randn(32, 1, 8, 8)
    ds = torch.utils.data.TensorDataset(x, torch.zeros(32, dtype=torch.long))
    ref = torch_x86_quantize(model, x)(x)
    torch.testing.assert_close(torch_x86_quantize(model, ds)(x), ref)
    torch.testing.assert_close(torch_x86_quantize(model.double(), x)(x), ref)
    assert next(model.parameters()).dtype == torch.float64  # the original is untouched
    with pytest.raises(ValueError, match="NaN"):
        torch_x86_quantize(model, torch.full((4, 1, 8, 8), float("nan")))
