"""benchmarks/federated.py runs in fast mode and writes the documented JSON.

Reference: the benchmark's own docstring (header from benchmarks/common.py, settings,
updates[split][kind] with accuracy, exact total bytes and per-round curves, qat_vs_ptq,
flower). In fast mode (one seed, two rounds) only robust properties are checked: bytes follow
the codec's formula ratios (fp32 > 4-bit > 2-bit), every accuracy is valid and beats chance.
The committed full result is checked for three seeds and the stated grid.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def result(fast_benchmark):
    return fast_benchmark("federated", timeout=600)[0]


@pytest.mark.slow
def test_fast_run(result):
    assert result["benchmark"] == "federated" and result["fast"] is True and result["seeds"] == [0]
    for split in ("iid", "noniid"):
        rows = result["updates"][split]
        assert rows["fp32"]["total_bytes"] > rows["4bit-stochastic"]["total_bytes"] > rows["2bit-nearest-ef"]["total_bytes"]
        for r in rows.values():
            assert 20 < r["accuracy"]["mean"] <= 100 and len(r["acc_per_round_mean"]) == 2
    for rows in result["qat_vs_ptq"].values():
        assert {"fp32", "synthetic W8A8", "real W3A3", "noise W4A4", "real W2A8"} <= set(rows)
    if result["flower"] is not None and "error" not in result["flower"]:
        assert result["flower"]["same_model_as_in_process"] is True


def test_committed_full_result():
    r = json.loads((ROOT / "benchmarks/results/federated.json").read_text())
    assert r["fast"] is False and r["seeds"] == [0, 1, 2]
    rows = r["updates"]["noniid"]
    assert len(rows) == 8
    # exact bytes: fp32 is 4 bytes an entry, 8-bit codes 1 byte plus scales: a bit under 4x fewer
    assert 3.0 < rows["fp32"]["total_bytes"] / rows["8bit-stochastic"]["total_bytes"] < 4.0
    assert rows["2bit-nearest"]["total_bytes"] == rows["2bit-stochastic"]["total_bytes"]
