"""qlib.llm.w8a8: per-tensor and per-token / per-channel int8 weights and activations.

Reference: ``torch.fake_quantize_per_tensor_affine`` / ``torch.fake_quantize_per_channel_affine``
with scales ``absmax / 127.5`` (PyTorch's symmetric qint8 convention), and the integer matmul
``(X_q @ W_q^T) * s_x * s_w`` summed exactly in int64. Static activation scales: the
calibration absmax / 127 computed in the test, codes ``[-127, 127]``
(``torch.fake_quantize_per_tensor_affine(x, s, 0, -127, 127)``); beyond the range, clipped.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qlib.llm import layers, model as charlm, w8a8


def _gen():
    return torch.Generator().manual_seed(torch.randint(2**31, (1,)).item() % 2**31)


def test_per_tensor_matches_torch():
    x = torch.randn(20, 16, generator=_gen()) * 3
    s = float(x.abs().max()) / 127.5
    assert torch.equal(w8a8.fake_quantize_int8(x, "tensor"), torch.fake_quantize_per_tensor_affine(x, s, 0, -128, 127))


def test_per_token_matches_torch_per_channel():
    x = torch.randn(20, 16, generator=_gen())
    s = x.abs().amax(1) / 127.5
    ref = torch.fake_quantize_per_channel_affine(x, s, torch.zeros(20, dtype=torch.int32), 0, -128, 127)
    assert torch.equal(w8a8.fake_quantize_int8(x, "token"), ref)


def test_linear_is_the_integer_matmul():
    g = _gen()
    lin = nn.Linear(64, 24)
    x = torch.randn(30, 64, generator=g)
    q = w8a8.W8A8Linear(lin, act="token", weight="channel")
    sx = x.abs().amax(1, keepdim=True) / 127.5
    sw = lin.weight.abs().amax(1, keepdim=True) / 127.5
    xq = torch.clamp(torch.round(x * (1 / sx)), -128, 127).long()
    wq = torch.clamp(torch.round(lin.weight.detach() * (1 / sw)), -128, 127).long()
    ref = (xq @ wq.T).float() * sx * sw.T + lin.bias
    torch.testing.assert_close(q(x), ref, rtol=1e-5, atol=1e-5)


def test_outlier_channel_hurts_per_tensor_more():
    g = _gen()
    x = torch.randn(64, 32, generator=g)
    x[:, 5] *= 60                                       # one outlier feature dimension
    err = lambda k: ((w8a8.fake_quantize_int8(x, k) - x)[:, torch.arange(32) != 5] ** 2).mean()  # noqa: E731
    assert err("token") <= err("tensor")


def test_quantize_model_and_errors():
    m = charlm.create(0, charlm.CharLMConfig(width=32, layers=1, heads=2, context=8))
    q = w8a8.quantize_model(m, "tensor", "tensor")
    assert isinstance(q.blocks[0].fc1, w8a8.W8A8Linear) and isinstance(m.blocks[0].fc1, nn.Linear)
    with pytest.raises(ValueError, match="activation granularity"):
        w8a8.quantize_model(m, act="channel")


def test_static_scale_is_the_calibration_absmax_over_127():
    g = _gen()
    calib = torch.randn(50, 16, generator=g) * 2
    s = w8a8.static_scale(calib)
    assert s.dtype == torch.float32 and s.shape == () and torch.equal(s, calib.abs().max() / 127)
    x = torch.randn(30, 16, generator=g)
    ref = torch.fake_quantize_per_tensor_affine(x, s.item(), 0, -127, 127)
    assert torch.equal(w8a8.fake_quantize_static(x, s), ref)


def test_static_clips_beyond_the_calibrated_range():
    calib = torch.randn(40, 8, generator=_gen())
    s = w8a8.static_scale(calib)
    top = calib.abs().max()
    x = torch.stack([top * 3, -top * 3, top * 0.4]).reshape(1, 3)
    y = w8a8.fake_quantize_static(x, s)
    torch.testing.assert_close(y[0, :2], torch.stack([127 * s, -127 * s]))   # clipped, not rescaled
    assert (y[0, 2] - x[0, 2]).abs() <= s / 2 * (1 + 1e-5)
    # the dynamic per-tensor scale instead grows with the input: within one of its steps
    assert (w8a8.fake_quantize_int8(x, "tensor")[0, 0] - x[0, 0]).abs() <= x.abs().max() / 127.5


def test_static_model_uses_each_layers_calibrated_scale():
    m = charlm.create(0, charlm.CharLMConfig(width=32, layers=1, heads=2, context=8)).eval()
    tokens = torch.randint(0, 256, (4, 8), generator=_gen())
    q = w8a8.quantize_model(m, "static", "tensor", tokens=tokens)
    x = layers.capture_inputs(m, tokens, ["blocks.0.fc2"])["blocks.0.fc2"]
    assert torch.equal(q.blocks[0].fc2.act_scale, x.abs().max() / 127)
    assert q(tokens).shape == (4, 8, 256)
    with pytest.raises(ValueError, match="calibration tokens"):
        w8a8.quantize_model(m, "static")
    with pytest.raises(ValueError, match="act_scale"):
        w8a8.W8A8Linear(nn.Linear(4, 4), act="static")
    with pytest.raises(ValueError, match="empty"):
        w8a8.static_scale(torch.zeros(0, 4))
