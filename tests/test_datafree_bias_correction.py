"""Tests for qlib.datafree.bias_correction (analytic and empirical bias correction).

Reference: Nagel et al., ICCV 2019, "Data-Free Quantization Through Weight Equalization
and Bias Correction", section 4.2 and appendix: E[y_q - y] = (W_q - W) E[x], E[x] for
x = relu(z), z ~ N(beta, gamma^2) is the clipped-normal mean
mu * Phi(mu/sigma) + sigma * phi(mu/sigma) (checked against Monte Carlo); correcting the
bias by it reduces the mean output error of a quantized layer (checked on sampled inputs).
For ReLU6 (MobileNet) E[clamp(z, 0, 6)] is the doubly clipped normal mean
mu (Phi(b) - Phi(a)) + sigma (phi(a) - phi(b)) + 6 (1 - Phi(b)), a = -mu/sigma, b = (6 - mu)/sigma
(checked against Monte Carlo, tolerance from the sample count). Depthwise and grouped layers
(the paper's MobileNetV2 experiments): the correction equals a brute-force E over inputs of
the quantized minus the float layer's output, computed with circular padding so that every
kernel tap sees the same input mean exactly.
"""

import math

import pytest
import torch
from torch import nn

from qlib.datafree.bias_correction import (bn_preactivation_stats, clipped_normal_mean, correct_bias,
                                           empirical_input_means, expected_inputs, expected_output_error,
                                           scale_stats)
from qlib.datafree.equalize import cross_layer_equalize, unbalance
from qlib.fold import fold_batchnorm
from qlib.models import create
from qlib.modules import QuantConfig
from qlib.ptq import prepare, quantize_static
from qlib.models import pretrained
from qlib.qparams import PerTensor


def gen(seed):
    return torch.Generator().manual_seed(seed)


def test_clipped_normal_mean_matches_monte_carlo():
    mean = torch.tensor([-2.0, -0.5, 0.0, 0.3, 2.0, 1.0])
    std = torch.tensor([1.0, 0.7, 1.0, 2.0, 0.5, 0.0])
    z = mean + std * torch.randn(400_000, 6, generator=gen(0))
    mc = z.clamp_min(0).mean(0)
    torch.testing.assert_close(clipped_normal_mean(mean, std), mc, atol=5e-3, rtol=0)
    assert clipped_normal_mean(torch.tensor(0.0), torch.tensor(1.0)).item() == pytest.approx(1 / math.sqrt(2 * math.pi))
    with pytest.raises(ValueError):
        clipped_normal_mean(torch.tensor([0.0]), torch.tensor([-1.0]))


def test_expected_output_error_written_out():
    w, wq = torch.randn(3, 2, 2, 2, generator=gen(0)), torch.randn(3, 2, 2, 2, generator=gen(1))
    ex = torch.tensor([0.5, 2.0])
    ref = torch.stack([sum((wq[o, i] - w[o, i]).sum() * ex[i] for i in range(2)) for o in range(3)])
    torch.testing.assert_close(expected_output_error(w, wq, ex), ref)
    lin = expected_output_error(w[:, :, 0, 0], wq[:, :, 0, 0], ex)
    torch.testing.assert_close(lin, (wq[:, :, 0, 0] - w[:, :, 0, 0]) @ ex)
    with pytest.raises(ValueError, match="input_mean"):
        expected_output_error(w, wq, torch.ones(3))
    with pytest.raises(ValueError, match="differ in shape"):
        expected_output_error(w, wq[:2], ex)


def test_bias_correction_reduces_expected_output_error_of_a_layer():
    """One quantized linear layer fed relu(N(beta, gamma^2)) inputs: the mean error shrinks."""
    c_in, c_out = 32, 16
    beta, gamma = torch.randn(c_in, generator=gen(0)), torch.rand(c_in, generator=gen(1)) + 0.2
    x = (beta + gamma * torch.randn(20_000, c_in, generator=gen(2))).clamp_min(0)
    layer = nn.Linear(c_in, c_out)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(c_out, c_in, generator=gen(3)))
        layer.bias.zero_()
    model = nn.Sequential(layer)
    cfg = QuantConfig(weight_bits=4, act_bits=16, weight_granularity=PerTensor())
    q = quantize_static(model, [x], cfg)
    ex = {"0": clipped_normal_mean(beta, gamma)}
    qc = correct_bias(q, ex)
    with torch.no_grad():
        y = model(x)
        mean_err = (q(x) - y).mean(0)
        mean_err_c = (qc(x) - y).mean(0)
    assert mean_err_c.norm() < 0.2 * mean_err.norm()
    # the correction is exactly (W_q - W) E[x]; the float layer and q are untouched
    torch.testing.assert_close(q[0].bias - qc[0].bias,
                               expected_output_error(layer.weight, q[0].weight_fq(q[0].weight), ex["0"]))
    assert torch.equal(layer.bias, torch.zeros(c_out))


def randomize_bn(model, seed=0):
    g = gen(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.randn(m.num_features, generator=g))
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.5)
    return model.eval()


def test_stats_follow_the_model_and_match_measured_means():
    model = randomize_bn(create("mlp", seed=0))
    stats = bn_preactivation_stats(model)
    assert set(stats) == {"1", "4"}
    torch.testing.assert_close(stats["1"][0], model[2].bias)
    torch.testing.assert_close(stats["1"][1], model[2].weight.abs())
    assert set(expected_inputs(model, stats)) == {"4", "7"}
    # the BN statistics are those of a standardized population: make BN see its own data
    folded = fold_batchnorm(model)
    unbal, c = unbalance(model, spread=10.0, seed=0)
    equal, s = cross_layer_equalize(unbal)
    moved = scale_stats(scale_stats(stats, c), s)
    ex = expected_inputs(equal, moved)
    # rescaling: E[x] of the equalized model is that of the folded model times the scales
    ex0 = expected_inputs(folded, stats)
    torch.testing.assert_close(ex["4"], ex0["4"] * c["1"] * s["1"])
    # cnn8: max-pool between conv 3 and conv 7 is not mean-preserving -> skipped; flatten block ok
    cnn = randomize_bn(create("cnn8", seed=0))
    assert set(expected_inputs(cnn, bn_preactivation_stats(cnn))) == {"3", "12"}


@pytest.mark.parametrize("name, layers", [("mlp", ["4", "7"]), ("cnn8", ["12", "3"]), ("cnn16", ["12", "3"]),
                                          ("res16", ["3.conv2", "4.conv2", "5.conv2"])])
def test_expected_inputs_on_the_zoo_use_the_traced_pairs(name, layers):
    # mlp/cnn: the layers the former nn.Sequential scan found; res16: conv2 inside each residual
    # block (relu(bn1(conv1(x))) reaches nothing else), which that scan could not see
    model = randomize_bn(create(name, seed=0))
    stats = bn_preactivation_stats(model)
    ex = expected_inputs(model, stats)
    assert sorted(ex) == layers
    assert sorted(expected_inputs(fold_batchnorm(model), stats)) == layers
    if name == "res16":
        mean, std = stats["3.conv1"]
        torch.testing.assert_close(ex["3.conv2"], clipped_normal_mean(mean, std))


def test_empirical_means_agree_with_analytic_for_gaussian_preactivations():
    """Identity layer + BN with running stats (0, 1): the BN output is exactly N(beta, gamma^2)."""
    model = nn.Sequential(nn.Linear(6, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3)).eval()
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(6))
        model[0].bias.zero_()
        model[1].running_mean.zero_()
        model[1].running_var.fill_(1.0 - model[1].eps)
        model[1].weight.copy_(torch.tensor([1.0, 0.5, 2.0, 1.0, 0.3, 1.5]))
        model[1].bias.copy_(torch.tensor([0.0, 1.0, -1.0, -3.0, 0.2, 0.5]))
    x = torch.randn(200_000, 6, generator=gen(0))
    emp = empirical_input_means(model, [x], ["3"])["3"]
    ana = expected_inputs(model, bn_preactivation_stats(model))["3"]
    torch.testing.assert_close(emp, ana, atol=0.01, rtol=0)
    assert set(empirical_input_means(model, x)) == {"0", "3"}


def test_clear_errors():
    model = create("mlp", seed=0)
    with pytest.raises(ValueError, match="no BatchNorm"):
        bn_preactivation_stats(fold_batchnorm(model))
    with pytest.raises(ValueError, match="empty"):
        correct_bias(quantize_static(model, [torch.randn(8, 1, 8, 8)]), {})
    with pytest.raises(ValueError, match="not a fake-quant layer"):
        correct_bias(model, {"1": torch.zeros(64)})
    with pytest.raises(ValueError, match="not converted"):
        correct_bias(prepare(model), {"1": torch.zeros(64)})
    with pytest.raises(ValueError, match="empty"):
        empirical_input_means(model, [])
    with pytest.raises(ValueError, match="not Conv2d/Linear"):
        empirical_input_means(model, [torch.randn(2, 1, 8, 8)], ["2"])


# --- regressions (issue 8): data forms, modes, dtypes ---------------------------------------

def _relu_net():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 2))


def test_empirical_means_accept_every_data_form_and_other_dtypes():
    """Before: a TensorDataset was iterated sample by sample (1-D inputs into the model), and
    float32 data met a float64 model inside torch."""
    model = _relu_net().eval()
    x = torch.randn(64, 4, generator=gen(0))
    want = empirical_input_means(model, x)
    ds = torch.utils.data.TensorDataset(x, torch.zeros(64, dtype=torch.long))
    for data in (ds, [x[:30], x[30:]], [(x[:30], None), (x[30:], None)]):
        got = empirical_input_means(model, data)
        for k in want:
            torch.testing.assert_close(got[k], want[k])
    got = empirical_input_means(model.double(), x)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)


def test_empirical_means_restore_every_mode_on_error():
    model = _relu_net().train()
    model[1].eval()
    modes = [m.training for m in model.modules()]
    with pytest.raises(ValueError, match="NaN"):
        empirical_input_means(model, [torch.randn(4, 4), torch.full((4, 4), float("nan"))])
    with pytest.raises(RuntimeError):
        empirical_input_means(model, torch.randn(4, 3))  # wrong width: torch's own shape error
    assert [m.training for m in model.modules()] == modes


# --- ReLU6 and depthwise/grouped layers (issue 11) --------------------------------------------

def test_relu6_mean_matches_monte_carlo_within_the_sampling_error():
    """E[clamp(z, 0, 6)]: Monte Carlo with n samples has standard error sd / sqrt(n); allow 5 of them."""
    mean = torch.tensor([-2.0, 0.0, 3.0, 5.5, 6.0, 8.0, 20.0, 1.0], dtype=torch.float64)
    std = torch.tensor([1.0, 2.0, 2.0, 1.0, 3.0, 2.0, 4.0, 0.0], dtype=torch.float64)
    n = 400_000
    samples = (mean + std * torch.randn(n, len(mean), generator=gen(0), dtype=torch.float64)).clamp(0, 6)
    mc, sd = samples.mean(0), samples.std(0)
    got = clipped_normal_mean(mean, std, upper=6)
    assert got.dtype == torch.float64
    assert ((got - mc).abs() <= 5 * sd / math.sqrt(n) + 1e-12).all(), (got, mc)
    assert got[-1] == 1.0 and got[4] < 6  # std 0: clamp(mean); mean at the clip: below it
    # far above the clip it is the ReLU mean (the clip is never reached)
    torch.testing.assert_close(clipped_normal_mean(mean[:4], std[:4], upper=1e4),
                               clipped_normal_mean(mean[:4], std[:4]))
    with pytest.raises(ValueError, match="upper"):
        clipped_normal_mean(mean, std, upper=-1.0)


def test_expected_inputs_know_relu6():
    """Regression (issue 11): pairs through ReLU6 were not searched, so dsc16 got no E[x] at all."""
    model = pretrained("dsc16", 0)
    stats = bn_preactivation_stats(model)
    ex = expected_inputs(model, stats)
    convs = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert sorted(ex) == sorted(convs[1:])  # every layer but the stem reads relu6(BN output)
    for first, second in zip(convs[:-1], convs[1:]):
        torch.testing.assert_close(ex[second], clipped_normal_mean(*stats[first], upper=6))
    assert all((v >= 0).all() and (v <= 6).all() for v in ex.values())


def test_analytic_relu6_means_agree_with_measured_ones():
    """BN with running stats (0, 1) after an identity layer: its output is exactly N(beta, gamma^2)."""
    model = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.ReLU6(),
                          nn.Conv2d(4, 4, 3, groups=4), nn.Flatten(), nn.Linear(4 * 4 * 4, 2)).eval()
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(4).reshape(4, 4, 1, 1))
        model[0].bias.zero_()
        model[1].running_mean.zero_()
        model[1].running_var.fill_(1.0 - model[1].eps)
        model[1].weight.copy_(torch.tensor([1.0, 3.0, 2.0, 0.5]))
        model[1].bias.copy_(torch.tensor([0.5, 5.0, 7.0, 5.8]))
    x = torch.randn(4_000, 4, 6, 6, generator=gen(0))
    emp = empirical_input_means(model, [x], ["3"])["3"]
    ana = expected_inputs(model, bn_preactivation_stats(model))["3"]
    torch.testing.assert_close(emp, ana, atol=0.01, rtol=0)


def circular_conv(x, weight, bias, groups):
    return torch.nn.functional.conv2d(torch.nn.functional.pad(x, (1, 1, 1, 1), mode="circular"),
                                      weight, bias, groups=groups)


@pytest.mark.parametrize("groups, c_out", [(6, 6), (6, 12), (2, 4), (1, 4)])
def test_grouped_bias_correction_equals_the_brute_force_mean_error(groups, c_out):
    """delta = E over inputs of (quantized - float) layer output, computed directly. Circular
    padding: every tap reads every input position once, so the mean over positions is exact.
    Regression (issue 11): correct_bias refused grouped convolutions (depthwise included)."""
    c_in = 6
    conv = nn.Conv2d(c_in, c_out, 3, padding=1, padding_mode="circular", groups=groups).double()
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen(1), dtype=torch.float64)
                          * torch.exp(torch.randn(c_out, 1, 1, 1, generator=gen(2), dtype=torch.float64)))
    x = (torch.randn(64, c_in, 5, 5, generator=gen(3), dtype=torch.float64)
         + torch.linspace(-1, 3, c_in, dtype=torch.float64).reshape(1, -1, 1, 1)).clamp(0, 6)
    q = quantize_static(nn.Sequential(conv), [x], QuantConfig(weight_bits=3, act_bits=16,
                                                              weight_granularity=PerTensor()))
    means = empirical_input_means(q, [x], ["0"])
    torch.testing.assert_close(means["0"], x.mean(dim=(0, 2, 3)).float())
    ex = {"0": x.mean(dim=(0, 2, 3))}  # the same, in float64
    corrected = correct_bias(q, ex)
    w_q = q[0].weight_fq(q[0].weight)
    assert not torch.equal(w_q, conv.weight)
    with torch.no_grad():
        brute = (circular_conv(x, w_q, conv.bias, groups) - circular_conv(x, conv.weight, conv.bias, groups)
                 ).mean(dim=(0, 2, 3))
        torch.testing.assert_close(q[0].bias - corrected[0].bias, brute, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(expected_output_error(conv.weight, w_q, ex["0"], groups=groups), brute,
                                   rtol=1e-9, atol=1e-12)
        after = (circular_conv(x, w_q, corrected[0].bias, groups)
                 - circular_conv(x, conv.weight, conv.bias, groups)).mean(dim=(0, 2, 3))
        torch.testing.assert_close(after, torch.zeros_like(after), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="groups"):
        expected_output_error(conv.weight, w_q, ex["0"], groups=5)
    with pytest.raises(ValueError, match="input_mean"):
        expected_output_error(conv.weight, w_q, ex["0"][:3], groups=groups)


def test_depthwise_correction_is_the_per_channel_tap_sum():
    """The depthwise case written out: delta_c = sum_taps (W_q - W)[c] * E[x_c]."""
    w, wq = torch.randn(5, 1, 3, 3, generator=gen(0)), torch.randn(5, 1, 3, 3, generator=gen(1))
    ex = torch.rand(5, generator=gen(2))
    torch.testing.assert_close(expected_output_error(w, wq, ex, groups=5), (wq - w).flatten(1).sum(1) * ex)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_relu6_means_and_depthwise_correction_on_cuda():
    mean, std = torch.tensor([0.5, 5.0, 7.0], device="cuda"), torch.tensor([1.0, 2.0, 0.0], device="cuda")
    got = clipped_normal_mean(mean, std, upper=6)
    assert got.is_cuda
    torch.testing.assert_close(got.cpu(), clipped_normal_mean(mean.cpu(), std.cpu(), upper=6))
    w, wq = torch.randn(3, 1, 3, 3, device="cuda"), torch.randn(3, 1, 3, 3, device="cuda")
    delta = expected_output_error(w, wq, got, groups=3)
    assert delta.is_cuda
    torch.testing.assert_close(delta, (wq - w).flatten(1).sum(1) * got)
