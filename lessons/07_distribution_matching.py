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
# # 07 · Distribution matching: measuring calibration sets, equalizing, correcting bias
#
# *...and its optimisation form, reconstruction: learning how to round (AdaRound, BRECQ).*
#
# **What you will learn**
# - **MMD** and **KL** as measures of how far a calibration set is from the real data, on
#   inputs and on the activations the model computes from them; which synthetic set is closer;
# - **cross-layer equalization** (CLE): rescale channels between two layers so that
#   per-tensor quantization works again, without changing the float function;
# - **bias correction**: remove the *mean* output error that quantized weights add, using
#   only the BatchNorm statistics stored in the model;
# - the same repairs on a **depthwise-separable** (MobileNet-style) model, the case they were made
#   for: CLE through depthwise layers, and why ReLU6 must become ReLU first;
# - **reconstruction** (AdaRound, BRECQ): learn how to round each weight so that every layer
#   or block reproduces the float model's *output distribution*; the optimisation form of
#   distribution matching, on real and on synthetic calibration data.
#
# Where the ideas come from. CLE and bias correction: Nagel et al., ICCV 2019 ("DFQ"). Images
# synthesized from BatchNorm statistics: ZeroQ (Cai et al., CVPR 2020). MMD is a general
# two-sample distance (Gretton et al., JMLR 2012) and KL between histograms is what TensorRT's
# entropy calibration minimises to choose a range (lesson 03); **neither ZeroQ nor DFQ uses them to
# compare calibration sets**: here they are our own diagnostic. AdaRound: Nagel et al., ICML
# 2020; BRECQ: Li et al., ICLR 2021.
#
# One confound first. At 4 bits, min-max weight scales are poor whatever the data (one outlier
# weight sets the grid of its channel); MSE-searched weight scales (`weight_observer="mse"`) need
# no data at all. All 4-bit and 3-bit numbers below use MSE weight scales unless a line says
# otherwise, so that what changes between rows is the calibration source or the method, not a
# weak weight grid.

# %%
import dataclasses

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F

from qlib import data, models, ptq, runtime
from qlib.reconstruct import adaround, brecq, rectified_sigmoid, rounding_regularizer
from qlib.datafree import (bn_preactivation_stats, channel_ranges, correct_bias, cross_layer_equalize,
                           expected_inputs, expected_output_error, gaussian_batches, histogram_kl, is_depthwise,
                           mmd, relu6_to_relu, scale_stats, synthesize_bn, unbalance)
from qlib.fold import fold_batchnorm
from qlib.modules import PerChannel, PerTensor, QuantConfig
from qlib.train import evaluate, format_spread

torch.set_num_threads(1)  # tiny layers: a second thread costs more in synchronisation than it saves
SEED = 0
# MSE weight scales search 100 candidate ranges per channel (grid=100, qlib's default); fast mode
# searches 20 (steps of 5% of the range): the same code path, a coarser search
MSE = {"weight_observer": "mse", "weight_observer_kwargs": {"grid": runtime.pick(100, 20)}}
digits = data.load_digits(16)
model = models.pretrained("cnn16", seed=SEED).eval()
fp32 = evaluate(model, digits.test)
print(f"cnn16 fp32 test accuracy {fp32:.1f}%   fast mode: {runtime.fast()}")

# %% [markdown]
# ## 1. MMD: a distance between two samples
#
# Maximum mean discrepancy with a Gaussian kernel $k(a, b) = e^{-\|a - b\|^2 / 2h^2}$:
#
# $$ \mathrm{MMD}^2(P, Q) = \mathbb{E}\,k(x, x') + \mathbb{E}\,k(y, y') - 2\,\mathbb{E}\,k(x, y),
#    \qquad x, x' \sim P,\; y, y' \sim Q. $$
#
# It is zero exactly when $P = Q$. The unbiased estimate leaves out the $i = j$ terms of the
# first two means (so it scatters around 0 for two samples of the same distribution). We
# write it, with the median of the pooled pairwise distances as $h$, and check against qlib.

# %%
def mmd2(x, y):
    x, y = x.flatten(1).double(), y.flatten(1).double()
    z = torch.cat([x, y])
    d = torch.cdist(z, z)
    h = d[torch.triu_indices(len(z), len(z), 1).unbind()].median()
    k = torch.exp(-d**2 / (2 * h**2))
    n, m = len(x), len(y)
    kxx, kyy, kxy = k[:n, :n], k[n:, n:], k[:n, n:]
    return ((kxx.sum() - kxx.trace()) / (n * (n - 1)) + (kyy.sum() - kyy.trace()) / (m * (m - 1))
            - 2 * kxy.mean()).item()


N = runtime.pick(256, 128)
real_a, real_b = digits.train.tensors[0][:N], digits.val.tensors[0][:N]
noise = torch.cat(gaussian_batches(digits.image_shape, num_samples=N, seed=SEED))
print("ours:", round(mmd2(real_a, noise), 5), " qlib:", round(mmd(real_a, noise), 5))
assert abs(mmd2(real_a, noise) - mmd(real_a, noise)) < 1e-6 + 1e-4 * abs(mmd(real_a, noise))

# %% [markdown]
# ## 2. Which calibration set is closer to the real data?
#
# Three candidates of the same size: other **real** digits (the train split, as a baseline),
# Gaussian **noise**, and **BN-synthetic** images (ZeroQ, `synthesize_bn`). The reference is
# the validation split. We measure MMD on the raw inputs and on the penultimate activations
# (what the last layer sees), the KL between activation histograms (what a calibration
# observer sees), and the end result: W4A4 PTQ accuracy calibrated on each set, with MSE weight
# scales (computed from the weights alone, identical for every set: only the activation ranges
# depend on the calibration source).

# %%
synthetic = synthesize_bn(model, digits.image_shape, num_samples=N, batch_size=64,
                          steps=runtime.pick(100, 15), seed=SEED, progress=False).x
candidates = {"real (train)": real_a, "noise": noise, "BN-synthetic": synthetic}
penultimate = model[:-1]  # everything up to the last Linear: (N, 64) features


def features(x):
    with torch.no_grad():
        return penultimate(x)


W4A4 = QuantConfig(weight_bits=4, act_bits=4, **MSE)
rows = {}
for name, x in candidates.items():
    rows[name] = {
        "MMD inputs": mmd(x, real_b),
        "MMD features": mmd(features(x), features(real_b)),
        "KL features": histogram_kl(features(real_b), features(x)),
        "W4A4 acc": evaluate(ptq.quantize_static(model, x.split(64), W4A4), digits.test),
    }
print(f"{'set':14s}" + "".join(f"{k:>14s}" for k in next(iter(rows.values()))))
for name, r in rows.items():
    print(f"{name:14s}" + "".join(f"{v:14.4f}" if k != "W4A4 acc" else f"{v:13.1f}%" for k, v in r.items()))

# %%
fig, axes = plt.subplots(1, 2, figsize=(11, 3.4))
for name, x in [("real (val)", real_b), *candidates.items()]:
    axes[0].hist(features(x).flatten().tolist(), bins=60, histtype="step", density=True, label=name)
axes[0].set_yscale("log")
axes[0].set_xlabel("penultimate activation value")
axes[0].set_title("what the calibration observer sees")
axes[0].legend(fontsize=8)
names = list(rows)
axes[1].bar(names, [rows[n]["MMD features"] for n in names], color=["tab:green", "tab:orange", "tab:blue"])
axes[1].set_ylabel("MMD^2 to real (features)")
axes[1].set_title("distance to the real data, in feature space")
plt.tight_layout()
plt.show()


def ranking(key, reverse=False):
    return sorted(rows, key=lambda n: rows[n][key], reverse=reverse)


by_acc = ranking("W4A4 acc", reverse=True)
for key in ("MMD inputs", "MMD features", "KL features"):
    print(f"closest first by {key:12s}: {ranking(key)}   same order as W4A4 accuracy: {ranking(key) == by_acc}")

# %% [markdown]
# Read the table column by column. The input-space MMD says little: every synthetic image is
# far from a digit. Feature space is where calibration happens. MMD (a kernel distance between
# whole feature vectors) and the histogram KL (the pooled values only, which is all a
# per-tensor min-max observer uses) need not agree, and neither has to rank the sets as the
# W4A4 accuracy does: min-max calibration depends on the extremes, which neither distance
# weighs much. The cell below prints which ranking agrees with the accuracy on this run.
# One model, one seed, few synthesis steps in fast mode: benchmarks/results/datafree.json has
# the spread over three training seeds.
#
# ## 3. Cross-layer equalization
#
# Per-tensor weight quantization gives all channels of a tensor one grid, sized by the
# largest channel. `unbalance` makes an *exactly equivalent* float model whose channels differ
# in range by up to 100x in each direction: it multiplies output channel $i$ of a layer by
# $c_i$ and the matching input channel of the next layer by $1/c_i$ (ReLU commutes with
# positive scaling). CLE undoes this: for each pair it picks
# $s_i = \sqrt{r_{1,i} r_{2,i}} / r_{2,i}$, which gives channel $i$ the range
# $\sqrt{r_{1,i} r_{2,i}}$ in both layers (`cross_layer_equalize`).

# %%
folded = fold_batchnorm(model)
patient, _ = unbalance(model, spread=100.0, seed=SEED)
healed, _ = cross_layer_equalize(patient)
x_check = digits.test.tensors[0][:64]
with torch.no_grad():
    for name, m in [("unbalanced", patient), ("equalized", healed)]:
        print(f"{name:10s} max |logit - fp32 logit| = {(m(x_check) - folded(x_check)).abs().max().item():.2e}")
        assert (m(x_check) - folded(x_check)).abs().max() < 1e-4  # the same float function

fig, axes = plt.subplots(1, 3, figsize=(12, 3), sharey=True)
for ax, (name, m) in zip(axes, [("original (folded)", folded), ("unbalanced", patient), ("after CLE", healed)]):
    r = channel_ranges(m[3].weight, axis=0)
    ax.bar(range(len(r)), r.tolist())
    ax.set_yscale("log")
    ax.set_title(f"{name}: max/min = {(r.max() / r.min()).item():.0f}")
    ax.set_xlabel("output channel of layer '3'")
axes[0].set_ylabel("max |w| per channel")
plt.tight_layout()
plt.show()

# %%
accs = {}
for bits in (8, 6):
    per_tensor = QuantConfig(weight_bits=bits, act_bits=8, weight_granularity=PerTensor())
    calib = real_a.split(64)
    accs[f"W{bits}A8 per-tensor"] = {name: evaluate(ptq.quantize_static(m, calib, per_tensor), digits.test)
                                     for name, m in [("original", model), ("unbalanced", patient),
                                                     ("after CLE", healed)]}
for k, v in accs.items():
    print(k, {n: round(a, 1) for n, a in v.items()})
# the next paragraph's claim: per-tensor W8 collapses on the unbalanced model (loses more than
# half of its accuracy) and returns after CLE (within two test digits of the original)
w8 = accs["W8A8 per-tensor"]
assert w8["unbalanced"] < w8["original"] / 2
assert w8["after CLE"] >= w8["original"] - 2 * 100 / len(digits.test) - 1e-9

# %% [markdown]
# The float function never changed, yet per-tensor W8 accuracy collapses on the unbalanced
# model (its small channels round to zero) and returns after CLE.
#
# Are per-channel weight scales (qlib's default) immune? Not to this model. `unbalance` scales
# output channel $i$ of one layer by $c_i$ **and input channel $i$ of the next layer by $1/c_i$**:
# a per-channel grid has one scale per *output* channel, so inside each row of the next layer the
# weights still differ by up to $10^4$. And the activation between the two layers now has
# channels 100x apart, under one per-tensor activation scale. We measure the two effects apart:
# 8-bit weights per channel with 16-bit activations (almost float), and 16-bit weights with 8-bit
# activations.

# %%
probe = {"W8A8 per-channel": QuantConfig(),
         "W8 per-channel, A16": QuantConfig(act_bits=16),
         "W16, A8 per-tensor": QuantConfig(weight_bits=16)}
pc = {label: {name: evaluate(ptq.quantize_static(m, calib, cfg), digits.test)
              for name, m in [("original", model), ("unbalanced", patient), ("after CLE", healed)]}
      for label, cfg in probe.items()}
for k, v in pc.items():
    print(f"{k:22s}", {n: round(a, 1) for n, a in v.items()})
# the claim of the next paragraph: each of the three collapses on the unbalanced model, and CLE
# brings all of them back to within two test digits of the original
for label, v in pc.items():
    assert v["unbalanced"] < v["original"] / 2, label
    assert v["after CLE"] >= v["original"] - 2 * 100 / len(digits.test) - 1e-9, label

# %% [markdown]
# Per-channel weights alone (activations almost float) collapse, and so do 8-bit per-tensor
# activations alone (weights almost float): unbalanced channels break both the next layer's
# weight rows and the activation grid, and per-channel weight scales repair neither. CLE repairs
# both, because it equalizes the ranges where they are created. A model *trained* with very
# different channel ranges (depthwise convolutions are the famous case: Nagel et al. report
# MobileNetV2 at 0.1% with per-tensor W8 before CLE) has the same problem without any `unbalance`:
# section 5 meets one.
#
# ## 4. Bias correction
#
# Quantizing $W$ to $W_q$ changes a layer's output by $(W_q - W)x$; its *mean* over the data,
# $(W_q - W)\,\mathbb{E}[x]$, is a constant shift per output channel. If the layer's input is
# $\mathrm{relu}(z)$ with $z$ the output of a BatchNorm, then $z_c$ has mean $\beta_c$ and std
# $|\gamma_c|$, and $\mathbb{E}[\mathrm{relu}(z_c)] = \mu\Phi(\mu/\sigma) + \sigma\phi(\mu/\sigma)$
# under a Gaussian assumption: no data needed. The correction is $b' = b - (W_q - W)\,\mathbb{E}[x]$.
# To *see* the shift we take the case where it is largest: weights per tensor at 4 bits with
# min-max scales (activations at 8), and measure, on real test inputs, the mean output error of
# each corrected layer before and after. The next cell then asks how much of the gain survives a
# good weight grid.

# %%
W4 = QuantConfig(weight_bits=4, act_bits=8, weight_granularity=PerTensor())  # min-max weight scales
q = ptq.quantize_static(model, real_a.split(64), W4)
means = expected_inputs(model, bn_preactivation_stats(model))  # {layer: E[x]} from BN statistics
q_bc = correct_bias(q, means)


def layer_inputs(m, name, x):
    seen = {}
    h = m.get_submodule(name).register_forward_pre_hook(lambda mod, args: seen.setdefault("x", args[0]))
    with torch.no_grad():
        m(x)
    h.remove()
    return seen["x"]


def mean_output_error(name, qmodel, x):
    """Per output channel: mean of (quantized layer - float layer) on the float model's inputs."""
    layer, qlayer = folded.get_submodule(name), qmodel.get_submodule(name)
    xin = layer_inputs(folded, name, x)
    with torch.no_grad():
        w_q = qlayer.weight_fq(qlayer.weight)
        if isinstance(layer, torch.nn.Conv2d):
            diff = (F.conv2d(xin, w_q, qlayer.bias, padding=layer.padding)
                    - F.conv2d(xin, layer.weight, layer.bias, padding=layer.padding))
            return diff.mean(dim=(0, 2, 3))
        return (F.linear(xin, w_q, qlayer.bias) - F.linear(xin, layer.weight, layer.bias)).mean(0)


x_test = digits.test.tensors[0]
fig, axes = plt.subplots(1, len(means), figsize=(11, 3))
for ax, name in zip(axes, means):
    before, after = mean_output_error(name, q, x_test), mean_output_error(name, q_bc, x_test)
    predicted = expected_output_error(folded.get_submodule(name).weight,
                                      q.get_submodule(name).weight_fq(q.get_submodule(name).weight), means[name])
    ax.bar(range(len(before)), before.tolist(), alpha=0.6, label="before")
    ax.bar(range(len(after)), after.tolist(), alpha=0.6, label="after")
    ax.plot(range(len(predicted)), predicted.tolist(), "k.", ms=4, label="predicted (W_q - W) E[x]")
    ax.set_title(f"layer '{name}': |mean error| {before.abs().mean():.3f} -> {after.abs().mean():.3f}")
    ax.set_xlabel("output channel")
    ax.legend(fontsize=7)
axes[0].set_ylabel("mean output error (test inputs)")
plt.tight_layout()
plt.show()
print(f"W4A8 per-tensor: {evaluate(q, digits.test):.1f}%  ->  with bias correction "
      f"{evaluate(q_bc, digits.test):.1f}%   (fp32 {fp32:.1f}%)")

# %% [markdown]
# The predicted shift (dots) follows the measured one, and the correction removes most of
# it; what remains comes from the Gaussian assumption and from zero padding. At 4 bits per
# tensor with min-max scales the shift is large enough to move whole classes, so removing it
# recovers many points. It fixes only the *mean* error, not the per-input rounding noise, and
# it relies on the model having BatchNorm statistics.
#
# Now the decomposition: per-tensor and per-channel weight scales, min-max and MSE-searched, each
# with and without bias correction (W4A8, same calibration set).

# %%
bc = {}
for gran in ("per-tensor", "per-channel"):
    for wobs in ("minmax", "mse"):
        cfg = QuantConfig(weight_bits=4, act_bits=8, **(MSE if wobs == "mse" else {}))
        cfg = dataclasses.replace(cfg, weight_granularity=PerTensor()) if gran == "per-tensor" else cfg
        qq = ptq.quantize_static(model, real_a.split(64), cfg)
        bc[gran, wobs] = (evaluate(qq, digits.test), evaluate(correct_bias(qq, means), digits.test))
print(f"{'W4A8 weights':26s}{'no correction':>15s}{'bias corrected':>16s}")
for (gran, wobs), (before, after) in bc.items():
    print(f"{gran + ', ' + wobs + ' scales':26s}{before:14.1f}%{after:15.1f}%")
gain = {k: after - before for k, (before, after) in bc.items()}
# the paragraph below: the gain is largest for the worst grid (per-tensor min-max) and the
# best grid (per-channel MSE) is left with less than 1.5 points to gain
assert max(gain, key=gain.get) == ("per-tensor", "minmax")
assert gain["per-channel", "mse"] < 1.5

bench = runtime.benchmark_result("datafree")
if bench is not None:
    w4 = bench["cle_bias_correction"]["W4A4"]
    print("\ndatafree benchmark, cnn16 W4A4 (min-max weight scales), mean [min, max] over seeds "
          f"{bench['seeds']}:")
    for row in w4:
        print(f"  {row:24s} {format_spread(w4[row])}")
    if {"+ CLE + bias corr.", "original per-channel"} <= set(w4):  # the claim of the next paragraph
        assert w4["+ CLE + bias corr."]["mean"] > w4["original per-channel"]["mean"]

# %% [markdown]
# Bias correction is a repair for a *bad weight grid*: it brings per-tensor min-max back by many
# points, on top of per-channel min-max it changes little, and with per-channel MSE scales there
# is almost nothing left for it (the printed gains). The benchmark table says the same over three
# seeds at W4A4 (min-max weight scales): per-tensor after CLE + bias correction ends *above*
# per-channel without it. The honest baseline for any data-free repair is per-channel weights
# with MSE scales.
#
# ## 5. The model DFQ was made for: a depthwise-separable network
#
# Nagel et al. built CLE and bias correction for MobileNets. On ImageNet, MobileNetV2 with
# per-tensor 8-bit weights falls to **0.1%** top-1; after CLE (with the bias absorption that goes
# with it) it is back at **70.9%**, 71.2% with bias correction on top (fp32: 71.7%). The zoo's
# `dsc16` has MobileNet's block (lesson 04): a **depthwise** 3x3 convolution (`groups = channels`,
# weight `(C, 1, 3, 3)`: one filter per channel), BN, ReLU6, then a **pointwise** 1x1
# convolution, BN, ReLU6. And it collapses the same way: its training (MobileNetV2's recipe) left
# a few ReLU6 channels dead, the depthwise filters after them have BN variances of about 0, and
# folding blows those filters up hundreds of times (lesson 04 finds them), so one scale per
# tensor rounds most live channels to 0 and the model to chance. This is the case DFQ was made
# for. Two things change for sections 3 and 4:
#
# - A depthwise layer is a legal CLE partner. As layer 1, its output channel $c$ is row $c$
#   (like any conv). As layer 2, its input channel $c$ is *also* row $c$ (the filter of channel
#   $c$ sees channel $c$ only): $r_{2,c} = \max|W_2[c]|$, and row $c$ is multiplied by $s_c$.
#   Bias correction sums over the 9 taps of one channel: $\delta_c = \sum_{taps} (W_q - W)[c]\,\mathbb{E}[x_c]$.
# - **ReLU6 is not positive homogeneous**: $\mathrm{relu6}(s x) = s\,\mathrm{relu6}(x)$ only where
#   $x \le 6/s$ (after rescaling, channel $c$ would have to clip at $6/s_c$). DFQ replaces ReLU6 by
#   ReLU before CLE, which changes the float model wherever an activation exceeded 6: we measure
#   that model too. Without data, $\mathbb{E}[x]$ after a ReLU6 is the mean of a normal clipped to
#   $[0, 6]$: with $a = -\mu/\sigma$, $b = (6 - \mu)/\sigma$,
#   $\mathbb{E}[\mathrm{relu6}(z)] = \mu(\Phi(b) - \Phi(a)) + \sigma(\phi(a) - \phi(b)) + 6(1 - \Phi(b))$.
#
# In qlib: `cross_layer_equalize(model, replace_relu6=True)` (without it, a ReLU6 between two
# layers is an error that says why), `relu6_to_relu`, and `expected_inputs`, which knows ReLU6.
# First the depthwise layers' folded ranges, channel by channel, before and after CLE (log scale:
# in two layers a few channels, those fed by a dead ReLU6 channel, stand hundreds of times above
# the rest):

# %%
dsc = models.pretrained("dsc16", seed=SEED).eval()
dsc_relu = relu6_to_relu(dsc)  # DFQ's first step: a different float model
dsc_folded = fold_batchnorm(dsc)
dsc_cle, dsc_scales = cross_layer_equalize(dsc, replace_relu6=True)
with torch.no_grad():
    cle_diff = (dsc_cle(x_check) - dsc_relu(x_check)).abs().max().item()
    relu_diff = (dsc_relu(x_check) - dsc(x_check)).abs().max().item()
print(f"max |logit difference|: CLE vs the ReLU model {cle_diff:.1e}; ReLU model vs the ReLU6 model {relu_diff:.2f}")
assert cle_diff < 1e-4  # CLE keeps the function of the model it equalizes (the ReLU one)
dsc_fp32 = {"ReLU6 (original)": evaluate(dsc, digits.test), "ReLU (for CLE)": evaluate(dsc_relu, digits.test)}
print("dsc16 fp32:", {k: round(v, 2) for k, v in dsc_fp32.items()})

depthwise = [n for n, m in dsc_folded.named_modules() if is_depthwise(m)]
fig, axes = plt.subplots(1, len(depthwise), figsize=(13, 2.8), sharey=True)
dw_spread = {}
for ax, name in zip(axes, depthwise):
    r0, r1 = (channel_ranges(m.get_submodule(name).weight) for m in (dsc_folded, dsc_cle))
    dw_spread[name] = ((r0.max() / r0.min()).item(), (r1.max() / r1.min()).item())
    ax.bar(range(len(r0)), r0.tolist(), alpha=0.6, label="folded")
    ax.bar(range(len(r1)), r1.tolist(), alpha=0.6, label="after CLE")
    ax.set_yscale("log")
    ax.set_title(f"depthwise '{name}': max/min {dw_spread[name][0]:.1f} -> {dw_spread[name][1]:.1f}", fontsize=9)
    ax.set_xlabel("channel")
axes[0].set_ylabel("max |w| per channel")
axes[0].legend(fontsize=8)
plt.tight_layout()
plt.show()
flatter = [n for n, (before, after) in dw_spread.items() if after < before]
print(f"CLE narrows the max/min range ratio of {len(flatter)} of {len(dw_spread)} depthwise layers: {flatter}")
assert max(before for before, _ in dw_spread.values()) > 100  # the text above: hundreds of times

# %% [markdown]
# Now sections 3 and 4's repairs on this model, seed 0, live: per-tensor weights at 8 and at 4
# bits, plain, with bias correction (data-free: $\mathbb{E}[x]$ from the BN statistics), after
# CLE (on the ReLU model), and both; per-channel weights as they are, the baseline. Min-max
# weight scales, 8-bit min-max activations, the calibration digits of section 2.

# %%
dsc_stats = bn_preactivation_stats(dsc)  # (beta, |gamma|) per layer, read before folding
dsc_means = {"plain": expected_inputs(dsc, dsc_stats),  # ReLU6: normal clipped to [0, 6]
             "cle": expected_inputs(dsc_cle, scale_stats(dsc_stats, dsc_scales))}  # ReLU, rescaled
assert set(dsc_means["plain"]) == set(dsc_means["cle"]) and len(dsc_means["plain"]) == 9  # every layer but the stem
dsc_live = {}


def dsc_quantized(src, bits, granularity):
    cfg = QuantConfig(weight_bits=bits, act_bits=8, weight_granularity=granularity)
    return ptq.quantize_static(src, real_a.split(64), cfg)


for bits in (8, 4):
    dsc_live[f"W{bits}A8 per-channel, plain"] = evaluate(dsc_quantized(dsc, bits, PerChannel(0)), digits.test)
    for src, means, (alone, corrected) in ((dsc, dsc_means["plain"], ("plain", "bias corr.")),
                                           (dsc_cle, dsc_means["cle"], ("CLE", "CLE + bias corr."))):
        qq = dsc_quantized(src, bits, PerTensor())
        dsc_live[f"W{bits}A8 per-tensor, {alone}"] = evaluate(qq, digits.test)
        dsc_live[f"W{bits}A8 per-tensor, {corrected}"] = evaluate(correct_bias(qq, means), digits.test)
print(f"dsc16 seed {SEED}, fp32 {dsc_fp32['ReLU6 (original)']:.1f}% "
      f"(one test digit: {100 / len(digits.test):.2f} points):")
for row, a in dsc_live.items():
    print(f"  {row:38s} {a:5.1f}%")
# the text above and below: per-tensor W8A8 collapses, bias correction alone cannot repair it, CLE does
assert max(dsc_live["W8A8 per-tensor, plain"], dsc_live["W8A8 per-tensor, bias corr."]) < 50
assert dsc_live["W8A8 per-tensor, CLE"] > 90 < dsc_live["W8A8 per-channel, plain"]

# %% [markdown]
# Per-tensor W8A8 is at chance, and bias correction alone cannot help: it corrects the *mean*
# error of a layer, and when most live channels of a layer round to 0 there is no small mean
# shift to correct. CLE shrinks the dead channels' depthwise filters towards their neighbours'
# ranges and moves the factor into the pointwise layers on either side (the function stays the
# same), and per-tensor weights work again. One seed and a few hundred test digits decide nothing
# alone, though. The benchmark (`benchmarks/ptq.py`, rows `depthwise`) runs the same grid over
# three training seeds, with bias correction both empirical (input means measured on the
# calibration digits) and analytic (the BN statistics, as above). The cell below prints it, and
# then answers, from those numbers, the questions the paper answers for MobileNetV2: does
# per-tensor W8 collapse? Do CLE and bias correction recover more than the seeds' spread? What
# does replacing ReLU6 by ReLU cost?

# %%
ptq_bench = runtime.benchmark_result("ptq")
if ptq_bench is not None and "depthwise" in ptq_bench:
    d = ptq_bench["depthwise"]
    print(f"{d['model']}, seeds {ptq_bench['seeds']}: mean [min, max]; fp32 {format_spread(d['fp32'])}, "
          f"with ReLU instead of ReLU6 {format_spread(d['fp32_relu'])}")
    methods = list(next(iter(next(iter(d["accuracy"].values())).values())))
    print(f"  {'':20s}" + "".join(f"{m.replace('analytic_', 'an. '):>25s}" for m in methods))
    for c, per_g in d["accuracy"].items():
        for g, per_m in per_g.items():
            print(f"  {c + ' ' + g:20s}" + "".join(f"{format_spread(per_m[m]):>25s}" for m in methods))

    def spread(s):
        return s["max"] - s["min"]

    fp, acc = d["fp32"], d["accuracy"]
    w8 = acc["W8A8"]["per_tensor"]["plain"]
    print(f"\n- per-tensor W8A8, plain: {w8['mean']:.1f}% vs fp32 {fp['mean']:.1f}%: "
          + ("collapses, as MobileNetV2 does" if w8["mean"] < fp["mean"] - 10 else
             f"{'no' if fp['mean'] - w8['mean'] <= spread(fp) + spread(w8) else 'a'} loss beyond the seeds' "
             "spread; nothing like MobileNetV2's collapse to 0.1%"))
    for c in acc:
        pt = acc[c]["per_tensor"]
        gain = pt["cle+bias_correction"]["mean"] - pt["plain"]["mean"]
        wins = sum(a > b for a, b in zip(pt["cle+bias_correction"]["values"], pt["plain"]["values"]))
        clear = pt["cle+bias_correction"]["min"] > pt["plain"]["max"]
        gap = acc[c]["per_channel"]["plain"]["mean"] - pt["cle+bias_correction"]["mean"]
        print(f"- {c} per-tensor: CLE + bias correction {gain:+.1f} points on average, higher than plain on "
              f"{wins} of {len(pt['plain']['values'])} seeds (worst seed above plain's best: {clear}); "
              f"per-channel plain is {gap:+.1f} points above it")
        print(f"  {c} per-tensor, what each step does: bias correction alone {pt['bias_correction']['mean']:.1f}%, "
              f"CLE alone {format_spread(pt['cle'], digits=1, bounds_width=0).strip()}, CLE + bias correction "
              f"{format_spread(pt['cle+bias_correction'], digits=1, bounds_width=0).strip()}")
    cost = d["fp32_relu"]["mean"] - fp["mean"]
    print(f"- ReLU6 -> ReLU changes fp32 accuracy by {cost:+.2f} points "
          f"({'within' if abs(cost) <= max(spread(fp), 100 / 360) else 'beyond'} the seeds' spread)")
    if "analytic_bias_correction" in methods:
        for c in acc:
            pt = acc[c]["per_tensor"]
            print(f"- {c} per-tensor after CLE, bias correction data-free vs empirical: "
                  f"{pt['cle+analytic_bias_correction']['mean']:.1f}% vs {pt['cle+bias_correction']['mean']:.1f}%")
    w8_dfq = acc["W8A8"]["per_tensor"]["cle+bias_correction"]
    print(f"\nDFQ, per-tensor 8-bit weights: plain -> after CLE -> after CLE + bias correction (fp32)\n"
          f"  MobileNetV2 on ImageNet (Nagel et al. 2019):         0.1% -> 70.9% -> 71.2%  (71.7%)\n"
          f"  dsc16 on the digits (this benchmark, {len(fp['values'])} seeds, mean): "
          f"{w8['mean']:.1f}% -> {acc['W8A8']['per_tensor']['cle']['mean']:.1f}% -> {w8_dfq['mean']:.1f}%  "
          f"({fp['mean']:.1f}%)")
    zoo = models.zoo_info()["models"][d["model"]]
    if [round(v, 2) for v in fp["values"]] != [round(zoo[str(s_)]["test_acc"], 2) for s_ in ptq_bench["seeds"]]:
        print("(these rows were measured on other dsc16 weights than the shipped ones: re-run benchmarks/ptq.py)")
    else:  # the text below, on the shipped weights
        pt8, pt4 = acc["W8A8"]["per_tensor"], acc["W4A8"]["per_tensor"]
        assert max(pt8["plain"]["max"], pt8["bias_correction"]["max"], pt8["analytic_bias_correction"]["max"]) < 50
        pc8 = acc["W8A8"]["per_channel"]["plain"]["values"]
        assert all(pc - cle < 1 for pc, cle in zip(pc8, pt8["cle"]["values"]))  # every seed within a point
        assert abs(pt8["cle+bias_correction"]["mean"] - pt8["cle"]["mean"]) < 1  # little left for bias correction
        assert pt4["plain"]["max"] < 50 < 80 < pt4["cle+bias_correction"]["min"]
        assert pt4["cle"]["min"] < acc["W4A8"]["per_channel"]["plain"]["min"] - 5  # CLE alone: not on every seed
        assert pt4["cle+bias_correction"]["mean"] > pt4["cle"]["mean"] + 5  # bias correction matters at 4 bits
        assert pt4["cle+bias_correction"]["mean"] < acc["W4A8"]["per_channel"]["plain"]["mean"]
        assert abs(pt4["cle+analytic_bias_correction"]["mean"] - pt4["cle+bias_correction"]["mean"]) < 1
        assert fp["mean"] - w8_dfq["mean"] < 71.7 - 70.9  # a smaller loss than MobileNetV2's, as said below

# %% [markdown]
# On the shipped `dsc16` this is DFQ's MobileNetV2 result in miniature (the last lines put the
# two side by side, and the cell checks the claims below against the benchmark):
#
# - one scale per tensor takes the model to chance at 8 bits, on every seed; bias correction
#   alone, empirical or data-free, leaves it there;
# - CLE brings per-tensor W8A8 back to within a point of per-channel scales on every seed; at 8
#   bits bias correction has little left to add;
# - at 4 bits CLE alone is not enough on every seed, and bias correction on top of it adds
#   points on average (the per-seed values in the table show where); the data-free version,
#   from the BN statistics, does as well as the empirical one; per-channel scales stay ahead;
# - replacing ReLU6 by ReLU, which CLE needs, is a different float model: the line above says
#   what it costs on the digits.
#
# Where hardware gives you per-channel weight scales, they are the baseline to beat (section 4);
# where it offers only per-tensor scales (per-channel scales cost extra bookkeeping in the
# integer kernels, and not every accelerator has them: DFQ's motivation), CLE is the data-free
# repair. Our model is small and its task is easy, so it recovers more of its
# float accuracy than MobileNetV2 does on ImageNet; the mechanism is the same.
#
# ## 6. Reconstruction: AdaRound and BRECQ
#
# Bias correction matches the *mean* of each layer's output. Reconstruction matches the whole
# output, sample by sample: keep the weight grid (scale, zero point) and choose for every weight
# whether to round **up or down** so that the quantized layer reproduces the float layer on the
# calibration data. AdaRound (Nagel et al. 2020) relaxes the choice with one variable $V$ per weight:
#
# $$ \tilde W = s \cdot \mathrm{clip}\big(\lfloor W/s \rfloor + h(V),\ q_{min}, q_{max}\big), \qquad
#    h(V) = \mathrm{clip}\big(\sigma(V)(\zeta - \gamma) + \gamma,\ 0, 1\big),\ \zeta = 1.1,\ \gamma = -0.1 $$
#
# $$ \min_V\ \big\| W x - \tilde W \tilde x \big\|^2 + \lambda \sum_i \big(1 - |2h(V_i) - 1|^\beta\big) $$
#
# where $x$ is the layer's input in the float model and $\tilde x$ in the *quantized* model (earlier
# layers already rounded, so each layer compensates their error). The regulariser pushes each
# $h$ to 0 or 1; $\beta$ falls from 20 to 2 so that it first lets the output loss decide and then
# insists. At the end $h$ is replaced by $1[V \ge 0]$: the weights land exactly on the grid.
# BRECQ (Li et al. 2021) does the same per **block** (a residual block, a conv-ReLU group), so
# the layers of a block round jointly against the block's output, and it can learn the
# activation step sizes (LSQ) at the same time. Below: the two functions that shape $h$.

# %%
v = torch.linspace(-4, 4, 400)
fig, axes = plt.subplots(1, 2, figsize=(10, 3))
axes[0].plot(v, torch.sigmoid(v), label="sigmoid(V)")
axes[0].plot(v, rectified_sigmoid(v), label="h(V): reaches 0 and 1")
axes[0].set_xlabel("V")
axes[0].legend(fontsize=8)
h = torch.linspace(0, 1, 200)
for b in (20, 8, 2):
    v_h = torch.logit(((h - (-0.1)) / 1.2).clamp(1e-6, 1 - 1e-6))  # V with h(V) = h
    axes[1].plot(h, [rounding_regularizer(x.reshape(1), b).item() for x in v_h], label=f"beta = {b}")
axes[1].set_xlabel("h(V)")
axes[1].set_title("regulariser per weight")
axes[1].legend(fontsize=8)
plt.tight_layout()
plt.show()

# %% [markdown]
# Now at **3 bits** for weights and activations (W3A3), where round-to-nearest fails: the same
# converted model (MSE weight scales, percentile activation ranges), re-rounded by AdaRound and
# BRECQ on real digits and on the BN-synthetic images of section 2 (no training image: the ranges
# and the reconstruction both use the synthetic set). Fast mode takes few steps; the benchmark
# below takes more, over three seeds and on res16 too.

# %%
W3A3 = QuantConfig(weight_bits=3, act_bits=3, **MSE, act_observer="percentile",
                   act_observer_kwargs={"percentile": 99.9})
steps = runtime.pick(200, 40)
live = {"round-to-nearest (real)": ptq.quantize_static(model, real_a.split(64), W3A3)}
live["AdaRound (real)"] = adaround(live["round-to-nearest (real)"], real_a, iters=steps, seed=SEED)
live["BRECQ (real)"] = brecq(live["round-to-nearest (real)"], real_a, iters=steps, seed=SEED)
live["round-to-nearest (synthetic)"] = ptq.quantize_static(model, synthetic.split(64), W3A3)
live["BRECQ (synthetic)"] = brecq(live["round-to-nearest (synthetic)"], synthetic, iters=steps, seed=SEED)
live_acc = {k: evaluate(m, digits.test) for k, m in live.items()}
for k, a in live_acc.items():
    print(f"cnn16 W3A3 {k:30s} {a:5.1f}%")
# the learned roundings stay on the grid: the model is an ordinary converted qlib model
layer = live["BRECQ (real)"].get_submodule("3")
assert torch.equal(layer.weight_fq(layer.weight), layer.weight)
# the claim below: on real data the learned rounding beats round-to-nearest by a wide margin
assert min(live_acc["AdaRound (real)"], live_acc["BRECQ (real)"]) > live_acc["round-to-nearest (real)"] + 10

# %%
rec = runtime.benchmark_result("reconstruct")
if rec is not None:
    for name, per in rec["accuracy"].items():
        print(f"\n{name}: fp32 {format_spread(rec['fp32'][name])}; mean [min, max] over seeds {rec['seeds']}")
        print(f"  {'':22s}" + "".join(f"{c:>22s}" for c in per))
        for row in next(iter(per.values())):
            print(f"  {row:22s}" + "".join(f"{format_spread(per[c][row]):>22s}" for c in per))
    r = rec["accuracy"]["cnn16"]["W3A3"]
    assert r["brecq_real"]["mean"] > max(r["minmax_real"]["mean"], r["percentile_real"]["mean"]) + 20
    print("\nBRECQ, real minus synthetic calibration (mean points):",
          {f"{n} {c}": round(per[c]["brecq_real"]["mean"] - per[c]["brecq_synthetic"]["mean"], 1)
           for n, per in rec["accuracy"].items() for c in per})
#
# Read the rows in pairs, and against the spread over seeds. On cnn16, round-to-nearest with
# min-max or percentile ranges is far from fp32 at W3A3 and W2A4, MSE weight scales alone do not
# rescue it, and learned rounding on top recovers most of the rest *without training the weights
# beyond their rounding*. res16 loses less at W3A3 with percentile ranges, so there is less to
# recover. The synthetic rows show how much survives without a single training image (ranges and
# reconstruction targets both from BN-synthetic images); the printed real-minus-synthetic gaps are
# the price of the synthetic data's mismatch (section 2): compare them with the seeds' spread.
#
# ## Summary
# - MMD compares two samples through a kernel; KL compares two histograms. Measured on the
#   activations the model computes (not on pixels), they separate real from synthetic
#   calibration sets; whether they also predict PTQ accuracy must be checked, not assumed.
# - CLE rescales channels between layers with ReLU in between; the float function is
#   unchanged, and per-tensor quantization recovers. Per-channel weight scales do *not* repair an
#   unbalanced model: the next layer's rows and the per-tensor activations stay unbalanced.
# - Bias correction predicts the mean output error $(W_q - W)\,\mathbb{E}[x]$ from BatchNorm
#   statistics and folds it into the bias; it repairs a bad weight grid, and has little left to
#   do on per-channel MSE scales.
# - Depthwise layers pair like any other (input channel $c$ of a depthwise layer is its row $c$),
#   but ReLU6 is not positive homogeneous: CLE needs ReLU, a different float model to measure.
#   On `dsc16`, whose dead ReLU6 channels make per-tensor weights collapse to chance even at 8
#   bits, CLE brings per-tensor W8A8 back to per-channel accuracy, as DFQ did for MobileNetV2
#   (0.1% -> 70.9%); at 4 bits bias correction on top of CLE matters too.
# - AdaRound and BRECQ learn the rounding so that each layer or block reproduces the float
#   output on calibration data: 3-bit weights and activations without retraining. They work on
#   synthetic data too, with a gap that measures how far the synthetic data is from real.
#
# **Exercises**
# 1. Compute `mmd` between two disjoint halves of the validation set. How large is "zero"?
#    Which of the differences in section 2 exceed it?
# 2. Run section 3 with `spread=10` and `spread=1000`. At which spread does per-tensor W8 fail?
# 3. Apply CLE to the *original* cnn16 and quantize per tensor at W4A8. Does it help a model
#    that was never unbalanced? Compare with per-channel scales.
# 4. Replace the BN-statistics `E[x]` by `qlib.datafree.empirical_input_means` on the
#    BN-synthetic images (empirical bias correction). Which predicts the error better?
# 5. Call `cross_layer_equalize(dsc)` without `replace_relu6=True` and read the error. Then give
#    the live grid of section 5 empirical bias correction (`empirical_input_means` on
#    `fold_batchnorm(dsc)` and `dsc_cle`, calibration digits): does it beat the BN statistics?
# 6. Run AdaRound with `reg_weight=0` and `return_stats=True`. What share of `h(V)` ends binary,
#    and what happens to the accuracy after the hard rounding? Why?
# 7. Predict, then measure: does BRECQ with `learn_act_scale=False` lose more at W3A3 or at W2A4?
