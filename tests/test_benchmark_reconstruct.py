"""benchmarks/reconstruct.py runs in fast mode and writes the documented JSON.

Reference: the benchmark's own docstring (JSON layout: header from benchmarks/common.py,
settings, fp32[model], accuracy[model][config][row], method_seconds, targets; rows
minmax/percentile/mse round-to-nearest on real data, adaround/brecq on real and on synthetic
data, mse on synthetic data). In fast mode (cnn16, seed 0, W3A3, 64 images, 30 steps) only
robust properties are checked: every cell is an accuracy, the learned rounding on real data is
ahead of every round-to-nearest row at W3A3.
"""

from __future__ import annotations

import pytest

ROWS = ("minmax_real", "percentile_real", "mse_real", "adaround_real", "brecq_real",
        "mse_synthetic", "adaround_synthetic", "brecq_synthetic")


@pytest.fixture(scope="module")
def result(fast_benchmark):
    result, stdout = fast_benchmark("reconstruct")
    assert "target" in stdout and "brecq_synthetic" in stdout
    return result


def test_header_and_layout(result):
    assert result["benchmark"] == "reconstruct" and result["fast"] is True and result["seeds"] == [0]
    for key in ("platform", "cpu_count", "torch_threads"):
        assert key in result["machine"]
    for key in ("python", "torch", "qlib"):
        assert key in result["versions"]
    assert set(result["accuracy"]) == {"cnn16"} and set(result["accuracy"]["cnn16"]) == {"W3A3"}
    assert tuple(result["accuracy"]["cnn16"]["W3A3"]) == ROWS
    assert result["settings"]["reconstruction"]["loss"].startswith("output MSE")
    assert len(result["targets"]) == 3 and all(isinstance(t["met"], bool) for t in result["targets"])


def test_learned_rounding_beats_round_to_nearest_at_w3a3(result):
    fp32 = result["fp32"]["cnn16"]["mean"]
    assert 95 <= fp32 <= 100
    row = {k: v["mean"] for k, v in result["accuracy"]["cnn16"]["W3A3"].items()}
    for k, s in result["accuracy"]["cnn16"]["W3A3"].items():
        assert 0 <= s["min"] <= s["mean"] <= s["max"] <= 100 and s["n"] == 1, k
    rtn = max(row["minmax_real"], row["percentile_real"], row["mse_real"])
    assert row["adaround_real"] > rtn and row["brecq_real"] > rtn
    assert row["brecq_synthetic"] > row["mse_synthetic"]
