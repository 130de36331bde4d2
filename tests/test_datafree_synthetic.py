"""Tests for qlib.datafree.synthetic (noise and ZeroQ BN-statistics synthesis).

Reference: ZeroQ (Cai et al., CVPR 2020): the BN-statistics loss is the distance between
the per-channel batch statistics at every BatchNorm input and the running statistics,
checked against a direct computation with torch.mean/torch.var; its variants against
written-out transcriptions of ZeroQ's official ``own_loss`` (``(A - B).norm()**2 /
B.size(0)`` on per-image statistics) and of DeepInversion's feature regularizer
(``torch.norm(running_var - var, 2) + torch.norm(running_mean - mean, 2)``); the
optimization must drive it down, below the loss of Gaussian noise. Small random models with
random BN statistics, plus one shipped model (cnn8) for the "below a real batch" property.
The data-free input range against the standardization of ``qlib.data.load_digits``.
"""

import pytest
import torch
from torch import nn

from qlib import models
from qlib.datafree.synthetic import (DIGITS_NORMALIZATION, SyntheticData, batch_moments, bn_layers,
                                     bn_statistics_loss, capture_bn_inputs, gaussian_batches,
                                     standardized_range, synthesize_bn, uniform_batches)
from qlib.fold import fold_batchnorm


def structured_images(n, seed=0):
    """Stand-in "real" data: smooth random 6x6 images (upsampled 3x3 patterns), mean 0 std 1."""
    g = torch.Generator().manual_seed(seed)
    x = nn.functional.interpolate(torch.randn(n, 1, 3, 3, generator=g) + 1.0, size=(6, 6), mode="bilinear")
    return (x - x.mean()) / x.std()


def small_cnn(seed=0):
    """A tiny conv net whose BatchNorm running statistics are those of ``structured_images``."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        m = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4, momentum=None),
                          nn.ReLU(), nn.Conv2d(4, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6, momentum=None),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3))
    with torch.no_grad():
        m.train()(structured_images(512, seed))  # momentum=None: running stats = this batch's
    return m.eval()


def test_noise_batches_shapes_seeds_and_statistics():
    b = gaussian_batches((1, 8, 8), num_samples=1000, batch_size=300, mean=0.5, std=2.0, seed=3)
    assert [len(x) for x in b] == [300, 300, 300, 100] and b[0].shape[1:] == (1, 8, 8)
    x = torch.cat(b)
    assert abs(x.mean().item() - 0.5) < 0.05 and abs(x.std().item() - 2.0) < 0.05
    assert torch.equal(x, torch.cat(gaussian_batches((1, 8, 8), 1000, 300, 0.5, 2.0, seed=3)))
    assert not torch.equal(x, torch.cat(gaussian_batches((1, 8, 8), 1000, 300, 0.5, 2.0, seed=4)))
    u = torch.cat(uniform_batches((2, 4, 4), 500, 100, low=-2, high=3, seed=0))
    assert u.shape == (500, 2, 4, 4) and u.min() >= -2 and u.max() <= 3


@pytest.mark.parametrize("bad", [dict(shape=(1, 0, 8)), dict(shape="1x8x8"), dict(num_samples=0),
                                 dict(batch_size=-1)])
def test_noise_rejects_bad_sizes(bad):
    kw = dict(shape=(1, 8, 8), num_samples=16, batch_size=8) | bad
    with pytest.raises(ValueError):
        gaussian_batches(**kw)
    with pytest.raises(ValueError):
        uniform_batches((1, 8, 8), 16, 8, low=1.0, high=1.0)


def test_batch_moments_match_torch_and_groups():
    x = torch.randn(12, 3, 5, 5) * torch.tensor([1.0, 2.0, 0.5]).reshape(1, 3, 1, 1)
    mean, var = batch_moments(x)
    assert mean.shape == (1, 3)
    torch.testing.assert_close(mean[0], x.mean(dim=(0, 2, 3)))
    torch.testing.assert_close(var[0], x.var(dim=(0, 2, 3), unbiased=False))
    mean, var = batch_moments(x, groups=3)
    torch.testing.assert_close(mean[1], x[4:8].mean(dim=(0, 2, 3)))
    torch.testing.assert_close(var[2], x[8:].var(dim=(0, 2, 3), unbiased=False))
    with pytest.raises(ValueError, match="equal groups"):
        batch_moments(x, groups=5)


def test_bn_loss_equals_direct_formula():
    m = small_cnn()
    x = torch.randn(16, 1, 6, 6)
    with torch.no_grad():
        a1 = m[0](x)
        a2 = m[3](m[2](m[1](a1)))
    expected = 0.0
    for a, bn in ((a1, m[1]), (a2, m[4])):
        mu, var = a.mean(dim=(0, 2, 3)), a.var(dim=(0, 2, 3), unbiased=False)
        expected += ((mu - bn.running_mean) ** 2).mean()
        expected += ((torch.sqrt(var + bn.eps) - torch.sqrt(bn.running_var + bn.eps)) ** 2).mean()
    torch.testing.assert_close(bn_statistics_loss(m, x), expected)
    extra = x.mean() ** 2 + (x.std(unbiased=False) - 1) ** 2
    torch.testing.assert_close(bn_statistics_loss(m, x, input_mean=0.0, input_std=1.0), expected + extra)


def test_capture_hooks_are_removed():
    m = small_cnn()
    with capture_bn_inputs(m) as seen:
        m(torch.randn(2, 1, 4, 4))
    assert set(seen) == {"1", "4"}
    assert all(not bn._forward_pre_hooks for bn in bn_layers(m).values())


def test_synthesis_drives_bn_loss_down_below_noise():
    m = small_cnn()
    before = [p.clone() for p in m.parameters()]
    out = synthesize_bn(m, (1, 6, 6), num_samples=64, batch_size=32, steps=40, lr=0.1, seed=0)
    assert isinstance(out, SyntheticData) and out.x.shape == (64, 1, 6, 6)
    assert len(out.history) == 41 and out.history[-1] < 0.2 * out.history[0]
    noise = torch.cat(gaussian_batches((1, 6, 6), 64, 64, seed=1))
    with torch.no_grad():
        assert bn_statistics_loss(m, out.x, groups=2, input_mean=0.0, input_std=1.0) < \
            bn_statistics_loss(m, noise, groups=2, input_mean=0.0, input_std=1.0)
    # the model is untouched; the batches are iterable like a calibration set
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters()))
    assert all(p.requires_grad for p in m.parameters()) and not m.training
    assert len(out) == 2 and [b.shape[0] for b in out] == [32, 32]
    again = synthesize_bn(m, (1, 6, 6), num_samples=64, batch_size=32, steps=40, lr=0.1, seed=0)
    assert torch.equal(out.x, again.x)
    falling = sum(b < a for a, b in zip(out.history, out.history[1:]))
    assert falling >= 0.8 * 40  # Adam on a smooth loss: almost every step goes down


def test_synthesis_options_range_and_labels():
    m = small_cnn()
    out = synthesize_bn(m, (1, 6, 6), 30, 10, steps=20, lr=0.1, input_range=(-0.5, 1.5),
                        ce_weight=1.0, num_classes=3, seed=0)
    assert out.x.min() >= -0.5 and out.x.max() <= 1.5
    assert out.labels.tolist() == [i % 3 for i in range(30)]


def test_synthesized_digits_beat_a_real_batch_on_bn_loss(digits8):
    model = models.pretrained("cnn8", 0)
    out = synthesize_bn(model, (1, 8, 8), num_samples=64, batch_size=64, steps=30, lr=0.5, seed=0)
    real = digits8.train.tensors[0][:64]
    with torch.no_grad():
        real_loss = bn_statistics_loss(model, real, input_mean=0.0, input_std=1.0).item()
    assert out.history[-1] < real_loss < out.history[0]


def test_clear_errors():
    m = small_cnn()
    with pytest.raises(ValueError, match="no BatchNorm"):
        synthesize_bn(fold_batchnorm(m), (1, 6, 6), 8, 8, steps=2)
    with pytest.raises(ValueError, match="no BatchNorm"):
        bn_statistics_loss(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)), torch.randn(2, 4))
    with pytest.raises(ValueError, match="NaN"):
        bn_statistics_loss(m, torch.full((4, 1, 6, 6), float("nan")))
    with pytest.raises(TypeError):
        bn_statistics_loss(m, torch.zeros(4, 1, 6, 6, dtype=torch.int64))
    with pytest.raises(ValueError, match="multiple"):
        synthesize_bn(m, (1, 6, 6), 10, 4, steps=2)
    with pytest.raises(ValueError, match="num_classes"):
        synthesize_bn(m, (1, 6, 6), 8, 8, steps=2, ce_weight=1.0)
    with pytest.raises(ValueError, match="lr"):
        synthesize_bn(m, (1, 6, 6), 8, 8, steps=2, lr=float("nan"))
    with pytest.raises(ValueError, match="input_range"):
        synthesize_bn(m, (1, 6, 6), 8, 8, steps=2, input_range=(1.0, 0.0))
    with pytest.raises(ValueError, match="does not accept inputs"):
        synthesize_bn(m, (3, 6, 6), 8, 8, steps=2)
    bad = small_cnn()
    with torch.no_grad():
        bad[0].weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        synthesize_bn(bad, (1, 6, 6), 8, 8, steps=2)


# --- regressions (issue 8): running statistics, modes, dtypes ------------------------------

def test_bn_statistics_loss_never_updates_running_statistics():
    """Before: on a train-mode model the forward pass overwrote every BN's running stats
    (the very targets of the loss) and normalized with batch statistics."""
    model = small_cnn(0).train()
    model[4].eval()
    modes = [m.training for m in model.modules()]
    stats = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(32, 1, 6, 6, generator=torch.Generator().manual_seed(1))
    loss = bn_statistics_loss(model, x)
    assert all(torch.equal(stats[k], v) for k, v in model.state_dict().items())
    assert [m.training for m in model.modules()] == modes
    torch.testing.assert_close(loss, bn_statistics_loss(small_cnn(0).eval(), x))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_other_dtypes(dtype):
    """Before: noise was float32 only, and float32 x met float64 weights inside torch."""
    b = gaussian_batches((1, 6, 6), num_samples=8, batch_size=4, seed=0, dtype=dtype)
    assert all(t.dtype == dtype for t in b)
    ref = gaussian_batches((1, 6, 6), num_samples=8, batch_size=4, seed=0)
    assert torch.equal(b[0], ref[0].to(dtype))  # same draw, cast: the seed means the same images
    model = small_cnn(0).to(dtype)
    loss = bn_statistics_loss(model, ref[0])  # float32 x goes to the model's dtype
    assert loss.dtype == dtype and torch.isfinite(loss)
    if dtype == torch.float64:
        synth = synthesize_bn(model, (1, 6, 6), num_samples=16, batch_size=8, steps=5, lr=0.1, progress=False)
        assert synth.x.dtype == dtype and synth.history[-1] < synth.history[0]


def test_synthesis_restores_every_submodule_mode_on_error():
    """Before: one ``model.train(was_training)`` flag for the whole tree came back."""
    model = small_cnn(0).train()
    model[1].eval()
    modes = [m.training for m in model.modules()]
    with pytest.raises(ValueError, match="does not accept"):
        synthesize_bn(model, (2, 6, 6), num_samples=8, batch_size=8, steps=1, progress=False)
    assert [m.training for m in model.modules()] == modes
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_synthesis_on_cuda():
    model = small_cnn(0).cuda()
    synth = synthesize_bn(model, (1, 6, 6), num_samples=16, batch_size=8, steps=3, progress=False)
    assert synth.x.is_cuda
    assert bn_statistics_loss(model, gaussian_batches((1, 6, 6), 8, 8)[0]).is_cuda  # CPU x moves


# --- the forms of the BN-statistics loss (issue 11) -------------------------------------------

def _bn_inputs(m, x):
    with torch.no_grad():
        a1 = m[0](x)
        a2 = m[3](m[2](m[1](a1)))
    return ((a1, m[1]), (a2, m[4]))


def test_zeroq_variant_is_zeroqs_own_loss():
    """ZeroQ's code: own_loss(A, B) = (A - B).norm()**2 / B.size(0), B = per-image channel
    statistics (N, C), std = sqrt(unbiased var + 1e-6) on both sides; input term against N(0, 1).
    Before: qlib had one form only, documented as "ZeroQ's code divides the squared norm by the
    number of channels" (it divides by the number of images)."""
    m = small_cnn(1)
    x = torch.randn(12, 1, 6, 6, generator=torch.Generator().manual_seed(2))

    def own_loss(a, b):
        return (a - b).norm() ** 2 / b.size(0)
    expected = 0.0
    for a, bn in _bn_inputs(m, x) + ((x, None),):
        v = a.view(a.size(0), a.size(1), -1)
        mean, std = v.mean(dim=2), torch.sqrt(v.var(dim=2) + 1e-6)
        if bn is None:
            expected += own_loss(torch.zeros(1, 1), mean) + own_loss(torch.ones(1, 1), std)
        else:
            expected += own_loss(bn.running_mean, mean) + own_loss(torch.sqrt(bn.running_var + 1e-6), std)
    got = bn_statistics_loss(m, x, input_mean=0.0, input_std=1.0, variant="zeroq")
    torch.testing.assert_close(got, expected)
    # it is not the default form: per-image statistics, summed over channels
    assert not torch.allclose(got, bn_statistics_loss(m, x, input_mean=0.0, input_std=1.0))


def test_deepinversion_and_l2_variants_use_plain_norms():
    """DeepInversion (Yin et al. 2020): ||mu~ - mu||_2 + ||var~ - var||_2 (variance, biased,
    not squared); "l2": the same plain norms on the mean and the std (lab 05's form)."""
    m = small_cnn(2)
    x = torch.randn(16, 1, 6, 6, generator=torch.Generator().manual_seed(3))
    deep = l2 = 0.0
    for a, bn in _bn_inputs(m, x):
        nch = a.shape[1]
        mean = a.mean([0, 2, 3])
        var = a.permute(1, 0, 2, 3).contiguous().view([nch, -1]).var(1, unbiased=False)
        deep += torch.norm(bn.running_var - var, 2) + torch.norm(bn.running_mean - mean, 2)
        l2 += torch.norm(mean - bn.running_mean, 2) + torch.norm(
            torch.sqrt(var + bn.eps) - torch.sqrt(bn.running_var + bn.eps), 2)
    torch.testing.assert_close(bn_statistics_loss(m, x, variant="deepinversion"), deep)
    torch.testing.assert_close(bn_statistics_loss(m, x, variant="l2"), l2)
    # groups: the mean over sub-batches of each sub-batch's loss
    halves = [bn_statistics_loss(m, h, variant="l2") for h in x.split(8)]
    torch.testing.assert_close(bn_statistics_loss(m, x, groups=2, variant="l2"), sum(halves) / 2)


def test_every_variant_synthesizes_and_bad_variants_fail():
    m = small_cnn()
    for variant in ("zeroq", "l2", "deepinversion"):
        out = synthesize_bn(m, (1, 6, 6), 32, 32, steps=15, lr=0.1, seed=0, variant=variant, progress=False)
        assert out.history[-1] < out.history[0], variant
    with pytest.raises(ValueError, match="variant must be one of"):
        bn_statistics_loss(m, torch.randn(4, 1, 6, 6), variant="ZeroQ")
    with pytest.raises(ValueError, match="variant must be one of"):
        synthesize_bn(m, (1, 6, 6), 8, 8, steps=1, variant="paper")
    mlp = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.ReLU()).eval()
    with pytest.raises(ValueError, match="spatial"):
        bn_statistics_loss(mlp, torch.randn(5, 4), variant="zeroq")
    assert bn_statistics_loss(mlp, torch.randn(5, 4), variant="deepinversion") > 0


# --- the input range without images (issue 11) -------------------------------------------------

@pytest.mark.parametrize("size", [8, 16])
def test_standardized_range_is_the_range_the_preprocessing_produces(size, request):
    """The data-free range (black and white pixel through the shipped normalization) is the
    range of the standardized training images, which hold black and white pixels."""
    digits = request.getfixturevalue(f"digits{size}")
    x = digits.train.tensors[0]
    lo, hi = standardized_range(*DIGITS_NORMALIZATION[size])
    assert lo == pytest.approx(x.min().item(), abs=1e-5) and hi == pytest.approx(x.max().item(), abs=1e-5)
    mean, std = DIGITS_NORMALIZATION[size]
    assert standardized_range(mean, std, 0.25, 0.5) == pytest.approx(((0.25 - mean) / std, (0.5 - mean) / std))
    for bad in (dict(std=0.0), dict(std=-1.0), dict(low=1.0, high=0.0), dict(mean=float("nan"))):
        with pytest.raises(ValueError):
            standardized_range(**(dict(mean=0.3, std=0.3) | bad))
