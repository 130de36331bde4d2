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
# # 13 · Mixed precision and deployment engines
#
# **What you will learn**
# - how to measure the **sensitivity** of each layer to quantization, three ways (one layer
#   at a time, HAWQ's Hessian trace, the SQNR of the layer's output), and how far their
#   rankings agree (Spearman);
# - how to **allocate bits** under a size budget: the integer linear program (ILP) of
#   HAWQ-v3, solved with `scipy.optimize.milp`, next to a greedy rule and uniform widths;
# - the **Pareto front** of accuracy against size, with a widget that moves the budget;
# - how a quantized model leaves Python: **ONNX in QDQ form**, run by **ONNX Runtime**, checked
#   against qlib's integer model; ONNX Runtime's own quantizer; LiteRT; what each engine
#   supports, and a table of accuracy, size and latency.
#
# Until now every layer got the same bit width. But layers are not equally fragile: the first
# convolution sees raw pixels through very few weights, the big middle layers hold most of
# the bits. Giving 8 bits where it matters and 2-3 bits elsewhere buys accuracy at the same
# size. Lab 09 follows: there you compute a sensitivity, write the allocation yourself and
# verify an exported model.

# %%
import itertools
import tempfile
import time
from pathlib import Path

import ipywidgets as ipw
import matplotlib.pyplot as plt
import numpy as np
import torch
from IPython.display import display

from qlib import data, export, models, runtime
from qlib.intmodel import convert_to_integer
from qlib.mixed import (allocation_bits, greedy_allocate, hawq_sensitivity, hessian_traces, ilp_allocate,
                        layer_sizes, one_at_a_time, ranking, spearman, sqnr_sensitivity, to_per_layer,
                        uniform_allocate)
from qlib.ptq import quantize_static
from qlib.train import evaluate, format_spread

torch.set_num_threads(1)
MODEL = "cnn16"  # the default teaching model (the mixed-precision benchmark also covers res16)
BITS = (2, 3, 4, 6, 8)
digits = data.load_digits(models.image_size(MODEL))
calib = data.calibration_batches(digits.train, num_samples=256, batch_size=64, seed=0)
model = models.pretrained(MODEL, seed=0)
sizes = layer_sizes(model)
fp32_acc = evaluate(model, digits.test)
print(f"fast mode: {runtime.fast()} | {MODEL}, seed 0 | fp32 test accuracy {fp32_acc:.2f}%")
print("weights per layer:", sizes)

# %% [markdown]
# ## 1. Sensitivity, three ways
#
# For each layer $l$ and width $b$ we want $\Omega_l(b)$: how much the model suffers when only
# layer $l$'s weights are quantized to $b$ bits.
#
# 1. **One layer at a time**: quantize $l$ alone (`per_layer`: every other layer `None`), and
#    measure the loss increase on the validation digits. Honest, and costs one PTQ and one
#    evaluation per (layer, width).
# 2. **HAWQ-v2**: around trained weights the gradient is about 0, so
#    $\Delta L \approx \tfrac12 \Delta W^\top H \Delta W$. Replacing $H_l$ by its mean
#    eigenvalue gives $\Omega_l(b) = \frac{\mathrm{Tr}(H_l)}{n_l}\,\|Q_b(W_l) - W_l\|^2$.
#    The trace comes from **Hutchinson's estimator**, $\mathrm{Tr}(H) = \mathbb{E}_v[v^\top H v]$
#    with random $\pm1$ vectors $v$, where $Hv$ is one extra backward pass: no Hessian is built.
# 3. **SQNR of the layer's output**: $\|y - y_q\|^2 / \|y\|^2$ on one batch, with $y_q$ from
#    $Q_b(W)$. No labels, no gradients.

# %%
timings = {}
t = time.perf_counter()
traces = hessian_traces(model, digits.val, samples=runtime.pick(16, 8), seed=0)
hawq = hawq_sensitivity(model, digits.val, BITS, traces=traces)
timings["HAWQ (Hessian trace)"] = time.perf_counter() - t
t = time.perf_counter()
sqnr = sqnr_sensitivity(model, digits.val, BITS)
timings["SQNR of the output"] = time.perf_counter() - t
t = time.perf_counter()
oat = one_at_a_time(model, digits.val, calib, [3])
timings["one layer at a time (3 bits only)"] = time.perf_counter() - t

at3 = {"one at a time": {k: v[3] for k, v in oat.items()}, "HAWQ": {k: v[3] for k, v in hawq.items()},
       "SQNR": {k: v[3] for k, v in sqnr.items()}}
fig, ax = plt.subplots(figsize=(7, 3))
names = list(sizes)
for i, (label, scores) in enumerate(at3.items()):
    vals = np.array([max(scores[n], 1e-12) for n in names])
    ax.bar(np.arange(len(names)) + 0.27 * (i - 1), vals / vals.max(), width=0.27, label=label)
ax.set_xticks(range(len(names)), [f"layer {n}\n{sizes[n]} w" for n in names])
ax.set_ylabel("sensitivity at 3 bits\n(relative to the largest)")
ax.legend()
plt.show()
for label, seconds in timings.items():
    print(f"{label:36s} {seconds:6.2f} s")
for a, b in itertools.combinations(at3, 2):
    print(f"Spearman({a}, {b}) = {spearman(at3[a], at3[b]):+.2f}")
print("ranking by HAWQ:", ranking(at3["HAWQ"]), "| by one at a time:", ranking(at3["one at a time"]))

# %% [markdown]
# HAWQ and the direct measurement usually agree (the Hessian knows about the loss), while the
# SQNR of a layer's own output does not know how much the *rest* of the network amplifies
# that noise: it is the cheapest and the least faithful. With only four layers a single
# swapped pair already lowers Spearman's rho a lot; the benchmark below gives the numbers on
# three seeds and on `res16`, whose residual blocks have more layers.
#
# ## 2. Bit allocation as an integer linear program
#
# Let $x_{l,b} \in \{0, 1\}$ say that layer $l$ gets $b$ bits. Then
#
# $$\min_x \sum_{l,b} \Omega_l(b)\, x_{l,b} \quad\text{s.t.}\quad \sum_b x_{l,b} = 1 \;\; \forall l,
# \qquad \sum_{l,b} n_l\, b\, x_{l,b} \le B_{size}, \qquad (\text{optionally } \sum_{l,b} \mathrm{MACs}_l\, b\, a_l\, x_{l,b} \le B_{ops}).$$
#
# Linear objective, linear constraints, binary variables: an ILP, which
# `scipy.optimize.milp` solves exactly by branch and bound (HiGHS). HAWQ-v3 solves this one.
# Let us check it against brute force (every one of $5^4 = 625$ allocations), and compare
# with a **greedy** rule: start at 8 bits and repeatedly lower the layer whose sensitivity
# grows least per bit saved.

# %%
def brute_force(sens, budget):
    best = None
    for choice in itertools.product(BITS, repeat=len(sizes)):
        alloc = dict(zip(sizes, choice))
        if allocation_bits(alloc, sizes) <= budget:
            cost = sum(sens[n][b] for n, b in alloc.items())
            best = min(best or (cost, alloc), (cost, alloc), key=lambda t: t[0])
    return best


total = sum(sizes.values())
for avg_bits in (6, 4, 3, 2.5):
    budget = total * avg_bits
    ilp, greedy = ilp_allocate(hawq, sizes, budget), greedy_allocate(hawq, sizes, budget)
    cost_ilp = sum(hawq[n][b] for n, b in ilp.items())
    cost_greedy = sum(hawq[n][b] for n, b in greedy.items())
    assert np.isclose(cost_ilp, brute_force(hawq, budget)[0])  # the ILP finds the optimum
    print(f"budget {avg_bits:3} bits/weight: ILP {ilp} (cost {cost_ilp:.4f}) | greedy {greedy} (cost {cost_greedy:.4f})")

# %% [markdown]
# ## 3. The Pareto front, and a budget you can move
#
# Each allocation becomes `per_layer` configs (`to_per_layer`), and `qlib.ptq` calibrates and
# converts it like any other model (activations stay at 8 bits here). Move the slider: the
# ILP solves again, the model is quantized and evaluated (a second or so), and the bars show
# where the bits went.

# %%
def ptq_accuracy(alloc):
    return evaluate(quantize_static(model, calib, per_layer=to_per_layer(alloc)), digits.test)


uniform_points = {b: ptq_accuracy(uniform_allocate(sizes, b)) for b in (8, 4, 3, 2)}
slider = ipw.FloatSlider(value=3.0, min=2.0, max=8.0, step=0.25, description="bits/weight",
                         continuous_update=False)
out = ipw.Output()


def show_budget(change=None):
    avg_bits = slider.value
    alloc = ilp_allocate(hawq, sizes, total * avg_bits)
    acc = ptq_accuracy(alloc)
    with out:
        out.clear_output(wait=True)
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3))
        ub = sorted(uniform_points)
        ax1.plot([total * b / 8192 for b in ub], [uniform_points[b] for b in ub], "o-", label="uniform PTQ")
        ax1.plot([allocation_bits(alloc, sizes) / 8192], [acc], "r*", markersize=14, label="ILP PTQ")
        ax1.axhline(fp32_acc, color="gray", ls=":", label="fp32")
        ax1.set_xlabel("weights (KiB)")
        ax1.set_ylabel("test accuracy (%)")
        ax1.legend(loc="lower right")
        ax2.bar([f"layer {n}" for n in alloc], list(alloc.values()), color="tab:red")
        ax2.set_ylabel("weight bits")
        ax2.set_title(f"ILP at {avg_bits} bits/weight: {acc:.1f}%")
        plt.tight_layout()
        plt.show()


slider.observe(show_budget, names="value")
display(ipw.VBox([slider, out]))
show_budget()

# %% [markdown]
# ### The benchmark: three seeds, two models, PTQ and QAT
#
# `benchmarks/mixed.py` runs the whole study (uniform W8-W2, ILP and greedy at the sizes of
# uniform W6/W4/W3/W2.5, then QAT for W4 and W3, uniform and mixed) on `cnn16` and `res16`
# with seeds 0-2, and saves `benchmarks/results/mixed.json`. Mean [min, max] test accuracy:

# %%
bench = runtime.benchmark_result("mixed")
if bench is not None:
    fig, axes = plt.subplots(1, len(bench["pareto"]), figsize=(10, 3.5))
    for ax, (name, res) in zip(np.atleast_1d(axes), bench["pareto"].items()):
        print(f"\n{name}: fp32 {res['fp32']['mean']:.1f}")
        for kind, style in (("uniform W", "o-"), ("ILP @", "s-"), ("greedy @", "x:")):
            for qat in (False, True):
                rows = [r for r in res["rows"] if r["config"].startswith(kind) and r["config"].endswith(" + QAT") == qat]
                if rows:
                    rows.sort(key=lambda r: r["size_bits"])
                    ax.plot([r["size_bits"] / 8192 for r in rows], [r["accuracy"]["mean"] for r in rows], style,
                            label=kind.strip(" @W") + (" + QAT" if qat else " PTQ"))
        ax.axhline(res["fp32"]["mean"], color="gray", ls=":")
        ax.set_title(name)
        ax.set_xlabel("weights (KiB)")
        ax.set_ylim(max(0, ax.get_ylim()[0]), 100.5)
        for r in res["rows"]:
            a = r["accuracy"]
            print(f"  {r['config']:22s} {r['size_bits'] / 8192:6.2f} KiB  {format_spread(a)}")
    np.atleast_1d(axes)[0].set_ylabel("test accuracy (%)")
    np.atleast_1d(axes)[0].legend(fontsize=7)
    plt.show()
    for name, res in bench["pareto"].items():
        for key in res["spearman_at_3_bits"][0]:
            rhos = [r[key] for r in res["spearman_at_3_bits"]]
            print(f"{name}: Spearman {key:24s} mean {np.mean(rhos):+.2f} (seeds: {', '.join(f'{r:+.2f}' for r in rhos)})")
        cost = {k: np.mean([c[k] for c in res["sensitivity_cost_s"]]) for k in res["sensitivity_cost_s"][0]}
        print(f"{name}: seconds per sensitivity measure:", {k: round(v, 1) for k, v in cost.items()})
    for name, t in bench["targets"].items():
        for key, v in t.items():
            print(f"{name}: {key}: {'met' if v['met'] else 'MISSED'}")

# %% [markdown]
# ## 4. The road to deployment
#
# qlib simulates; engines execute. What they support differs:
#
# | engine | weights | activations | widths | graph format |
# |---|---|---|---|---|
# | PyTorch x86 (FBGEMM/oneDNN) | int8, per-channel symmetric | uint8 asymmetric per-tensor (7-bit `reduce_range`) | 8 | `torch.ao` FX / PT2E |
# | ONNX Runtime (CPU) | int8/uint8, per-channel or per-tensor | uint8/int8 asymmetric per-tensor | 8 (int4 weights for MatMul only) | ONNX QDQ or QOperator |
# | LiteRT (TensorFlow Lite) | int8 per-channel symmetric | int8 asymmetric per-tensor | 8 (16x8 mode) | `.tflite` flatbuffer |
# | qlib | any 2-16 bits, per-tensor/channel/group | any, per-tensor | mixed per layer | PyTorch modules |
#
# A mixed-precision model below 8 bits runs on these engines in 8-bit containers: the size
# win is real only where the format packs the codes (int4 weights), the accuracy is what
# the table above says either way.
#
# **ONNX QDQ.** `qlib.export.to_onnx` writes the converted model as a float graph with a
# `QuantizeLinear -> DequantizeLinear` pair wherever qlib quantizes (each layer's input), and
# the weights and biases as int8/int32 codes behind a `DequantizeLinear` with qlib's scales.
# Let us open the graph:

# %%
qmodel = quantize_static(model, calib)
x_test, y_test = digits.test.tensors
tmp = Path(tempfile.mkdtemp())
proto = export.to_onnx(qmodel, x_test[:2], tmp / "cnn16_qdq.onnx")
for node in proto.graph.node[:12]:
    print(f"{node.op_type:18s} {list(node.input)} -> {list(node.output)}")
print("...", len(proto.graph.node), "nodes;", len(export.qdq_nodes(proto)), "of them Q/DQ")

# %% [markdown]
# ONNX Runtime reads the file, fuses what it can into integer kernels, and runs it. Check it
# against qlib's integer model: the same predictions, the logits within one step of an 8-bit
# quantizer of their range. Then let ONNX Runtime quantize the *float* model itself
# (`quantize_static`, the same calibration digits) for a side-by-side.

# %%
session = export.ort_session(tmp / "cnn16_qdq.onnx")
ort_logits = export.ort_predict(session, digits.test)
int_logits = convert_to_integer(qmodel)(x_test)
agree = (ort_logits.argmax(1) == int_logits.argmax(1)).float().mean().item()
step = float(int_logits.max() - int_logits.min()) / 255
diff = (ort_logits - int_logits).abs().max().item()
print(f"predictions agree on {100 * agree:.2f}% of {len(x_test)} test digits; max |logit diff| {diff:.4f} "
      f"(one 8-bit step: {step:.4f})")
assert agree >= 0.999 and diff <= step

export.to_onnx(model, x_test[:2], tmp / "cnn16_fp32.onnx")
export.ort_quantize_static(tmp / "cnn16_fp32.onnx", tmp / "cnn16_ort_int8.onnx", calib)
ort_own = export.ort_predict(export.ort_session(tmp / "cnn16_ort_int8.onnx"), digits.test)
for label, logits in (("qlib integer", int_logits), ("ONNX Runtime, qlib's QDQ", ort_logits),
                      ("ONNX Runtime, its own quantizer", ort_own)):
    print(f"{label:34s} {100 * (logits.argmax(1) == y_test).float().mean().item():.2f}%")
for f in ("cnn16_fp32", "cnn16_qdq", "cnn16_ort_int8"):
    print(f"{f + '.onnx':22s} {(tmp / (f + '.onnx')).stat().st_size / 1024:6.1f} KiB")

# %% [markdown]
# **LiteRT** (TensorFlow Lite) converts PyTorch models with `litert-torch` and runs them with
# the `ai-edge-litert` interpreter. It brings jax (about 0.75 GB), so it is an optional extra
# (`pip install 'qlib[litert]'`); ONNX and ONNX Runtime (about 110 MB) are in the default
# environment. Where LiteRT is absent the cell says so and moves on.

# %%
reason = export.litert_available()
if reason:
    print("skipped:", reason)
else:
    tfl = export.to_litert(model, x_test[:1], tmp / "cnn16.tflite")
    lit = export.litert_predict(tfl, x_test[:64], batch_size=64)
    with torch.no_grad():
        print("LiteRT vs PyTorch, max |diff|:", (lit - model(x_test[:64])).abs().max().item())

# %% [markdown]
# ### The engine table
#
# Measured by `benchmarks/mixed.py` on one CPU thread, the same test digits, seed 0.
# Latencies were measured interleaved in one run: compare the ratios, not the absolute times.

# %%
if bench is not None:
    for name, eng in bench["engines"].items():
        print(f"\n{name}: {'engine':26s} {'acc %':>6s} {'size KiB':>9s} {'ms @1':>8s} {'ms @64':>8s}")
        for label, r in eng["rows"].items():
            print(f"       {label:26s} {r['accuracy']:6.1f} {r['file_bytes'] / 1024:9.1f} "
                  f"{r['latency_ms_batch1']:8.3f} {r['latency_ms_batch64']:8.2f}")
        print("       LiteRT:", eng["litert"])

# %% [markdown]
# qlib's integer model is the slowest by far: it is readable tensor code, built to be
# checked, not to be fast. The engines run the same integers in optimized kernels. Compare
# ONNX Runtime's own QDQ model with qlib's export: ONNX Runtime puts Q/DQ pairs after every
# operation, so the runtime can fuse whole `Conv-Relu` blocks into integer kernels, while
# qlib's graph quantizes only at layer inputs, as qlib's integer model does, and leaves the
# convolution outputs in float: the same numbers, fewer fusions.
#
# ## Summary
# - Layers differ in **sensitivity**. Quantizing one layer at a time measures it directly;
#   HAWQ's $\mathrm{Tr}(H_l)/n_l \cdot \|Q(W_l) - W_l\|^2$ estimates it from the Hessian
#   (Hutchinson: $v^\top H v$ with random signs); the SQNR of the layer's output is cheapest
#   and least faithful. Spearman's rank correlation compares them.
# - **Bit allocation** under a size (and BitOps) budget is a small integer linear program;
#   `scipy.optimize.milp` solves it exactly. Greedy is close, not always optimal.
# - A **mixed** allocation beats uniform widths of the same size, by a lot at 3 bits, and QAT
#   closes most of the remaining gap.
# - Deployment: **ONNX QDQ** carries qlib's scales and codes to **ONNX Runtime**, which agrees
#   with qlib's integer model; the engines differ in what they support (per-channel,
#   asymmetric activations, widths below 8 bits).
#
# **Exercises**
# 1. Give the activations their own widths: `to_per_layer(alloc, act_bits=4)`. Which layer's
#    input suffers most at 4 bits? Extend the allocation to choose activation widths too.
# 2. Add a BitOps budget: `ilp_allocate(..., macs=layer_macs(model, x_test[:1]),
#    bitops_budget=...)`. Which layers does it push down, compared with the size budget alone?
# 3. Allocate with the SQNR sensitivity instead of HAWQ at 3 bits/weight. How much accuracy
#    does the cheaper measure cost?
# 4. Export a mixed W8/W4/W3 model with `export.to_onnx` and check it against
#    `convert_to_integer` as above. Why does the file not get smaller than the W8 export?
