"""Tests for qlib.fold (batch-norm folding).

Reference: torch.nn.utils.fusion.fuse_conv_bn_weights / fuse_linear_bn_weights (what
torch.ao.quantization's fuse_conv_bn_eval uses), and the unfolded model in eval mode.
"""

import pytest
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights, fuse_linear_bn_weights

from qlib.fold import LayerPair, find_layer_bn_pairs, find_layer_pairs, fold_batchnorm, fold_bn
from qlib.models import BasicBlock, create


def randomize_bn(model: nn.Module) -> nn.Module:
    """Give every BatchNorm non-trivial running statistics and affine parameters."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_(0, 0.5)
                m.running_var.uniform_(0.2, 3.0)
                if m.weight is not None:
                    m.weight.normal_(1, 0.3)
                    m.bias.normal_(0, 0.3)
    return model


def assert_same_eval_output(model, x, atol=1e-5):
    folded = fold_batchnorm(model)
    expected = model.eval()(x)
    got = folded(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=atol)
    return folded


@pytest.mark.parametrize("bias", [True, False])
def test_fold_bn_conv_matches_torch(bias):
    conv = nn.Conv2d(3, 8, 3, bias=bias)
    bn = randomize_bn(nn.BatchNorm2d(8))
    w, b = fold_bn(conv.weight, conv.bias, bn)
    w_ref, b_ref = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var,
                                        bn.eps, bn.weight, bn.bias)
    torch.testing.assert_close(w, w_ref.detach())
    torch.testing.assert_close(b, b_ref.detach())


def test_fold_bn_linear_matches_torch():
    lin = nn.Linear(10, 6)
    bn = randomize_bn(nn.BatchNorm1d(6))
    w, b = fold_bn(lin.weight, lin.bias, bn)
    w_ref, b_ref = fuse_linear_bn_weights(lin.weight, lin.bias, bn.running_mean, bn.running_var,
                                          bn.eps, bn.weight, bn.bias)
    torch.testing.assert_close(w, w_ref.detach())
    torch.testing.assert_close(b, b_ref.detach())


def test_fold_bn_without_affine():
    lin = nn.Linear(5, 4)
    bn = randomize_bn(nn.BatchNorm1d(4, affine=False))
    w, b = fold_bn(lin.weight, lin.bias, bn)
    x = torch.randn(7, 5)
    torch.testing.assert_close(x @ w.T + b, bn.eval()(lin(x)))


def test_fold_bn_errors():
    bn = nn.BatchNorm2d(4)
    with pytest.raises(ValueError, match="output channels"):
        fold_bn(torch.randn(5, 3, 3, 3), None, bn)
    with pytest.raises(ValueError, match="bias"):
        fold_bn(torch.randn(4, 3), torch.randn(5), nn.BatchNorm1d(4))
    with pytest.raises(TypeError, match="BatchNorm"):
        fold_bn(torch.randn(4, 3), None, nn.ReLU())
    with pytest.raises(ValueError, match="running statistics"):
        fold_bn(torch.randn(4, 3), None, nn.BatchNorm1d(4, track_running_stats=False))
    with pytest.raises(TypeError, match="nn.Module"):
        fold_batchnorm("not a model")


def test_sequential_cnn():
    model = randomize_bn(create("cnn8", seed=None))
    folded = assert_same_eval_output(model, torch.randn(16, 1, 8, 8))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert all(m.bias is not None for m in folded.modules() if isinstance(m, nn.Conv2d))


def test_mlp_with_batchnorm1d():
    model = randomize_bn(create("mlp", seed=None))
    folded = assert_same_eval_output(model, torch.randn(16, 1, 8, 8))
    assert not any(isinstance(m, nn.BatchNorm1d) for m in folded.modules())


@pytest.mark.parametrize("stride", [1, 2])
def test_residual_block(stride):
    c_out = 16 if stride == 1 else 24
    block = randomize_bn(BasicBlock(16, c_out, stride=stride))
    folded = assert_same_eval_output(block, torch.randn(4, 16, 8, 8))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())


def test_res16_model():
    model = randomize_bn(create("res16", seed=None))
    folded = assert_same_eval_output(model, torch.randn(4, 1, 16, 16), atol=1e-4)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in folded.modules()) == 0


def test_original_untouched_even_in_training_mode():
    model = randomize_bn(create("cnn8", seed=None)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded = fold_batchnorm(model)
    assert model.training and not folded.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    # the folded copy reproduces the *eval-mode* behaviour
    x = torch.randn(8, 1, 8, 8)
    torch.testing.assert_close(folded(x), model.eval()(x), rtol=1e-5, atol=1e-5)


class SharedOutput(nn.Module):
    """conv output goes to the BN *and* elsewhere: folding would change the other use."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


class BnFirst(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(5)
        self.lin = nn.Linear(5, 3)

    def forward(self, x):
        return self.lin(torch.relu(self.bn(x)))


@pytest.mark.parametrize("cls", [SharedOutput, BnFirst])
def test_unfoldable_pairs_are_left_alone(cls):
    model = randomize_bn(cls())
    assert find_layer_bn_pairs(model) == []
    x = torch.randn(6, 3, 5, 5) if cls is SharedOutput else torch.randn(6, 5)
    folded = assert_same_eval_output(model, x)
    assert isinstance(folded.bn, nn.modules.batchnorm._BatchNorm)


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU())

    def forward(self, x):
        if x.sum() > 1e9:  # data-dependent control flow: torch.fx cannot trace this
            return x
        return self.body(x)


def test_untraceable_model_falls_back_to_sequential_neighbours():
    model = randomize_bn(Untraceable())
    with pytest.warns(UserWarning, match="could not trace"):
        folded = assert_same_eval_output(model, torch.randn(5, 4))
    assert isinstance(folded.body[1], nn.Identity)


# ----------------------------------------------------------------- surviving mutants, shared modules
class SharedConv(nn.Module):
    """One conv called twice: folding its BatchNorm would change the second use too."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x)) + self.conv(x)


class SharedBn(nn.Module):
    """One BatchNorm after two convs: it can be folded into neither."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.a(x)) + self.bn(self.b(x))


@pytest.mark.parametrize("cls", [SharedConv, SharedBn])
def test_modules_called_twice_are_not_folded(cls):
    torch.manual_seed(0)
    model = randomize_bn(cls())
    assert find_layer_bn_pairs(model) == []
    folded = assert_same_eval_output(model, torch.randn(2, 3, 5, 5))
    assert isinstance(folded.bn, nn.BatchNorm2d)


def reference_fold(weight, bias, bn):
    """The written formula, in float64."""
    var, mean = bn.running_var.double(), bn.running_mean.double()
    gamma = bn.weight.double() if bn.affine else torch.ones_like(var)
    beta = bn.bias.double() if bn.affine else torch.zeros_like(var)
    factor = gamma / torch.sqrt(var + bn.eps)
    b = bias.double() if bias is not None else torch.zeros_like(var)
    return weight.double() * factor.reshape(-1, *[1] * (weight.dim() - 1)), (b - mean) * factor + beta


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("eps", [1e-3, 0.1])
def test_fold_bn_with_signed_gammas_small_variances_and_large_eps(affine, eps):
    """Kills two mutants the lab check alone caught: ``eps`` dropped, and ``|gamma|`` for gamma < 0."""
    gen = torch.Generator().manual_seed(int(eps * 1000) + affine)
    conv = nn.Conv2d(3, 16, 3)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen))
        conv.bias.copy_(torch.randn(16, generator=gen))
    bn = nn.BatchNorm2d(16, eps=eps, affine=affine).eval()
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(16, generator=gen))
        bn.running_var.copy_(torch.rand(16, generator=gen) * 1e-3)  # var << eps: eps matters
        if affine:
            bn.weight.copy_(torch.randn(16, generator=gen))  # N(0, 1): about half negative
            bn.bias.copy_(torch.randn(16, generator=gen))
    if affine:
        assert (bn.weight < 0).any()
    w, b = fold_bn(conv.weight, conv.bias, bn)
    w_ref, b_ref = reference_fold(conv.weight, conv.bias, bn)
    torch.testing.assert_close(w.double(), w_ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(b.double(), b_ref, rtol=1e-6, atol=1e-6)
    model = nn.Sequential(conv, bn)
    x = torch.randn(4, 3, 6, 6, generator=gen)
    torch.testing.assert_close(fold_batchnorm(model)(x), model.eval()(x), rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------- find_layer_pairs
class LayerChain(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.relu, self.pool = nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(2)
        self.c2, self.c3 = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)
        self.flat, self.fc = nn.Flatten(), nn.Linear(4 * 3 * 3, 2)

    def forward(self, x):
        y = self.c2(self.pool(self.relu(self.c1(x))))
        z = self.relu(self.c3(y)) + y  # c2's output has two consumers: c2 -> c3 is not a pair
        return self.fc(self.flat(z))


def test_find_layer_pairs_across_modules_and_skips_branches():
    model = LayerChain()
    through = (nn.ReLU, nn.MaxPool2d, nn.Flatten)
    pairs = find_layer_pairs(model, second=(nn.Conv2d, nn.Linear), through=through)
    assert pairs == [LayerPair("c1", "c2", ("relu", "pool"))]
    assert find_layer_pairs(model, second=(nn.Conv2d, nn.Linear)) == []  # nothing directly adjacent
    seq = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
    assert find_layer_pairs(seq, second=nn.Conv2d, through=nn.ReLU) == [LayerPair("0", "2", ("1",))]
    assert find_layer_pairs(seq) == [LayerPair("2", "3")]
    with pytest.raises(TypeError, match="nn.Module class"):
        find_layer_pairs(seq, second="BatchNorm2d")
    with pytest.raises(TypeError, match="nn.Module"):
        find_layer_pairs(lambda x: x)


def test_find_layer_pairs_falls_back_with_through():
    class Wrapped(Untraceable):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))

    with pytest.warns(UserWarning, match="could not trace"):
        pairs = find_layer_pairs(Wrapped(), second=nn.Linear, through=nn.ReLU)
    assert pairs == [LayerPair("body.0", "body.2", ("body.1",))]


def test_set_submodule_is_public_and_private_copies_are_gone():
    from qlib import fold, modules

    assert not hasattr(fold, "_set_submodule")
    model = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.ReLU()))
    modules.set_submodule(model, "1.0", nn.Tanh())
    assert isinstance(model[1][0], nn.Tanh)
    with pytest.raises(AttributeError):
        modules.set_submodule(model, "1.5", nn.Tanh())
    with pytest.raises(ValueError, match="non-empty"):
        modules.set_submodule(model, "", nn.Tanh())
