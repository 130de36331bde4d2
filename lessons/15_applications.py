# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% tags=["colab-setup"]
# Setup: on Google Colab this installs qlib from the course repository;
# anywhere else (JupyterLab from `make lab`) it does nothing.
import subprocess, sys
REPO = "https://github.com/qdm-course/quantization-course@main"
if "google.colab" in sys.modules:
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "qlib @ git+" + REPO],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError("Could not install qlib from " + REPO + " (is the repository public, and is "
                           "this its address?). For a fork: run `make sync REPO=owner/name` and commit, "
                           "or edit REPO in this cell.\n" + r.stderr[-800:])

# %% [markdown]
# # 15 · Applications: healthcare, vehicles, IoT
#
# **What you will learn**, on three measured mini-studies with data that ships offline:
# - **healthcare**: a quantized diagnostic model whose overall accuracy hides *where* it errs:
#   per-class recall and calibration (ECE) before and after PTQ and QAT; and data-free
#   calibration, for when patient data may not leave the hospital;
# - **vehicles**: a latency and robustness budget: the smallest bit width that meets a latency
#   target on this CPU and keeps its accuracy under noise and blur;
# - **IoT**: does a model fit a microcontroller (256 KB flash, 64 KB RAM)? Packed 4-bit
#   weights, peak activation memory of integer-only inference, and the integer model exported
#   as a C header, compiled and checked bit for bit where a C compiler exists.

# %%
import time

import matplotlib.pyplot as plt
import torch
from sklearn.datasets import load_breast_cancer
from torch import nn
from torch.utils.data import TensorDataset

from qlib import applications as A
from qlib import data, models, runtime
from qlib.datafree import synthesize_bn
from qlib.intmodel import convert_to_integer
from qlib.modules import QuantConfig
from qlib.ptq import quantize_static
from qlib.qat import quantization_aware_training
from qlib.train import predict, train

torch.set_num_threads(runtime.pick(2, 1))  # fast mode (tests) runs beside other work: one thread, no spin-waiting
SEED = 0
print("fast mode:", runtime.fast())

# %% [markdown]
# ## 1. Healthcare: breast-cancer diagnosis
#
# scikit-learn's Wisconsin breast-cancer data: 569 tumours, 30 features, labels
# malignant (0) / benign (1). We split it with a fixed seed, standardize with the training
# statistics, and train a small MLP with BatchNorm.

# %%
bc = load_breast_cancer()
x = torch.tensor(bc.data, dtype=torch.float32)
yb = torch.tensor(bc.target, dtype=torch.int64)
i_tr, i_va, i_te = data.split_indices(len(x), seed=SEED)
mu, sd = x[i_tr].mean(0), x[i_tr].std(0)
x = (x - mu) / sd
train_set, val_set, test_set = (TensorDataset(x[i], yb[i]) for i in (i_tr, i_va, i_te))
print(f"train {len(i_tr)}, val {len(i_va)}, test {len(i_te)}; malignant in test: {(yb[i_te] == 0).sum().item()}")


def make_net():
    torch.manual_seed(SEED)
    return nn.Sequential(nn.Linear(30, 32), nn.BatchNorm1d(32), nn.ReLU(),
                         nn.Linear(32, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 2))


net = make_net()
train(net, train_set, val_set, epochs=runtime.pick(60, 30), lr=3e-3, seed=SEED)


def report(name, model):
    logits, labels = predict(model, test_set)
    rec = A.per_class_recall(logits, labels)
    acc = 100 * (logits.argmax(1) == labels).double().mean().item()
    ece = A.expected_calibration_error(logits, labels)
    print(f"{name:22s} accuracy {acc:5.1f}  recall malignant {rec[0]:5.1f}  benign {rec[1]:5.1f}  ECE {ece:4.1f}")
    return {"acc": acc, "malignant": rec[0].item(), "benign": rec[1].item(), "ece": ece}


calib = [x[i_tr][:128]]
rows = {"fp32": report("fp32", net)}
for bits in (8, 4, 3, 2):
    cfg = QuantConfig(weight_bits=bits, act_bits=bits)
    rows[f"PTQ W{bits}A{bits}"] = report(f"PTQ W{bits}A{bits}", quantize_static(net, calib, cfg))
qat_model, _ = quantization_aware_training(net, (train_set, val_set), QuantConfig(weight_bits=3, act_bits=3),
                                           epochs=runtime.pick(15, 6), lr=1e-3, seed=SEED, progress=False)
rows["QAT W3A3"] = report("QAT W3A3", qat_model)

fig, ax = plt.subplots(figsize=(8, 3))
names = list(rows)
xs = range(len(names))
ax.bar([i - 0.27 for i in xs], [rows[n]["acc"] for n in names], 0.27, label="accuracy")
ax.bar(list(xs), [rows[n]["malignant"] for n in names], 0.27, label="recall malignant")
ax.bar([i + 0.27 for i in xs], [rows[n]["benign"] for n in names], 0.27, label="recall benign")
ax.set_xticks(list(xs)); ax.set_xticklabels(names, fontsize=8); ax.set_ylabel("%"); ax.legend(fontsize=7)
plt.tight_layout(); plt.show()

# %% [markdown]
# Read the recall of the *malignant* class, not the accuracy: a missed cancer costs far more
# than a false alarm, and with a minority class the overall accuracy can move little while
# the malignant recall drops. ECE says whether the model's confidence can still be trusted.
#
# **Privacy.** If the records may not leave the hospital, the model can still be calibrated
# from its own BatchNorm statistics (ZeroQ, lesson 06):

# %%
syn = synthesize_bn(net, (30,), num_samples=128, steps=runtime.pick(100, 40), seed=SEED, progress=False)
for bits in (4, 3):
    cfg = QuantConfig(weight_bits=bits, act_bits=bits)
    report(f"PTQ W{bits}A{bits} synthetic", quantize_static(net, [syn.x], cfg))

# %% [markdown]
# ## 2. Vehicles: a latency and robustness budget
#
# A perception model on a car must answer in time *and* keep working in rain or fog. The
# digits `cnn16` stands in for it; noise and blur stand in for the weather (lesson 10's
# corruptions go further). We time integer-only inference of one batch of 64 at each bit
# width here (median of repeats, side by side) and pick the smallest width whose latency
# meets a target *and* whose accuracy under each corruption stays within 2 points of fp32.

# %%
d16 = data.load_digits(16)
cnn = models.pretrained("cnn16", seed=SEED)
xt, yt = d16.test.tensors
calib16 = [d16.train.tensors[0][:128]]


def acc_of(model, xs):
    with torch.no_grad():
        return 100 * (model(xs).argmax(1) == yt).double().mean().item()


def median_ms(fn, repeats=runtime.pick(7, 3)):
    ts = []
    for _ in range(repeats):
        t = time.perf_counter(); fn(); ts.append(1000 * (time.perf_counter() - t))
    return sorted(ts)[len(ts) // 2]


conditions = {"clean": xt, "noise 0.5": A.corrupt(xt, "noise", 0.5, seed=SEED), "blur 1": A.corrupt(xt, "blur", 1)}
vehicle = {}
with torch.no_grad():
    vehicle["fp32"] = {"ms": median_ms(lambda: cnn(xt[:64])), **{c: acc_of(cnn, v) for c, v in conditions.items()}}
    for bits in (8, 6, 4):
        q = quantize_static(cnn, calib16, QuantConfig(weight_bits=bits, act_bits=bits, act_observer="percentile",
                                                      act_observer_kwargs={"percentile": 99.9}))
        vehicle[f"W{bits}A{bits}"] = {"ms": median_ms(lambda: q(xt[:64])), **{c: acc_of(q, v) for c, v in conditions.items()}}
for k, v in vehicle.items():
    print(f"{k:6s} {v['ms']:6.1f} ms/64   " + "  ".join(f"{c}: {v[c]:5.1f}" for c in conditions))

# %% [markdown]
# Fake-quantized models run in float here, so on this CPU their latency says nothing about
# int8 hardware (lesson 09 measures real int8 kernels): the target below is relative to
# fp32. A real budget would use the engine the car runs.

# %%
target_ms = 1.5 * vehicle["fp32"]["ms"]
ok = [k for k, v in vehicle.items() if k != "fp32" and v["ms"] <= target_ms
      and all(v[c] >= vehicle["fp32"][c] - 2 for c in conditions)]
print(f"latency target {target_ms:.1f} ms; widths that meet both budgets: {ok}")
print("smallest:", min(ok, key=lambda k: int(k[1])) if ok else "none")

# %% [markdown]
# ## 3. IoT: does it fit a microcontroller?
#
# A Cortex-M4 class board: 256 KB flash for the weights, 64 KB RAM for activations. The
# digits `mlp` (64-128-128-10) with BatchNorm folded:

# %%
mlp = models.pretrained("mlp", seed=SEED)
d8 = data.load_digits(8)
FLASH, RAM = 256 * 1024, 64 * 1024
print(f"fp32 weights: {4 * models.count_parameters(mlp):,} bytes")
for bits in (8, 4, 2):
    print(f"{bits}-bit packed weights + scales + int32 biases: {A.packed_weight_bytes(mlp, bits):,} bytes "
          f"({'fits' if A.packed_weight_bytes(mlp, bits) <= FLASH else 'does not fit'} in 256 KB)")
peak = A.peak_activation_bytes(mlp, d8.test.tensors[0])
for r in peak["layers"]:
    print(f"layer {r['layer']}: int8 input {r['input_bytes']} B + int32 accumulator {r['acc_bytes']} B")
print(f"peak activation memory {peak['peak']} B of {RAM} B RAM")

# %% [markdown]
# The integer model as a C header: int8 weight arrays, zero points, int32 biases and the
# fixed-point multipliers and shifts that requantize each layer's accumulator to the next
# layer's input codes (lesson 04).

# %%
q_mlp = quantize_static(mlp, [d8.train.tensors[0][:256]], QuantConfig())
int_mlp = convert_to_integer(q_mlp)
header = A.c_header(int_mlp, "digits_mlp")
print(f"header: {len(header):,} characters of C for {A.packed_weight_bytes(mlp, 8):,} bytes of 8-bit model data")
print("\n".join(line[:100] + (" ..." if len(line) > 100 else "") for line in header.splitlines()[:9]))
ok = A.c_check_first_layer(int_mlp, d8.test.tensors[0][:16])
print("C compile check of the first layer:", "no C compiler here (skipped)" if ok is None else
      ("bit-exact with qlib.intmodel" if ok else "MISMATCH"))

# %% [markdown]
# ## Summary
#
# - Healthcare: report per-class recall and ECE, not only accuracy; data-free calibration
#   keeps patient data at home.
# - Vehicles: a bit width is chosen against *two* budgets, latency on the target and
#   accuracy under shift.
# - IoT: 4-bit packed weights and int8 activations bring the MLP far inside a
#   microcontroller's budget, and its integer arithmetic ports to C exactly.
#
# **Exercises**
# 1. Lower the healthcare model to W2A2 with PTQ calibrated on synthetic data: which class
#    suffers first?
# 2. Add a stronger corruption (noise 1.0, blur 3): which bit widths still pass?
# 3. Extend the C check to the whole MLP with `qlib.intops.requantize`'s rounding rules.
