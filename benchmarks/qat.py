"""Benchmark: how much accuracy does quantization-aware training win back over PTQ?

Study: for W4A4 and W2A4 (2-bit weights, 4-bit activations) on ``cnn16`` (the default
teaching model) and ``cnn8``, the test accuracy of the fp32 model, of static PTQ (the same
QuantConfig, calibrated on 256 training digits) and of QAT with the straight-through
estimator (``ste``), with learned step sizes (``lsq``), with learned activation clipping
(``pact``, Choi et al. 2018) and with the STE plus distillation from the float model
(``ste+kd``: loss 0.5 CE + 0.5 KD at T = 4), plus the QAT wall time. Mean and min-max over
the three shipped pretrained seeds (0, 1, 2). Target: W4A4 QAT within one point of fp32.
The JSON keeps the STE and LSQ rows (the main study) in ``rows`` and the other methods'
rows in ``method_rows``.

Recipes: W4A4 15 epochs, lr 5e-4; W2A4 30 epochs, lr 2e-3 with MSE-searched
weight scales (the STE keeps the MSE clipping ratio; LSQ starts from it). No early stopping.

    python benchmarks/qat.py            # full study, writes benchmarks/results/qat.json
    python benchmarks/qat.py --fast     # cnn8, seed 0, 1 epoch on 320 digits: a smoke test
    python benchmarks/qat.py --models cnn8 --methods pact ste+kd --update
                                        # add rows to the saved JSON (the others are kept;
                                        # "runs" records which run measured which rows)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import arguments, machine, versions, write  # noqa: E402
from qlib import data, models  # noqa: E402
from qlib.modules import QuantConfig  # noqa: E402
from qlib.ptq import quantize_static  # noqa: E402
from qlib.qat import quantization_aware_training  # noqa: E402
from qlib.train import accuracy_over_seeds, evaluate, format_spread  # noqa: E402

CONFIGS = {
    "W4A4": (QuantConfig(weight_bits=4, act_bits=4), 15, 5e-4),
    "W2A4": (QuantConfig(weight_bits=2, act_bits=4, weight_observer="mse"), 30, 2e-3),
}
METHODS = {  # row label: QAT options
    "ste": {"method": "ste"},
    "lsq": {"method": "lsq"},
    "pact": {"method": "pact"},
    "ste+kd": {"method": "ste", "kd_weight": 0.5, "kd_temperature": 4.0},
}


def run(model_names, seeds, epochs_override=None, train_samples=None, methods=tuple(METHODS)) -> list[dict]:
    rows = []
    for name in model_names:
        splits = data.load_digits(models.image_size(name))
        if train_samples:  # --fast: fewer training digits, same code path
            x, y = splits.train.tensors
            splits.train = torch.utils.data.TensorDataset(x[:train_samples], y[:train_samples])
        calib = data.calibration_batches(splits.train, num_samples=256, seed=0)
        for label, (config, epochs, lr) in CONFIGS.items():
            epochs = epochs_override or epochs
            fp32, ptq = [], []
            qat = {m: [] for m in methods}
            times = {m: [] for m in methods}
            for seed in seeds:
                model = models.pretrained(name, seed)
                fp32.append(evaluate(model, splits.test))
                ptq.append(evaluate(quantize_static(model, calib, config), splits.test))
                for method in methods:
                    start = time.perf_counter()
                    qmodel, _ = quantization_aware_training(model, splits, config, epochs=epochs, lr=lr,
                                                            seed=seed, progress=False, **METHODS[method])
                    times[method].append(time.perf_counter() - start)
                    qat[method].append(evaluate(qmodel, splits.test))
            for method in methods:
                rows.append({"model": name, "config": label, "method": method, "epochs": epochs, "lr": lr,
                             "weight_observer": config.weight_observer, "fp32": accuracy_over_seeds(fp32),
                             "ptq": accuracy_over_seeds(ptq), "qat": accuracy_over_seeds(qat[method]),
                             "qat_time_s": accuracy_over_seeds(times[method]),
                             "per_seed": {"fp32": fp32, "ptq": ptq, "qat": qat[method], "qat_time_s": times[method]}})
                print(format_row(rows[-1]), flush=True)
    return rows


def _fmt(stats: dict, digits: int = 1) -> str:
    return format_spread(stats, digits, width=0)


HEADER = (f"{'model':6} {'config':6} {'method':6} {'fp32':>18} {'PTQ':>18} {'QAT':>18} "
          f"{'QAT - fp32':>10} {'QAT time s':>18}")


def format_row(row: dict) -> str:
    gap = row["qat"]["mean"] - row["fp32"]["mean"]
    return (f"{row['model']:6} {row['config']:6} {row['method']:6} {_fmt(row['fp32']):>18} {_fmt(row['ptq']):>18} "
            f"{_fmt(row['qat']):>18} {gap:>+10.1f} {_fmt(row['qat_time_s']):>18}")


MAIN_METHODS = ("ste", "lsq")
"""The main study's methods (``rows``); the others go to ``method_rows``."""


def _merge(old_rows: list[dict], new_rows: list[dict]) -> list[dict]:
    """``old_rows`` with rows of the same (model, config, method) replaced by ``new_rows``, others appended."""
    key = lambda r: (r["model"], r["config"], r["method"])  # noqa: E731
    fresh = {key(r): r for r in new_rows}
    merged = [fresh.pop(key(r), r) for r in old_rows]
    return merged + [r for r in new_rows if key(r) in fresh]


def _selection(argv):
    """``--models``, ``--methods`` and ``--update``; the rest goes to ``benchmarks.common.arguments``."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--models", nargs="+", choices=["cnn16", "cnn8"])
    parser.add_argument("--methods", nargs="+", choices=list(METHODS))
    parser.add_argument("--update", action="store_true",
                        help="merge the rows into the existing --out file instead of replacing it")
    return parser.parse_known_args(argv)


def main(argv=None) -> dict:
    sel, rest = _selection(sys.argv[1:] if argv is None else argv)
    args = arguments("qat", __doc__, "cnn8, seed 0, 1 epoch on 320 digits", threads=None,
                     threads_help="torch threads (default: torch's); also --models, --methods, --update", argv=rest)
    names, seeds = (["cnn8"], [0]) if args.fast else (["cnn16", "cnn8"], list(models.SEEDS))
    names = sel.models or names
    methods = tuple(sel.methods or METHODS)
    start = time.perf_counter()
    print(HEADER)
    rows = run(names, seeds, epochs_override=1 if args.fast else None, train_samples=320 if args.fast else None,
               methods=methods)
    this_run = {"models": names, "methods": list(methods), "seeds": seeds, "machine": machine(),
                "versions": versions(), "time_s": time.perf_counter() - start}
    main_rows = [r for r in rows if r["method"] in MAIN_METHODS]
    other_rows = [r for r in rows if r["method"] not in MAIN_METHODS]
    result = {"study": "qat", "fast": args.fast, "machine": machine(), "versions": versions(), "seeds": seeds,
              "data": "digits test split (360 images; one image = 0.28 points)",
              "calibration": "256 training digits, seed 0", "rows": main_rows, "method_rows": other_rows,
              "runs": [this_run], "total_time_s": this_run["time_s"]}
    if sel.update and args.out.exists():
        old = json.loads(args.out.read_text())
        old.setdefault("runs", [{"models": sorted({r["model"] for r in old["rows"]}),
                                 "methods": sorted({r["method"] for r in old["rows"]}), "seeds": old["seeds"],
                                 "machine": old["machine"], "versions": old["versions"],
                                 "time_s": old.get("total_time_s")}])
        old["runs"].append(this_run)
        old["rows"] = _merge(old.get("rows", []), main_rows)
        old["method_rows"] = _merge(old.get("method_rows", []), other_rows)
        result = old
    write(result, args.out)
    print(f"wrote {args.out} in {this_run['time_s']:.0f} s")
    return result


if __name__ == "__main__":
    main()
