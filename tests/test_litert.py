"""Tests for qlib.litert (LiteRT / TensorFlow Lite, an optional extra). Moved verbatim from
tests/test_export.py. Reference: PyTorch's float model (a float ``.tflite`` computes the same
function: logits within 1e-4); without LiteRT installed, the reason names the install command
and ``to_litert`` raises it as a RuntimeError, then the test skips with that reason.
"""

import numpy as np
import pytest
import torch
from torch import nn

from qlib import models
from qlib.litert import litert_available, litert_predict, to_litert


def test_litert_round_trip_or_clear_skip(tmp_path):
    reason = litert_available()
    if reason:
        assert "pip install 'qlib[litert]'" in reason
        with pytest.raises(RuntimeError, match="LiteRT is not installed"):
            to_litert(nn.Linear(2, 2), torch.zeros(1, 2), tmp_path / "m.tflite")
        pytest.skip(reason)
    model = models.pretrained("cnn16", 0)
    x = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    path = to_litert(model, x[:1], tmp_path / "m.tflite")
    with torch.no_grad():
        assert np.allclose(litert_predict(path, x).numpy(), model(x).numpy(), atol=1e-4)
