"""Benchmark: federated learning with quantized updates (FedAvg on the digits MLP).

Four clients hold the 1078 training digits, split IID or non-IID (Dirichlet alpha 0.3);
every round each client trains one local epoch of SGD (lr 0.05, batch 32) from the global
model and sends its update. Three seeds (model init, partition, shuffling and rounding
noise all follow the seed); accuracy on the 360 test digits as mean and min-max.

1. ``updates``: accuracy after R rounds and exact total uplink bytes for fp32 updates and
   8/4/2-bit updates (per-channel scales) with stochastic vs nearest rounding, plus 2-bit
   nearest with error feedback; IID and non-IID; accuracy after every round for the
   accuracy-vs-bytes plot of lesson 14.
2. ``qat_vs_ptq``: non-IID, 8-bit stochastic updates; clients train in float or with 2-bit
   weight QAT; the server then quantizes the global model (static PTQ, per-channel
   weights, 99.9th-percentile activations) at W8A8, W4A4, W3A3 and W2A8, calibrated on
   BN-statistics synthetic data (what a data-less server can do), Gaussian noise, or 128
   real training digits (which it could not have had).
3. ``flower``: the wall time of one 2-client, 2-round Flower simulation (Ray) of the same
   code, and a check that it gives the in-process driver's global model bit for bit.

The grid runs with ``qlib.federated.fedavg.run_rounds``, the in-process driver over the very
client and aggregation functions that the Flower apps call (part 3 checks that they agree):
one Ray start costs tens of seconds on a busy 2-core machine, 96 of them would not fit.

    python benchmarks/federated.py                  # full study -> benchmarks/results/federated.json
    python benchmarks/federated.py --fast --out /tmp/federated.json   # 1 seed, 2 rounds: a smoke test
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402
from benchmarks.common import header  # noqa: E402
from qlib import data, models  # noqa: E402
from qlib.federated import fedavg, flower, partition, server  # noqa: E402
from qlib.train import accuracy_over_seeds, evaluate, format_spread  # noqa: E402

UPDATES = {  # name: (bits, rounding, error_feedback)
    "fp32": (None, "stochastic", False),
    "8bit-stochastic": (8, "stochastic", False), "8bit-nearest": (8, "nearest", False),
    "4bit-stochastic": (4, "stochastic", False), "4bit-nearest": (4, "nearest", False),
    "2bit-stochastic": (2, "stochastic", False), "2bit-nearest": (2, "nearest", False),
    "2bit-nearest-ef": (2, "nearest", True),
}
SPLITS = {"iid": None, "noniid": 0.3}
PTQ_CONFIGS = ((8, 8), (4, 4), (3, 3), (2, 8))
NUM_CLIENTS = 4


def clients_for(d, split: str, seed: int):
    y = d.train.tensors[1]
    alpha = SPLITS[split]
    parts = partition.iid_partition(y, NUM_CLIENTS, seed) if alpha is None else \
        partition.dirichlet_partition(y, NUM_CLIENTS, alpha, seed=seed)
    return partition.client_datasets(d.train, parts)


def run(fast: bool = False, log=print) -> dict:
    seeds = (0,) if fast else (0, 1, 2)
    rounds = 2 if fast else 20
    updates = {k: UPDATES[k] for k in (("fp32", "4bit-stochastic", "2bit-nearest-ef") if fast else UPDATES)}
    d = data.load_digits(8)
    acc = lambda m: evaluate(m, d.test)  # noqa: E731
    result = header("federated", seeds, fast)
    result["settings"] = {"model": "mlp", "dataset": "digits (8x8)", "num_clients": NUM_CLIENTS, "rounds": rounds,
                          "local_epochs": 1, "lr": 0.05, "batch_size": 32, "granularity": "per-channel (axis 0)",
                          "splits": {k: ("iid" if v is None else f"dirichlet alpha={v}") for k, v in SPLITS.items()}}
    t0 = time.perf_counter()
    out: dict = {}
    for split in SPLITS:
        out[split] = {}
        for name, (bits, rounding, ef) in updates.items():
            curves, totals, finals = [], [], []
            for s in seeds:
                model = models.create("mlp", seed=s)
                cfg = fedavg.FedConfig(rounds=rounds, bits=bits, rounding=rounding, error_feedback=ef, seed=s)
                h = fedavg.run_rounds(model, clients_for(d, split, s), cfg, evaluate=acc)
                curves.append(h["acc"])
                totals.append(h["bytes"][-1])
                finals.append(h["acc"][-1])
            out[split][name] = {"bits": bits, "rounding": rounding, "error_feedback": ef,
                                "accuracy": accuracy_over_seeds(finals), "per_seed": finals,
                                "total_bytes": totals[0], "bytes_per_round": totals[0] // rounds,
                                "acc_per_round_mean": [sum(c[r] for c in curves) / len(curves) for r in range(rounds)]}
            a = out[split][name]["accuracy"]
            log(f"{split:7s} {name:16s} acc {a['mean']:5.1f} [{a['min']:.1f}, {a['max']:.1f}]  "
                f"bytes {totals[0]:>10,d}")
    result["updates"] = out
    result["update_seconds"] = time.perf_counter() - t0

    qat: dict = {}
    for kind, qat_bits in (("float_clients", None), ("qat2_clients", 2)):
        rows: dict = {}
        for s in seeds:
            model = models.create("mlp", seed=s)
            cfg = fedavg.FedConfig(rounds=rounds, bits=8, rounding="stochastic", qat_bits=qat_bits, seed=s)
            fedavg.run_rounds(model, clients_for(d, "noniid", s), cfg)
            rows.setdefault("fp32", []).append(acc(model))
            real = [d.train.tensors[0][torch.randperm(len(d.train), generator=torch.Generator().manual_seed(s))[:128]]]
            sets = server.calibration_sets(model, (1, 8, 8), real=real, num_samples=128,
                                           steps=20 if fast else 50, seed=s)
            for source, batches in sets.items():
                for wb, ab in PTQ_CONFIGS:
                    rows.setdefault(f"{source} W{wb}A{ab}", []).append(
                        acc(server.quantize_global(model, batches, wb, ab)))
        qat[kind] = {k: {"accuracy": accuracy_over_seeds(v), "per_seed": v} for k, v in rows.items()}
        for k, v in qat[kind].items():
            log(f"{kind:13s} {k:18s} {v['accuracy']['mean']:5.1f} [{v['accuracy']['min']:.1f}, {v['accuracy']['max']:.1f}]")
    result["qat_vs_ptq"] = qat

    if flower.available():
        cl = clients_for(d, "noniid", 0)[:2]
        cfg = fedavg.FedConfig(rounds=2, bits=4, rounding="stochastic", seed=0)
        a, b = models.create("mlp", seed=0), models.create("mlp", seed=0)
        try:
            h = flower.simulate(a, cl, cfg, evaluate=acc)
        except RuntimeError as e:  # Ray can time out starting on an overloaded machine
            result["flower"] = {"error": f"{type(e).__name__}: {e}"}
            log(f"Flower simulation failed: {e}")
            return result
        ref = fedavg.run_rounds(b, cl, cfg, evaluate=acc)
        t = time.perf_counter()
        fedavg.run_rounds(models.create("mlp", seed=0), cl, cfg)
        same = all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
        result["flower"] = {"clients": 2, "rounds": 2, "wall_s": h["wall_s"], "in_process_s": time.perf_counter() - t,
                            "same_model_as_in_process": same, "acc": h["acc"], "bytes": h["bytes"],
                            "in_process_acc": ref["acc"]}
        log(f"Flower 2 clients x 2 rounds: {h['wall_s']:.1f} s (in process {result['flower']['in_process_s']:.2f} s), "
            f"same model: {same}")
    else:
        result["flower"] = None
        log("flwr[simulation] not installed: Flower timing skipped")
    return result


def table(result: dict) -> str:
    lines = [f"{'split':7s} {'update':16s} {'accuracy (mean [min, max])':>28s} {'total bytes':>12s} {'x fp32':>7s}"]
    for split, rows in result["updates"].items():
        fp = rows["fp32"]["total_bytes"]
        for name, r in rows.items():
            a = r["accuracy"]
            lines.append(f"{split:7s} {name:16s} {format_spread(a, width=12, bounds_width=5)}   "
                         f"{r['total_bytes']:>12,d} {fp / r['total_bytes']:6.1f}x")
    lines.append("")
    lines.append(f"{'clients':13s} {'server PTQ':18s} accuracy")
    for kind, rows in result["qat_vs_ptq"].items():
        for k, v in rows.items():
            a = v["accuracy"]
            lines.append(f"{kind:13s} {k:18s} {format_spread(a, bounds_width=0)}")
    return "\n".join(lines)


def main(argv=None) -> int:
    return common.main("federated", run, table, __doc__, "1 seed, 2 rounds, 3 update kinds: a smoke test", argv)


if __name__ == "__main__":
    sys.exit(main())
