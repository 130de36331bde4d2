"""qlib.llm.evaluate: perplexity and next-byte accuracy.

Reference: the same quantities computed directly from ``log_softmax`` of the logits, window
by window; a model that predicts uniformly has perplexity 256.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from qlib.llm import evaluate, model as charlm

SMALL = charlm.CharLMConfig(width=32, layers=1, heads=2, context=8)


class Uniform(nn.Module):
    cfg = SMALL

    def forward(self, t):
        return torch.zeros(*t.shape, 256)


def test_uniform_model_has_perplexity_256():
    data = torch.randint(0, 256, (100,))
    r = evaluate.evaluate(Uniform(), data)
    assert r["ppl"] == pytest.approx(256.0) and r["tokens"] == 12 * 8


def test_matches_direct_log_softmax():
    m = charlm.create(2, SMALL).eval()
    data = torch.randint(0, 256, (200,), generator=torch.Generator().manual_seed(torch.randint(2**31, (1,)).item() % 2**31))
    w = data.unfold(0, 9, 8)
    logp = m(w[:, :-1]).log_softmax(-1)
    nll = -logp.gather(-1, w[:, 1:, None]).mean().item()
    acc = 100 * (logp.argmax(-1) == w[:, 1:]).float().mean().item()
    r = evaluate.evaluate(m, data, batch_size=5)
    assert r["nll"] == pytest.approx(nll, rel=1e-5) and r["ppl"] == pytest.approx(math.exp(nll), rel=1e-5)
    assert r["acc"] == pytest.approx(acc)


def test_over_seeds_and_errors():
    assert evaluate.over_seeds([3.0, 4.0, 5.0]) == {"mean": 4.0, "min": 3.0, "max": 5.0, "n": 3}
    assert evaluate.relative_change(10.2, 10.0) == pytest.approx(0.02)
    with pytest.raises(TypeError, match="int64"):
        evaluate.evaluate(Uniform(), torch.zeros(50))
