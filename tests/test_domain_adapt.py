"""qlib.domain.adapt: AdaBN changes only BN buffers; the quantized orders; TENT.

Reference: AdaBN (Li et al., 2016): the new running statistics equal the mean and unbiased
variance of the BN inputs over the target data (recomputed here with forward hooks); TENT
(Wang et al., ICLR 2021): only the BN affine parameters move, and the entropy goes down.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qlib import ptq
from qlib.domain import adapt
from qlib.domain.evaluate import ptq_config
from qlib.modules import fake_quantizers


def small_model(seed=None):
    g = torch.Generator().manual_seed(seed if seed is not None else int(torch.randint(0, 2**31, (1,))))
    m = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                      nn.Conv2d(4, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3))
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        for bn in adapt.bn_modules(m).values():
            bn.running_mean.copy_(torch.randn(bn.num_features, generator=g))
            bn.running_var.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
    return m.eval()


def target(n=64, shift=1.5):
    return torch.randn(n, 1, 8, 8) * 2 + shift


def test_adabn_changes_only_bn_buffers():
    model = small_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adapted = adapt.adabn(model, [target(), target()])
    for k, v in model.state_dict().items():     # the argument is untouched
        assert torch.equal(v, before[k]), k
    for (name, p), (_, q) in zip(model.named_parameters(), adapted.named_parameters()):
        assert torch.equal(p, q), name           # no parameter changes
    changed = {k for k, v in adapted.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.endswith(("running_mean", "running_var", "num_batches_tracked")) for k in changed)
    assert not adapted.training


def test_adabn_statistics_are_the_target_moments():
    """The first BN sees the raw conv output: its new statistics are the target's moments.

    Three equal batches with a cumulative average (momentum None): the running mean is the
    mean over all images, the running variance the average of the per-batch unbiased ones.
    """
    model = small_model()
    x = target(96)
    adapted = adapt.adabn(model, [x[:32], x[32:64], x[64:]])
    with torch.no_grad():
        a = model[0](x)                          # input of BN "1" (conv weights unchanged)
    bn = adapted[1]
    assert torch.allclose(bn.running_mean, a.mean((0, 2, 3)), atol=1e-5)
    per_batch = torch.stack([a[i:i + 32].transpose(0, 1).flatten(1).var(1) for i in (0, 32, 64)])
    assert torch.allclose(bn.running_var, per_batch.mean(0), rtol=1e-4, atol=1e-5)
    assert int(bn.num_batches_tracked) == 3


def test_adabn_keeps_momentum_and_rejects_bad_input():
    model = small_model(0)
    assert all(bn.momentum == 0.1 for bn in adapt.bn_modules(adapt.adabn(model, target())).values())
    with pytest.raises(ValueError, match="empty"):
        adapt.adabn(model, [])
    with pytest.raises(ValueError, match="no BatchNorm"):
        adapt.adabn(nn.Sequential(nn.Flatten(), nn.Linear(64, 2)), target())
    with pytest.raises(TypeError, match="nn.Module"):
        adapt.adabn("model", target())


def test_adabn_repairs_a_mean_shift():
    """A source model, a target that is the source plus a constant: AdaBN undoes the shift."""
    model = small_model(1)
    src = torch.randn(256, 1, 8, 8)
    model = adapt.adabn(model, src)          # BN statistics of the source
    with torch.no_grad():
        want = model(src[:64])
        shifted = src[:64] + 3.0
        before = (model(shifted) - want).abs().mean()
        after = (adapt.adabn(model, src + 3.0)(shifted) - want).abs().mean()
    assert after < 0.25 * before


@pytest.mark.parametrize("order", adapt.ORDERS)
def test_adabn_quantized_orders(order):
    model = small_model(2)
    src, tgt = [torch.randn(64, 1, 8, 8)], [target()]
    q = adapt.adabn_quantized(model, tgt, ptq_config(8), source=src, order=order)
    assert fake_quantizers(q) and not adapt.bn_modules(q)  # folded and quantized
    right = adapt.adabn_quantized(model, tgt, ptq_config(8), order="adabn")
    stale = adapt.adabn_quantized(model, tgt, ptq_config(8), source=src, order="stale_ranges")
    # stale ranges: the activation quantizers are those of a source calibration
    src_q = ptq.quantize_static(model, src, ptq_config(8))
    for name, fq in fake_quantizers(stale).items():
        if name.endswith("input_fq") and name != "0.input_fq":
            assert torch.equal(fq.qparams()[0], fake_quantizers(src_q)[name].qparams()[0])
            assert not torch.equal(fq.qparams()[0], fake_quantizers(right)[name].qparams()[0])


def test_adabn_quantized_bad_order():
    with pytest.raises(ValueError, match="order"):
        adapt.adabn_quantized(small_model(0), [target()], ptq_config(8), order="later")
    with pytest.raises(ValueError, match="source"):
        adapt.adabn_quantized(small_model(0), [target()], ptq_config(8), order="stale_ranges")


def test_tent_moves_only_bn_affine_and_lowers_entropy():
    model = small_model(3)
    x = target(128)
    base = adapt.adabn(model, x)
    tented = adapt.tent(model, x, steps=5, lr=1e-2, batch_size=32)
    base_params = dict(base.named_parameters())
    moved = []
    for name, p in tented.named_parameters():
        is_bn = name.split(".")[0] in ("1", "4")     # the BatchNorms of small_model
        if not is_bn:
            assert torch.equal(p, base_params[name]), name
        elif not torch.equal(p, base_params[name]):
            moved.append(name)
    assert moved, "TENT did not move any BN affine parameter"
    with torch.no_grad():
        assert adapt.entropy(tented(x)) < adapt.entropy(base(x))
    assert all(p.requires_grad for p in tented.parameters())


def test_entropy_formula():
    logits = torch.randn(5, 4)
    p = logits.softmax(1)
    assert torch.allclose(adapt.entropy(logits), -(p * p.log()).sum(1).mean())
    with pytest.raises(ValueError, match="steps"):
        adapt.tent(small_model(0), target(), steps=-1)
