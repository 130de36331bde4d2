"""Tests for qlib.datafree.equalize (cross-layer equalization).

Reference: Nagel et al., ICCV 2019, "Data-Free Quantization Through Weight Equalization
and Bias Correction", section 4.1: s_i = sqrt(r1_i * r2_i) / r2_i makes the ranges of
channel i equal in both layers (sqrt(r1_i * r2_i)), leaves the fp32 function unchanged
through ReLU (positive homogeneity), and maximizes sum_i (r1_i/R1)(r2_i/R2). Checked on
random Sequential models (conv, linear, pooling, flatten) against the unequalized model.
Depthwise and grouped convolutions (section 4.1 applies CLE to MobileNetV2, after replacing
ReLU6 by ReLU, section 5.1): input channel i of a grouped layer is column i mod (C_in/g) of
its group's rows (a depthwise layer's row i), checked against a written-out loop and by the
function of a float64 depthwise-separable net (MobileNet's block: Howard et al. 2017).
"""

import pytest
import torch
from torch import nn

from qlib.datafree.equalize import (channel_ranges, cross_layer_equalize, equalization_scales, equalize_pair,
                                    find_equalization_pairs, input_channel_ranges, is_depthwise, pair_precision,
                                    relu6_to_relu, rescale_pair, unbalance)
from qlib.fold import fold_batchnorm
from qlib.models import create
from qlib.modules import QuantConfig
from qlib.ptq import quantize_static
from qlib.qparams import PerTensor


def randomize_bn(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.randn(m.num_features, generator=g))
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.2)
    return model.eval()


def test_scales_formula_and_equal_ranges():
    r1, r2 = torch.tensor([4.0, 1.0, 0.5, 0.0]), torch.tensor([1.0, 9.0, 2.0, 3.0])
    s = equalization_scales(r1, r2)
    torch.testing.assert_close(s[:3], torch.sqrt(r1[:3] * r2[:3]) / r2[:3])
    assert s[3] == 1.0  # a dead channel stays as it is
    torch.testing.assert_close(r1[:3] / s[:3], r2[:3] * s[:3])

    g = torch.Generator().manual_seed(0)
    l1, l2 = nn.Linear(5, 4), nn.Linear(4, 3)
    with torch.no_grad():
        l1.weight.copy_(torch.randn(4, 5, generator=g) * torch.tensor([[10.0], [0.1], [1.0], [3.0]]))
        l2.weight.copy_(torch.randn(3, 4, generator=g))
    r1, r2 = channel_ranges(l1.weight, 0), channel_ranges(l2.weight, 1)
    s = equalize_pair(l1, l2)
    torch.testing.assert_close(channel_ranges(l1.weight, 0), torch.sqrt(r1 * r2))
    torch.testing.assert_close(channel_ranges(l2.weight, 1), torch.sqrt(r1 * r2))
    torch.testing.assert_close(s, torch.sqrt(r1 * r2) / r2)


def test_find_pairs_and_bn_must_be_folded():
    cnn = create("cnn8", seed=0)
    with pytest.raises(ValueError, match="fold BatchNorm"):
        find_equalization_pairs(cnn)
    from qlib.fold import fold_batchnorm
    assert find_equalization_pairs(fold_batchnorm(cnn)) == [("0", "3"), ("3", "7"), ("7", "12")]
    mlp = fold_batchnorm(create("mlp", seed=0))
    assert find_equalization_pairs(mlp) == [("1", "4"), ("4", "7")]
    # a non-homogeneous activation breaks the chain; a grouped conv does not (since issue 11)
    m = nn.Sequential(nn.Conv2d(2, 4, 3), nn.Sigmoid(), nn.Conv2d(4, 4, 3, groups=2), nn.ReLU(), nn.Conv2d(4, 2, 1))
    assert find_equalization_pairs(m) == [("2", "4")]
    m = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU6(), nn.Conv2d(4, 2, 1))
    assert find_equalization_pairs(m) == []


ZOO_PAIRS = {  # recorded from the nn.Sequential scan this module had before qlib.fold.find_layer_pairs
    "mlp": [("1", "4"), ("4", "7")],
    "cnn8": [("0", "3"), ("3", "7"), ("7", "12")],
    "cnn16": [("0", "3"), ("3", "7"), ("7", "12")],
    # the old scan found none; the traced graph sees conv1 -> relu1 -> conv2 inside each block
    # (the stem conv and conv2 feed a residual add as well: never rescaled)
    "res16": [("3.conv1", "3.conv2"), ("4.conv1", "4.conv2"), ("5.conv1", "5.conv2")],
}


@pytest.mark.parametrize("name", sorted(ZOO_PAIRS))
def test_zoo_pairs_come_from_fold_find_layer_pairs(name):
    from qlib.fold import fold_batchnorm
    model = create(name, seed=0)
    with pytest.raises(ValueError, match="fold BatchNorm"):
        find_equalization_pairs(model)
    assert find_equalization_pairs(fold_batchnorm(model)) == ZOO_PAIRS[name]


def test_residual_blocks_equalize_inside_and_keep_the_function():
    model = randomize_bn(create("res16", seed=0))
    x = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    equal, scales = cross_layer_equalize(model)
    assert sorted(scales) == ["3.conv1", "4.conv1", "5.conv1"]
    with torch.no_grad():
        torch.testing.assert_close(equal(x), model(x), rtol=1e-4, atol=1e-4)
    for n1, n2 in ZOO_PAIRS["res16"]:
        r1 = channel_ranges(equal.get_submodule(n1).weight, 0)
        r2 = channel_ranges(equal.get_submodule(n2).weight, 1)
        torch.testing.assert_close(r1, r2, rtol=1e-3, atol=0)


@pytest.mark.parametrize("name", ["cnn8", "mlp"])
def test_equalization_keeps_fp32_function_and_balances_ranges(name):
    model = randomize_bn(create(name, seed=1), seed=1)
    x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    unbal, c = unbalance(model, spread=50.0, seed=0)
    equal, scales = cross_layer_equalize(unbal)
    with torch.no_grad():
        ref = model(x)
        torch.testing.assert_close(unbal(x), ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(equal(x), ref, rtol=1e-4, atol=1e-4)
    assert set(scales) == set(c)
    for n1, n2 in find_equalization_pairs(equal):
        l1, l2 = equal.get_submodule(n1), equal.get_submodule(n2)
        u1, u2 = unbal.get_submodule(n1), unbal.get_submodule(n2)
        assert pair_precision(l1, l2) > pair_precision(u1, u2)
        spread_before = channel_ranges(u1.weight).max() / channel_ranges(u1.weight).min()
        spread_after = channel_ranges(l1.weight).max() / channel_ranges(l1.weight).min()
        assert spread_after < spread_before
    assert not any(isinstance(m, nn.BatchNorm2d) for m in equal.modules())


def test_equalization_is_a_fixed_point_and_undoes_unbalancing():
    model = randomize_bn(create("cnn8", seed=2), seed=2)
    eq_a, _ = cross_layer_equalize(model, iterations=200, tol=1e-7)
    eq_b, _ = cross_layer_equalize(unbalance(model, spread=100.0, seed=3)[0], iterations=200, tol=1e-7)
    for (name, a), b in zip(eq_a.named_parameters(), eq_b.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5, msg=name)
    s = equalize_pair(eq_a.get_submodule("0"), eq_a.get_submodule("3"))
    torch.testing.assert_close(s, torch.ones_like(s), rtol=1e-3, atol=1e-3)


def test_per_tensor_quantization_collapses_then_recovers(digits8):
    """The lesson's story on random-BN cnn8: unbalanced per-tensor W6 is bad, CLE repairs it."""
    model = randomize_bn(create("cnn8", seed=0), seed=0)
    x = digits8.train.tensors[0][:128]
    unbal, _ = unbalance(model, spread=100.0, seed=0)
    equal, _ = cross_layer_equalize(unbal)
    cfg = QuantConfig(weight_bits=6, act_bits=8, weight_granularity=PerTensor())

    def err(m):
        with torch.no_grad():
            ref = model(x)
            return ((quantize_static(m, [x], cfg)(x) - ref).pow(2).mean() / ref.pow(2).mean()).item()
    assert err(unbal) > 5 * err(equal)
    assert err(equal) < 0.05


def test_clear_errors():
    with pytest.raises(ValueError, match="no consecutive"):
        cross_layer_equalize(nn.Sequential(nn.Linear(3, 3)))
    with pytest.raises(ValueError, match="spread"):
        unbalance(create("mlp", seed=0), spread=0.5)
    with pytest.raises(ValueError, match="iterations"):
        cross_layer_equalize(create("mlp", seed=0), iterations=0)
    with pytest.raises(ValueError, match="positive"):
        rescale_pair(nn.Linear(2, 3), nn.Linear(3, 2), torch.tensor([1.0, -1.0, 1.0]))
    with pytest.raises(ValueError, match="ranges differ"):
        equalization_scales(torch.ones(3), torch.ones(4))
    with pytest.raises(ValueError, match="not a multiple"):
        equalize_pair(nn.Linear(2, 3), nn.Linear(4, 2))
    with pytest.raises(TypeError):
        cross_layer_equalize("model")
    broken = create("mlp", seed=0)
    with torch.no_grad():
        broken[1].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        cross_layer_equalize(broken)


# --- regressions (issue 8): scales on the weights' device and dtype ------------------------

def test_float64_models_keep_float64_scales_and_the_function():
    """Before: ``unbalance`` returned float32 scales for a float64 model (drawn on the CPU in
    float32 and never put on the weights' device and dtype; on CUDA: a device error)."""
    model = randomize_bn(create("cnn8", seed=0)).double()
    x = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    unbalanced, c = unbalance(model, spread=50.0, seed=0)
    equalized, s = cross_layer_equalize(unbalanced)
    for scales in (c, s):
        assert all(v.dtype == torch.float64 and v.device == x.device for v in scales.values())
    ref = model(x)
    torch.testing.assert_close(unbalanced(x), ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(equalized(x), ref, rtol=1e-10, atol=1e-10)
    with pytest.raises(TypeError, match="seed"):
        unbalance(model, seed=1.5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_equalization_on_cuda():
    model = randomize_bn(create("cnn8", seed=0)).cuda()
    x = torch.randn(8, 1, 8, 8, device="cuda")
    unbalanced, c = unbalance(model, seed=0)
    equalized, s = cross_layer_equalize(unbalanced)
    assert all(v.is_cuda for v in list(c.values()) + list(s.values()))
    torch.testing.assert_close(equalized(x), model(x), rtol=1e-4, atol=1e-4)


# --- depthwise and grouped convolutions, ReLU6 (issue 11) ------------------------------------

def depthwise_separable_net(seed=0, act=nn.ReLU):
    """Stem conv, two MobileNet blocks (depthwise 3x3 + BN + act, pointwise 1x1 + BN + act),
    a grouped conv (groups=2), average pool, linear head; BN statistics spread widely."""
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = nn.Sequential(
            nn.Conv2d(2, 8, 3, padding=1), nn.BatchNorm2d(8), act(),
            nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8), act(),
            nn.Conv2d(8, 12, 1, bias=False), nn.BatchNorm2d(12), act(),
            nn.Conv2d(12, 12, 3, stride=2, padding=1, groups=12, bias=False), nn.BatchNorm2d(12), act(),
            nn.Conv2d(12, 8, 3, padding=1, groups=2), act(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.exp(2 * torch.randn(m.num_features, generator=g)))  # gammas e^-4..e^4
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.2)
    return model.eval().double()


DSC_PAIRS = [("0", "3"), ("3", "6"), ("6", "9"), ("9", "12"), ("12", "16")]


def test_input_channel_ranges_of_grouped_layers_written_out():
    """Input channel i of a conv with groups g is column i % (C_in/g) of group i // (C_in/g)."""
    g = torch.Generator().manual_seed(0)
    for groups, c_in, c_out in [(1, 6, 4), (2, 6, 4), (3, 6, 6), (6, 6, 6), (6, 6, 12)]:
        conv = nn.Conv2d(c_in, c_out, 3, groups=groups)
        with torch.no_grad():
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=g))
        cpg, opg = c_in // groups, c_out // groups
        ref = torch.stack([conv.weight[(i // cpg) * opg:(i // cpg + 1) * opg, i % cpg].abs().max()
                           for i in range(c_in)])
        torch.testing.assert_close(input_channel_ranges(conv), ref.detach(), rtol=0, atol=0)
        if groups == 1:
            torch.testing.assert_close(input_channel_ranges(conv), channel_ranges(conv.weight, 1))
        if is_depthwise(conv):  # the depthwise case: input channel c is row c
            torch.testing.assert_close(input_channel_ranges(conv), channel_ranges(conv.weight, 0))
    assert not is_depthwise(nn.Conv2d(6, 12, 3, groups=6)) and not is_depthwise(nn.Conv2d(6, 6, 3))


def test_cle_through_depthwise_layers_keeps_the_function_and_evens_ranges():
    """Regression (issue 11): depthwise and grouped pairs were dropped, so this net had no pair
    at all ("no consecutive ... layers") and its depthwise ranges stayed as folded."""
    model = depthwise_separable_net(seed=0)
    x = torch.randn(16, 2, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    folded = fold_batchnorm(model)
    assert find_equalization_pairs(folded) == DSC_PAIRS
    equal, scales = cross_layer_equalize(model, iterations=500, tol=1e-10)
    assert sorted(scales) == sorted(n1 for n1, _ in DSC_PAIRS)
    with torch.no_grad():
        torch.testing.assert_close(equal(x), model(x), rtol=1e-10, atol=1e-10)
    for n1, n2 in DSC_PAIRS:  # converged: each channel has one range in both layers
        r1 = channel_ranges(equal.get_submodule(n1).weight, 0)
        r2 = input_channel_ranges(equal.get_submodule(n2), len(r1))
        torch.testing.assert_close(r1, r2, rtol=1e-6, atol=0)
    def spread(m, name):
        r = channel_ranges(m.get_submodule(name).weight)
        return (r.max() / r.min()).item()
    for name in ("3", "9"):  # the depthwise layers: their channel ranges spread less
        assert spread(equal, name) < spread(folded, name) / 2, name


def test_unbalance_through_depthwise_layers_and_cle_undoes_it():
    model = depthwise_separable_net(seed=1)
    x = torch.randn(8, 2, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    unbal, c = unbalance(model, spread=100.0, seed=0)
    assert sorted(c) == sorted(n1 for n1, _ in DSC_PAIRS)
    eq_a, _ = cross_layer_equalize(model, iterations=500, tol=1e-10)
    eq_b, _ = cross_layer_equalize(unbal, iterations=500, tol=1e-10)
    with torch.no_grad():
        torch.testing.assert_close(unbal(x), model(x), rtol=1e-10, atol=1e-10)
    for (name, a), b in zip(eq_a.named_parameters(), eq_b.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9, msg=name)


def test_relu6_is_refused_or_replaced_as_dfq_does():
    """ReLU6 is not positive homogeneous: CLE says so instead of skipping the pairs silently
    (before issue 11: "no consecutive layers" on an all-ReLU6 net, no word about ReLU6)."""
    model = depthwise_separable_net(seed=2, act=nn.ReLU6)
    with pytest.raises(ValueError, match="ReLU6 between layers '0' and '3'.*relu6_to_relu"):
        cross_layer_equalize(model)
    with pytest.raises(ValueError, match="ReLU6"):
        unbalance(model)
    relu = relu6_to_relu(model)
    assert not any(isinstance(m, nn.ReLU6) for m in relu.modules())
    assert sum(isinstance(m, nn.ReLU6) for m in model.modules()) == 5  # the original is untouched
    equal, _ = cross_layer_equalize(model, replace_relu6=True)
    x = 3 * torch.randn(8, 2, 8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(equal(x), relu(x), rtol=1e-10, atol=1e-10)  # the ReLU model's function
        assert not torch.allclose(relu(x), model(x))  # which is not ReLU6's: activations above 6 pass


def test_grouped_layer_2_must_take_layer_1s_channels():
    with pytest.raises(ValueError, match="groups=2"):
        equalize_pair(nn.Conv2d(2, 4, 1), nn.Conv2d(8, 4, 1, groups=2))
    with pytest.raises(TypeError):
        relu6_to_relu("model")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_depthwise_equalization_on_cuda():
    model = depthwise_separable_net(seed=0).float().cuda()
    x = torch.randn(8, 2, 8, 8, device="cuda")
    equalized, s = cross_layer_equalize(model)
    assert all(v.is_cuda for v in s.values())
    torch.testing.assert_close(equalized(x), model(x), rtol=1e-4, atol=1e-4)
