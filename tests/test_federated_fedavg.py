"""Tests of qlib.federated.fedavg and qlib.federated.server.

References: FedAvg (McMahan et al. 2017): the aggregate is the data-size-weighted mean of
the decoded updates (checked against a direct float64 formula on fresh random updates);
training on the digits must beat chance by far within a few rounds; same seeds, same model.
"""

import pytest
import torch

from qlib import data, models
from qlib.federated import codec, fedavg, partition, server
from qlib.qparams import PerTensor
from qlib.train import evaluate


@pytest.fixture(scope="module")
def digits():
    return data.load_digits(8)


def _clients(d, k=3, alpha=0.5):
    return partition.client_datasets(d.train, partition.dirichlet_partition(d.train.tensors[1], k, alpha, seed=0))


def test_aggregate_is_weighted_mean():
    ups = [({"w": torch.randn(4, 3)}, n) for n in (5, 1, 10)]
    want = sum(u["w"].double() * n for u, n in ups) / 16
    assert torch.equal(fedavg.aggregate(ups)["w"], want.float())
    enc = [(codec.encode_update(u, 4, PerTensor(), "nearest"), n) for u, n in ups]
    want = sum(codec.decode(e["w"]).double() * n for e, n in enc) / 16
    assert torch.equal(fedavg.aggregate(enc)["w"], want.float())
    with pytest.raises(ValueError, match="at least one"):
        fedavg.aggregate([])


def test_learns_and_is_deterministic(digits):
    cl = _clients(digits)
    cfg = fedavg.FedConfig(rounds=4, bits=4, rounding="stochastic")
    a, b = models.create("mlp", seed=0), models.create("mlp", seed=0)
    ha = fedavg.run_rounds(a, cl, cfg, evaluate=lambda m: evaluate(m, digits.test))
    hb = fedavg.run_rounds(b, cl, cfg)
    assert ha["acc"][-1] > 70  # chance is 10 %
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert ha["bytes"] == hb["bytes"]
    c = models.create("mlp", seed=0)
    fedavg.run_rounds(c, cl, fedavg.FedConfig(rounds=4, bits=4, rounding="stochastic", seed=1))
    assert not torch.equal(a[1].weight, c[1].weight)


def test_bytes_per_round_are_exact(digits):
    cl = _clients(digits, k=2)
    model = models.create("mlp", seed=0)
    h8 = fedavg.run_rounds(model, cl, fedavg.FedConfig(rounds=2, bits=8))
    h32 = fedavg.run_rounds(models.create("mlp", seed=0), cl, fedavg.FedConfig(rounds=2, bits=None))
    params = dict(model.named_parameters())
    buffers = {k: v for k, v in model.state_dict().items() if v.is_floating_point() and k not in params}
    per_client8 = sum(p.numel() + 4 * (p.shape[0] if p.dim() >= 2 else 1) for p in params.values()) \
        + 4 * sum(b.numel() for b in buffers.values())
    per_client32 = 4 * (sum(p.numel() for p in params.values()) + sum(b.numel() for b in buffers.values()))
    assert h8["bytes"] == [2 * per_client8, 4 * per_client8]
    assert h32["bytes"] == [2 * per_client32, 4 * per_client32]


def test_qat_clients_change_training(digits):
    cl = _clients(digits, k=2)
    a, b = models.create("mlp", seed=0), models.create("mlp", seed=0)
    fedavg.run_rounds(a, cl, fedavg.FedConfig(rounds=1, bits=None))
    fedavg.run_rounds(b, cl, fedavg.FedConfig(rounds=1, bits=None, qat_bits=2))
    assert not torch.equal(a[1].weight, b[1].weight)


def test_error_feedback_runs(digits):
    cl = _clients(digits, k=2)
    m = models.create("mlp", seed=0)
    h = fedavg.run_rounds(m, cl, fedavg.FedConfig(rounds=3, bits=2, rounding="nearest", error_feedback=True),
                          evaluate=lambda m: evaluate(m, digits.test))
    assert h["acc"][-1] > 50


def test_server_side_data_free_calibration(digits):
    m = models.create("mlp", seed=0)
    fedavg.run_rounds(m, _clients(digits), fedavg.FedConfig(rounds=4, bits=8))
    sets = server.calibration_sets(m, (1, 8, 8), real=[digits.train.tensors[0][:64]], num_samples=64, steps=20)
    assert set(sets) == {"synthetic", "noise", "real"}
    fp = evaluate(m, digits.test)
    q = evaluate(server.quantize_global(m, sets["synthetic"], 8, 8), digits.test)
    assert q > fp - 3


def test_bad_config():
    with pytest.raises(ValueError, match="bits"):
        fedavg.FedConfig(bits=3)
    with pytest.raises(ValueError, match="rounds"):
        fedavg.FedConfig(rounds=0)
    with pytest.raises(ValueError, match="qat_bits"):
        fedavg.FedConfig(qat_bits=1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_round(digits):
    m = models.create("mlp", seed=0).cuda()
    h = fedavg.run_rounds(m, _clients(digits, k=2), fedavg.FedConfig(rounds=1, bits=4))
    assert next(m.parameters()).is_cuda and h["bytes"][0] > 0


def test_bn_buffers_travel_in_fp32(digits):
    # regression: 2-bit running-variance updates drove a variance below zero (NaN logits)
    m = models.create("mlp", seed=0)
    enc, n = fedavg.client_update(m, _clients(digits, k=2)[0], fedavg.FedConfig(bits=2), 0, 0)
    assert isinstance(enc["2.running_var"], torch.Tensor) and isinstance(enc["1.weight"], codec.EncodedTensor)
    fedavg.run_rounds(m, _clients(digits, k=4, alpha=0.3), fedavg.FedConfig(rounds=3, bits=2))
    assert all((b.running_var >= 0).all() for b in m if isinstance(b, torch.nn.BatchNorm1d))
