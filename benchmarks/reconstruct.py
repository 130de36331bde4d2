"""Benchmark: reconstruction PTQ (AdaRound, BRECQ) at 3 and 2 bits, on real and synthetic data.

On the shipped ``cnn16`` and ``res16`` weights (seeds 0, 1, 2; mean and min-max over seeds) and
the 360 test digits, without retraining: static PTQ (``qlib.ptq.quantize_static``; weights
symmetric per-channel, activations affine per-tensor, BN folded) with round-to-nearest weights

- ``minmax``: min-max weight scales, min-max activation ranges;
- ``percentile``: min-max weight scales, 99.9% percentile activation ranges;
- ``mse``: MSE-searched weight scales (data-free: a property of the weights alone), percentile
  activations. At 4 bits and below min-max weight scales are a weak baseline (one outlier weight
  sets the grid of its whole channel), so the reconstructions start from this one;

and then, from the ``mse`` model, the learned rounding of ``qlib.reconstruct``:

- ``adaround``: layer-wise output reconstruction (Nagel et al. 2020);
- ``brecq``: block-wise output reconstruction with LSQ activation step sizes (Li et al. 2021).

Calibration (ranges *and* reconstruction) uses ``real`` data (128 training digits) or
``synthetic`` data (128 BN-statistics images, ``qlib.datafree.synthesize_bn``: no training
image is seen; the input range comes from the preprocessing). The ``mse`` row is repeated on
the synthetic set so that each pair of rows differs in one thing. W2A4 and AdaRound run on cnn16
only (res16 gets W3A3 and BRECQ, its natural unit: residual blocks), to stay within ~15 min on
one thread.

Targets, at W3A3 on each model: BRECQ on real data is above min-max and percentile PTQ beyond the
seeds' spread (its worst seed above their best seed) and above the MSE-weight baseline on every
seed; it is within 1.5 points of fp32 (mean); on synthetic data it keeps at least half of its
gain over the better of min-max and percentile PTQ. (A first version asked for a 20-point gain
over min-max/percentile: met on cnn16, 57 points, but res16 with percentile ranges is already
within 15 points of fp32 at W3A3, so it measured res16's baseline, not the method.)

    python benchmarks/reconstruct.py                  # full study -> benchmarks/results/reconstruct.json (~10 min of CPU on one thread)
    python benchmarks/reconstruct.py --fast --out /tmp/reconstruct.json   # cnn16 seed 0, W3A3, 30 steps: a smoke test
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402
from benchmarks.common import header, target_lines  # noqa: E402
from qlib import data, models  # noqa: E402
from qlib.datafree import synthesize_bn  # noqa: E402
from qlib.modules import QuantConfig  # noqa: E402
from qlib.ptq import quantize_static  # noqa: E402
from qlib.reconstruct import adaround, brecq  # noqa: E402
from qlib.train import accuracy_over_seeds, evaluate, format_spread  # noqa: E402

MODELS = ("cnn16", "res16")
CONFIGS = {"W3A3": (3, 3), "W2A4": (2, 4)}
BASELINES = ("minmax", "percentile", "mse")
METHODS = ("adaround", "brecq")
ROWS = tuple(f"{r}_real" for r in BASELINES + METHODS) + tuple(f"{r}_synthetic" for r in ("mse",) + METHODS)
MAX_DROP = 1.5
MIN_KEPT = 0.5
TARGET_CONFIG = "W3A3"


def settings(fast: bool) -> dict:
    return {"models": ["cnn16"] if fast else list(MODELS), "dataset": "digits",
            "seeds": [0] if fast else list(models.SEEDS),
            "configs": {"W3A3": CONFIGS["W3A3"]} if fast else dict(CONFIGS),
            # W2A4 and AdaRound only on cnn16: res16's steps cost ~4x (budget ~15 min on 1 thread)
            "config_models": {"W3A3": list(MODELS), "W2A4": ["cnn16"]},
            "model_methods": {"cnn16": list(METHODS), "res16": ["brecq"]},
            "calibration": {"num_samples": 64 if fast else 128, "batch_size": 64, "seed": 0},
            "bn_synthesis": {"steps": 10 if fast else 50, "lr": 0.5, "input_mean": 0.0, "input_std": 1.0, "seed": 0},
            "reconstruction": {"iters": 30 if fast else 100, "batch_size": 32, "lr": 5e-2, "reg_weight": 0.01,
                               "warmup": 0.2, "beta": [20.0, 2.0], "act_lr": 1e-3, "seed": 0,
                               "loss": "output MSE (no Fisher weighting)"},
            "percentile": 99.9,
            "quant_scheme": "weights symmetric per-channel signed, activations affine per-tensor unsigned at every "
                            "conv/linear input, BN folded"}


def _config(wb: int, ab: int, weights: str, acts: str, pct: float) -> QuantConfig:
    kw = {"percentile": pct} if acts == "percentile" else {}
    return QuantConfig(weight_bits=wb, act_bits=ab, weight_observer=weights, act_observer=acts, act_observer_kwargs=kw)


def _summary(values) -> dict:
    out = accuracy_over_seeds(values)
    out["values"] = [round(v, 4) for v in values]
    return out


def run(fast: bool = False, log=print) -> dict:
    cfg = settings(fast)
    cal, rec, pct = cfg["calibration"], cfg["reconstruction"], cfg["percentile"]
    kw = {k: rec[k] for k in ("iters", "batch_size", "lr", "reg_weight", "warmup", "seed")}
    kw["beta"] = tuple(rec["beta"])
    digits = data.load_digits(16)
    train_x = digits.train.tensors[0]
    # known from the preprocessing: the standardized values of a black and a white pixel
    input_range = (train_x.min().item(), train_x.max().item())
    real = data.calibration_batches(digits.train, cal["num_samples"], cal["batch_size"], seed=cal["seed"])
    acc: dict = {}
    fp32: dict = {}
    seconds: dict = {"synthesis": [], "adaround": [], "brecq": []}
    start, cpu_start = time.perf_counter(), time.process_time()
    for name in cfg["models"]:
        fp32[name] = []
        rows = [r for r in ROWS if not r.startswith(METHODS) or r.split("_")[0] in cfg["model_methods"][name]]
        acc[name] = {c: {r: [] for r in rows} for c in cfg["configs"] if name in cfg["config_models"][c]}
        for seed in cfg["seeds"]:
            model = models.pretrained(name, seed)
            fp32[name].append(evaluate(model, digits.test))
            s = cfg["bn_synthesis"]
            t = time.perf_counter()
            synth = synthesize_bn(model, (1, 16, 16), cal["num_samples"], cal["batch_size"], steps=s["steps"],
                                  lr=s["lr"], input_mean=s["input_mean"], input_std=s["input_std"],
                                  input_range=input_range, seed=s["seed"], progress=False).batches
            seconds["synthesis"].append(time.perf_counter() - t)
            for label in acc[name]:
                wb, ab = cfg["configs"][label]
                row = acc[name][label]
                for base, (w_obs, a_obs) in zip(BASELINES, (("minmax", "minmax"), ("minmax", "percentile"),
                                                            ("mse", "percentile"))):
                    row[f"{base}_real"].append(evaluate(quantize_static(model, real, _config(wb, ab, w_obs, a_obs, pct)),
                                                        digits.test))
                for source, batches in (("real", real), ("synthetic", synth)):
                    q = quantize_static(model, batches, _config(wb, ab, "mse", "percentile", pct))
                    if source == "synthetic":
                        row["mse_synthetic"].append(evaluate(q, digits.test))
                    for method, fn in (("adaround", adaround), ("brecq", brecq)):
                        if method not in cfg["model_methods"][name]:
                            continue
                        t = time.perf_counter()
                        extra = {"act_lr": rec["act_lr"]} if method == "brecq" else {}
                        r = fn(q, batches, **kw, **extra)
                        seconds[method].append(time.perf_counter() - t)
                        row[f"{method}_{source}"].append(evaluate(r, digits.test))
                log(f"{name} seed {seed} {label}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in row.items())
                    + f"  ({time.perf_counter() - start:.0f} s)")

    result = header("reconstruct", cfg["seeds"], fast)
    accuracy = {n: {c: {r: _summary(v) for r, v in d.items()} for c, d in per.items()} for n, per in acc.items()}
    fp32 = {n: _summary(v) for n, v in fp32.items()}
    result.update({
        "settings": {**cfg, "input_range": list(input_range)},
        "fp32": fp32,
        "accuracy": accuracy,
        "method_seconds": {k: _summary(v) for k, v in seconds.items() if v},
        "targets": targets(accuracy, fp32),
        "seconds": time.perf_counter() - start,
        "cpu_seconds": time.process_time() - cpu_start,
    })
    return result


def targets(accuracy: dict, fp32: dict) -> list[dict]:
    """The targets at ``TARGET_CONFIG``, per model, from the summaries (``values`` per seed)."""
    out = []
    for name, per in accuracy.items():
        if TARGET_CONFIG not in per:
            continue
        row = per[TARGET_CONFIG]
        best_base = max(row["minmax_real"]["mean"], row["percentile_real"]["mean"])
        top_base = max(row["minmax_real"]["max"], row["percentile_real"]["max"])
        margin = row["brecq_real"]["min"] - top_base
        every_seed = all(b > m for b, m in zip(row["brecq_real"]["values"], row["mse_real"]["values"]))
        drop = fp32[name]["mean"] - row["brecq_real"]["mean"]
        gain = row["brecq_real"]["mean"] - best_base
        kept = (row["brecq_synthetic"]["mean"] - best_base) / gain if gain > 0 else 0.0
        out += [
            {"name": f"{name} {TARGET_CONFIG}: BRECQ (real) worst seed minus the best seed of min-max and "
                     "percentile PTQ > 0 (beyond the seeds' spread), and above MSE-weight PTQ on every seed",
             "value": margin, "threshold": 0, "met": margin > 0 and every_seed},
            {"name": f"{name} {TARGET_CONFIG}: BRECQ (real) within {MAX_DROP:g} points of fp32 (mean)",
             "value": drop, "threshold": MAX_DROP, "met": drop <= MAX_DROP},
            {"name": f"{name} {TARGET_CONFIG}: BRECQ on BN-synthetic data keeps at least {MIN_KEPT:g} of the "
                     "real-data gain over the better of min-max/percentile PTQ (means)",
             "value": kept, "threshold": MIN_KEPT, "met": kept >= MIN_KEPT},
        ]
    return out


def table(result: dict) -> str:
    """The result as text tables (what ``main`` prints)."""
    def acc(s):
        return format_spread(s, digits=1, width=5, bounds_digits=1, bounds_width=0)

    lines = [f"Reconstruction PTQ on digits, seeds {result['seeds']}{' (fast)' if result['fast'] else ''}; "
             "test accuracy % mean [min, max]"]
    for name, per in result["accuracy"].items():
        lines += ["", f"{name}: fp32 {acc(result['fp32'][name])}", f"  {'row':22s}" + "".join(f"{c:>22s}" for c in per)]
        for r in next(iter(per.values())):
            lines.append(f"  {r:22s}" + "".join(f"{acc(per[c][r]):>22s}" for c in per))
    lines += ["", "seconds per run (mean): " + ", ".join(f"{k} {v['mean']:.1f}" for k, v in result["method_seconds"].items())
              + f"; total {result['seconds']:.0f} s wall, {result['cpu_seconds']:.0f} s CPU", ""]
    lines += target_lines(result["targets"])
    return "\n".join(lines)


def main(argv=None) -> int:
    return common.main("reconstruct", run, table, __doc__, "cnn16 seed 0, W3A3, 64 images, 30 steps: a smoke test", argv)


if __name__ == "__main__":
    sys.exit(main())
