"""Tests for qlib.ptq (static and dynamic post-training quantization).

Reference: the fp32 model (quantized outputs stay close to it, more so with more bits) and
the contract of torch.ao.quantization's prepare / calibrate / convert and quantize_dynamic
(dynamic = static calibrated on the very batch being run). Accuracy-free properties on
small random models, so the tests need no data or trained weights.
"""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from qlib.models import create
from qlib.modules import QuantConfig, QuantConv2d, QuantLinear, fake_quantizers
from qlib.ptq import calibrate, convert, prepare, quantize_dynamic, quantize_static
from qlib.qparams import PerTensor


def randomize_bn(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_(0, 0.3)
                m.running_var.uniform_(0.5, 2.0)
    return model


def rel_error(y, ref):
    """Root-mean-square error relative to the RMS of the reference."""
    return ((y - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()).item()


@pytest.fixture(params=["mlp", "cnn8"])
def model_and_data(request):
    model = randomize_bn(create(request.param, seed=None)).eval()
    calib = [torch.randn(32, 1, 8, 8) for _ in range(3)]
    return model, calib, torch.randn(64, 1, 8, 8)


def test_prepare_folds_swaps_and_observes(model_and_data):
    model, calib, x = model_and_data
    prepared = prepare(model)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in prepared.modules())
    assert not any(type(m) in (nn.Linear, nn.Conv2d) for m in prepared.modules())
    assert all(fq.observe and not fq.quantize for fq in fake_quantizers(prepared).values())
    assert not prepared.training
    torch.testing.assert_close(prepared(x), model(x), rtol=1e-4, atol=1e-5)  # float until convert
    assert any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def seeded(name: str, seed: int) -> nn.Module:
    """A random zoo model with random BatchNorm statistics, all from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    model = create(name, seed=seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.3)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) * 1.5 + 0.5)
    return model.eval()


# Bounds at about twice the largest error measured over seeds 0-59 (static) and 0-39 (dynamic)
# with exactly these models and data (torch 2.x CPU): static W8A8 max 0.0183 (mlp), 0.0095
# (cnn8), while W8A6 reaches 0.0675 (mlp), 0.0212 (cnn8). Dynamic W8 max 0.0149 (mlp), 0.0091
# (cnn8), 0.0118 (res16). Ratios: static W2A8 / W8A8 >= 23.7, dynamic W3 / W8 >= 22.8 (bound 10).
STATIC_W8A8_MAX = {"mlp": 0.037, "cnn8": 0.019}
DYNAMIC_W8_MAX = {"mlp": 0.03, "cnn8": 0.018, "res16": 0.024}


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("name", ["mlp", "cnn8"])
def test_static_w8a8_close_to_fp32_and_w2_further(name, seed):
    model = seeded(name, seed)
    gen = torch.Generator().manual_seed(1000 + seed)
    calib = [torch.randn(32, 1, 8, 8, generator=gen) for _ in range(3)]
    x = torch.randn(64, 1, 8, 8, generator=gen)
    with torch.no_grad():
        ref = model(x)
        err8 = rel_error(quantize_static(model, calib)(x), ref)
        err2 = rel_error(quantize_static(model, calib, QuantConfig(weight_bits=2))(x), ref)
    assert err8 < STATIC_W8A8_MAX[name], err8
    assert err2 > 10 * err8, (err2, err8)


def test_calibrate_accepts_tensors_pairs_loaders_and_counts_batches(capsys):
    model = create("mlp", seed=None).eval()
    xs = [torch.randn(8, 1, 8, 8) for _ in range(5)]
    ys = [torch.randint(0, 10, (8,)) for _ in range(5)]
    loader = DataLoader(TensorDataset(torch.cat(xs), torch.cat(ys)), batch_size=8)
    for data, max_batches, expected in [(xs, None, 5), (list(zip(xs, ys)), 2, 2), (loader, None, 5),
                                        (loader, 3, 3), (iter(xs), 4, 4), (xs[0], None, 1)]:
        prepared = calibrate(prepare(model), data, max_batches=max_batches)
        counts = {int(fq.observed_batches) for fq in fake_quantizers(prepared).values()}
        assert counts == {expected}
    assert capsys.readouterr().err == ""  # no progress bar when not on a terminal


def test_calibrate_errors():
    prepared = prepare(create("mlp", seed=None))
    with pytest.raises(ValueError, match="calibration data is empty"):
        calibrate(prepared, [])
    with pytest.raises(ValueError, match="calibration data is empty"):
        calibrate(prepared, DataLoader(TensorDataset(torch.randn(0, 1, 8, 8)), batch_size=4))
    with pytest.raises(TypeError, match="tensor"):
        calibrate(prepared, [("not", "tensors")])
    with pytest.raises(TypeError, match="iterable"):
        calibrate(prepared, 3.0)
    with pytest.raises(ValueError, match="max_batches"):
        calibrate(prepared, [torch.randn(2, 1, 8, 8)], max_batches=0)
    with pytest.raises(ValueError, match="prepare"):
        calibrate(create("mlp", seed=None), [torch.randn(2, 1, 8, 8)])


def test_calibrate_rejects_a_nan_batch_by_its_index_before_observing_it():
    # reference: qlib.batching.input_batches(..., finite=True), the one NaN check of the loops
    import qlib.ptq as ptq
    g = torch.Generator().manual_seed(0)
    good = torch.randn(4, 1, 8, 8, generator=g)
    bad = good.clone()
    bad[2, 0, 3, 3] = float("inf")
    prepared = prepare(create("mlp", seed=0))
    with pytest.raises(ValueError, match="batch 1 .*NaN or infinite"):
        calibrate(prepared, [(good, torch.zeros(4)), (bad, torch.zeros(4))])
    fqs = fake_quantizers(prepared).values()
    assert all(int(fq.observed_batches) == 1 for fq in fqs if fq.observe)  # the first batch only
    assert all(torch.isfinite(fq.observer.max_val).all() for fq in fqs if int(fq.observed_batches))
    assert not hasattr(ptq, "_batches") and not hasattr(ptq, "_inputs")  # one batching helper


def test_convert_needs_calibration_and_returns_a_copy():
    prepared = prepare(create("cnn8", seed=None))
    with pytest.raises(ValueError, match="calibrate"):
        convert(prepared)
    with pytest.raises(ValueError, match="prepare"):
        convert(create("cnn8", seed=None))
    calibrate(prepared, torch.randn(16, 1, 8, 8))
    converted = convert(prepared)
    assert all(not fq.observe and fq.quantize for fq in fake_quantizers(converted).values())
    assert all(fq.observe and not fq.quantize for fq in fake_quantizers(prepared).values())


def test_per_layer_bits_and_skips():
    model = randomize_bn(create("cnn8", seed=None)).eval()
    cfg4 = QuantConfig(weight_bits=4, act_bits=4)
    q = quantize_static(model, torch.randn(16, 1, 8, 8), per_layer={"0": None, "12": cfg4})
    assert type(q[0]) is nn.Conv2d
    assert isinstance(q[3], QuantConv2d) and q[3].weight_fq.bits == 8
    assert isinstance(q[12], QuantLinear) and q[12].weight_fq.bits == 4 and q[12].input_fq.bits == 4
    per_tensor = QuantConfig(weight_granularity=PerTensor())
    q = quantize_static(model, torch.randn(16, 1, 8, 8), per_tensor)
    assert q[3].weight_fq.qparams()[0].numel() == 1


def test_dynamic_equals_static_calibrated_on_the_same_batch():
    model = nn.Sequential(nn.Linear(20, 7))
    x = torch.randn(32, 20) * 3
    static = quantize_static(model, [x])
    dynamic = quantize_dynamic(model)
    assert torch.equal(dynamic(x), static(x))
    x_new = torch.randn(32, 20) * 10  # a wider batch: static clips it, dynamic adapts
    assert not torch.equal(dynamic(x_new), static(x_new))
    assert rel_error(dynamic(x_new), model(x_new)) < rel_error(static(x_new), model(x_new))


@pytest.mark.parametrize("name", ["mlp", "cnn8", "res16"])
def test_dynamic_close_to_fp32(name):
    size = 16 if name == "res16" else 8
    model = seeded(name, 3)
    x = torch.randn(16, 1, size, size, generator=torch.Generator().manual_seed(2000))
    with torch.no_grad():
        ref = model(x)
        err8 = rel_error(quantize_dynamic(model)(x), ref)
        err3 = rel_error(quantize_dynamic(model, bits=3)(x), ref)
    assert err8 < DYNAMIC_W8_MAX[name] and err3 > 10 * err8, (err8, err3)
    dynamic = quantize_dynamic(model)
    assert all(fq.dynamic for name, fq in fake_quantizers(dynamic).items() if name.endswith("input_fq"))
    assert all(not fq.dynamic and fq.quantize for name, fq in fake_quantizers(dynamic).items()
               if name.endswith("weight_fq"))


def test_quantize_dynamic_errors():
    model = create("mlp", seed=None)
    with pytest.raises(ValueError, match="not both"):
        quantize_dynamic(model, bits=4, config=QuantConfig())
    with pytest.raises(ValueError, match="bits"):
        quantize_dynamic(model, bits=1)
    with pytest.raises(ValueError, match="no layers to quantize"):
        quantize_dynamic(nn.Sequential(nn.ReLU()))


def test_models_are_not_modified():
    model = randomize_bn(create("cnn8", seed=None)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    quantize_static(model, torch.randn(8, 1, 8, 8))
    quantize_dynamic(model)
    assert model.training
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_evaluation_between_calibrate_and_convert_does_not_move_the_ranges():
    """Regression: evaluating the prepared model leaked test data into the observers."""
    from qlib.train import evaluate

    gen = torch.Generator().manual_seed(0)
    model = randomize_bn(create("cnn8", seed=0)).eval()
    calib = [torch.randn(32, 1, 8, 8, generator=gen) for _ in range(2)]
    test = TensorDataset(5 * torch.randn(64, 1, 8, 8, generator=gen), torch.randint(0, 10, (64,), generator=gen))
    prepared = calibrate(prepare(model), calib)
    before = {n: (fq.observer.min_val.clone(), fq.observer.max_val.clone(), int(fq.observed_batches))
              for n, fq in fake_quantizers(prepared).items()}
    evaluate(prepared, test)
    prepared(test.tensors[0])  # a plain eval-mode forward is evaluation too
    for name, fq in fake_quantizers(prepared).items():
        lo, hi, n = before[name]
        assert torch.equal(fq.observer.min_val, lo) and torch.equal(fq.observer.max_val, hi), name
        assert int(fq.observed_batches) == n, name
    x = test.tensors[0]
    assert torch.equal(convert(prepared)(x), quantize_static(model, calib)(x))


def test_calibrate_again_adds_to_the_ranges():
    gen = torch.Generator().manual_seed(1)
    model = create("mlp", seed=0).eval()
    prepared = calibrate(prepare(model), torch.randn(16, 1, 8, 8, generator=gen))
    calibrate(prepared, 10 * torch.randn(16, 1, 8, 8, generator=gen))
    assert all(int(fq.observed_batches) == 2 for fq in fake_quantizers(prepared).values()
               if fq.observe)


def test_calibrate_feeds_batches_in_the_model_dtype():
    """Batches go through qlib.batching: float32 data calibrates a float64 model (it used to fail
    inside torch's conv), from a tensor or a DataLoader of (x, y) pairs alike."""
    gen = torch.Generator().manual_seed(5)
    model = seeded("cnn8", 0).double()
    data = torch.randn(16, 1, 8, 8, generator=gen, dtype=torch.float64)
    a = calibrate(prepare(model), data.float())
    b = calibrate(prepare(model), DataLoader(TensorDataset(data.float(), torch.zeros(16)), batch_size=16))
    for (name, fa), fb in zip(fake_quantizers(a).items(), fake_quantizers(b).values()):
        assert int(fa.observed_batches) == 1, name
        assert torch.equal(fa.observer.min_val, fb.observer.min_val), name
    x = data.float()
    assert convert(a)(x.double()).dtype == torch.float64
