"""benchmarks/llm.py runs in fast mode and writes the documented JSON; the committed full run
holds its targets.

Reference: the benchmark's own docstring (JSON layout: header from benchmarks/common.py,
settings, rows[method] with ppl/acc/rel_ppl/seconds summaries over seeds and size_bytes,
outliers per seed and layer, targets). Fast mode: seed 0, 48 held-out windows. The targets
are recomputed from the committed full run's per-seed perplexities.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["fp32", "W8A8 per-tensor", "W8A8 per-token/per-channel", "LLM.int8", "SmoothQuant W8A8",
           "W4 RTN g32", "W4 RTN g64", "W4 RTN g128", "W3 RTN g128", "GPTQ W4 g128", "GPTQ W3 g128",
           "AWQ W4 g128"]


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "llm.json"
    proc = subprocess.run([sys.executable, "benchmarks/llm.py", "--fast", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(out.read_text())


def test_fast_run_layout(result):
    assert result["benchmark"] == "llm" and result["fast"] is True and result["seeds"] == [0]
    assert list(result["rows"]) == METHODS
    fp = result["rows"]["fp32"]
    for name, row in result["rows"].items():
        assert row["ppl"]["n"] == 1 and 1.0 < row["ppl"]["mean"] < 256.0, name
        assert 0 <= row["acc"]["mean"] <= 100 and row["size_bytes"] > 0
    assert result["rows"]["W4 RTN g128"]["size_bytes"] < 0.4 * fp["size_bytes"]
    assert result["rows"]["W3 RTN g128"]["size_bytes"] < result["rows"]["W4 RTN g128"]["size_bytes"]
    assert len(result["outliers"]["0"]) == 24
    planted = result["planted"]["rows"]
    assert list(planted) == METHODS[:5] and max(result["planted"]["absmax"]) > 6.0
    for name in ("LLM.int8", "SmoothQuant W8A8"):  # the planted outliers break per-tensor W8A8 only
        assert planted[name]["rel_ppl"]["mean"] < planted["W8A8 per-tensor"]["rel_ppl"]["mean"]


def test_committed_full_run_targets():
    r = json.loads((ROOT / "benchmarks" / "results" / "llm.json").read_text())
    assert r["fast"] is False and r["seeds"] == [0, 1, 2]
    rows = r["rows"]
    fp, sq = rows["fp32"]["ppl"]["values"], rows["SmoothQuant W8A8"]["ppl"]["values"]
    worst = max(s / f - 1 for s, f in zip(sq, fp))
    t = {x["name"].split(" ")[0]: x for x in r["targets"]}
    assert t["SmoothQuant"]["value"] == pytest.approx(worst) and t["SmoothQuant"]["met"] == (worst <= 0.02)
    gap = max(g - q for g, q in zip(rows["GPTQ W4 g128"]["ppl"]["values"], rows["W4 RTN g128"]["ppl"]["values"]))
    assert t["GPTQ"]["value"] == pytest.approx(gap) and t["GPTQ"]["met"] == (gap < 0)
