"""benchmarks/mixed.py runs in fast mode, writes the documented JSON, and meets its targets.

Reference: the benchmark's own docstring (JSON layout: header from benchmarks/common.py,
settings, pareto[model] rows with size and accuracy, engines[model] rows with accuracy, file
size and latency at batch 1 and 64, targets). Checked in fast mode (cnn16, seed 0): the ILP
allocation at the size of uniform W4 beats uniform W4 PTQ, every allocation fits its budget,
and the ONNX Runtime QDQ export is as accurate as qlib's integer model.
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def result(fast_benchmark):
    return fast_benchmark("mixed")[0]


def test_header(result):
    assert result["benchmark"] == "mixed" and result["fast"] is True and result["seeds"] == [0]
    for key in ("platform", "cpu_count", "torch_threads"):
        assert key in result["machine"]


def test_pareto_rows_fit_their_budgets(result):
    rows = {r["config"]: r for r in result["pareto"]["cnn16"]["rows"]}
    weights = result["pareto"]["cnn16"]["weights"]
    for b in (8, 6, 4, 3, 2):
        assert rows[f"uniform W{b}"]["size_bits"] == weights * b
    for label, b in result["settings"]["budgets"].items():
        for method in ("ILP", "greedy"):
            assert rows[f"{method} @{label}"]["size_bits"] <= weights * b
    for row in rows.values():
        assert 0 <= row["accuracy"]["mean"] <= 100 and row["accuracy"]["n"] == 1
    assert {"uniform W4 + QAT", "ILP @W3 + QAT"} <= set(rows)
    assert rows["ILP @W4"]["accuracy"]["mean"] > rows["uniform W4"]["accuracy"]["mean"]
    assert result["targets"]["cnn16"]["mixed_at_W4_beats_uniform_W4_ptq"]["met"]
    rho = result["pareto"]["cnn16"]["spearman_at_3_bits"][0]
    assert all(-1 <= v <= 1 for v in rho.values())


def test_engine_table(result):
    rows = result["engines"]["cnn16"]["rows"]
    expected = {"fp32 PyTorch", "PyTorch x86 int8", "qlib integer", "ONNX Runtime QDQ (qlib)",
                "ONNX Runtime own int8", "ONNX Runtime fp32"}
    assert expected <= set(rows)
    for row in rows.values():
        assert row["file_bytes"] > 0 and row["latency_ms_batch1"] > 0 and row["latency_ms_batch64"] > 0
    assert rows["ONNX Runtime QDQ (qlib)"]["accuracy"] == pytest.approx(rows["qlib integer"]["accuracy"], abs=0.3)
    assert rows["ONNX Runtime QDQ (qlib)"]["file_bytes"] < 0.4 * rows["ONNX Runtime fp32"]["file_bytes"]
    assert "LiteRT" in result["engines"]["cnn16"]["litert"] or result["engines"]["cnn16"]["litert"] == "present"
