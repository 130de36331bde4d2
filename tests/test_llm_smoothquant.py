"""qlib.llm.smoothquant: SmoothQuant (Xiao et al. 2023).

Reference: the scale formula ``s_j = max|X_j|^alpha / max|W_j|^(1-alpha)`` evaluated in the
test; the smoothed model must compute the same function in float (the identity
``X W^T = (X/s)(W s)^T``), and flatten the activations it quantizes.
"""

from __future__ import annotations

import pytest
import torch

from qlib.llm import layers, model as charlm, smoothquant, stats

SMALL = charlm.CharLMConfig(width=32, layers=2, heads=4, context=16)


def test_scale_formula():
    a, w = torch.rand(10) * 5 + 0.1, torch.rand(10) + 0.1
    torch.testing.assert_close(smoothquant.smoothing_scales(a, w, 0.7), a ** 0.7 / w ** 0.3)
    with pytest.raises(ValueError, match="alpha"):
        smoothquant.smoothing_scales(a, w, 1.5)


def test_smoothing_keeps_the_function_and_flattens_activations():
    m = charlm.create(0, SMALL).eval()
    with torch.no_grad():
        m.blocks[0].ln1.weight[5] = 40.0                 # plant an outlier channel
    tokens = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(torch.randint(2**31, (1,)).item() % 2**31))
    scales = smoothquant.act_scales(m, tokens)
    sm = smoothquant.smooth_model(m, scales, alpha=0.5)
    torch.testing.assert_close(sm(tokens), m(tokens), rtol=1e-4, atol=1e-4)
    before = stats.outlier_ratio(scales["blocks.0.attn.q"])
    after = stats.outlier_ratio(stats.channel_absmax(layers.capture_inputs(sm, tokens, ["blocks.0.attn.q"])["blocks.0.attn.q"]))
    assert after < before


def test_quantized_model_runs():
    m = charlm.create(0, SMALL).eval()
    tokens = torch.randint(0, 256, (2, 16))
    q = smoothquant.quantize_model(m, tokens, alpha=0.5)
    assert q(tokens).shape == (2, 16, 256)


def test_levels_and_static_scales_of_the_smoothed_model():
    m = charlm.create(0, SMALL).eval()
    with torch.no_grad():
        m.blocks[0].ln1.weight[5] = 40.0
    tokens = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(torch.randint(2**31, (1,)).item() % 2**31))
    o3 = smoothquant.quantize_model(m, tokens, 0.5, level="O3")
    layer = o3.blocks[0].attn.q
    assert layer.act == "static" and layer.weight_granularity == "tensor"
    sm = smoothquant.smooth_model(m, smoothquant.act_scales(m, tokens), 0.5)  # calibrated after smoothing
    x_sm = layers.capture_inputs(sm, tokens, ["blocks.0.attn.q"])["blocks.0.attn.q"]
    assert torch.equal(layer.act_scale, x_sm.abs().max() / 127)
    o1 = smoothquant.quantize_model(m, tokens, 0.5, level="O1").blocks[0].fc1
    assert (o1.act, o1.weight_granularity, o1.act_scale) == ("token", "tensor", None)
    with pytest.raises(ValueError, match="level"):
        smoothquant.quantize_model(m, tokens, level="O4")
