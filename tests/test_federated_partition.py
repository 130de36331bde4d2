"""Tests of qlib.federated.partition.

Reference: the Dirichlet label partition of Hsu et al. (2019): a partition (every example
exactly once), seeded, one-class-ish clients for small alpha and near-global mixes for large
alpha; the Gamma sampler against the Gamma distribution's mean and variance.
"""

import pytest
import torch

from qlib.federated import partition
from qlib.federated.partition import _gamma


def _labels(n=600, classes=10):
    return torch.randint(0, classes, (n,), generator=torch.Generator().manual_seed(int(torch.randint(0, 999, ()))))


@pytest.mark.parametrize("alpha", [0.1, 1.0, 100.0])
def test_dirichlet_is_a_partition(alpha):
    y = _labels()
    parts = partition.dirichlet_partition(y, 5, alpha, seed=1)
    allidx = torch.cat(parts).sort().values
    assert torch.equal(allidx, torch.arange(len(y)))
    assert min(len(p) for p in parts) >= 1


def test_dirichlet_seeded():
    y = _labels()
    a = partition.dirichlet_partition(y, 4, 0.5, seed=3)
    b = partition.dirichlet_partition(y, 4, 0.5, seed=3)
    c = partition.dirichlet_partition(y, 4, 0.5, seed=4)
    assert all(torch.equal(x, z) for x, z in zip(a, b))
    assert not all(torch.equal(x, z) for x, z in zip(a, c))


def test_alpha_controls_skew():
    y = _labels(2000)

    def skew(alpha):  # mean over clients of the largest class share
        h = partition.label_histogram(y, partition.dirichlet_partition(y, 5, alpha, seed=0), 10).float()
        return (h.max(1).values / h.sum(1)).mean().item()
    # IID share of the top class is about 0.1; alpha 0.1 leaves each client 2-3 classes
    assert skew(0.1) > 0.3 and skew(0.1) > skew(1.0) > skew(100.0) and skew(100.0) < 0.15


def test_gamma_moments():
    g = torch.Generator().manual_seed(0)
    for a in (0.3, 2.0):
        x = torch.cat([_gamma(torch.full((500,), a, dtype=torch.float64), g) for _ in range(4)])
        # Gamma(a, 1): mean a, variance a; 5 standard errors
        assert abs(x.mean().item() - a) < 5 * (a / len(x)) ** 0.5
        assert abs(x.var().item() - a) < 0.25 * a


def test_iid_partition_and_datasets():
    y = _labels(103)
    x = torch.randn(103, 2)
    parts = partition.iid_partition(y, 4, seed=0)
    assert sorted(len(p) for p in parts) == [25, 26, 26, 26]
    ds = partition.client_datasets(torch.utils.data.TensorDataset(x, y), parts)
    assert torch.equal(ds[2].tensors[0], x[parts[2]])


def test_bad_inputs():
    with pytest.raises(ValueError, match="alpha"):
        partition.dirichlet_partition(_labels(), 3, 0.0)
    with pytest.raises(ValueError, match="num_clients"):
        partition.iid_partition(_labels(), 0)
    with pytest.raises(TypeError, match="labels"):
        partition.iid_partition(torch.rand(10), 2)
