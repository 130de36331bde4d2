"""Benchmark: outlier features that *emerge* from training, and what they do to W8A8.

The shipped char-level transformer (``qlib.llm.model.pretrained(seed)``, 400 steps with weight
decay) has no strong activation outliers, so lesson 16 also trains one model for longer
without weight decay (``python -m qlib.weights.train_charlm --recipe long 0``), the conditions
under which outlier features grow (Dettmers et al. 2022; Elhage et al. 2023). This benchmark
reports, for seed 0:

- ``curve``: the *emergence curve* the training logged every 250 steps on 16 fixed held-out
  windows (``qlib.llm.stats.snapshot``): per kind of tensor (``ln1``: input of q/k/v,
  ``ln2``: input of fc1, ``gelu``: input of fc2, ``attn``: input of proj, ``resid``: the
  residual stream) the largest magnitude and the largest channel max/median ratio over
  layers, the number of LLM.int8() outlier columns (``|X| >= 6``) summed over the 24 block
  linears, and the held-out perplexity on 64 windows. Copied from ``charlm.json``.
- ``models``: for the default model and the long one, the layer report (``stats.layer_report``
  of every block linear's input on ``CALIB`` calibration windows) and the perplexity of the
  W8A8 methods of ``benchmarks/llm.py`` (fp32, W8A8 per-tensor, W8A8 per-token/per-channel,
  LLM.int8 with threshold 6.0, SmoothQuant W8A8 with alpha 0.5) on the first ``VAL_WINDOWS``
  held-out windows, with the fraction of input columns LLM.int8 keeps in float.

Targets (each can fail; the lesson states what they found):
- emergence: the long model has LLM.int8() outlier columns (more than the default model's);
- per-tensor W8A8 loses more relative perplexity on the long model than on the default one;
- on the long model, LLM.int8 and SmoothQuant W8A8 recover: each within 2% of fp32 and below
  per-tensor W8A8.

    python benchmarks/llm_outliers.py          # 256 held-out windows, 32 calibration windows
    python benchmarks/llm_outliers.py --fast   # 48 held-out windows, 8 calibration windows
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402
from benchmarks.common import header, target_lines  # noqa: E402
from benchmarks.llm import ALPHA, CALIB, THRESHOLD, VAL_WINDOWS, calibration_windows, methods, outliers  # noqa: E402
from qlib.llm import corpus, evaluate, int8_mixed, model as charlm  # noqa: E402

W8A8 = ("fp32", "W8A8 per-tensor", "W8A8 per-token/per-channel", "LLM.int8", "SmoothQuant W8A8")
SEED = 0


def measure(model, calib, val, limit, log, label) -> dict:
    """Layer report and the W8A8 rows (ppl, acc, rel_ppl against fp32) of one model."""
    make = methods(calib)
    rows, frac = {}, None
    for name in W8A8:
        q = make[name][0](model)
        r = evaluate.evaluate(q, val, limit=limit)
        if name == "LLM.int8":
            fr = int8_mixed.outlier_fractions(q)
            frac = round(sum(fr.values()) / len(fr), 5)
        rows[name] = {"ppl": r["ppl"], "acc": r["acc"]}
        log(f"{label:8s} {name:28s} ppl {r['ppl']:.4f}  acc {r['acc']:.2f}%")
    for row in rows.values():
        row["rel_ppl"] = evaluate.relative_change(row["ppl"], rows["fp32"]["ppl"])
    report = outliers(model, calib)
    return {"rows": rows, "layers": report, "llm_int8_outlier_fraction": frac,
            "absmax": max(r["absmax"] for r in report),
            "int8_columns": sum(r["n_outliers"] for r in report)}


def targets(models: dict) -> list[dict]:
    d, lg = models["default"], models["long"]
    rel = {k: m["rows"] for k, m in models.items()}
    tensor_gap = rel["long"]["W8A8 per-tensor"]["rel_ppl"] - rel["default"]["W8A8 per-tensor"]["rel_ppl"]
    out = [{"name": "emergence: LLM.int8 outlier columns of the long model minus the default model's",
            "value": lg["int8_columns"] - d["int8_columns"], "threshold": 0,
            "met": lg["int8_columns"] > d["int8_columns"]},
           {"name": "per-tensor W8A8 relative perplexity, long model minus default model",
            "value": tensor_gap, "threshold": 0, "met": tensor_gap > 0}]
    for name in ("LLM.int8", "SmoothQuant W8A8"):
        r, t = rel["long"][name]["rel_ppl"], rel["long"]["W8A8 per-tensor"]["rel_ppl"]
        out.append({"name": f"{name} on the long model within 0.02 relative perplexity of fp32 "
                            f"and below per-tensor W8A8", "value": r, "threshold": 0.02,
                    "met": r <= 0.02 and r < t})
    return out


def run(fast: bool, log=print) -> dict:
    info = charlm.charlm_info()
    long = info["recipes"]["long"]
    limit = 48 if fast else VAL_WINDOWS
    calib = calibration_windows(8 if fast else CALIB)
    val = corpus.load().val
    models = {"default": measure(charlm.pretrained(SEED), calib, val, limit, log, "default"),
              "long": measure(charlm.pretrained(SEED, recipe="long"), calib, val, limit, log, "long")}
    rec = long["seeds"][str(SEED)]
    curve = [{"step": p["step"], "val_ppl_64": p["val_ppl_64"], "train_loss": p["train_loss"],
              **p["summary"]} for p in rec["curve"]]
    return {**header("llm_outliers", [SEED], fast),
            "settings": {"calibration_windows": calib.shape[0], "val_windows": limit,
                         "int8_threshold": THRESHOLD, "smoothquant_alpha": ALPHA,
                         "recipes": {"default": info["settings"], "long": long["settings"]},
                         "weights_python": long["python"], "corpus_python": corpus.python_version()},
            "training": {k: rec[k] for k in ("val_ppl", "val_acc", "train_seconds", "steps_done")
                         if k in rec} | {"default_val_ppl": info["seeds"][str(SEED)]["val_ppl"]},
            "curve": curve, "models": models, "targets": targets(models)}


def table(result: dict) -> str:
    lines = ["emergence curve (seed 0, long recipe): step, held-out ppl, largest |x| at the "
             "ln1/ln2/gelu inputs and in the residual stream (max/median channel ratio), LLM.int8 columns"]
    for p in result["curve"]:
        lines.append(f"{p['step']:6d} {p['val_ppl_64']:8.3f} " + " ".join(
            f"{k} {p[k]['absmax']:6.2f} ({p[k]['channel_ratio']:5.1f})" for k in ("ln1", "ln2", "gelu", "resid"))
            + f"  cols {p['int8_columns']}")
    lines.append(f"\n{'method':28s} {'default ppl':>12s} {'rel.':>8s} {'long ppl':>10s} {'rel.':>8s}")
    d, lg = result["models"]["default"]["rows"], result["models"]["long"]["rows"]
    for name in W8A8:
        lines.append(f"{name:28s} {d[name]['ppl']:12.4f} {100 * d[name]['rel_ppl']:+7.2f}% "
                     f"{lg[name]['ppl']:10.4f} {100 * lg[name]['rel_ppl']:+7.2f}%")
    for k in ("default", "long"):
        m = result["models"][k]
        lines.append(f"{k}: largest linear input {m['absmax']:.2f}, LLM.int8 columns {m['int8_columns']}")
    return "\n".join(lines + target_lines(result["targets"]))


def main(argv=None) -> int:
    return common.main("llm_outliers", run, table, __doc__, "48 held-out windows, 8 calibration windows", argv, timed=True)


if __name__ == "__main__":
    sys.exit(main())
