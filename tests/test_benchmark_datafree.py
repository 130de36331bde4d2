"""benchmarks/datafree.py runs in fast mode and writes the documented JSON.

Reference: the benchmark's own docstring (JSON layout: header from benchmarks/common.py,
settings, fp32, accuracy[source][config][observer], calibration_scores, bn_loss,
cle_bias_correction[config][row], distillation_W4A4, method_seconds, targets). In fast
mode (one seed, 64 images, 20-step loops) only the robust properties are checked:
every cell is a valid accuracy, W8A8 stays near fp32 for every source, synthetic data
matches the BN statistics better than noise, CLE undoes the unbalancing at W8A8.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("real", "noise", "noise_clamped", "bn_synthetic", "generator")


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "datafree.json"
    proc = subprocess.run([sys.executable, "benchmarks/datafree.py", "--fast", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "target" in proc.stdout and "CLE + bias correction" in proc.stdout
    return json.loads(out.read_text())


def test_header_and_layout(result):
    assert result["benchmark"] == "datafree" and result["fast"] is True and result["seeds"] == [0]
    for key in ("platform", "cpu_count", "torch_threads"):
        assert key in result["machine"]
    for key in ("python", "torch", "qlib"):
        assert key in result["versions"]
    assert result["settings"]["model"] == "cnn16" and len(result["settings"]["input_range"]) == 2
    assert set(result["accuracy"]) == set(SOURCES)
    assert len(result["targets"]) == 4 and all(isinstance(t["met"], bool) for t in result["targets"])


def test_cells_are_accuracies_and_8_bits_is_free(result):
    fp32 = result["fp32"]["mean"]
    assert 95 <= fp32 <= 100
    for source in SOURCES:
        for config in ("W8A8", "W6A6", "W4A4"):
            s = result["accuracy"][source][config]["percentile"]
            assert 0 <= s["min"] <= s["mean"] <= s["max"] <= 100 and s["n"] == 1
        assert result["accuracy"][source]["W8A8"]["percentile"]["mean"] >= fp32 - 1.0


def test_synthetic_data_matches_bn_statistics_better_than_noise(result):
    b = result["bn_loss"]
    assert b["bn_synthetic_end"]["mean"] < b["bn_synthetic_start"]["mean"]
    assert b["bn_synthetic_end"]["mean"] < b["noise"]["mean"]
    scores = result["calibration_scores"]
    assert scores["bn_synthetic"]["bn_distance"] < scores["noise"]["bn_distance"]
    assert scores["real"]["mmd_inputs"] < scores["noise"]["mmd_inputs"]


def test_cle_undoes_unbalancing_at_8_bits(result):
    w8 = result["cle_bias_correction"]["W8A8"]
    assert w8["unbalanced per-tensor"]["mean"] < 50
    assert w8["+ CLE"]["mean"] >= w8["original per-channel"]["mean"] - 1.0
    d = result["distillation_W4A4"]["accuracy"]
    assert set(d) == {"ptq", "distilled_bn_synthetic", "distilled_generator"}
