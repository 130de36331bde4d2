"""qlib.llm.awq: AWQ (Lin et al. 2023).

Reference: the grid search written in the test (``s = mean|X|^alpha`` normalised, effective
weight ``Q(W s) / s``, output MSE over 20 values of alpha); alpha = 0 is round-to-nearest, so
AWQ's error on its calibration inputs is never above RTN's. The clipping search
(mit-han-lab/llm-awq ``auto_clip_layer``: ratios ``1 - k/20``, k < 10, per output-channel group,
error of the group's partial output) is checked against a brute-force loop over rows, groups and
ratios written in the test.
"""

from __future__ import annotations

import pytest
import torch

from qlib.llm import awq, model as charlm, weight_only as wo


def test_search_matches_a_written_grid_and_beats_rtn():
    g = torch.Generator().manual_seed(torch.randint(2**31, (1,)).item() % 2**31)
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
    assert 0.5 < q.blocks[0].fc1.qinfo["clip_ratio"] <= 1 and q.blocks[0].attn.q.qinfo["clip_ratio"] is None
    assert awq.quantize_model(m, tokens, 4, 32, clip=False).blocks[0].fc1.qinfo["clip_ratio"] is None
    with pytest.raises(ValueError, match="alpha"):
        awq.awq_scales(torch.ones(3), 2.0)


def _brute_force_clip(w, x, bits, g, ratios):
    """Per (row, group), try every ratio written out: clamp, quantize the whole matrix, score."""
    out, groups = w.shape[0], w.shape[1] // g
    best_err = torch.full((out, groups), float("inf"))
    best_r = torch.zeros(out, groups)
    errs = torch.zeros(len(ratios), out, groups)
    for k, r in enumerate(ratios):
        w_c = w.clone()
        for o in range(out):
            for j in range(groups):
                m = w[o, j * g:(j + 1) * g].abs().max() * r
                w_c[o, j * g:(j + 1) * g] = w[o, j * g:(j + 1) * g].clamp(-m, m)
        w_q = wo.fake_quantize_groups(w_c, bits, g)
        for j in range(groups):
            sl = slice(j * g, (j + 1) * g)
            errs[k, :, j] = ((x[:, sl] @ w_q[:, sl].T - x[:, sl] @ w[:, sl].T) ** 2).mean(0)
        better = errs[k] < best_err
        best_err[better], best_r[better] = errs[k][better], r
    return best_r, errs


def test_clip_search_matches_a_brute_force_grid():
    g = torch.Generator().manual_seed(torch.randint(2**31, (1,)).item() % 2**31)
    w = torch.randn(12, 64, generator=g)
    w[:, ::9] *= 4                                               # a few large weights per group
    x = torch.randn(200, 64, generator=g)
    ratios = awq.clip_ratios()
    assert ratios == pytest.approx([1 - k / 20 for k in range(10)])   # llm-awq: n_grid 20, max_shrink 0.5
    w_clip, ratio, errors = awq.clip_search(w, x, 4, 16, n_tokens=None)
    ref_ratio, ref_errs = _brute_force_clip(w, x, 4, 16, ratios)
    torch.testing.assert_close(errors, ref_errs, rtol=1e-4, atol=1e-6)
    k = (torch.as_tensor(ratios)[:, None, None] - ratio).abs().argmin(0)     # index of the chosen ratio
    chosen = ref_errs.gather(0, k[None])[0]
    torch.testing.assert_close(chosen, ref_errs.min(0).values, rtol=1e-4, atol=1e-6)  # the grid's minimum
    assert (ratio < 1).any() and (ratio == ref_ratio).float().mean() > 0.9  # near-ties may differ in rounding
    m = (w.abs().reshape(12, 4, 16).amax(-1) * ratio).repeat_interleave(16, 1)
    assert torch.equal(w_clip, w.clamp(-m, m))
    # clipping never raises the layer's output error on the tokens it was chosen on
    err = lambda v: ((x @ wo.fake_quantize_groups(v, 4, 16).T - x @ w.T) ** 2).mean().item()  # noqa: E731
    assert err(w_clip) <= err(w) * (1 + 1e-5)


def test_awq_layer_with_clip_is_not_worse_than_without():
    g = torch.Generator().manual_seed(torch.randint(2**31, (1,)).item() % 2**31)
    w = torch.randn(32, 128, generator=g)
    x = torch.randn(300, 128, generator=g)
    x[:, :4] *= 10
    plain = awq.awq_layer(w, x, 4, 32, clip=False)
    clipped = awq.awq_layer(w, x, 4, 32, clip=True)
    assert plain["ratio"] is None and plain["mse"] == pytest.approx(min(plain["losses"]), rel=1e-4)
    assert clipped["alpha"] == plain["alpha"] and clipped["ratio"].shape == (32, 4)
    assert clipped["mse"] <= plain["mse"] * (1 + 1e-5)


def test_clip_errors():
    with pytest.raises(ValueError, match="ratios"):
        awq.clip_search(torch.randn(4, 8), torch.randn(5, 8), 4, 4, ratios=[1.5])
    with pytest.raises(ValueError, match="calibration inputs"):
        awq.clip_search(torch.randn(4, 8), torch.randn(5, 6), 4, 4)
    with pytest.raises(ValueError, match="group_size"):
        awq.clip_search(torch.randn(4, 8), torch.randn(5, 8), 4, 3)
