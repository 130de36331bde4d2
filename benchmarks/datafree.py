"""Benchmark: data-free quantization of ``cnn16`` on the digits, with the weight confound removed.

On the shipped ``cnn16`` weights (seeds 0, 1, 2; mean and min-max over seeds) and the 360
test digits, without touching a training image except where a row says "real":

1. Calibration source x {W8A8, W6A6, W4A4} static PTQ (weights symmetric per-channel,
   activations affine per-tensor, min-max and 99.9% percentile activation observers), once
   with **min-max weight scales** (``accuracy``: the course's original baseline) and once with
   **MSE weight scales** (``accuracy_mse_weights``: per-channel grid search minimizing the
   weights' own rounding + clipping error, ``weight_observer="mse"``; it needs no data).
   Sources: ``real`` (256 training digits), ``noise`` (N(0, 1)), ``noise_clamped`` (N(0, 1)
   clamped to the input range: a control for the clamp), ``bn_synthetic`` (ZeroQ,
   ``qlib.datafree.synthesize_bn``), ``generator`` (GDFQ, ``qlib.datafree.Generator``).
   The input range and the input mean 0 / std 1 come from the preprocessing (the
   standardized values of a black and a white pixel, ``qlib.datafree.standardized_range``
   of ``DIGITS_NORMALIZATION``), not from images.
2. How far each calibration set is from real digits (``score_calibration_set``).
3. Cross-layer equalization and bias correction with *per-tensor* weights: the original
   model, an fp32-equivalent copy with unbalanced channels (``unbalance``, spread 100),
   after CLE, after CLE + analytic bias correction; calibrated on the BN-synthetic set.
4. Data-free distillation at W4A4 (``qlib.distill.distill``), for both weight observers:
   the BN-synthetic-calibrated student trained against the fp32 teacher on the BN-synthetic
   images (training its biases only, its weights only, or both) and on a stream from the
   generator (both). ``distillation_W4A4`` keeps the original min-max-weight rows.
5. The decomposition at W4A4 (percentile activations): fp32; min-max weights + real
   calibration; MSE weights + real; MSE weights + each synthetic source; + distillation.
   Each step changes one thing, so the effect of the weight scales, of the calibration
   source and of distillation can be read apart.

Targets: BN-synthetic calibration within 1.5 points of real-data calibration at W4A4
(percentile observer, mean over seeds) and clearly ahead of noise (by >= 5 points, and on
every seed); CLE brings the unbalanced model's per-tensor W8A8 back within 1 point of the
original per-channel W8A8; distillation raises W4A4 accuracy and agreement with the teacher
(these four on the original min-max weight scales). With MSE weight scales: real-data W4A4
gains >= 5 points over min-max weight scales (the size of the confound); BN-synthetic within
1.5 points of real data; distillation gains less than with min-max weights (much of what it
recovered was the weight scales).

    python benchmarks/datafree.py                  # full study -> benchmarks/results/datafree.json
    python benchmarks/datafree.py --fast --out /tmp/datafree.json   # seed 0, 64 images, 20-step loops: a smoke test
"""

from __future__ import annotations

import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402
from benchmarks.common import header, target_lines  # noqa: E402
from qlib import data, models  # noqa: E402
from qlib.datafree import (DIGITS_NORMALIZATION, Generator, bn_preactivation_stats,  # noqa: E402
                           bn_statistics_loss, correct_bias, cross_layer_equalize, expected_inputs,
                           gaussian_batches, generator_batches, scale_stats, score_calibration_set,
                           standardized_range, synthesize_bn, train_generator, unbalance)
from qlib.distill import agreement, distill  # noqa: E402
from qlib.modules import QuantConfig  # noqa: E402
from qlib.ptq import quantize_static  # noqa: E402
from qlib.qparams import PerTensor  # noqa: E402
from qlib.train import accuracy_over_seeds, evaluate, format_spread  # noqa: E402

MODEL = "cnn16"
CONFIGS = {"W8A8": 8, "W6A6": 6, "W4A4": 4}
SOURCES = ("real", "noise", "noise_clamped", "bn_synthetic", "generator")
OBSERVERS = {"minmax": {}, "percentile": {"percentile": 99.9}}
WEIGHT_OBSERVERS = ("minmax", "mse")
CLE_ROWS = ("original per-channel", "original per-tensor", "unbalanced per-tensor", "+ CLE", "+ CLE + bias corr.")
KD_ROWS = ("ptq", "biases_only", "weights_only", "distilled_bn_synthetic", "distilled_generator")
KD_TRAIN = {"biases_only": ("bn_synthetic", "biases"), "weights_only": ("bn_synthetic", "weights"),
            "distilled_bn_synthetic": ("bn_synthetic", "all"), "distilled_generator": ("generator", "all")}
MAX_GAP_TO_REAL = 1.5
MIN_LEAD_OVER_NOISE = 5.0
MIN_WEIGHT_SCALE_GAIN = 5.0


def settings(fast: bool) -> dict:
    return {"model": MODEL, "dataset": "digits", "image_size": models.image_size(MODEL),
            "seeds": [0] if fast else list(models.SEEDS),
            "calibration": {"num_samples": 64 if fast else 256, "batch_size": 64, "seed": 0},
            "bn_synthesis": {"steps": 20 if fast else 100, "lr": 0.5, "input_mean": 0.0, "input_std": 1.0,
                             "seed": 0},
            "generator": {"steps": 20 if fast else 200, "lr": 5e-3, "width": 16, "latent_dim": 64,
                          "batch_size": 32 if fast else 64, "sample_seed": 0},
            "distill": {"steps": 20 if fast else 200, "lr": 1e-4, "temperature": 4.0,
                        "batch_size": 32 if fast else 64},
            "unbalance_spread": 100.0,
            "observers": {k: v for k, v in OBSERVERS.items() if not fast or k == "percentile"},
            "weight_observers": list(WEIGHT_OBSERVERS),
            "input_normalization": list(DIGITS_NORMALIZATION[models.image_size(MODEL)]),
            "quant_scheme": "weights symmetric signed (per-channel unless 'per-tensor'; min-max scales in "
                            "'accuracy', MSE scales in 'accuracy_mse_weights'), activations affine "
                            "per-tensor unsigned at every conv/linear input, BN folded"}


def _summary(values) -> dict:
    out = accuracy_over_seeds(values)
    out["values"] = [round(v, 4) for v in values]
    return out


def _config(bits: int, observer: str, per_tensor: bool = False, weight_observer: str = "minmax") -> QuantConfig:
    cfg = QuantConfig(weight_bits=bits, act_bits=bits, act_observer=observer,
                      act_observer_kwargs=dict(OBSERVERS[observer]), weight_observer=weight_observer)
    return replace(cfg, weight_granularity=PerTensor()) if per_tensor else cfg


def decomposition(result: dict, observer: str = "percentile") -> list[dict]:
    """The W4A4 rows of the decomposition, each changing one thing against the row above it:
    ``[{"row", "weights", "calibration", "distillation", **summary}]`` read from ``result``."""
    acc, mse = result["accuracy"], result["accuracy_mse_weights"]
    kd = result["distillation_ablation_W4A4"]["mse"]["accuracy"]
    rows = [("fp32", "fp32", "-", "-", result["fp32"]),
            ("min-max weights + real", "min-max", "real", "-", acc["real"]["W4A4"][observer]),
            ("MSE weights + real", "MSE", "real", "-", mse["real"]["W4A4"][observer])]
    for src in ("noise", "bn_synthetic", "generator"):
        rows.append((f"MSE weights + {src}", "MSE", src, "-", mse[src]["W4A4"][observer]))
    if observer == "percentile":
        rows += [("MSE weights + bn_synthetic + distillation (BN-synthetic images)", "MSE", "bn_synthetic",
                  "bn_synthetic", kd["distilled_bn_synthetic"]),
                 ("MSE weights + bn_synthetic + distillation (generator stream)", "MSE", "bn_synthetic",
                  "generator", kd["distilled_generator"])]
    return [{"row": r, "weights": w, "calibration": c, "distillation": d, **{k: v for k, v in s.items()}}
            for r, w, c, d, s in rows]


def measure_seed(seed: int, cfg: dict, log=print) -> dict:
    """Every measurement of one model seed (``settings(fast)`` in ``cfg``): a dict of lists of
    one value each, in the layout ``summarize`` merges over seeds. Seeds are independent, so
    ``summarize([measure_seed(s, cfg) for s in seeds])`` is the whole study, whichever order
    (or processes) the seeds ran in."""
    start = time.perf_counter()
    cal = cfg["calibration"]
    size = cfg["image_size"]
    shape = (1, size, size)
    digits = data.load_digits(size)
    # Known from the preprocessing, not from images: standardized pixels lie between the
    # standardized values of a black (0) and a white (1) pixel.
    input_range = standardized_range(*DIGITS_NORMALIZATION[size])
    real = data.calibration_batches(digits.train, cal["num_samples"], cal["batch_size"], seed=cal["seed"])
    observers = list(cfg["observers"])
    acc = {w: {s: {c: {o: [] for o in observers} for c in CONFIGS} for s in SOURCES} for w in WEIGHT_OBSERVERS}
    cle = {c: {r: [] for r in CLE_ROWS} for c in CONFIGS}
    kd = {w: {k: [] for k in KD_ROWS} for w in WEIGHT_OBSERVERS}
    kd_agree = {w: {k: [] for k in KD_ROWS} for w in WEIGHT_OBSERVERS}
    scores = {s: [] for s in SOURCES}
    bn_loss = {"noise": [], "real": [], "bn_synthetic_start": [], "bn_synthetic_end": []}
    seconds = {"bn_synthesis": [], "generator": [], "distill_bn_synthetic": [], "distill_generator": []}

    model = models.pretrained(MODEL, seed)
    fp32 = [evaluate(model, digits.test)]
    s = cfg["bn_synthesis"]
    t = time.perf_counter()
    synth = synthesize_bn(model, shape, cal["num_samples"], cal["batch_size"], steps=s["steps"], lr=s["lr"],
                          input_mean=s["input_mean"], input_std=s["input_std"], input_range=input_range,
                          seed=s["seed"])
    seconds["bn_synthesis"].append(time.perf_counter() - t)
    g = cfg["generator"]
    t = time.perf_counter()
    gen = Generator(shape, digits.num_classes, g["latent_dim"], g["width"], input_range=input_range, seed=seed)
    train_generator(gen, model, steps=g["steps"], batch_size=g["batch_size"], lr=g["lr"], seed=seed)
    seconds["generator"].append(time.perf_counter() - t)
    noise = gaussian_batches(shape, cal["num_samples"], cal["batch_size"], seed=cal["seed"])
    sources = {"real": real, "noise": noise,
               "noise_clamped": [b.clamp(*input_range) for b in noise],
               "bn_synthetic": synth.batches,
               "generator": generator_batches(gen, cal["num_samples"], cal["batch_size"], seed=g["sample_seed"])}
    groups = cal["num_samples"] // cal["batch_size"]
    with torch.no_grad():
        for key, x in (("noise", torch.cat(noise)), ("real", torch.cat(real))):
            bn_loss[key].append(bn_statistics_loss(model, x, groups, 0.0, 1.0).item())
    bn_loss["bn_synthetic_start"].append(synth.history[0])
    bn_loss["bn_synthetic_end"].append(synth.history[-1])

    for name, batches in sources.items():
        scores[name].append(score_calibration_set(model, batches, reference=digits.test.tensors[0]))
        for wobs in WEIGHT_OBSERVERS:
            for label, bits in CONFIGS.items():
                for obs in observers:
                    q = quantize_static(model, batches, _config(bits, obs, weight_observer=wobs))
                    acc[wobs][name][label][obs].append(evaluate(q, digits.test))
    for wobs in WEIGHT_OBSERVERS:
        log(f"seed {seed} W4A4 {observers[-1]}, {wobs} weights: " + ", ".join(
            f"{n} {acc[wobs][n]['W4A4'][observers[-1]][-1]:.1f}" for n in SOURCES)
            + f"  ({time.perf_counter() - start:.0f} s)")

    # CLE + bias correction, per-tensor weights, calibrated on the BN-synthetic images
    stats = bn_preactivation_stats(model)
    unbal, c_unbal = unbalance(model, cfg["unbalance_spread"], seed=seed)
    equal, c_equal = cross_layer_equalize(unbal)
    means = expected_inputs(equal, scale_stats(scale_stats(stats, c_unbal), c_equal))
    for label, bits in CONFIGS.items():
        row = {"original per-channel": quantize_static(model, synth, _config(bits, "minmax")),
               "original per-tensor": quantize_static(model, synth, _config(bits, "minmax", True)),
               "unbalanced per-tensor": quantize_static(unbal, synth, _config(bits, "minmax", True)),
               "+ CLE": quantize_static(equal, synth, _config(bits, "minmax", True))}
        row["+ CLE + bias corr."] = correct_bias(row["+ CLE"], means)
        for name, q in row.items():
            cle[label][name].append(evaluate(q, digits.test))
    log(f"seed {seed} CLE W8A8 per-tensor: " + ", ".join(f"{r} {cle['W8A8'][r][-1]:.1f}" for r in CLE_ROWS)
        + f"  ({time.perf_counter() - start:.0f} s)")

    # data-free distillation at W4A4, for each weight observer: what is trained, on what
    d = cfg["distill"]
    streams = {"bn_synthetic": synth, "generator": gen}
    for wobs in WEIGHT_OBSERVERS:
        w4 = _config(4, "percentile", weight_observer=wobs)
        student = quantize_static(model, synth, w4)
        kd[wobs]["ptq"].append(evaluate(student, digits.test))
        kd_agree[wobs]["ptq"].append(agreement(student, model, digits.test))
        for key, (stream, train) in KD_TRAIN.items():
            student = quantize_static(model, synth, w4)
            t = time.perf_counter()
            distill(student, model, streams[stream], steps=d["steps"], lr=d["lr"], temperature=d["temperature"],
                    batch_size=d["batch_size"], seed=seed, train=train)
            if train == "all":
                seconds[f"distill_{stream}"].append(time.perf_counter() - t)
            kd[wobs][key].append(evaluate(student, digits.test))
            kd_agree[wobs][key].append(agreement(student, model, digits.test))
        log(f"seed {seed} W4A4 distillation, {wobs} weights: "
            + ", ".join(f"{k} {v[-1]:.1f}" for k, v in kd[wobs].items())
            + f"  ({time.perf_counter() - start:.0f} s)")
    return {"seed": seed, "input_range": list(input_range), "fp32": fp32, "acc": acc, "cle": cle, "kd": kd,
            "kd_agree": kd_agree, "scores": scores, "bn_loss": bn_loss, "seconds": seconds,
            "wall_seconds": time.perf_counter() - start}


def _merge(a, b):
    """Concatenate the lists of two ``measure_seed`` dicts of the same layout."""
    if isinstance(a, dict):
        return {k: _merge(a[k], b[k]) for k in a}
    return a + b


def summarize(per_seed: list[dict], cfg: dict, fast: bool, seconds: float, cpu_seconds: float) -> dict:
    """The result JSON from the ``measure_seed`` dicts of every seed (in ``cfg["seeds"]`` order)."""
    per_seed = sorted(per_seed, key=lambda r: cfg["seeds"].index(r["seed"]))
    keys = ("fp32", "acc", "cle", "kd", "kd_agree", "scores", "bn_loss", "seconds")
    m = {k: per_seed[0][k] for k in keys}
    for r in per_seed[1:]:
        m = {k: _merge(m[k], r[k]) for k in keys}
    seeds, observers = cfg["seeds"], list(cfg["observers"])
    acc, cle, kd, kd_agree = m["acc"], m["cle"], m["kd"], m["kd_agree"]
    obs_t = "percentile" if "percentile" in observers else observers[0]
    w4 = {n: acc["minmax"][n]["W4A4"][obs_t] for n in SOURCES}
    mean = {n: sum(v) / len(v) for n, v in w4.items()}
    gap = mean["real"] - mean["bn_synthetic"]
    lead = mean["bn_synthetic"] - mean["noise"]
    every_seed = all(a > b for a, b in zip(w4["bn_synthetic"], w4["noise"]))
    cle_gap = max(a - b for a, b in zip(cle["W8A8"]["original per-channel"], cle["W8A8"]["+ CLE"]))
    kd_gain = min(b - a for a, b in zip(kd["minmax"]["ptq"], kd["minmax"]["distilled_bn_synthetic"]))
    agree_gain = min(b - a for a, b in zip(kd_agree["minmax"]["ptq"], kd_agree["minmax"]["distilled_bn_synthetic"]))
    m4 = {n: sum(v) / len(v) for n, v in ((n, acc["mse"][n]["W4A4"][obs_t]) for n in SOURCES)}
    scale_gain = m4["real"] - mean["real"]
    mse_gap = m4["real"] - m4["bn_synthetic"]

    def mean_gain(w):
        return sum(b - a for a, b in zip(kd[w]["ptq"], kd[w]["distilled_bn_synthetic"])) / len(seeds)
    kd_less = mean_gain("minmax") - mean_gain("mse")
    targets = [
        {"name": f"BN-synthetic within {MAX_GAP_TO_REAL} points of real data at W4A4 ({obs_t}, mean)",
         "value": gap, "threshold": MAX_GAP_TO_REAL, "met": gap <= MAX_GAP_TO_REAL},
        {"name": f"BN-synthetic ahead of Gaussian noise at W4A4 by >= {MIN_LEAD_OVER_NOISE} points "
                 f"({obs_t}, mean) and on every seed",
         "value": lead, "threshold": MIN_LEAD_OVER_NOISE, "met": lead >= MIN_LEAD_OVER_NOISE and every_seed},
        {"name": "CLE: unbalanced model, per-tensor W8A8 within 1 point of original per-channel (worst seed)",
         "value": cle_gap, "threshold": 1.0, "met": cle_gap <= 1.0},
        {"name": "distillation raises W4A4 accuracy and teacher agreement on every seed (smallest gain)",
         "value": min(kd_gain, agree_gain), "threshold": 0.0, "met": kd_gain > 0 and agree_gain > 0},
        {"name": f"MSE weights: real-data W4A4 ({obs_t}, mean) gains >= {MIN_WEIGHT_SCALE_GAIN} points over "
                 "min-max weight scales",
         "value": scale_gain, "threshold": MIN_WEIGHT_SCALE_GAIN, "met": scale_gain >= MIN_WEIGHT_SCALE_GAIN},
        {"name": f"MSE weights: BN-synthetic within {MAX_GAP_TO_REAL} points of real data at W4A4 ({obs_t}, mean)",
         "value": mse_gap, "threshold": MAX_GAP_TO_REAL, "met": mse_gap <= MAX_GAP_TO_REAL},
        {"name": "MSE weights: distillation on BN-synthetic images gains less than with min-max weights "
                 "(difference of the mean gains)",
         "value": kd_less, "threshold": 0.0, "met": kd_less > 0},
    ]
    trio = ("ptq", "distilled_bn_synthetic", "distilled_generator")
    result = header("datafree", seeds, fast)
    result.update({
        "settings": {**cfg, "input_range": per_seed[0]["input_range"]},
        "fp32": _summary(m["fp32"]),
        "accuracy": {n: {c: {o: _summary(v) for o, v in d.items()} for c, d in per.items()}
                     for n, per in acc["minmax"].items()},
        "accuracy_mse_weights": {n: {c: {o: _summary(v) for o, v in d.items()} for c, d in per.items()}
                                 for n, per in acc["mse"].items()},
        "calibration_scores": {n: {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}
                               for n, rows in m["scores"].items()},
        "bn_loss": {k: _summary(v) for k, v in m["bn_loss"].items()},
        "cle_bias_correction": {c: {r: _summary(v) for r, v in d.items()} for c, d in cle.items()},
        "distillation_W4A4": {"accuracy": {k: _summary(kd["minmax"][k]) for k in trio},
                              "agreement_with_teacher": {k: _summary(kd_agree["minmax"][k]) for k in trio}},
        "distillation_ablation_W4A4": {w: {"accuracy": {k: _summary(v) for k, v in kd[w].items()},
                                           "agreement_with_teacher": {k: _summary(v) for k, v in kd_agree[w].items()}}
                                       for w in WEIGHT_OBSERVERS},
        "method_seconds": {k: _summary(v) for k, v in m["seconds"].items()},
        "seed_seconds": [round(r["wall_seconds"], 1) for r in per_seed],
        "targets": targets,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
    })
    result["decomposition_W4A4"] = {o: decomposition(result, o) for o in observers}
    return result


def run(fast: bool = False, log=print) -> dict:
    cfg = settings(fast)
    start, cpu_start = time.perf_counter(), time.process_time()
    per_seed = [measure_seed(seed, cfg, log) for seed in cfg["seeds"]]
    return summarize(per_seed, cfg, fast, time.perf_counter() - start, time.process_time() - cpu_start)


def table(result: dict) -> str:
    """The result as text tables (what ``main`` prints)."""
    def acc(s):
        return format_spread(s, digits=2, width=6, bounds_digits=1, bounds_width=0)

    observers = list(result["settings"]["observers"])
    lines = [f"Data-free quantization: {result['settings']['model']} on digits, seeds {result['seeds']}"
             f"{' (fast)' if result['fast'] else ''}; test accuracy % mean [min, max]",
             f"fp32: {acc(result['fp32'])}", ""]
    for key, what in (("accuracy", "min-max weights"), ("accuracy_mse_weights", "MSE weights")):
        for obs in observers:
            lines.append(f"calibration source ({what}, {obs} activations)".ljust(58)
                         + "  ".join(f"{c:>20s}" for c in CONFIGS))
            for n in SOURCES:
                lines.append(f"  {n:56s}" + "  ".join(f"{acc(result[key][n][c][obs]):>20s}" for c in CONFIGS))
            lines.append("")
    for obs, rows in result["decomposition_W4A4"].items():
        lines.append(f"decomposition at W4A4 ({obs} activations): one change per row")
        for r in rows:
            lines.append(f"  {r['row']:66s} {acc(r)}")
        lines.append("")
    lines.append("calibration set vs real test digits: bn_distance  mmd_inputs  mmd_outputs  confidence  class_entropy")
    for n, s in result["calibration_scores"].items():
        lines.append(f"  {n:15s} {s['bn_distance']:10.4f}  {s['mmd_inputs']:10.4f}  {s['mmd_outputs']:11.4f}  "
                     f"{s['confidence']:10.3f}  {s['class_entropy']:13.3f}")
    b = result["bn_loss"]
    lines += ["", "BN-statistics loss (mean): " + ", ".join(f"{k} {v['mean']:.4f}" for k, v in b.items()), "",
              "CLE + bias correction (min-max activations, BN-synthetic calibration)  "
              + "  ".join(f"{c:>20s}" for c in CONFIGS)]
    for r in CLE_ROWS:
        lines.append(f"  {r:69s}" + "  ".join(f"{acc(result['cle_bias_correction'][c][r]):>20s}" for c in CONFIGS))
    for w, d in result["distillation_ablation_W4A4"].items():
        lines += ["", f"data-free distillation, W4A4 (percentile), {w} weight scales, student calibrated on "
                      "BN-synthetic images: what is trained, on what"]
        for k in d["accuracy"]:
            lines.append(f"  {k:24s} accuracy {acc(d['accuracy'][k])}   agreement with teacher "
                         f"{acc(d['agreement_with_teacher'][k])}")
    lines += ["", "seconds per seed (mean): "
              + ", ".join(f"{k} {v['mean']:.1f}" for k, v in result["method_seconds"].items())
              + f"; total {result['seconds']:.0f} s wall, {result['cpu_seconds']:.0f} s CPU", ""]
    lines += target_lines(result["targets"])
    return "\n".join(lines)


def main(argv=None) -> int:
    return common.main("datafree", run, table, __doc__, "seed 0, 64 images, 20-step loops: a smoke test", argv)


if __name__ == "__main__":
    sys.exit(main())
