"""qlib.llm.stats and qlib.llm.layers: activation statistics and captured layer inputs.

Reference: plain ``abs().max`` over the other axis, and a forward hook written in the test
(the input of ``blocks.0.fc1`` is ``ln2`` of the residual stream after attention; the residual
stream after block ``i`` is the output of ``blocks[i]``). ``snapshot``'s LLM.int8() column count is
checked against ``outlier_channels`` summed over every block linear's captured input.
"""

from __future__ import annotations

import pytest
import torch

from qlib.llm import layers, model as charlm, stats

SMALL = charlm.CharLMConfig(width=32, layers=2, heads=4, context=16)


def test_channel_and_token_maxima():
    x = torch.randn(50, 8)
    x[:, 3] *= 20
    torch.testing.assert_close(stats.channel_absmax(x), torch.tensor([x[:, j].abs().max() for j in range(8)]))
    torch.testing.assert_close(stats.token_absmax(x), torch.tensor([x[t].abs().max() for t in range(50)]))
    assert 3 in stats.outlier_channels(x, threshold=float(x[:, 3].abs().max()) - 1e-3).tolist()
    assert stats.outlier_ratio(stats.channel_absmax(x)) > 5


def test_capture_inputs_match_a_hook():
    m = charlm.create(0, SMALL).eval()
    tokens = torch.randint(0, 256, (3, 16))
    seen = []
    h = m.blocks[0].fc1.register_forward_hook(lambda mod, a, o: seen.append(a[0]))
    m(tokens)
    h.remove()
    acts = layers.capture_inputs(m, tokens, ["blocks.0.fc1"], batch_size=2)
    torch.testing.assert_close(acts["blocks.0.fc1"], seen[0].reshape(-1, 32))
    assert len(layers.linear_layers(m)) == 2 * 6


def test_layer_report_and_errors():
    m = charlm.create(0, SMALL).eval()
    rows = stats.layer_report(layers.capture_inputs(m, torch.randint(0, 256, (2, 16))))
    assert {r["name"] for r in rows} == set(layers.linear_layers(m))
    with pytest.raises(ValueError, match="NaN"):
        stats.channel_absmax(torch.tensor([[float("nan")]]))
    with pytest.raises(TypeError, match="int64"):
        layers.capture_inputs(m, torch.zeros(2, 4))
    with pytest.raises(ValueError, match="no block linear"):
        layers.capture_inputs(m, torch.zeros(2, 4, dtype=torch.long), ["nope"])


def test_planted_outliers_keep_the_function():
    m = charlm.create(0, SMALL).eval()
    tokens = torch.randint(0, 256, (2, 16))
    big = stats.with_outlier_channels(m, (3, 9), 25.0)
    torch.testing.assert_close(big(tokens), m(tokens), rtol=1e-4, atol=1e-4)
    x = layers.capture_inputs(big, tokens, ["blocks.1.fc1"])["blocks.1.fc1"]
    assert set(stats.channel_absmax(x).topk(2).indices.tolist()) == {3, 9}


def test_residual_stream_is_what_each_block_writes():
    m = charlm.create(0, SMALL).train()
    tokens = torch.randint(0, 256, (3, 16))
    seen = []
    h = m.blocks[1].register_forward_hook(lambda mod, a, o: seen.append(o))
    m.eval()(tokens)
    h.remove()
    m.train()
    res = stats.residual_stream(m, tokens, batch_size=2)
    assert list(res) == ["resid.0", "resid.1"] and m.training
    torch.testing.assert_close(res["resid.1"], seen[0].reshape(-1, 32))
    with pytest.raises(TypeError, match="int64"):
        stats.residual_stream(m, torch.zeros(2, 4))


def test_snapshot_counts_llm_int8_columns_per_layer():
    m = charlm.create(0, SMALL).eval()
    tokens = torch.randint(0, 256, (2, 16))
    big = stats.with_outlier_channels(m, (3, 9), 60.0)  # LN gains x60: inputs of q, k, v, fc1 reach 6
    acts = layers.capture_inputs(big, tokens)
    expected = sum(stats.outlier_channels(x).numel() for x in acts.values())
    snap = stats.snapshot(big, tokens)
    assert expected >= 2 * 4 * 2  # two channels in the 4 LN-fed linears of each of 2 blocks
    assert snap["summary"]["int8_columns"] == expected
    assert snap["summary"]["ln1"]["absmax"] == pytest.approx(
        max(float(acts[f"blocks.{i}.attn.q"].abs().max()) for i in range(2)), rel=1e-4)
    assert set(snap["layers"]) == {n for n in acts if not n.endswith((".k", ".v"))} | {"resid.0", "resid.1"}
    assert stats.snapshot(m, tokens)["summary"]["int8_columns"] == 0  # freshly initialised: no outliers
