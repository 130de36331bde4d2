"""The PTQ benchmark's depthwise study: why per-tensor weights collapse on ``dsc16``, and what DFQ recovers.

``benchmarks/ptq.py`` calls this module; its rows are ``depthwise`` in ``benchmarks/results/ptq.json``.

What it measures, on the depthwise-separable ``dsc16`` (the zoo's MobileNet-style model), for the
shipped seeds, the main study's calibration digits and the 360 test digits:

- fp32 accuracy, and fp32 after replacing ReLU6 by ReLU (the first step of DFQ);
- W8A8 and W4A8 static PTQ (``qlib.ptq.quantize_static``; weights symmetric min-max, activations
  affine min-max per-tensor) with **per-tensor** and with **per-channel** weight scales, each
  ``plain``, after cross-layer equalization (``cle``), with empirical ``bias_correction`` (the
  calibration batches' input means), with ``analytic_bias_correction`` (no data: E[x] from the
  BatchNorm statistics), and with CLE plus either;
- qlib's integer path for each row (``integer_path``: accuracy, agreement with the fake-quant
  predictions, max |logit diff|; in fast mode ``FAST_INTEGER_METHODS`` only);
- the folded weights' per-channel range spread, layer by layer (``weight_range_spread``, seed 0);
- min-max vs entropy activations at W8A8 per-channel.

Why per-tensor collapses. train_zoo's ``"mobilenet"`` recipe (MobileNetV2's RMSprop at lr 0.03, no
weight decay on depthwise weights or BN) kills a few ReLU6 channels on every seed. The depthwise
layer after a dead channel sees only zeros, so its BN running variance decays to ~0, and folding
BN (w * gamma / sqrt(var + eps), per output channel) multiplies that channel's weights hundreds of times: the worst
depthwise layer's largest folded channel range is about 400-1200x its median, by seed. One per-tensor
scale, set by that channel, rounds most live channels to zero codes; per-channel scales do not care.

What recovers it (Nagel et al. 2019, Data-Free Quantization, DFQ). Cross-layer equalization
divides output channel i of a layer by s_i and multiplies the matching input channel of the next
layer by s_i, s_i = sqrt(r1_i * r2_i) / r2_i (r1_i, r2_i: the two channels' ranges max |w|), so both
get range sqrt(r1_i * r2_i); the float function is unchanged across a positively homogeneous
activation (relu(s x) = s relu(x), s > 0). ReLU6 is not positively homogeneous
(min(s x, 6) != s min(x, 6)), so ReLU6 is replaced by ReLU first, as DFQ does. Weight quantization
shifts each layer's output mean, E[W_q x] - E[W x] = (W_q - W) E[x]; bias correction subtracts it,
with E[x] measured on calibration batches (empirical) or computed from BN (analytic: the mean of a
normal with mean beta and std |gamma| clipped to [0, 6] after ReLU6, to [0, inf) after the ReLU that replaces it).
CLE and bias correction are ``qlib.datafree``'s (``cross_layer_equalize(..., replace_relu6=True)``,
``correct_bias``), depthwise layers included.

Targets (``depthwise_targets``, W8A8, every seed): per-tensor weights collapse (below
``DSC_COLLAPSE_BELOW``%), per-channel keep fp32 (above ``DSC_PER_CHANNEL_ABOVE``%), and CLE + bias
correction recovers per-tensor weights (above ``DSC_RECOVERY_ABOVE``%).

Also here, because both studies use them and ``ptq.py`` imports this module (not the other way
round): ``summary`` (accuracies over seeds) and ``integer_path`` / ``integer_summary`` (the
fake-quant model against its integer-only twin).

Shapes and dtypes: models take float32 images (N, 1, 16, 16); accuracies are Python floats in %.
"""

from __future__ import annotations

import time

from torch import nn

from qlib import data, models
from qlib.datafree.bias_correction import (bn_preactivation_stats, correct_bias, empirical_input_means,
                                           expected_inputs, scale_stats)
from qlib.datafree.equalize import LAYERS, channel_ranges, cross_layer_equalize, is_depthwise, relu6_to_relu
from qlib.fold import fold_batchnorm
from qlib.granularity import PerChannel, PerTensor
from qlib.intmodel import convert_to_integer
from qlib.modules import QuantConfig
from qlib.ptq import quantize_static
from qlib.train import accuracy_over_seeds, evaluate, predict

DEPTHWISE_MODEL = "dsc16"
DEPTHWISE_CONFIGS = {"W8A8": (8, 8), "W4A8": (4, 8)}
GRANULARITIES = {"per_tensor": PerTensor(), "per_channel": PerChannel(0)}
METHODS = ("plain", "bias_correction", "cle", "cle+bias_correction",
           "analytic_bias_correction", "cle+analytic_bias_correction")
"""Depthwise rows: ``bias_correction`` is empirical (calibration batches' input means);
``analytic_bias_correction`` is data-free (E[x] from the BatchNorm statistics)."""
FAST_INTEGER_METHODS = ("plain", "cle+bias_correction")
DSC_COLLAPSE_BELOW = 50.0
"""dsc16, per-tensor W8A8 plain: every seed below this (chance is 10%)."""
DSC_PER_CHANNEL_ABOVE = 95.0
"""dsc16, per-channel W8A8 plain: every seed above this."""
DSC_RECOVERY_ABOVE = 90.0
"""dsc16, per-tensor W8A8 after CLE + (empirical) bias correction: every seed above this."""


def summary(values) -> dict:
    """Per-seed accuracies (%) -> mean, min, max, n (``accuracy_over_seeds``) and the values."""
    out = accuracy_over_seeds(values)
    out["values"] = [round(v, 4) for v in values]
    return out


def integer_path(q: nn.Module, test) -> dict:
    """Fake-quant model ``q`` against its integer-only twin ``convert_to_integer(q)`` on the
    labelled ``test`` set: both accuracies (%), how often they predict the same class (%), and
    the largest |logit difference|."""
    y_fq, labels = predict(q, test)
    y_int, _ = predict(convert_to_integer(q), test)
    return {"fake_quant_acc": 100.0 * (y_fq.argmax(1) == labels).float().mean().item(),
            "acc": 100.0 * (y_int.argmax(1) == labels).float().mean().item(),
            "agreement": 100.0 * (y_fq.argmax(1) == y_int.argmax(1)).float().mean().item(),
            "max_abs_logit_diff": (y_fq - y_int).abs().max().item()}


def integer_summary(runs: list[dict]) -> dict:
    """Seeds' ``integer_path`` dicts -> accuracy and agreement summaries, largest logit diff."""
    return {"acc": summary([r["acc"] for r in runs]),
            "agreement_with_fake_quant": summary([r["agreement"] for r in runs]),
            "max_abs_logit_diff": max(r["max_abs_logit_diff"] for r in runs)}


def depthwise_settings(fast: bool) -> dict:
    """The study's entry in the benchmark's ``settings`` (``settings["depthwise"]``)."""
    return {"model": DEPTHWISE_MODEL, "configs": list(DEPTHWISE_CONFIGS),
            "weight_granularity": list(GRANULARITIES), "methods": list(METHODS),
            "integer_methods": list(FAST_INTEGER_METHODS if fast else METHODS),
            "observers": "weights symmetric min-max, activations affine min-max per-tensor",
            "cle": "ReLU6 -> ReLU, BN folded, pairs across ReLU/pooling incl. depthwise, "
                   "20 sweeps (tol 1e-4)",
            "bias_correction": "empirical: input means of every layer on the calibration batches",
            "analytic_bias_correction": "data-free: E[x] = clipped-normal mean of BN (beta, |gamma|) "
                                        "after ReLU6 ([0, 6]) or ReLU (CLE)"}


def weight_range_spread(model: nn.Module) -> dict:
    """Per folded layer: how far its output channels' weight ranges ``max |w|`` spread
    (largest / median, largest / smallest), and whether it is depthwise."""
    out = {}
    for name, layer in fold_batchnorm(model).named_modules():
        if isinstance(layer, LAYERS):
            r = channel_ranges(layer.weight, 0)
            out[name] = {"depthwise": is_depthwise(layer), "max_over_median": (r.max() / r.median()).item(),
                         "max_over_min": (r.max() / r.min().clamp_min(1e-12)).item()}
    return out


def depthwise_study(cfg: dict, log=print) -> dict:
    """The ``dsc16`` rows: per-tensor vs per-channel weights, plain, CLE, bias correction, and
    the integer path of each (``FAST_INTEGER_METHODS`` only in fast mode). ``cfg`` is the
    benchmark's ``settings``: its ``seeds``, ``calibration`` and ``depthwise`` entries are used."""
    digits = data.load_digits(models.image_size(DEPTHWISE_MODEL))
    calib = data.calibration_batches(digits.train, cfg["calibration"]["num_samples"],
                                     cfg["calibration"]["batch_size"], seed=cfg["calibration"]["seed"])
    int_methods = cfg["depthwise"]["integer_methods"]
    fp32, fp32_relu, entropy_w8 = [], [], []
    acc = {c: {g: {m: [] for m in METHODS} for g in GRANULARITIES} for c in DEPTHWISE_CONFIGS}
    integer = {c: {g: {m: [] for m in int_methods} for g in GRANULARITIES} for c in DEPTHWISE_CONFIGS}
    start = time.perf_counter()
    for seed in cfg["seeds"]:
        model = models.pretrained(DEPTHWISE_MODEL, seed)
        relu = relu6_to_relu(model)
        fp32.append(evaluate(model, digits.test))
        fp32_relu.append(evaluate(relu, digits.test))
        equalized, scales = cross_layer_equalize(model, replace_relu6=True)
        sources = {"plain": model, "cle": equalized}
        means = {k: empirical_input_means(fold_batchnorm(m), calib) for k, m in sources.items()}
        stats = bn_preactivation_stats(model)  # (beta, |gamma|) per layer, read before folding
        analytic = {"plain": expected_inputs(model, stats),
                    "cle": expected_inputs(equalized, scale_stats(stats, scales))}
        for label, (wb, ab) in DEPTHWISE_CONFIGS.items():
            for gname, gran in GRANULARITIES.items():
                config = QuantConfig(weight_bits=wb, act_bits=ab, weight_granularity=gran)
                for key, src in sources.items():
                    q = quantize_static(src, calib, config)
                    prefix = "" if key == "plain" else "cle+"
                    variants = {key: q, prefix + "bias_correction": correct_bias(q, means[key]),
                                prefix + "analytic_bias_correction": correct_bias(q, analytic[key])}
                    for method, qm in variants.items():
                        if method in int_methods:
                            path = integer_path(qm, digits.test)
                            integer[label][gname][method].append(path)
                            acc[label][gname][method].append(path["fake_quant_acc"])
                        else:
                            acc[label][gname][method].append(evaluate(qm, digits.test))
            log(f"{DEPTHWISE_MODEL} seed {seed} {label}: " + ", ".join(
                f"{g} {'/'.join(f'{acc[label][g][m][-1]:.1f}' for m in METHODS)}" for g in GRANULARITIES)
                + f"  ({time.perf_counter() - start:.0f} s)")
        entropy_w8.append(evaluate(quantize_static(model, calib, QuantConfig(act_observer="entropy")), digits.test))
    return {"model": DEPTHWISE_MODEL, "fp32": summary(fp32), "fp32_relu": summary(fp32_relu),
            "accuracy": {c: {g: {m: summary(v) for m, v in d.items()} for g, d in per_g.items()}
                         for c, per_g in acc.items()},
            "integer_path": {c: {g: {m: integer_summary(v) for m, v in d.items()} for g, d in per_g.items()}
                             for c, per_g in integer.items()},
            "entropy_W8A8_per_channel": summary(entropy_w8),
            "weight_range_spread_seed0": weight_range_spread(models.pretrained(DEPTHWISE_MODEL, cfg["seeds"][0]))}


def depthwise_targets(d: dict) -> list[dict]:
    """The ``dsc16`` targets from the study ``d`` (W8A8, every seed): per-tensor weights
    collapse, per-channel keep fp32, CLE + bias correction recovers per-tensor."""
    w8 = d["accuracy"]["W8A8"]
    collapse = w8["per_tensor"]["plain"]["max"]
    per_channel = w8["per_channel"]["plain"]["min"]
    recovered = w8["per_tensor"]["cle+bias_correction"]["min"]
    return [
        {"name": f"dsc16 per-tensor W8A8 collapses: below {DSC_COLLAPSE_BELOW:g}% (best seed)",
         "value": collapse, "threshold": DSC_COLLAPSE_BELOW, "met": collapse < DSC_COLLAPSE_BELOW},
        {"name": f"dsc16 per-channel W8A8 above {DSC_PER_CHANNEL_ABOVE:g}% (worst seed)",
         "value": per_channel, "threshold": DSC_PER_CHANNEL_ABOVE, "met": per_channel > DSC_PER_CHANNEL_ABOVE},
        {"name": f"dsc16 per-tensor W8A8 after CLE + bias correction above {DSC_RECOVERY_ABOVE:g}% (worst seed)",
         "value": recovered, "threshold": DSC_RECOVERY_ABOVE, "met": recovered > DSC_RECOVERY_ABOVE},
    ]


def depthwise_table(d: dict, acc) -> list[str]:
    """The study ``d`` as text lines (the ``dsc16`` block of the benchmark's table); ``acc``
    formats one accuracy summary."""
    lines = [f"{d['model']} (depthwise-separable): fp32 {acc(d['fp32'])}, ReLU6 -> ReLU {acc(d['fp32_relu'])}; "
             f"weights min-max, activations min-max",
             f"  {'':24s}" + "  ".join(f"{m.replace('analytic_', 'an. '):>21s}" for m in METHODS)]
    for c, per_g in d["accuracy"].items():
        for g, per_m in per_g.items():
            lines.append(f"  {c + ' ' + g:24s}" + "  ".join(f"{acc(per_m[m]):>21s}" for m in METHODS))
    lines.append(f"  {d['model']} integer path: accuracy (agreement with fake-quant predictions, max |logit diff|)")
    for c, per_g in d["integer_path"].items():
        for g, per_m in per_g.items():
            lines.append(f"  {c + ' ' + g:24s}" + "  ".join(
                f"{m.replace('analytic_', 'an. ')} {r['acc']['mean']:.1f} "
                f"({r['agreement_with_fake_quant']['mean']:.0f}%, {r['max_abs_logit_diff']:.2g})"
                for m, r in per_m.items()))
    lines.append(f"  W8A8 per-channel, entropy activations: {acc(d['entropy_W8A8_per_channel'])}")
    spread = d["weight_range_spread_seed0"]
    lines.append("  folded weight ranges, largest / median channel (seed 0): " + ", ".join(
        f"{n}{'(dw)' if v['depthwise'] else ''} {v['max_over_median']:.1f}" for n, v in spread.items()))
    return lines
