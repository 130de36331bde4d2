"""qlib.llm.w8a8: per-tensor and per-token / per-channel int8 weights and activations.

Reference: ``torch.fake_quantize_per_tensor_affine`` / ``torch.fake_quantize_per_channel_affine``
with scales ``absmax / 127.5`` (PyTorch's symmetric qint8 convention), and the integer matmul
``(X_q @ W_q^T) * s_x * s_w`` summed exactly in int64.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qlib.llm import model as charlm, w8a8


def _gen():
    return torch.Generator().manual_seed(torch.seed() % 2**31)


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
