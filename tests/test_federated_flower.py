"""Tests of qlib.federated.flower: a two-client Flower simulation (Ray) that learns.

Reference: qlib.federated.fedavg.run_rounds, the in-process driver over the same client and
aggregation functions: Flower must produce bit for bit the same global model and the same
exact byte counts; the wire payload (packed codes + scales) must round-trip.
"""

import pytest
import torch

from qlib import data, models
from qlib.federated import codec, fedavg, flower, partition
from qlib.qparams import PerChannel
from qlib.train import evaluate


def test_wire_round_trip():
    upd = {"a.weight": torch.randn(5, 3), "a.bias": torch.randn(5), "bn.running_mean": torch.randn(5)}
    enc = codec.encode_update({k: upd[k] for k in ("a.weight", "a.bias")}, 2, PerChannel(0), "stochastic",
                              torch.Generator().manual_seed(0))
    enc["bn.running_mean"] = upd["bn.running_mean"]
    keys = list(upd)
    arrays = flower.to_wire(enc, keys)
    assert sum(a.nbytes for a in arrays) == codec.update_bytes(enc)
    back = flower.from_wire(arrays, upd, 2, {"a.weight", "a.bias"}, PerChannel(0))
    for k in keys:
        assert torch.equal(codec.decode_update(back)[k], codec.decode_update(enc)[k])


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.skipif(not flower.available(), reason="flwr[simulation] is not installed")
def test_two_client_simulation_learns_and_matches_in_process():
    d = data.load_digits(8)
    clients = partition.client_datasets(d.train, partition.dirichlet_partition(d.train.tensors[1], 2, 0.5, seed=0))
    cfg = fedavg.FedConfig(rounds=2, bits=4, rounding="stochastic")
    a, b = models.create("mlp", seed=0), models.create("mlp", seed=0)
    h = flower.simulate(a, clients, cfg, evaluate=lambda m: evaluate(m, d.test))
    ref = fedavg.run_rounds(b, clients, cfg, evaluate=lambda m: evaluate(m, d.test))
    assert h["acc"][-1] > 60, h  # chance is 10 %
    assert h["bytes"] == ref["bytes"] and h["acc"] == ref["acc"]
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    print(f"Flower 2-client 2-round simulation: {h['wall_s']:.1f} s")


def test_refuses_error_feedback():
    if not flower.available():
        pytest.skip("flwr[simulation] is not installed")
    with pytest.raises(ValueError, match="error feedback"):
        flower.simulate(models.create("mlp"), [None], fedavg.FedConfig(error_feedback=True))
