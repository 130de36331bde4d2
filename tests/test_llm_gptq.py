"""qlib.llm.gptq: GPTQ (Frantar et al. 2022).

Reference: ``gptq_reference``, the unblocked algorithm with the explicit Optimal Brain Surgeon
update and inverse-Hessian downdate (no Cholesky trick, no lazy batches): the blocked
``gptq_quantize`` must give the same codes (float64, fresh matrices). And the purpose: the
layer's output error ``||XW^T - XQ^T||`` below round-to-nearest on fresh correlated inputs.
"""

from __future__ import annotations

import pytest
import torch

from qlib.llm import gptq, model as charlm, weight_only as wo


def _problem(out=32, n=128, dtype=torch.float64):
    g = torch.Generator().manual_seed(torch.randint(2**31, (1,)).item() % 2**31)
    w = torch.randn(out, n, generator=g, dtype=dtype)
    x = torch.randn(512, n, generator=g, dtype=dtype) @ (torch.randn(n, n, generator=g, dtype=dtype) * 0.3)
    x[:, 3] *= 10                                               # an outlier input channel
    return w, x


@pytest.mark.parametrize("group_size,act_order,blocksize", [(None, False, 128), (32, False, 128),
                                                            (32, True, 48), (64, True, 32)])
def test_blocked_equals_unblocked_reference(group_size, act_order, blocksize):
    w, x = _problem()
    h = gptq.hessian(x)
    a = gptq.gptq_quantize(w, h, 4, group_size, act_order=act_order, blocksize=blocksize)
    b = gptq.gptq_reference(w, h, 4, group_size, act_order=act_order)
    assert torch.equal(a.w_q, b.w_q) and torch.equal(a.g_idx, b.g_idx)
    torch.testing.assert_close(a.weight_dq, b.weight_dq, rtol=0, atol=1e-12)
    # the codes and qparams rebuild weight_dq (group of column j is g_idx[j])
    cols = torch.arange(w.shape[1])
    rebuilt = (a.w_q - a.zero_point[:, a.g_idx]) * a.scale[:, a.g_idx].double()
    torch.testing.assert_close(rebuilt[:, cols], a.weight_dq, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bits,symmetric", [(4, False), (3, False), (4, True)])
def test_output_error_below_round_to_nearest(bits, symmetric):
    w, x = _problem(dtype=torch.float32)
    res = gptq.gptq_quantize(w, gptq.hessian(x), bits, 32, symmetric, act_order=True)
    rtn = wo.fake_quantize_groups(w, bits, 32, symmetric)
    assert gptq.output_error(w, res.weight_dq, x) < gptq.output_error(w, rtn, x)


def test_hessian_and_errors():
    x = torch.randn(10, 4)
    torch.testing.assert_close(gptq.hessian(x), 2 * x.T @ x / 10)
    with pytest.raises(ValueError, match="H must be"):
        gptq.gptq_quantize(torch.randn(3, 4), torch.eye(5))
    with pytest.raises(ValueError, match="empty"):
        gptq.hessian(torch.zeros(0, 4))


def test_quantize_model_runs():
    m = charlm.create(0, charlm.CharLMConfig(width=32, layers=1, heads=2, context=8)).eval()
    tokens = torch.randint(0, 256, (4, 8))
    q = gptq.quantize_model(m, tokens, 4, 32)
    assert q(tokens).shape == (4, 8, 256)
    assert q.blocks[0].fc2.qinfo["method"] == "gptq"
