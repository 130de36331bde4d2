"""qlib.measure: bytes at a bit width and latency.

Reference: the packed-size formula ceil(numel * bits / 8) and torch.save's real file size.
"""

from __future__ import annotations

import pytest
import torch

from qlib import measure, models


def test_tensor_bytes():
    assert measure.tensor_bytes(1000, 32) == 4000
    assert measure.tensor_bytes(3, 4) == 2
    assert measure.tensor_bytes(0, 8) == 0
    with pytest.raises(ValueError, match="bits"):
        measure.tensor_bytes(10, 0)


def test_model_size_matches_parameters_and_state_dict():
    model = models.create("cnn8")
    n = models.count_parameters(model)
    assert measure.model_size_bytes(model) == 4 * n
    assert measure.model_size_bytes(model, 8) == n
    # torch.save also stores BN buffers and metadata: bigger than the parameters alone
    assert measure.state_dict_bytes(model) > 4 * n
    with pytest.raises(TypeError):
        measure.model_size_bytes(torch.zeros(3))


def test_latency_is_a_positive_median():
    t = measure.latency(lambda: sum(range(1000)), repeats=5, warmup=1)
    assert 0 < t < 1


def test_cast_error():
    w = torch.tensor([1.0, 1.0 + 2 ** -12])
    assert measure.cast_error(w) == pytest.approx(2 ** -12)
    with pytest.raises(TypeError):
        measure.cast_error(torch.tensor([1, 2]))
