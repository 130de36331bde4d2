"""benchmarks/llm_outliers.py runs in fast mode and writes the documented JSON; the committed full
run's targets agree with its own numbers.

Reference: the benchmark's docstring (header from benchmarks/common.py, settings, training, curve
copied from qlib/weights/charlm.json's ``recipes.long``, models[default|long] with W8A8 rows, layer
report and LLM.int8 column count, targets). The targets are recomputed from the committed rows and
the curve from charlm.json, so a target that claims more than the numbers show fails here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from qlib.llm import model as charlm

ROOT = Path(__file__).resolve().parents[1]
W8A8 = ["fp32", "W8A8 per-tensor", "W8A8 per-token/per-channel", "LLM.int8", "SmoothQuant W8A8"]
pytestmark = pytest.mark.skipif(not charlm.weights_path(0, "long").exists(),
                                reason="the long-trained model is not shipped")


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "llm_outliers.json"
    proc = subprocess.run([sys.executable, "benchmarks/llm_outliers.py", "--fast", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(out.read_text())


def _check_layout(r):
    assert r["benchmark"] == "llm_outliers" and r["seeds"] == [0]
    for key in ("default", "long"):
        m = r["models"][key]
        assert list(m["rows"]) == W8A8 and len(m["layers"]) == 24
        assert m["rows"]["fp32"]["rel_ppl"] == 0 and 1.0 < m["rows"]["fp32"]["ppl"] < 256.0
        assert m["int8_columns"] == sum(row["n_outliers"] for row in m["layers"])
        assert m["absmax"] == max(row["absmax"] for row in m["layers"])
        for row in m["rows"].values():
            assert row["rel_ppl"] == pytest.approx(row["ppl"] / m["rows"]["fp32"]["ppl"] - 1)
    steps = [p["step"] for p in r["curve"]]
    assert steps[0] == 0 and steps == sorted(steps) and steps[-1] == r["training"]["steps_done"]
    for p in r["curve"]:
        assert {"ln1", "ln2", "gelu", "attn", "resid", "int8_columns", "val_ppl_64"} <= set(p)
    assert r["curve"][-1]["val_ppl_64"] < r["curve"][0]["val_ppl_64"]  # it learned


def test_fast_run_layout(result):
    assert result["fast"] is True and result["settings"]["val_windows"] == 48
    _check_layout(result)


def test_committed_full_run_targets_follow_its_numbers():
    r = json.loads((ROOT / "benchmarks" / "results" / "llm_outliers.json").read_text())
    assert r["fast"] is False
    _check_layout(r)
    rec = charlm.charlm_info()["recipes"]["long"]["seeds"]["0"]
    assert [p["step"] for p in rec["curve"]] == [p["step"] for p in r["curve"]]
    d, lg = r["models"]["default"], r["models"]["long"]
    t = {x["name"].split(" ")[0].rstrip(":"): x for x in r["targets"]}
    assert t["emergence"]["met"] == (lg["int8_columns"] > d["int8_columns"])
    gap = lg["rows"]["W8A8 per-tensor"]["rel_ppl"] - d["rows"]["W8A8 per-tensor"]["rel_ppl"]
    assert t["per-tensor"]["value"] == pytest.approx(gap) and t["per-tensor"]["met"] == (gap > 0)
    for name in ("LLM.int8", "SmoothQuant"):
        rel = lg["rows"][t[name]["name"].split(" on ")[0]]["rel_ppl"]
        met = rel <= 0.02 and rel < lg["rows"]["W8A8 per-tensor"]["rel_ppl"]
        assert t[name]["value"] == pytest.approx(rel) and t[name]["met"] == met
