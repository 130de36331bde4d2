"""Tests for qlib.fold (batch-norm folding).

Reference: torch.nn.utils.fusion.fuse_conv_bn_weights / fuse_linear_bn_weights (what
torch.ao.quantization's fuse_conv_bn_eval uses), and the unfolded model in eval mode.
"""

import pytest
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights, fuse_linear_bn_weights

from qlib.fold import find_layer_bn_pairs, fold_batchnorm, fold_bn
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
