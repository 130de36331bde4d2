"""qlib.domain.evaluate: the cross-domain grid, drops and calibration sources.

Reference: ``qlib.train.evaluate`` on ``qlib.domain.shifts.corrupt_dataset`` (recomputed
by hand for one cell) and ``qlib.ptq.quantize_static`` with ``ptq_config``.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import TensorDataset

from qlib import models, ptq
from qlib.domain import evaluate as ev
from qlib.domain.shifts import corrupt_dataset
from qlib.train import evaluate


@pytest.fixture(scope="module")
def setup(digits8):
    test = TensorDataset(*(t[:120] for t in digits8.test.tensors))
    calib = [digits8.train.tensors[0][:128]]
    return [models.pretrained("cnn8", 0), models.pretrained("cnn8", 1)], test, calib


def test_grid_layout_and_one_cell_by_hand(setup):
    nets, test, calib = setup
    grid = ev.accuracy_grid(nets, test, calib, shifts=("blur", "rotation"), severities=(1, 5), bits=(32, 4))
    assert set(grid) == {"none", "blur", "rotation"}
    assert set(grid["blur"]) == {"1", "5"} and set(grid["none"]) == {"0"}
    cell = grid["rotation"]["5"]
    assert set(cell) == {"fp32", "W4A4"}
    shifted = corrupt_dataset(test, "rotation", 5, seed=0)
    want = [evaluate(m, shifted) for m in nets]
    assert cell["fp32"]["values"] == [round(v, 2) for v in want]
    assert cell["fp32"]["min"] == min(want) and cell["fp32"]["n"] == 2
    q = ptq.quantize_static(nets[1], calib, ev.ptq_config(4))
    assert cell["W4A4"]["values"][1] == round(evaluate(q, shifted), 2)
    # severity 5 hurts the fp32 models more than severity 1
    assert grid["rotation"]["5"]["fp32"]["mean"] < grid["rotation"]["1"]["fp32"]["mean"]


def test_drop_grid_is_per_seed_difference(setup):
    nets, test, calib = setup
    grid = ev.accuracy_grid(nets, test, calib, shifts=("contrast",), severities=(3,), bits=(32, 8))
    drop = ev.drop_grid(grid)
    ref, q = grid["contrast"]["3"]["fp32"]["values"], grid["contrast"]["3"]["W8A8"]["values"]
    assert drop["contrast"]["3"]["W8A8"]["values"] == [round(a - b, 2) for a, b in zip(ref, q)]


def test_calibration_sources_accepts_batches_and_callables(setup):
    nets, test, calib = setup
    noise = [torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(0))]
    out = ev.calibration_sources(nets[:1], {"source": calib, "noise": lambda m: noise}, test, bits=8)
    assert set(out) == {"source", "noise"}
    want = evaluate(ptq.quantize_static(nets[0], noise, ev.ptq_config(8)), test)
    assert out["noise"]["values"] == [round(want, 2)]


def test_bad_arguments(setup):
    nets, test, calib = setup
    with pytest.raises(ValueError, match="at least one model"):
        ev.accuracy_grid([], test, calib)
    with pytest.raises(ValueError, match="unknown shift"):
        ev.accuracy_grid(nets, test, calib, shifts=("fog",))
