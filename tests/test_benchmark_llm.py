"""benchmarks/llm.py runs in fast mode and writes the documented JSON; the committed full run
holds its targets.

Reference: the benchmark's own docstring (JSON layout: header from benchmarks/common.py,
settings, rows[method] with ppl/acc/rel_ppl/seconds summaries over seeds and size_bytes,
outliers per seed and layer, targets, comparisons). Fast mode: seed 0, 48 held-out windows. The
targets (the 2% of every SmoothQuant row, dynamic and static; GPTQ below RTN) and the AWQ
comparisons are recomputed from the committed full run's per-seed perplexities.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
W8A8 = ["fp32", "W8A8 per-tensor", "W8A8 per-token/per-channel", "LLM.int8", "SmoothQuant W8A8",
        "SmoothQuant O1", "SmoothQuant O3"]
SMOOTHQUANT = ["SmoothQuant W8A8", "SmoothQuant O1", "SmoothQuant O3"]
METHODS = W8A8 + ["W4 RTN g32", "W4 RTN g64", "W4 RTN g128", "W3 RTN g128", "GPTQ W4 g128", "GPTQ W3 g128",
                  "AWQ W4 g128", "AWQ W4 g128 scale only"]


@pytest.fixture(scope="module")
def result(fast_benchmark):
    return fast_benchmark("llm")[0]


def test_fast_run_layout(result):
    assert result["benchmark"] == "llm" and result["fast"] is True and result["seeds"] == [0]
    assert list(result["rows"]) == METHODS
    fp = result["rows"]["fp32"]
    for name, row in result["rows"].items():
        assert row["ppl"]["n"] == 1 and 1.0 < row["ppl"]["mean"] < 256.0, name
        assert 0 <= row["acc"]["mean"] <= 100 and row["size_bytes"] > 0
    assert result["rows"]["W4 RTN g128"]["size_bytes"] < 0.4 * fp["size_bytes"]
    size = {name: row["size_bytes"] for name, row in result["rows"].items()}
    n_layers, n_out = 24, 4 * 128 + 4 * 128 + 128           # q, k, v, proj, fc1 (4 x 128), fc2 per block
    assert size["W8A8 per-token/per-channel"] - size["W8A8 per-tensor"] == 4 * (4 * n_out - n_layers)
    assert size["SmoothQuant O3"] - size["SmoothQuant O1"] == 4 * n_layers     # one static scale per layer
    assert result["rows"]["W3 RTN g128"]["size_bytes"] < result["rows"]["W4 RTN g128"]["size_bytes"]
    assert len(result["outliers"]["0"]) == 24
    planted = result["planted"]["rows"]
    assert list(planted) == W8A8 and max(result["planted"]["absmax"]) > 6.0
    for name in ["LLM.int8"] + SMOOTHQUANT:  # the planted outliers break per-tensor W8A8 only
        assert planted[name]["rel_ppl"]["mean"] < planted["W8A8 per-tensor"]["rel_ppl"]["mean"]


def test_committed_full_run_targets():
    r = json.loads((ROOT / "benchmarks" / "results" / "llm.json").read_text())
    assert r["fast"] is False and r["seeds"] == [0, 1, 2] and list(r["rows"]) == METHODS
    rows = r["rows"]
    fp = rows["fp32"]["ppl"]["values"]
    t = {x["name"].split(" within")[0].split(" minus")[0]: x for x in r["targets"]}
    assert list(t) == SMOOTHQUANT + ["GPTQ W4 g128"]
    for name in SMOOTHQUANT:                      # the 2% target, for each activation scale
        worst = max(s / f - 1 for s, f in zip(rows[name]["ppl"]["values"], fp))
        assert t[name]["value"] == pytest.approx(worst) and t[name]["met"] == (worst <= 0.02)
    rtn = rows["W4 RTN g128"]["ppl"]["values"]
    gap = max(g - q for g, q in zip(rows["GPTQ W4 g128"]["ppl"]["values"], rtn))
    assert t["GPTQ W4 g128"]["value"] == pytest.approx(gap) and t["GPTQ W4 g128"]["met"] == (gap < 0)
    for name in ("AWQ W4 g128", "AWQ W4 g128 scale only"):
        d = [a - q for a, q in zip(rows[name]["ppl"]["values"], rtn)]
        c = r["comparisons"][f"{name} minus W4 RTN g128"]
        assert c["ppl_difference"] == pytest.approx(d) and c["better_on_every_seed"] == (max(d) < 0)
