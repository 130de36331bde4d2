"""Tests for qlib.reconstruct.adaround and the shared loop in qlib.reconstruct.reconstruction.

Reference: Nagel et al., ICML 2020 (AdaRound): learned rounding minimises a layer's output
error ||W x - W~ x~||^2, so on *fresh* inputs (not the calibration set) the learned rounding
gives a layer output MSE no worse than round-to-nearest (qlib's ``fake_quantize``); after the
annealed regulariser h(V) is (near) binary; the result is an ordinary converted qlib model
whose weights are exactly on the frozen grid (``fake_quantize(w) == w`` with ``torch.equal``).
Determinism: the mini-batches come from a ``torch.Generator`` seeded by ``seed``.
"""

import copy

import pytest
import torch

from qlib import data, models
from qlib.modules import QuantConfig, fake_quantizers
from qlib.ptq import prepare, quantize_static
from qlib.reconstruct import AdaRoundQuantizer, adaround, capture, float_reference
from qlib.train import evaluate

W3 = QuantConfig(weight_bits=3, act_bits=8, weight_observer="mse")


@pytest.fixture(scope="module")
def setup():
    digits = data.load_digits(16)
    model = models.pretrained("cnn16", 0)
    calib = digits.train.tensors[0][:128]
    fresh = digits.val.tensors[0][:128]
    q = quantize_static(model, calib.split(64), W3)
    return digits, model, q, calib, fresh


def layer_output_mse(q, name, x, fp):
    """Output MSE of layer ``name`` of ``q`` on inputs ``x`` against the float model's output."""
    return (capture(q, name, x, "output") - capture(fp, name, x, "output")).pow(2).mean().item()


def on_grid(q, names=None):
    for name, m in q.named_modules():
        if hasattr(m, "weight_fq") and (names is None or name in names):
            assert torch.equal(m.weight_fq(m.weight), m.weight), name


def test_beats_round_to_nearest_on_fresh_data_and_h_is_binary(setup):
    _, _, q, calib, fresh = setup
    fp = float_reference(q)
    qa, stats = adaround(q, calib, layers=["3"], iters=200, seed=0, return_stats=True)
    rtn, learned = layer_output_mse(q, "3", fresh, fp), layer_output_mse(qa, "3", fresh, fp)
    assert learned < 0.9 * rtn, (learned, rtn)
    # at the start few fractional parts lie within 1e-3 of 0 or 1; the annealed regulariser
    # drives most h(V) there in 200 steps (20000 in the paper: all of them)
    layer = q.get_submodule("3")
    assert AdaRoundQuantizer(layer.weight, layer.weight_fq).binary_fraction() < 0.05
    assert stats["3"]["binary"] > 0.85
    assert stats["3"]["loss_end"] < stats["3"]["loss_start"]
    # only layer '3' changed; the other layers keep round-to-nearest; the argument is unchanged
    for name in ("0", "7", "12"):
        assert torch.equal(qa.get_submodule(name).weight, q.get_submodule(name).weight)
    assert not torch.equal(qa.get_submodule("3").weight, q.get_submodule("3").weight)
    assert torch.equal(q.get_submodule("3").weight, fp.get_submodule("3").weight)


def test_result_is_an_ordinary_converted_model_on_the_grid(setup):
    digits, model, q, calib, _ = setup
    qa = adaround(q, calib, iters=20, seed=0)
    on_grid(qa)
    for name, fq in fake_quantizers(qa).items():  # same frozen grids and modes as the input
        ref = q.get_submodule(name)
        assert torch.equal(fq.frozen_scale, ref.frozen_scale) and fq.quantize and not fq.observe
    assert all(not p.requires_grad or p0.requires_grad for p, p0 in zip(qa.parameters(), q.parameters()))
    assert 0 <= evaluate(qa, digits.test) <= 100


def test_deterministic_under_a_seed(setup):
    _, _, q, calib, _ = setup
    a = adaround(q, calib, layers=["7"], iters=15, lr=1e-2, seed=3)
    b = adaround(q, calib, layers=["7"], iters=15, lr=1e-2, seed=3)
    assert torch.equal(a.get_submodule("7").weight, b.get_submodule("7").weight)


def test_float64_model():
    model = models.create("cnn16", seed=0).double()
    x = torch.randn(32, 1, 16, 16, dtype=torch.float64)
    q = quantize_static(model, x, W3)
    qa = adaround(q, x, layers=["0"], iters=5, seed=0)
    assert qa.get_submodule("0").weight.dtype == torch.float64
    on_grid(qa, ["0"])


def test_bad_inputs(setup):
    _, model, q, calib, _ = setup
    with pytest.raises(ValueError, match="not frozen"):
        adaround(prepare(model, W3), calib)
    with pytest.raises(ValueError, match="no fake-quant layers"):
        adaround(model, calib)
    with pytest.raises(TypeError, match="converted"):
        adaround("model", calib)
    with pytest.raises(ValueError, match="iters"):
        adaround(q, calib, iters=0)
    with pytest.raises(ValueError, match="empty"):
        adaround(q, [], iters=1)
    with pytest.raises(ValueError, match="not fake-quant layers"):
        adaround(q, calib, layers=["1"], iters=1)
    with pytest.raises(ValueError, match="NaN"):
        adaround(q, torch.full((4, 1, 16, 16), float("nan")), iters=1)
    with pytest.raises(TypeError, match="seed"):
        adaround(q, calib, iters=1, seed=0.5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda(setup):
    _, _, q, calib, _ = setup
    qc = copy.deepcopy(q).cuda()
    qa = adaround(qc, calib, layers=["3"], iters=10, seed=0)
    assert qa.get_submodule("3").weight.device.type == "cuda"
    on_grid(qa)
