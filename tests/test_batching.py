"""qlib.batching: the one helper that turns data into batches on a device and dtype.

Reference: the forms accepted are written in the module docstring; modes are compared with
each submodule's own ``training`` flag.
"""

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from qlib.batching import (check_seed, eval_mode, input_batches, iter_batches, model_device, model_dtype, placed,
                           to_device)


def _data(n=10):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, generator=g), torch.arange(n) % 3


def test_forms_give_the_same_batches():
    x, y = _data()
    ds = TensorDataset(x, y)
    for data in (ds, DataLoader(ds, batch_size=4), [(x[:4], y[:4]), (x[4:8], y[4:8]), (x[8:], y[8:])]):
        xs, ys = zip(*iter_batches(data, batch_size=4))
        assert torch.equal(torch.cat(xs), x) and torch.equal(torch.cat(ys), y)
    (bx, by), = list(iter_batches(x))
    assert torch.equal(bx, x) and by is None


def test_dtype_casts_inputs_not_labels():
    x, y = _data()
    for dtype in (torch.float64, torch.bfloat16):
        (bx, by), = list(iter_batches([(x, y)], dtype=dtype))
        assert bx.dtype == dtype and by.dtype == torch.int64
    assert next(input_batches(TensorDataset(x, y), dtype=torch.float64)).dtype == torch.float64


def test_shuffle_is_seeded():
    x, y = _data(32)
    a = [b for b, _ in iter_batches(TensorDataset(x, y), 8, shuffle=True, seed=3)]
    b = [b for b, _ in iter_batches(TensorDataset(x, y), 8, shuffle=True, seed=3)]
    c = [b for b, _ in iter_batches(TensorDataset(x, y), 8, shuffle=True, seed=4)]
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert not all(torch.equal(p, q) for p, q in zip(a, c))


def test_empty_batches_skipped_and_bad_forms_rejected():
    x, _ = _data()
    assert list(iter_batches([x[:0]])) == []
    for bad in (3, "abc", {"x": x}, [3.0]):
        with pytest.raises(TypeError, match="expected|each batch"):
            list(iter_batches(bad))


def test_model_device_and_dtype():
    m = nn.Linear(2, 2).double()
    assert model_device(m) == torch.device("cpu") and model_dtype(m) == torch.float64
    assert model_device(nn.ReLU()) == torch.device("cpu") and model_dtype(nn.ReLU()) == torch.float32
    t = to_device((torch.ones(1), torch.ones(1, dtype=torch.long)), "cpu", torch.float64)
    assert t[0].dtype == torch.float64 and t[1].dtype == torch.long


def test_eval_mode_restores_each_submodule_even_on_error():
    m = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    m.train()
    m[1].eval()  # deliberately frozen BN stays frozen afterwards
    with pytest.raises(RuntimeError):
        with eval_mode(m):
            assert not m.training and not m[0].training
            raise RuntimeError("boom")
    assert m.training and m[0].training and not m[1].training


def test_placed_uses_the_models_device_and_dtype_and_stops_on_nan():
    x, y = _data()
    for dtype in (torch.float64, torch.bfloat16):
        m = nn.Linear(3, 2).to(dtype)
        (bx, by), = list(placed(m, [(x, y)]))
        assert bx.dtype == dtype and bx.device == model_device(m) and by.dtype == torch.int64
    (bx, _), = list(placed(nn.ReLU(), [x.double()]))  # no parameters: the input keeps its dtype
    assert bx.dtype == torch.float64
    bad = x.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="batch 1 .*NaN"):
        list(placed(nn.Linear(3, 2), [x, bad]))
    assert len(list(iter_batches([bad]))) == 1  # iter_batches itself checks only when asked


def test_check_seed_and_batch_size():
    assert check_seed(3) == 3 and type(check_seed(np.int64(3))) is int
    for bad in (1.5, "1", True, None):
        with pytest.raises(TypeError, match="seed"):
            check_seed(bad)
    x, y = _data()
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="batch_size"):
            list(iter_batches(TensorDataset(x, y), batch_size=bad))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_placed_on_cuda():
    x, y = _data()
    m = nn.Linear(3, 2).cuda()
    (bx, by), = list(placed(m, TensorDataset(x, y), batch_size=16))
    assert bx.is_cuda and by.is_cuda


def test_a_shuffling_loader_keeps_its_order():
    """A trial ``iter()`` would draw from the loader's generator and reorder its batches."""
    x, y = _data(32)
    def loader():
        return DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True,
                          generator=torch.Generator().manual_seed(5))
    direct = [b for b, _ in loader()]
    through = [b for b, _ in iter_batches(loader())]
    assert all(torch.equal(p, q) for p, q in zip(direct, through))
