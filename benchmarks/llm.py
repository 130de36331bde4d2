"""Benchmark: quantizing a pretrained transformer (the char-level model of lesson 16).

For each of the three shipped seeds of ``qlib.llm.model`` (trained on Python's standard
library, ``qlib.llm.corpus``), every method below quantizes the 24 block linears (embeddings
and head stay float) and is scored on the first ``VAL_WINDOWS`` (256) windows of 128 bytes of the held-out
files (32,768 bytes, about a third of them): perplexity, next-byte accuracy,
model size (bytes to store it) and the seconds the quantization took.

- ``fp32``: the shipped model.
- ``W8A8 per-tensor``: int8 weights and dynamic int8 activations, one scale each (naive).
- ``W8A8 per-token/per-channel``: one activation scale per token, one weight scale per row.
- ``LLM.int8``: per-token/per-channel int8 with input features reaching 6.0 kept in float.
- ``SmoothQuant W8A8``: alpha 0.5, then per-tensor dynamic activations / per-channel weights.
- ``SmoothQuant O1`` and ``SmoothQuant O3``: the paper's levels, per-tensor weights with
  per-token *dynamic* (O1) or per-tensor *static* activation scales (O3: ``max|X|/127`` of the
  smoothed model's inputs on the calibration windows, fixed; inputs beyond it are clipped).
- ``W4 RTN g32/g64/g128``, ``W3 RTN g128``: weight-only, asymmetric, round-to-nearest.
- ``GPTQ W4 g128``, ``GPTQ W3 g128``: act-order, damping 0.01, blocks of 128.
- ``AWQ W4 g128``: the 20-point alpha grid, then the per-group clipping search (the paper's
  default); ``AWQ W4 g128 scale only``: without the clipping search.

Calibration (SmoothQuant, GPTQ, AWQ): ``CALIB`` windows of 128 bytes drawn from the training
files with seed 0. Outliers: per layer, the largest input magnitude, the max/median ratio of
the channel maxima, and how many channels reach LLM.int8()'s threshold 6.0.
Targets: SmoothQuant W8A8 within 2% relative perplexity of fp32 on every seed (each of the
three SmoothQuant rows); GPTQ W4 g128 closer to fp32 (lower perplexity) than RTN W4 g128 on
every seed. ``comparisons`` records, per seed, AWQ (with and without clipping) minus RTN W4 g128.

Our small model has no strong outlier features (no input reaches 6.0), so the W8A8 methods
are also run on ``planted_rows``: the same model with two outlier channels built in by
``stats.with_outlier_channels`` (LayerNorm gains x20 in channels 7 and 77, the weight columns
/20: the float function is unchanged, the activations are not), labelled as constructed.

    python benchmarks/llm.py           # three seeds, 256 held-out windows (writes results/llm.json)
    python benchmarks/llm.py --fast    # seed 0, 48 held-out windows, 8 calibration windows
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402
from benchmarks.common import header, target_lines  # noqa: E402
from qlib.llm import (awq, corpus, evaluate, gptq, int8_mixed, layers, model as charlm,  # noqa: E402
                      smoothquant, stats, w8a8, weight_only)

CALIB, ALPHA, THRESHOLD, VAL_WINDOWS = 32, 0.5, 6.0, 256
PLANTED = {"channels": (7, 77), "factor": 20.0}
W8A8_METHODS = ("fp32", "W8A8 per-tensor", "W8A8 per-token/per-channel", "LLM.int8", "SmoothQuant W8A8",
                "SmoothQuant O1", "SmoothQuant O3")
SMOOTHQUANT = ("SmoothQuant W8A8", "SmoothQuant O1", "SmoothQuant O3")


def w8a8_size(model, per_channel: bool = True, static: bool = False) -> int:
    """int8 weights plus a float32 weight scale per output channel (or one per tensor); a
    static activation scale adds one float32 per layer (dynamic ones are computed at run time)."""
    total = weight_only.model_size_bytes(model)
    for layer in layers.linear_layers(model).values():
        scales = layer.weight.shape[0] if per_channel else 1
        total -= layer.weight.numel() * 3 - scales * 4 - (4 if static else 0)
    return total


def methods(calib: torch.Tensor) -> dict:
    """``{name: (quantize(model) -> model, size(model) -> bytes)}``."""
    wo = lambda b, g: lambda m: weight_only.model_size_bytes(m, b, g)  # noqa: E731
    per_tensor = lambda m: w8a8_size(m, per_channel=False)  # noqa: E731
    return {
        "fp32": (lambda m: m, weight_only.model_size_bytes),
        "W8A8 per-tensor": (lambda m: w8a8.quantize_model(m, "tensor", "tensor"), per_tensor),
        "W8A8 per-token/per-channel": (lambda m: w8a8.quantize_model(m, "token", "channel"), w8a8_size),
        "LLM.int8": (lambda m: int8_mixed.quantize_model(m, THRESHOLD), w8a8_size),
        "SmoothQuant W8A8": (lambda m: smoothquant.quantize_model(m, calib, ALPHA, "tensor", "channel"), w8a8_size),
        "SmoothQuant O1": (lambda m: smoothquant.quantize_model(m, calib, ALPHA, level="O1"), per_tensor),
        "SmoothQuant O3": (lambda m: smoothquant.quantize_model(m, calib, ALPHA, level="O3"),
                           lambda m: w8a8_size(m, per_channel=False, static=True)),
        "W4 RTN g32": (lambda m: weight_only.quantize_model(m, 4, 32), wo(4, 32)),
        "W4 RTN g64": (lambda m: weight_only.quantize_model(m, 4, 64), wo(4, 64)),
        "W4 RTN g128": (lambda m: weight_only.quantize_model(m, 4, 128), wo(4, 128)),
        "W3 RTN g128": (lambda m: weight_only.quantize_model(m, 3, 128), wo(3, 128)),
        "GPTQ W4 g128": (lambda m: gptq.quantize_model(m, calib, 4, 128), wo(4, 128)),
        "GPTQ W3 g128": (lambda m: gptq.quantize_model(m, calib, 3, 128), wo(3, 128)),
        "AWQ W4 g128": (lambda m: awq.quantize_model(m, calib, 4, 128), wo(4, 128)),
        "AWQ W4 g128 scale only": (lambda m: awq.quantize_model(m, calib, 4, 128, clip=False), wo(4, 128)),
    }


def calibration_windows(n: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    x, _ = corpus.random_batch(corpus.load().train, n, charlm.CharLMConfig().context, gen)
    return x


def outliers(model, calib) -> list[dict]:
    return [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}
            for row in stats.layer_report(layers.capture_inputs(model, calib), THRESHOLD)]


def run(fast: bool, log=print) -> dict:
    seeds = [0] if fast else list(charlm.SEEDS)
    limit = 48 if fast else VAL_WINDOWS
    calib = calibration_windows(8 if fast else CALIB)
    val = corpus.load().val
    per = {name: {"ppl": [], "acc": [], "seconds": [], "size_bytes": None} for name in methods(calib)}
    planted = {name: {"ppl": [], "acc": []} for name in W8A8_METHODS}
    out_stats, int8_frac, planted_absmax = {}, {}, []
    for seed in seeds:
        model = charlm.pretrained(seed)
        out_stats[str(seed)] = outliers(model, calib)
        big = stats.with_outlier_channels(model, **PLANTED)
        planted_absmax.append(max(r["absmax"] for r in outliers(big, calib)))
        for name in W8A8_METHODS:
            r = evaluate.evaluate(methods(calib)[name][0](big), val, limit=limit)
            planted[name]["ppl"].append(r["ppl"])
            planted[name]["acc"].append(r["acc"])
            log(f"seed {seed}  planted outliers: {name:28s} ppl {r['ppl']:.4f}")
        for name, (quantize, size) in methods(calib).items():
            start = time.perf_counter()
            q = quantize(model)
            seconds = time.perf_counter() - start
            r = evaluate.evaluate(q, val, limit=limit)
            if name == "LLM.int8":
                fr = int8_mixed.outlier_fractions(q)
                int8_frac[str(seed)] = round(sum(fr.values()) / len(fr), 5)
            row = per[name]
            row["ppl"].append(r["ppl"])
            row["acc"].append(r["acc"])
            row["seconds"].append(seconds)
            row["size_bytes"] = size(model)
            log(f"seed {seed}  {name:28s} ppl {r['ppl']:.4f}  acc {r['acc']:.2f}%  ({seconds:.1f} s)")
    rows = {}
    for name, row in per.items():
        rel = [p / f - 1 for p, f in zip(row["ppl"], per["fp32"]["ppl"])]
        rows[name] = {"ppl": {**evaluate.over_seeds(row["ppl"]), "values": row["ppl"]},
                      "acc": {**evaluate.over_seeds(row["acc"]), "values": row["acc"]},
                      "rel_ppl": {**evaluate.over_seeds(rel), "values": rel},
                      "seconds": {**evaluate.over_seeds(row["seconds"]), "values": row["seconds"]},
                      "size_bytes": row["size_bytes"]}
    planted_rows = {}
    for name, row in planted.items():
        rel = [p / f - 1 for p, f in zip(row["ppl"], planted["fp32"]["ppl"])]
        planted_rows[name] = {"ppl": {**evaluate.over_seeds(row["ppl"]), "values": row["ppl"]},
                              "acc": {**evaluate.over_seeds(row["acc"]), "values": row["acc"]},
                              "rel_ppl": {**evaluate.over_seeds(rel), "values": rel}}
    targets = []
    for name in SMOOTHQUANT:
        sq = rows[name]["rel_ppl"]["max"]
        targets.append({"name": f"{name} within 0.02 relative perplexity of fp32 (worst seed)",
                        "value": sq, "threshold": 0.02, "met": sq <= 0.02})
    gap = max(g - r for g, r in zip(per["GPTQ W4 g128"]["ppl"], per["W4 RTN g128"]["ppl"]))
    targets.append({"name": "GPTQ W4 g128 minus RTN W4 g128 perplexity below 0 on every seed (worst seed)",
                    "value": gap, "threshold": 0, "met": gap < 0})
    comparisons = {}
    for name in ("AWQ W4 g128", "AWQ W4 g128 scale only"):
        d = [a - r for a, r in zip(per[name]["ppl"], per["W4 RTN g128"]["ppl"])]
        comparisons[f"{name} minus W4 RTN g128"] = {"ppl_difference": d, "better_on_every_seed": max(d) < 0}
    info = charlm.charlm_info()
    return {**header("llm", seeds, fast),
            "settings": {"calibration_windows": calib.shape[0], "context": charlm.CharLMConfig().context,
                         "val_windows": limit or "all", "val_files": list(corpus.VAL_FILES),
                         "corpus_python": corpus.python_version(), "weights_python": info["python"],
                         "smoothquant_alpha": ALPHA, "int8_threshold": THRESHOLD,
                         "weight_only": "asymmetric, torchao quantize_affine convention",
                         "gptq": {"percdamp": 0.01, "blocksize": 128, "act_order": True},
                         "awq_grid": awq.N_GRID, "awq_clip_ratios": awq.clip_ratios(),
                        "awq_no_clip": list(awq.NO_CLIP), "static_act_scale": "max|X_calib| / 127, codes [-127, 127]"},
            "rows": rows, "outliers": out_stats,
            "planted": {**PLANTED, "channels": list(PLANTED["channels"]), "absmax": planted_absmax,
                        "rows": planted_rows}, "llm_int8_outlier_fraction": int8_frac,
            "comparisons": comparisons, "targets": targets}


def table(result: dict) -> str:
    lines = [f"{'method':28s} {'perplexity mean [min, max]':>30s} {'rel. ppl':>9s} {'next-byte acc':>14s} "
             f"{'size KiB':>9s} {'seconds':>8s}"]
    for name, r in result["rows"].items():
        p = r["ppl"]
        lines.append(f"{name:28s} {p['mean']:12.4f} [{p['min']:.4f}, {p['max']:.4f}] "
                     f"{100 * r['rel_ppl']['mean']:+8.2f}% {r['acc']['mean']:13.2f}% "
                     f"{r['size_bytes'] / 1024:9.1f} {r['seconds']['mean']:8.2f}")
    lines.append(f"\nthe same models with planted outlier channels {result['planted']['channels']} "
                 f"(x{result['planted']['factor']:g}; largest input {max(result['planted']['absmax']):.1f}):")
    for name, r in result["planted"]["rows"].items():
        p = r["ppl"]
        lines.append(f"{name:28s} {p['mean']:12.4f} [{p['min']:.4f}, {p['max']:.4f}] "
                     f"{100 * r['rel_ppl']['mean']:+8.2f}%")
    for name, c in result["comparisons"].items():
        lines.append(f"{name}: {', '.join(f'{d:+.4f}' for d in c['ppl_difference'])} perplexity per seed")
    return "\n".join(lines + target_lines(result["targets"]))


def main(argv=None) -> int:
    return common.main("llm", run, table, __doc__, "seed 0, 48 held-out windows, 8 calibration windows", argv, timed=True)


if __name__ == "__main__":
    sys.exit(main())
