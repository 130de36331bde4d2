"""Benchmark: quantized models under domain shift, adaptation, generalization and transfer.

Five studies, each reported as mean [min, max] over the three shipped seeds (0, 1, 2):

1. ``grid``: accuracy of ``cnn16`` fp32 / W8A8 / W4A4 (static PTQ, ``qlib.domain.ptq_config``,
   calibrated on 256 handwritten training digits) on the test digits corrupted by six shifts
   at five severities, plus the printed-digit domain; ``drop``: fp32 minus quantized, per seed.
2. ``calibration``: W4A4 and W8A8 accuracy on the printed test digits, calibrated on source
   (handwritten) digits, unlabeled target (printed) digits, a half/half mix, BN-statistics
   synthetic images (``qlib.datafree.synthesize_bn``) or Gaussian noise.
3. ``adaptation``: on the printed domain and three corruptions (severity 5): fp32 without /
   with AdaBN / with TENT; W4A4 calibrated on source, re-calibrated on target, AdaBN with
   stale (source) activation ranges, AdaBN -> fold -> calibrate, TENT -> fold -> calibrate.
   Adaptation uses the unlabeled *training* part of the target (for corruptions: the
   training digits corrupted with another seed); accuracy is on the target test part.
4. ``generalization``: ``cnn8`` trained from scratch in fp32 and with QAT at W8A8 and W4A4
   (same init, data order, epochs, learning rate), on all 1078 training digits (20 epochs) and
   on 150 (the same number of optimizer steps, 144 epochs):
   train and test accuracy, gap, mean accuracy over the corruptions at severity 3, sharpness
   (loss rise under relative weight noise) and a 1-D filter-normalized loss slice.
5. ``transfer``: ``cnn16`` pretrained on handwritten digits, reused on printed digits:
   zero-shot, frozen fp32 / W4A4 backbone + new float head (and a W4A4 head), few-shot
   (10 labels per class), QAT fine-tuning (all labels, few labels), and the transferred
   fp32 model quantized to W4A4 with target, source or synthetic (data-free) calibration,
   and AdaBN-only adaptation (no labels) as the on-device scenario.

    python benchmarks/domain.py          # full study (about 10-15 minutes on 2 cores)
    python benchmarks/domain.py --fast   # seed 0, fewer shifts and epochs: a smoke test
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402
from benchmarks.common import header  # noqa: E402
from qlib import data, models  # noqa: E402
from qlib.datafree import synthesize_bn  # noqa: E402
from qlib.domain import adapt, generalization, transfer  # noqa: E402
from qlib.domain import evaluate as ev  # noqa: E402
from qlib.domain.printed import load_printed  # noqa: E402
from qlib.domain.shifts import SEVERITIES, SHIFTS, corrupt_dataset  # noqa: E402
from qlib.train import evaluate, format_spread  # noqa: E402

SEEDS = (0, 1, 2)
ADAPT_TARGETS = (("printed", None), ("gaussian_noise", 5), ("contrast", 5), ("blur", 5))


def _bounds(splits):
    x = splits.train.tensors[0]
    return (x.min().item(), x.max().item())


def _corrupted_splits(splits, shift, severity):
    """Target train (seed 1) and test (seed 0) parts of a corrupted domain."""
    b = _bounds(splits)
    return (corrupt_dataset(splits.train, shift, severity, seed=1, bounds=b),
            corrupt_dataset(splits.test, shift, severity, seed=0, bounds=b))


def study_grid(nets, hand, printed, calib, shifts, severities) -> dict:
    grid = ev.accuracy_grid(nets, hand.test, calib, shifts=shifts, severities=severities, bits=(32, 8, 4),
                            bounds=_bounds(hand))
    variants = [m for m in nets], [ev.quantize(m, calib, 8) for m in nets], [ev.quantize(m, calib, 4) for m in nets]
    grid["printed"] = {"0": {name: ev.summarize(evaluate(m, printed.test) for m in group)
                             for name, group in zip(("fp32", "W8A8", "W4A4"), variants)}}
    return {"accuracy": grid, "drop": ev.drop_grid(grid)}


def study_calibration(nets, hand, printed, synth_steps) -> dict:
    src = data.calibration_batches(hand.train, 256, seed=0)
    tgt = data.calibration_batches(printed.train, 256, seed=0)
    mix = data.calibration_batches(TensorDataset(torch.cat([src[0], src[1], tgt[0], tgt[1]])), 256, seed=0)
    noise = [torch.randn(256, 1, 16, 16, generator=torch.Generator().manual_seed(0))]
    synth = {}

    def synthetic(model):
        key = id(model)
        if key not in synth:
            synth[key] = synthesize_bn(model, (1, 16, 16), num_samples=256, steps=synth_steps, seed=0,
                                       progress=False).batches
        return synth[key]

    sources = {"source (handwritten)": src, "target (printed, unlabeled)": tgt, "mix (half/half)": mix,
               "synthetic (BN statistics)": synthetic, "Gaussian noise": noise}
    return {f"W{b}A{b}": ev.calibration_sources(nets, sources, printed.test, bits=b) for b in (8, 4)}


def study_adaptation(nets, hand, printed, targets, tent_steps) -> dict:
    src = data.calibration_batches(hand.train, 256, seed=0)
    config = ev.ptq_config(4)
    out = {}
    for shift, sev in targets:
        if shift == "printed":
            tr, te, name = printed.train, printed.test, "printed"
        else:
            (tr, te), name = _corrupted_splits(hand, shift, sev), f"{shift} {sev}"
        tgt = data.calibration_batches(tr, 256, seed=0)
        rows: dict[str, list[float]] = {}
        for m in nets:
            tented = adapt.tent(m, tgt, steps=tent_steps, lr=5e-3)
            accs = {
                "fp32": evaluate(m, te),
                "fp32 + AdaBN": evaluate(adapt.adabn(m, tgt), te),
                "fp32 + TENT": evaluate(tented, te),
                "W4A4 (source calibration)": evaluate(ev.quantize(m, src, 4), te),
                "W4A4 recalibrated on target": evaluate(adapt.adabn_quantized(m, tgt, config, order="recalibrate"), te),
                "W4A4 AdaBN, stale ranges": evaluate(adapt.adabn_quantized(m, tgt, config, src, "stale_ranges"), te),
                "W4A4 AdaBN -> fold -> calibrate": evaluate(adapt.adabn_quantized(m, tgt, config), te),
                "W4A4 TENT -> fold -> calibrate": evaluate(ev.quantize(tented, tgt, 4), te),
            }
            for k, v in accs.items():
                rows.setdefault(k, []).append(v)
        out[name] = {k: ev.summarize(v) for k, v in rows.items()}
    return out


def _epochs(epochs: int, n: int, full: int = 1078) -> int:
    """Epochs for ``n`` training digits: the same number of optimizer steps as ``epochs`` on all of them."""
    return max(epochs, round(epochs * full / n))


def study_generalization(seeds, epochs, train_sizes, severity=3) -> dict:
    hand = data.load_digits(8)
    bounds = _bounds(hand)
    out = {}
    for n in train_sizes:
        x, y = hand.train.tensors
        splits = data.Splits(TensorDataset(x[:n], y[:n]), hand.val, hand.test, 10, f"digits[:{n}]")
        table = {}
        for bits in (None, 8, 4):
            rows: dict[str, list[float]] = {}
            for seed in seeds:
                m = generalization.train_variant("cnn8", splits, bits, epochs=_epochs(epochs, n), seed=seed)
                gap = generalization.train_test_gap(m, splits)
                vals = {"train": gap["train"], "test": gap["test"], "gap": gap["gap"],
                        f"corruptions (severity {severity})": generalization.corruption_accuracy(
                            m, hand.test, severity, bounds=bounds),
                        "sharpness sigma=0.05": generalization.sharpness(m, hand.val, 0.05, samples=3, seed=seed),
                        "sharpness sigma=0.1": generalization.sharpness(m, hand.val, 0.1, samples=3, seed=seed)}
                for a, loss in zip((-0.5, -0.25, 0.0, 0.25, 0.5),
                                   generalization.loss_slice(m, hand.val, (-0.5, -0.25, 0.0, 0.25, 0.5), seed=seed)):
                    vals[f"loss slice {a:+.2f}"] = loss
                for k, v in vals.items():
                    rows.setdefault(k, []).append(v)
            table["fp32" if bits is None else f"QAT W{bits}A{bits}"] = {k: ev.summarize(v) for k, v in rows.items()}
        out[str(n)] = table
    return out


def study_transfer(nets, hand, printed, qat_epochs, head_epochs, synth_steps) -> dict:
    tgt = data.calibration_batches(printed.train, 256, seed=0)
    src = data.calibration_batches(hand.train, 256, seed=0)
    few = transfer.few_shot(printed.train, 10, seed=0)
    rows: dict[str, list[float]] = {}
    for m in nets:
        fb, _ = transfer.split_head(m)
        qb = transfer.quantized_backbone(m, tgt, 4)
        float_head = transfer.train_head(fb, printed.train, epochs=head_epochs)
        q_head = transfer.train_head(qb, printed.train, epochs=head_epochs)
        synth = synthesize_bn(fb, (1, 16, 16), num_samples=256, steps=synth_steps, seed=0, progress=False).batches
        accs = {
            "zero-shot fp32 (handwritten head)": evaluate(m, printed.test),
            "zero-shot W4A4 (target calibration)": evaluate(ev.quantize(m, tgt, 4), printed.test),
            "frozen fp32 backbone + new head": evaluate(float_head, printed.test),
            "frozen W4A4 backbone + float head": evaluate(q_head, printed.test),
            "frozen W4A4 backbone + W4A4 head": evaluate(transfer.quantize_head(q_head, tgt, 4), printed.test),
            "few-shot: frozen W4A4 backbone + float head": evaluate(
                transfer.train_head(qb, few, epochs=head_epochs), printed.test),
            "QAT W4A4 fine-tune, all labels": evaluate(
                transfer.qat_finetune(m, printed.train, None, 4, epochs=qat_epochs), printed.test),
            "QAT W4A4 fine-tune, 10 labels/class": evaluate(
                transfer.qat_finetune(m, few, None, 4, epochs=qat_epochs), printed.test),
            "transferred fp32 -> W4A4, target calibration": evaluate(ev.quantize(float_head, tgt, 4), printed.test),
            "transferred fp32 -> W4A4, source calibration": evaluate(ev.quantize(float_head, src, 4), printed.test),
            "transferred fp32 -> W4A4, synthetic (data-free)": evaluate(ev.quantize(float_head, synth, 4),
                                                                        printed.test),
            "on-device: W4A4 AdaBN only (no labels)": evaluate(
                adapt.adabn_quantized(m, tgt, ev.ptq_config(4)), printed.test),
        }
        for k, v in accs.items():
            rows.setdefault(k, []).append(v)
    return {k: ev.summarize(v) for k, v in rows.items()}


def run(fast: bool, log=print) -> dict:
    start = time.perf_counter()
    seeds = (0,) if fast else SEEDS
    shifts = ("gaussian_noise", "rotation") if fast else SHIFTS
    severities = (1, 5) if fast else SEVERITIES
    settings = {"model": "cnn16", "generalization_model": "cnn8", "seeds": list(seeds), "shifts": list(shifts),
                "severities": list(severities), "ptq_config": "weights MSE per-channel symmetric, activations "
                "99.99th percentile per-tensor affine (qlib.domain.ptq_config)",
                "calibration": {"num_samples": 256, "seed": 0},
                "qat_epochs": 2 if fast else 10, "generalization_epochs": 2 if fast else 20,
                "generalization_train_sizes": [150] if fast else [1078, 150],
                "tent_steps": 1 if fast else 3, "synthesis_steps": 10 if fast else 100, "head_epochs": 200,
                "printed": "qlib.domain.load_printed(16): 21 fonts x 10 digits x 6 jitters, 756/252/252"}
    hand, printed = data.load_digits(16), load_printed(16)
    nets = [models.pretrained("cnn16", s) for s in seeds]
    calib = data.calibration_batches(hand.train, 256, seed=0)
    result = header("domain", seeds, fast)
    result["settings"] = settings
    times = {}

    def timed(name, fn):
        t = time.perf_counter()
        log(f"[{name}] ...")
        out = fn()
        times[name] = round(time.perf_counter() - t, 1)
        log(f"[{name}] {times[name]} s")
        return out

    result["grid"] = timed("grid", lambda: study_grid(nets, hand, printed, calib, shifts, severities))
    result["calibration"] = timed("calibration", lambda: study_calibration(nets, hand, printed,
                                                                           settings["synthesis_steps"]))
    result["adaptation"] = timed("adaptation", lambda: study_adaptation(
        nets, hand, printed, ADAPT_TARGETS[:2] if fast else ADAPT_TARGETS, settings["tent_steps"]))
    result["generalization"] = timed("generalization", lambda: study_generalization(
        seeds, settings["generalization_epochs"], settings["generalization_train_sizes"]))
    result["transfer"] = timed("transfer", lambda: study_transfer(
        nets, hand, printed, settings["qat_epochs"], settings["head_epochs"], settings["synthesis_steps"]))
    result["seconds"] = {**times, "total": round(time.perf_counter() - start, 1)}
    return result


def acc(s: dict, width: int = 21, digits: int = 1) -> str:
    return format_spread(s, digits, width=6, bounds_width=0).rjust(width)


def table(result: dict) -> str:
    """The result as text tables (what ``main`` prints)."""
    lines = [f"Domain-shift benchmark, seeds {result['seeds']}{' (fast)' if result['fast'] else ''}: "
             "accuracy % mean [min, max]", "", "1. cnn16 under shift (fp32 / W8A8 / W4A4, source calibration)"]
    grid, drop = result["grid"]["accuracy"], result["grid"]["drop"]
    lines.append(f"  {'shift':22s}" + "".join(f"{v:>22s}" for v in ("fp32", "W8A8", "W4A4", "drop W4A4")))
    for shift, by_sev in grid.items():
        for sev, cell in by_sev.items():
            d = drop[shift][sev]["W4A4"]
            lines.append(f"  {shift + ' ' + sev:22s}" + "".join(acc(cell[v], 22) for v in ("fp32", "W8A8", "W4A4"))
                         + acc(d, 22))
    lines += ["", "2. calibration source, evaluated on printed digits"]
    for bits, rows in result["calibration"].items():
        for k, s in rows.items():
            lines.append(f"  {bits} {k:34s}{acc(s)}")
    lines += ["", "3. adaptation without labels (target test accuracy)"]
    for target, rows in result["adaptation"].items():
        lines.append(f"  {target}")
        for k, s in rows.items():
            lines.append(f"    {k:36s}{acc(s)}")
    lines += ["", "4. generalization: cnn8 trained from scratch (fp32 vs QAT)"]
    for n, tab in result["generalization"].items():
        keys = list(next(iter(tab.values())))
        lines.append(f"  {n} training digits" + "".join(f"{v:>24s}" for v in tab))
        for k in keys:
            digits = 3 if k.startswith("sharpness") else 2 if k.startswith("loss") else 1
            lines.append(f"    {k:28s}" + "".join(acc(tab[v][k], 24, digits) for v in tab))
    lines += ["", "5. transfer handwritten -> printed (cnn16)"]
    for k, s in result["transfer"].items():
        lines.append(f"  {k:48s}{acc(s)}")
    lines += ["", "seconds: " + ", ".join(f"{k} {v}" for k, v in result["seconds"].items())]
    return "\n".join(lines)


def main(argv=None) -> int:
    return common.main("domain", run, table, __doc__, "seed 0, two shifts, two severities, short training", argv)


if __name__ == "__main__":
    sys.exit(main())
