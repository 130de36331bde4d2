"""Benchmark: mixed-precision bit allocation (a Pareto table) and deployment engines (an engine table).

Pareto study, on ``cnn16`` and ``res16`` over the three shipped seeds (mean and min-max):
test accuracy against weight size for uniform W8/W6/W4/W3/W2 and for ILP allocations
(``qlib.mixed.ilp_allocate`` on HAWQ-v2 sensitivities, weight bits in {2, 3, 4, 6, 8}) at the
sizes of uniform W6, W4, W3 and W2.5, with static PTQ; the greedy allocation at the same
budgets; and QAT (STE, ``QAT_EPOCHS`` epochs) for uniform W4/W3 and the mixed allocations at
their sizes. Activations stay at 8 bits (weight-only mixed precision: activations are what
integer engines fix at 8). Sizes count the weights only (biases stay 32-bit in all cases).
Per model and seed it also records the three sensitivity measures' Spearman rank
correlations (at 3 bits) and their cost in seconds.
Targets: at the size of uniform W4, a mixed allocation beats uniform W4 PTQ; at the size of
uniform W3, mixed + QAT within 1 point of fp32.

Engine table, seed 0 of each model, on the same test digits and the same CPU (one torch and
one ONNX Runtime thread): fp32 PyTorch, PyTorch's x86 int8 engine (``qlib.engines``), qlib's
integer model, the qlib model exported to ONNX QDQ on ONNX Runtime, ONNX Runtime's own
``quantize_static`` (the same 256 calibration digits), the float ONNX model on ONNX Runtime,
and LiteRT where installed: accuracy, file size (serialized state dict or model file) and
median latency at batch 1 and 64 (measured interleaved, so read the ratios).

    python benchmarks/mixed.py           # full study, writes benchmarks/results/mixed.json
    python benchmarks/mixed.py --fast    # cnn16, seed 0, 1 QAT epoch: a smoke test
"""

from __future__ import annotations

import io
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import arguments, header, write  # noqa: E402
from qlib import convert_to_integer, data, export, models  # noqa: E402
from qlib.engines import compare_latency, torch_x86_quantize  # noqa: E402
from qlib.mixed import (allocation_bits, greedy_allocate, hawq_sensitivity, hessian_traces, ilp_allocate,  # noqa: E402
                        layer_sizes, one_at_a_time, spearman, sqnr_sensitivity, to_per_layer, uniform_allocate)
from qlib.ptq import quantize_static  # noqa: E402
from qlib.qat import quantization_aware_training  # noqa: E402
from qlib.train import accuracy_over_seeds, evaluate, format_spread  # noqa: E402

BITS = (2, 3, 4, 6, 8)
UNIFORM = (8, 6, 4, 3, 2)
BUDGETS = {"W6": 6, "W4": 4, "W3": 3, "W2.5": 2.5}  # ILP budgets: the size of uniform W<b>
QAT_EPOCHS, QAT_LR = 5, 5e-4
QAT_ROWS = ("uniform W4", "ILP @W4", "uniform W3", "ILP @W3")


def _bits_3(sens: dict) -> dict:
    return {k: v[3] for k, v in sens.items()}


def study_seed(name: str, seed: int, splits, calib, qat_epochs: int) -> dict:
    model = models.pretrained(name, seed)
    sizes = layer_sizes(model)
    out = {"fp32": evaluate(model, splits.test), "acc": {}, "size_bits": {}, "alloc": {}}
    t = time.perf_counter()
    traces = hessian_traces(model, splits.val, samples=8, seed=seed)
    hawq = hawq_sensitivity(model, splits.val, BITS, traces=traces)
    cost = {"hawq": time.perf_counter() - t}
    t = time.perf_counter()
    sqnr = sqnr_sensitivity(model, splits.val, BITS)
    cost["sqnr"] = time.perf_counter() - t
    t = time.perf_counter()
    oat = one_at_a_time(model, splits.val, calib, [3])
    cost["one_at_a_time"] = time.perf_counter() - t
    out["sensitivity_cost_s"] = cost
    out["spearman_at_3_bits"] = {"hawq_vs_one_at_a_time": spearman(_bits_3(hawq), _bits_3(oat)),
                                 "sqnr_vs_one_at_a_time": spearman(_bits_3(sqnr), _bits_3(oat)),
                                 "hawq_vs_sqnr": spearman(_bits_3(hawq), _bits_3(sqnr))}
    allocs = {f"uniform W{b}": uniform_allocate(sizes, b) for b in UNIFORM}
    for label, b in BUDGETS.items():
        budget = sum(sizes.values()) * b
        allocs[f"ILP @{label}"] = ilp_allocate(hawq, sizes, budget)
        allocs[f"greedy @{label}"] = greedy_allocate(hawq, sizes, budget)
    for label, alloc in allocs.items():
        per_layer = to_per_layer(alloc)
        out["acc"][label] = evaluate(quantize_static(model, calib, per_layer=per_layer), splits.test)
        out["size_bits"][label] = allocation_bits(alloc, sizes)
        out["alloc"][label] = alloc
    for label in QAT_ROWS:
        qmodel, _ = quantization_aware_training(model, splits, epochs=qat_epochs, lr=QAT_LR,
                                                per_layer=to_per_layer(allocs[label]), seed=seed, progress=False)
        out["acc"][label + " + QAT"] = evaluate(qmodel, splits.test)
        out["size_bits"][label + " + QAT"] = out["size_bits"][label]
    return out


def pareto(names, seeds, qat_epochs) -> dict:
    result = {}
    for name in names:
        splits = data.load_digits(models.image_size(name))
        calib = data.calibration_batches(splits.train, 256, seed=0)
        per_seed = [study_seed(name, s, splits, calib, qat_epochs) for s in seeds]
        fp32 = accuracy_over_seeds([r["fp32"] for r in per_seed])
        rows = []
        for label in per_seed[0]["acc"]:
            rows.append({"config": label, "size_bits": per_seed[0]["size_bits"][label],
                         "size_bits_per_seed": [r["size_bits"][label] for r in per_seed],
                         "accuracy": accuracy_over_seeds([r["acc"][label] for r in per_seed]),
                         "allocation_seed0": per_seed[0]["alloc"].get(label.replace(" + QAT", ""))})
        result[name] = {"fp32": fp32, "weights": sum(layer_sizes(models.create(name)).values()), "rows": rows,
                        "spearman_at_3_bits": [r["spearman_at_3_bits"] for r in per_seed],
                        "sensitivity_cost_s": [r["sensitivity_cost_s"] for r in per_seed]}
        print(f"\n{name}: fp32 {format_spread(fp32)}")
        for row in rows:
            print(f"  {row['config']:24} {row['size_bits'] / 8 / 1024:7.2f} KiB  {format_spread(row['accuracy'])}")
    return result


def _state_bytes(module) -> int:
    buf = io.BytesIO()
    torch.save(module.state_dict(), buf)
    return buf.getbuffer().nbytes


def engines(name: str, repeats: int) -> dict:
    splits = data.load_digits(models.image_size(name))
    calib = data.calibration_batches(splits.train, 256, seed=0)
    model = models.pretrained(name, 0)
    x_test, y_test = splits.test.tensors
    qmodel = quantize_static(model, calib)
    tmp = Path(tempfile.mkdtemp())
    export.to_onnx(qmodel, x_test[:2], tmp / "qdq.onnx")
    export.to_onnx(model, x_test[:2], tmp / "fp32.onnx")
    export.ort_quantize_static(tmp / "fp32.onnx", tmp / "ort_int8.onnx", calib)
    runners, sizes = {}, {}
    runners["fp32 PyTorch"], sizes["fp32 PyTorch"] = model, _state_bytes(model)
    x86 = torch_x86_quantize(model, calib)
    runners["PyTorch x86 int8"], sizes["PyTorch x86 int8"] = x86, _state_bytes(x86)
    integer = convert_to_integer(qmodel)
    runners["qlib integer"], sizes["qlib integer"] = integer, _state_bytes(integer)
    for label, file in (("ONNX Runtime QDQ (qlib)", "qdq"), ("ONNX Runtime own int8", "ort_int8"),
                        ("ONNX Runtime fp32", "fp32")):
        session = export.ort_session(tmp / f"{file}.onnx")
        runners[label] = (lambda s: (lambda x: torch.from_numpy(s.run(None, {"input": x.numpy()})[0])))(session)
        sizes[label] = (tmp / f"{file}.onnx").stat().st_size
    litert = export.litert_available()
    if litert is None:
        path = export.to_litert(model, x_test[:1], tmp / "fp32.tflite")
        runners["LiteRT fp32"] = lambda x, p=path: export.litert_predict(p, x, batch_size=len(x))
        sizes["LiteRT fp32"] = path.stat().st_size
    rows = {}
    with torch.inference_mode():
        for label, run in runners.items():
            logits = torch.cat([run(x) for x in x_test.split(64)])
            rows[label] = {"accuracy": 100.0 * (logits.argmax(1) == y_test).float().mean().item(),
                           "file_bytes": sizes[label]}
    for batch in (1, 64):
        lat = compare_latency(runners, x_test[:batch], repeats=repeats, warmup=2)
        for label, seconds in lat.items():
            rows[label][f"latency_ms_batch{batch}"] = 1000 * seconds
    print(f"\nengines on {name} (seed 0): accuracy, file size, latency at batch 1 and 64")
    for label, r in rows.items():
        print(f"  {label:26} {r['accuracy']:5.1f}  {r['file_bytes'] / 1024:7.1f} KiB  "
              f"{r['latency_ms_batch1']:8.3f} ms  {r['latency_ms_batch64']:8.3f} ms")
    return {"rows": rows, "litert": litert or "present"}


def targets(par: dict) -> dict:
    out = {}
    for name, res in par.items():
        acc = {r["config"]: r["accuracy"]["mean"] for r in res["rows"]}
        out[name] = {
            "mixed_at_W4_beats_uniform_W4_ptq": {"mixed": acc["ILP @W4"], "uniform": acc["uniform W4"],
                                                 "met": acc["ILP @W4"] > acc["uniform W4"]},
            "mixed_qat_at_W3_within_1_point_of_fp32": {"mixed_qat": acc["ILP @W3 + QAT"], "fp32": res["fp32"]["mean"],
                                                       "met": acc["ILP @W3 + QAT"] >= res["fp32"]["mean"] - 1.0}}
        for key, t in out[name].items():
            print(f"{name}: {key}: target {'MET' if t['met'] else 'MISSED'} {t}")
    return out


def main(argv=None) -> dict:
    args = arguments("mixed", __doc__, "cnn16, seed 0, 1 QAT epoch, 5 latency repeats", argv=argv)
    names, seeds = (["cnn16"], [0]) if args.fast else (["cnn16", "res16"], list(models.SEEDS))
    start = time.perf_counter()
    par = pareto(names, seeds, 1 if args.fast else QAT_EPOCHS)
    eng = {name: engines(name, 5 if args.fast else 20) for name in names}
    result = {**header("mixed", seeds, args.fast),
              "settings": {"bits": BITS, "uniform": UNIFORM, "budgets": BUDGETS, "act_bits": 8,
                           "sensitivity_for_allocation": "hawq (8 Hutchinson samples, validation split)",
                           "qat": {"method": "ste", "epochs": 1 if args.fast else QAT_EPOCHS, "lr": QAT_LR},
                           "calibration": "256 training digits, seed 0",
                           "data": "digits test split (360 images; one image = 0.28 points)"},
              "pareto": par, "engines": eng, "targets": targets(par)}
    result["total_time_s"] = time.perf_counter() - start
    write(result, args.out)
    print(f"wrote {args.out} in {result['total_time_s']:.0f} s")
    return result


if __name__ == "__main__":
    main()
