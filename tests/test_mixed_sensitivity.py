"""Tests of qlib.mixed.sensitivity. References: scipy.stats.spearmanr (rank correlation), the
exact Hessian from torch.autograd.functional.hessian (Hutchinson's trace estimator, HAWQ-v2),
and the written formulas ||Q(W) - W||^2 and ||y - y_q||^2 / ||y||^2."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from torch import nn

from qlib import ptq
from qlib.mixed import (hawq_sensitivity, hessian_traces, one_at_a_time, quantization_perturbation, ranking,
                        spearman, sqnr_sensitivity)
from qlib.mixed.sensitivity import check_bits_list, quantize_weight
from qlib.modules import QuantConfig


def small_model(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).eval()


def small_data(seed, n=64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 6, 6, generator=g)
    return torch.utils.data.TensorDataset(x, torch.randint(0, 3, (n,), generator=g))


def test_spearman_matches_scipy_with_ties():
    g = torch.Generator().manual_seed(torch.randint(2**31, (1,)).item() % 2**31)
    for _ in range(20):
        a = torch.randint(0, 5, (9,), generator=g).tolist()  # many ties
        b = torch.randn(9, generator=g).tolist()
        da, db = {str(i): v for i, v in enumerate(a)}, {str(i): v for i, v in enumerate(b)}
        ref = spearmanr(a, b).statistic
        if ref != ref:  # constant input
            continue
        assert spearman(da, db) == pytest.approx(ref, abs=1e-12)
    assert spearman({"a": 1, "b": 2, "c": 3}, {"a": 10, "b": 20, "c": 30}) == pytest.approx(1.0)
    assert spearman({"a": 1, "b": 2, "c": 3}, {"a": 3, "b": 2, "c": 1}) == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="at least 2"):
        spearman({"a": 1}, {"a": 2})
    assert ranking({"a": 0.1, "b": 3.0, "c": 1.0}) == ["b", "c", "a"]


def test_hutchinson_trace_matches_exact_hessian_trace():
    model, data = small_model(1), small_data(2)
    x, y = data.tensors
    samples = 400
    est = hessian_traces(model, data, samples=samples, seed=torch.randint(2**31, (1,)).item() % 2**31)
    w0, w3 = model[0].weight.detach().clone(), model[3].weight.detach().clone()
    n0 = w0.numel()

    def loss_of(flat):
        return F.cross_entropy(F.linear(F.relu(F.conv2d(x, flat[:n0].view_as(w0), model[0].bias, padding=1)).flatten(1),
                                        flat[n0:].view_as(w3), model[3].bias), y)
    h = torch.autograd.functional.hessian(loss_of, torch.cat([w0.flatten(), w3.flatten()]))
    for name, block in [("0", slice(0, n0)), ("3", slice(n0, None))]:
        exact = float(h[block, block].diagonal().sum())
        # one sample is v_B . (H v)_B with one Rademacher v over all weights: unbiased, variance
        # 2 sum_{i != j in B} H_ij^2 + sum_{i in B, j not in B} H_ij^2
        inside = h[block, block]
        var = 2 * (inside.pow(2).sum() - inside.diagonal().pow(2).sum()) + (h[block].pow(2).sum() - inside.pow(2).sum())
        std = float((var / samples).sqrt())
        assert abs(est[name] - exact) <= 5 * std + 1e-6, (name, est[name], exact, std)


def test_hawq_is_trace_per_weight_times_perturbation():
    model, data = small_model(4), small_data(5)
    traces = hessian_traces(model, data, samples=4, seed=0)
    hawq = hawq_sensitivity(model, data, [2, 4], traces=traces)
    pert = quantization_perturbation(model, [2, 4])
    for name, layer in [("0", model[0]), ("3", model[3])]:
        w = layer.weight.detach()
        for b in (2, 4):
            assert pert[name][b] == pytest.approx(float((quantize_weight(w, b) - w).pow(2).sum()), rel=1e-6)
            assert hawq[name][b] == pytest.approx(traces[name] / w.numel() * pert[name][b], rel=1e-12)
        assert pert[name][2] > pert[name][4]


def test_quantize_weight_uses_the_config_recipe():
    w = torch.randn(5, 7, generator=torch.Generator().manual_seed(0))
    q = quantize_weight(w, 3)
    for row, qrow in zip(w, q):  # symmetric per-channel 3 bits: at most 8 levels, multiples of one step
        step = row.abs().max() / 3.5  # (qmax - qmin) / 2 = 3.5 for [-4, 3]
        assert torch.allclose(qrow / step, (qrow / step).round(), atol=1e-4)
    per_tensor = quantize_weight(w, 3, dataclasses.replace(QuantConfig(), weight_granularity=QuantConfig().act_granularity))
    assert per_tensor.unique().numel() <= 8


def test_sqnr_is_noise_over_signal_of_the_layer_output():
    model, data = small_model(6), small_data(7)
    sq = sqnr_sensitivity(model, data, [2, 8])
    x = data.tensors[0]
    w = model[0].weight
    with torch.no_grad():
        y = model[0](x)
        yq = F.conv2d(x, quantize_weight(w, 2), model[0].bias, padding=1)
    assert sq["0"][2] == pytest.approx(float((y - yq).pow(2).sum() / y.pow(2).sum()), rel=1e-4)
    assert sq["0"][2] > sq["0"][8] and sq["3"][2] > sq["3"][8]


def test_one_at_a_time_quantizes_only_that_layer():
    model, data = small_model(8), small_data(9)
    calib = data.tensors[0][:32]
    sens = one_at_a_time(model, data, calib, [2, 8])
    base = F.cross_entropy(model(data.tensors[0]), data.tensors[1]).item()
    q = ptq.quantize_static(model, calib, QuantConfig(weight_bits=2), per_layer={"0": None})
    expect = F.cross_entropy(q(data.tensors[0]), data.tensors[1]).item() - base
    assert sens["3"][2] == pytest.approx(expect, abs=1e-5)
    assert set(sens) == {"0", "3"} and set(sens["0"]) == {2, 8}


def test_bad_inputs():
    model, data = small_model(0), small_data(0)
    with pytest.raises(ValueError, match="between 2 and 16"):
        check_bits_list([1, 4])
    with pytest.raises(TypeError, match="list of ints"):
        check_bits_list(None)
    with pytest.raises(ValueError, match="labelled"):
        hessian_traces(model, data.tensors[0])
    with pytest.raises(ValueError, match="samples"):
        hessian_traces(model, data, samples=0)
    with pytest.raises(ValueError, match="no layers"):
        sqnr_sensitivity(nn.Sequential(nn.ReLU()), data, [4])
    with pytest.raises(TypeError, match="nn.Module"):
        quantization_perturbation("model", [4])
