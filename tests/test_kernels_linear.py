"""qlib.kernels.linear: ``Int8Linear`` (per-channel int8 weights, per-token int8 activations).

References: ``nn.Linear`` in float64 with the layer's own dequantized weights and
dequantized activations (what W8A8 computes, to the output dtype's rounding), and the float
layer itself within the quantization error bound; the PyTorch backend and the Triton
backend (interpreter) give the same bits.
"""

import pytest
import torch
from torch import nn

from qlib.kernels import Int8Linear, kernel_device, load_triton, quantize_per_token_reference
from qlib.qparams import choose_qparams_symmetric_qmax


def layer(seed=0, in_features=48, out_features=20, bias=True):
    torch.manual_seed(seed)  # nn.Linear's own initialisation; the test seeds it explicitly
    return nn.Linear(in_features, out_features, bias=bias)


def test_weights_are_per_channel_symmetric_int8():
    lin = layer()
    q = Int8Linear.from_float(lin)
    w = lin.weight.detach()
    want_scale, _ = choose_qparams_symmetric_qmax(w.amin(1), w.amax(1), 127)
    assert q.weight_q.dtype == torch.int8 and q.weight_q.shape == (20, 48)
    assert torch.equal(q.weight_scale, want_scale)
    assert (q.quant_min, q.quant_max) == (-127, 127) and not q.zero_point.any()
    assert (q.dequantized_weight() - w).abs().le(q.weight_scale[:, None] / 2 + 1e-7).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_is_the_w8a8_product(dtype, bias):
    lin = layer(bias=bias)
    q = Int8Linear.from_float(lin)
    x = torch.randn(3, 7, 48, generator=torch.Generator().manual_seed(1)).to(dtype)
    y = q(x)
    assert y.shape == (3, 7, 20) and y.dtype == dtype
    x_q, x_scale = quantize_per_token_reference(x.reshape(-1, 48))
    exact = (x_q.double() * x_scale.double()[:, None]) @ q.dequantized_weight().double().t()
    if bias:
        exact = exact + lin.bias.double()
    tol = torch.finfo(dtype).eps * exact.abs() + 1e-5 * (exact.abs().max() + 1)
    assert ((y.reshape(-1, 20).double() - exact).abs() <= tol).all()
    # and close to the float layer: both roundings are at most half a step per element
    err = (y.float() - lin(x.float())).abs().max().item()
    assert err < 0.05


def test_triton_backend_gives_the_same_bits_as_the_pytorch_one():
    load_triton()
    device = kernel_device()
    lin = layer(2).to(device)
    x = torch.randn(10, 48, generator=torch.Generator().manual_seed(3)).to(device)
    y_triton = Int8Linear.from_float(lin, backend="triton")(x)
    y_torch = Int8Linear.from_float(lin, backend="int32" if device.type == "cpu" else "float64")(x)
    assert torch.equal(y_triton, y_torch)


def test_bad_input_is_rejected():
    q = Int8Linear.from_float(layer())
    with pytest.raises(TypeError, match="nn.Linear"):
        Int8Linear.from_float(nn.Conv2d(1, 1, 1))
    with pytest.raises(ValueError, match=r"\(\.\.\., 48\)"):
        q(torch.randn(2, 47))
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        q(torch.randn(2, 48).double())
    bad = layer()
    with torch.no_grad():
        bad.weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN or infinite"):
        Int8Linear.from_float(bad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_moves_to_cuda_and_runs_there():
    lin = layer().cuda()
    q = Int8Linear.from_float(lin)
    x = torch.randn(33, 48, device="cuda", dtype=torch.bfloat16)
    y = q(x)
    assert y.device.type == "cuda" and y.dtype == torch.bfloat16
    assert (y.float() - lin(x.float())).abs().max().item() < 0.05
