"""qlib.llm.int8_mixed: LLM.int8() mixed-precision decomposition (Dettmers et al. 2022).

Reference: the decomposition written out in the test: outlier columns (``max|X_j| >= 6``) in
float, the rest as an int64 matmul of vector-wise int8 codes times the outer product of scales.
"""

from __future__ import annotations

import torch
from torch import nn

from qlib.llm import int8_mixed, w8a8


def test_matches_written_decomposition():
    g = torch.Generator().manual_seed(torch.randint(2**31, (1,)).item() % 2**31)
    lin = nn.Linear(48, 20)
    x = torch.randn(40, 48, generator=g)
    x[:, [3, 30]] *= 25                                  # two outlier features
    layer = int8_mixed.Int8MixedLinear(lin, threshold=6.0)
    out = x.abs().amax(0) >= 6.0
    assert out[3] and out[30]
    w = lin.weight.detach()
    sw = w.abs().amax(1, keepdim=True) / 127.5
    wq = torch.clamp(torch.round(w * (1 / sw)), -128, 127).long()
    xr = x.masked_fill(out, 0)
    sx = xr.abs().amax(1, keepdim=True) / 127.5
    xq = torch.clamp(torch.round(xr * (1 / sx)), -128, 127).long()
    ref = (xq @ (wq.masked_fill(out, 0)).T).float() * sx * sw.T + x[:, out] @ w[:, out].T + lin.bias
    torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-5)
    assert abs(layer.outlier_fraction - out.sum().item() / 48) < 1e-9


def test_no_outliers_is_per_token_w8a8_and_beats_it_with_outliers():
    g = torch.Generator().manual_seed(torch.randint(2**31, (1,)).item() % 2**31)
    lin = nn.Linear(32, 16)
    x = torch.randn(10, 3, 32, generator=g)
    torch.testing.assert_close(int8_mixed.Int8MixedLinear(lin, 1e9)(x), w8a8.W8A8Linear(lin, "token", "channel")(x))
    x[..., 7] *= 80
    ref = lin(x)
    err_mixed = (int8_mixed.Int8MixedLinear(lin)(x) - ref).abs().mean()
    err_w8a8 = (w8a8.W8A8Linear(lin, "token", "channel")(x) - ref).abs().mean()
    assert err_mixed < err_w8a8
