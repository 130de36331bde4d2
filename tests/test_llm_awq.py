"""qlib.llm.awq: AWQ (Lin et al. 2023).

Reference: the grid search written in the test (``s = mean|X|^alpha`` normalised, effective
weight ``Q(W s) / s``, output MSE over 20 values of alpha); alpha = 0 is round-to-nearest, so
AWQ's error on its calibration inputs is never above RTN's.
"""

from __future__ import annotations

import pytest
import torch

from qlib.llm import awq, model as charlm, weight_only as wo


def test_search_matches_a_written_grid_and_beats_rtn():
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    w = torch.randn(24, 128, generator=g)
    x = torch.randn(256, 128, generator=g)
    x[:, :4] *= 15                                               # salient input channels
    w_dq, alpha, losses = awq.awq_search(w, x, 4, 32)
    mean = x.abs().mean(0)
    ref = []
    for k in range(20):
        s = mean.pow(k / 20).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        ref.append(((x @ (wo.fake_quantize_groups(w * s, 4, 32) / s).T - x @ w.T) ** 2).mean().item())
    assert losses == pytest.approx(ref, rel=1e-5)
    assert alpha == pytest.approx(min(range(20), key=lambda k: ref[k]) / 20)
    rtn = ((x @ wo.fake_quantize_groups(w, 4, 32).T - x @ w.T) ** 2).mean().item()
    assert losses[0] == pytest.approx(rtn, rel=1e-5) and min(losses) < rtn


def test_quantize_model_and_errors():
    m = charlm.create(0, charlm.CharLMConfig(width=32, layers=1, heads=2, context=8)).eval()
    tokens = torch.randint(0, 256, (4, 8))
    q = awq.quantize_model(m, tokens, 4, 32)
    assert 0 <= q.blocks[0].fc1.qinfo["alpha"] < 1
    with pytest.raises(ValueError, match="alpha"):
        awq.awq_scales(torch.ones(3), 2.0)
