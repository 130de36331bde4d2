"""Tests for qlib.qat.convert (folding kept BatchNorms, freezing, step sizes).

Reference: the unfolded QAT model itself. Folding ``f = gamma / sqrt(var + eps)`` into a layer
with per-channel weight scales ``s |f|`` gives ``round(w f / (s |f|)) s |f| = f round(w / s) s``
(round half to even is odd-symmetric) for every code with a twin inside the range and off a tie:
all but the ends of the range.
"""

import pytest
import torch
from torch import nn

from qlib.lsq import LSQFakeQuantize
from qlib.modules import FakeQuantize, QuantConfig
from qlib.qat import FixedQParamsObserver, convert_qat, fold_kept_bn, prepare_qat, qat_layers, step_sizes


def model_with_signed_bn(seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Conv2d(1, 6, 3), nn.BatchNorm2d(6, eps=1e-2), nn.ReLU(), nn.Flatten(),
                              nn.Linear(6 * 6 * 6, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3))
    with torch.no_grad():
        for bn in (model[1], model[5]):
            bn.weight.copy_(torch.randn(bn.num_features, generator=gen))      # N(0, 1): negative ones too
            bn.bias.copy_(torch.randn(bn.num_features, generator=gen))
            bn.running_mean.copy_(torch.randn(bn.num_features, generator=gen) * 0.3)
            bn.running_var.copy_(torch.rand(bn.num_features, generator=gen) * 0.05 + 1e-3)
    assert (model[1].weight < 0).any() and (model[5].weight < 0).any()
    return model.eval()


def _trained(method: str, seed: int, positive: bool):
    model = model_with_signed_bn(seed)
    if positive:
        with torch.no_grad():
            for bn in (model[1], model[5]):
                bn.weight.abs_()
    qat = prepare_qat(model, QuantConfig(weight_bits=4, act_bits=8), method=method, fold_bn=False)
    x = torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(seed + 100))
    with torch.no_grad():
        qat.train()(x)                     # observers / LSQ initialization (BN statistics move: fine)
    for fq in qat.modules():
        if isinstance(fq, FakeQuantize) and fq.observe:
            fq.freeze()
    return qat.eval(), x


@pytest.mark.parametrize("method", ["ste", "lsq"])
@pytest.mark.parametrize("seed, positive", [(0, True), (0, False), (1, False)])
def test_kept_bn_folding_moves_only_the_codes_at_the_ends(method, seed, positive):
    """Every folded weight is ``f`` times its QAT value, except codes at the ends of the range: a
    negative ``f`` flips a channel's codes and ``quant_min`` has no twin (``-(-8) = 8 > 7``), and
    symmetric min-max scales put the largest weight on a tie (``max|w| / s = 7.5``) that float
    rounding may break either way. Those move by one step, nothing else. Kills the mutant that
    scales LSQ steps by ``f`` instead of ``|f|`` (its steps collapse to eps)."""
    qat, _ = _trained(method, seed, positive=positive)
    folded = convert_qat(qat)
    for layer_name, bn_name in (("0", "1"), ("4", "5")):
        layer, bn, new = qat.get_submodule(layer_name), qat.get_submodule(bn_name), folded.get_submodule(layer_name)
        f = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach()
        view = (-1,) + (1,) * (layer.weight.dim() - 1)
        with torch.no_grad():
            before = layer.weight_fq(layer.weight)
            after = new.weight_fq(new.weight)
        scale, _ = new.weight_fq.qparams()
        steps = ((after - before * f.reshape(view)) / scale.reshape(view)).abs()
        old_scale = (qat.get_submodule(layer_name).weight_fq.qparams()[0] if method == "lsq"
                     else layer.weight_fq.batch_qparams(layer.weight)[0])
        r = (layer.weight / old_scale.reshape(view)).detach()            # the unrounded codes
        clamped = r.abs() >= new.weight_fq.quant_max - 0.5 - 1e-4        # the outermost bins
        assert steps[~clamped].max() < 1e-3, layer_name
        assert steps[clamped].max() < 1 + 1e-3, layer_name
        if not positive:
            assert ((steps > 0.5) & (f.reshape(view) < 0)).any(), layer_name  # the flip does move codes


def test_convert_freezes_every_quantizer_and_keeps_step_sizes():
    qat = prepare_qat(model_with_signed_bn(1), QuantConfig(weight_bits=4, act_bits=4), method="lsq")
    x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        qat(x)
    frozen = convert_qat(qat)
    for layer in qat_layers(frozen).values():
        for fq in (layer.input_fq, layer.weight_fq):
            assert type(fq) is FakeQuantize and not fq.observe and fq.quantize
            assert isinstance(fq.observer, FixedQParamsObserver)
    assert step_sizes(frozen) == step_sizes(qat)
    assert all(isinstance(m, LSQFakeQuantize) for m in (qat[0].weight_fq, qat[0].input_fq))


def test_fold_kept_bn_without_pairs_is_a_no_op():
    qat = prepare_qat(model_with_signed_bn(2), QuantConfig())
    assert qat.qat_bn_pairs == [] and fold_kept_bn(qat) is qat


def test_convert_errors():
    with pytest.raises(ValueError, match="no fake-quant layers"):
        convert_qat(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(TypeError, match="nn.Module"):
        convert_qat("model")
    unseen = prepare_qat(model_with_signed_bn(3), QuantConfig(), method="lsq")
    with pytest.raises(ValueError, match="seen no data"):
        convert_qat(unseen)
