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
# # 02 · Linear quantization: scale, zero point, rounding and clipping
#
# **What you will learn**
# - the affine mapping between floats and integers: `scale`, `zero_point`, `quant_min`,
#   `quant_max`; you build `quantize` and `dequantize` and check them bit for bit against
#   qlib and PyTorch;
# - symmetric vs affine quantization, and when each wastes codes;
# - the two errors of a quantizer, **rounding** and **clipping**, and the trade-off between
#   them as the clipping range moves;
# - granularity: one scale per tensor, per output channel or per group of weights, measured
#   on a trained model;
# - how the error and the accuracy change from 8 bits down to 2;
# - how integer hardware computes with zero points: the **zero-point expansion** of a layer
#   into one integer matrix product plus precomputed terms (Jacob et al. 2018), and how two
#   tensors with different scales are **added** in integers (a residual connection, TFLite's ADD);
# - and you get an interactive explorer to try it all.
#
# Lab 01 comes after this lesson: there you write these functions yourself.

# %%
import copy
import math
import warnings

import matplotlib.pyplot as plt
import torch
from tqdm.auto import tqdm

from qlib import data, intops, models, runtime, viz, widgets, zeropoint
from qlib.qparams import (PerChannel, PerGroup, PerTensor, choose_qparams,
                          choose_qparams_symmetric_qmax, qparams_for, quant_range)
from qlib.quantize import dequantize, fake_quantize, quantize, quantize_round_half_away
from qlib.requant import add_multipliers, requantized_add
from qlib.train import evaluate

gen = torch.Generator().manual_seed(0)
print("fast mode:", runtime.fast())

# %% [markdown]
# ## 1. The mapping: scale and zero point
#
# A $b$-bit code is an integer in $[q_{min}, q_{max}]$: $[-2^{b-1}, 2^{b-1}-1]$ signed,
# $[0, 2^b - 1]$ unsigned. Linear (uniform) quantization maps a real interval onto it:
#
# $$ x_q = \mathrm{clamp}\left(\mathrm{round}\left(\frac{x}{s}\right) + z,\ q_{min},\ q_{max}\right), \qquad \hat x = s\,(x_q - z) $$
#
# The **scale** $s$ is the step between neighbouring levels, the **zero point** $z$ is the
# code of the real number 0. To cover $[\alpha, \beta]$ with the $q_{max} - q_{min}$ steps:
#
# $$ s = \frac{\beta - \alpha}{q_{max} - q_{min}}, \qquad z = q_{min} - \mathrm{round}\left(\frac{\alpha}{s}\right) $$
#
# The range is first stretched to contain 0 ($\alpha \le 0 \le \beta$), so that 0.0 (padding,
# ReLU outputs) is represented exactly, by the code $z$. **Build it:**

# %%
def my_quant_range(bits, signed=True):
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)


def my_choose_qparams(lo, hi, quant_min, quant_max):
    """Affine scale and zero point for the range [lo, hi] (float32 tensors)."""
    lo, hi = torch.clamp(lo, max=0.0), torch.clamp(hi, min=0.0)  # make the range contain 0
    scale = (hi - lo) / (quant_max - quant_min)
    zero_point = quant_min - torch.round(lo / scale).to(torch.int64)
    return scale, zero_point


def my_quantize(x, scale, zero_point, quant_min, quant_max):
    # PyTorch multiplies by the float32 reciprocal 1/scale (see below why it matters)
    return torch.clamp(torch.round(x * (1.0 / scale)) + zero_point, quant_min, quant_max).to(torch.int64)


def my_dequantize(x_q, scale, zero_point):
    return (x_q - zero_point).to(torch.float32) * scale


x = torch.tensor([-1.0, -0.5, 0.0, 0.1, 0.33, 0.5, 1.2, 2.0])
qmin, qmax = my_quant_range(4, signed=False)
scale, zp = my_choose_qparams(x.min(), x.max(), qmin, qmax)
x_q = my_quantize(x, scale, zp, qmin, qmax)
x_dq = my_dequantize(x_q, scale, zp)
print(f"4-bit unsigned codes [{qmin}, {qmax}], scale {scale.item():.4f}, zero_point {zp.item()}")
for name, v in [("x", x), ("x_q", x_q), ("x_dq", x_dq), ("error", x_dq - x)]:
    print(f"{name:6s}", " ".join(f"{float(e):7.3f}" for e in v))
print("max |error| =", (x_dq - x).abs().max().item(), "<= scale/2 =", scale.item() / 2)

# %% [markdown]
# **Check it** against qlib and against PyTorch's own kernels, bit for bit, on fresh random
# tensors and every bit width from 2 to 8: `torch.quantize_per_tensor` (8-bit codes) and
# `torch.fake_quantize_per_tensor_affine` (quantize + dequantize in one call, any range).
# qlib adds two details our version skips: a minimum scale `eps` (a constant tensor would
# otherwise get scale 0) and clamping the zero point into the range.

# %%
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=".*deprecated")  # torch's quantized dtypes are on the way out
    for bits in range(2, 9):
        for signed in (False, True):
            x = torch.randn(10000, generator=gen) * 3 + 1
            qmin, qmax = my_quant_range(bits, signed)
            assert (qmin, qmax) == quant_range(bits, signed)
            scale, zp = my_choose_qparams(x.min(), x.max(), qmin, qmax)
            ref_scale, ref_zp = choose_qparams(x.min(), x.max(), qmin, qmax)
            assert torch.equal(scale, ref_scale) and torch.equal(zp, ref_zp)
            x_q = my_quantize(x, scale, zp, qmin, qmax)
            assert torch.equal(x_q, quantize(x, scale, zp, qmin, qmax).to(torch.int64))
            assert torch.equal(my_dequantize(x_q, scale, zp), dequantize(x_q, scale, zp))
            fq = torch.fake_quantize_per_tensor_affine(x, scale.item(), int(zp), qmin, qmax)
            assert torch.equal(my_dequantize(x_q, scale, zp), fq)
            if bits == 8:
                dtype = torch.qint8 if signed else torch.quint8
                q_torch = torch.quantize_per_tensor(x, scale.item(), int(zp), dtype).int_repr()
                assert torch.equal(x_q, q_torch.to(torch.int64))
print("my_quantize / my_dequantize == qlib == PyTorch, bit for bit, for 2..8 bits")

# %% [markdown]
# Two details decide those last bits:
#
# - **Round half to even**: `torch.round(2.5) = 2`, `torch.round(3.5) = 4` (unbiased on
#   average). School rounding ("half away from zero", C's `round`, TFLite's reference
#   kernels) gives 3 and 4. They differ only at exact ties.
# - **Multiply by the reciprocal**: PyTorch computes `x * (1/scale)` in float32, which is not
#   always `x / scale` rounded the same way.
#
# How often do they matter? On random inputs rarely; on inputs that sit on ties, often. We use
# the scale of an 8-bit symmetric quantizer of random data:

# %%
random_x = torch.randn(100000, generator=gen)
scale = random_x.abs().max() / 127.5
ties = (torch.arange(-100, 100) + 0.5) * scale  # (about) halfway between two levels
for name, v in [("random values", random_x), ("near-ties", ties)]:
    even = torch.round(v * (1.0 / scale))
    away = quantize_round_half_away(v, scale, 0, -(2**15), 2**15 - 1).to(torch.float32)
    divided = torch.round(v / scale)
    print(f"{name:14s}: half-away differs in {(even != away).sum().item():5d} of {v.numel()}, "
          f"x/scale differs in {(even != divided).sum().item():5d}")

# %% [markdown]
# From here on we use qlib's `quantize`, `dequantize`, `fake_quantize` (quantize then
# dequantize, in float) and `qparams_for(x, bits, symmetric, granularity)`, which takes the
# min and max of `x` and calls `choose_qparams`.
#
# ## 2. Symmetric vs affine
#
# **Symmetric** quantization fixes the zero point at 0 (signed codes) and centres the range:
# $[-c, c]$ with $c = \max|x|$, $s = c / ((q_{max} - q_{min})/2)$ (PyTorch divides by 127.5
# at 8 bits). No zero point makes integer arithmetic cheaper (section 6 shows why), so it is the usual
# choice for **weights**. **Affine** quantization fits $[\min x, \max x]$ exactly: worth it when
# the data is one-sided, like **activations after a ReLU**. We compare both on the real
# tensors of a trained model: a conv layer's weights and the activations after a ReLU.

# %%
model = models.pretrained("cnn16", seed=0)
digits16 = data.load_digits(16)
layers = {name: m for name, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))}

captured = {}
hook = model[5].register_forward_hook(lambda module, inputs, output: captured.update(relu=output.detach()))
with torch.no_grad():
    model(data.calibration_batches(digits16.train, num_samples=runtime.pick(256, 64), seed=0)[0])
hook.remove()
tensors = {"conv weights (layer 7)": layers["7"].weight.detach(), "ReLU activations (layer 5)": captured["relu"]}


def sqnr_db(x, x_dq):
    """Signal-to-quantization-noise ratio in dB: 10 log10(mean x^2 / mean (x - x_dq)^2)."""
    return 10 * torch.log10(x.pow(2).mean() / (x - x_dq).pow(2).mean()).item()


def fake_quant(x, bits, symmetric):
    """Per-tensor min-max quantization: signed codes if symmetric, unsigned if affine."""
    scale, zero_point = qparams_for(x, bits, symmetric=symmetric)
    return fake_quantize(x, scale, zero_point, *quant_range(bits, signed=symmetric))


affine_gain = {}
for name, t in tensors.items():
    print(f"{name:28s} range [{t.min():.3f}, {t.max():.3f}], {t.numel()} values")
    for bits in (8, 4):
        sym, aff = sqnr_db(t, fake_quant(t, bits, True)), sqnr_db(t, fake_quant(t, bits, False))
        affine_gain[name, bits] = aff - sym
        print(f"    {bits} bits: symmetric {sym:5.1f} dB, affine {aff:5.1f} dB  (affine - symmetric: {aff - sym:+.1f} dB)")

# the next paragraph's claims: alike on weights; on ReLU outputs affine wins one bit, 20 log10(2) dB
ONE_BIT_DB = 20 * math.log10(2)
assert all(abs(affine_gain["conv weights (layer 7)", b]) < 1 for b in (8, 4))
assert all(abs(affine_gain["ReLU activations (layer 5)", b] - ONE_BIT_DB) < 1 for b in (8, 4))

# %% [markdown]
# On the weights both are alike (they are nearly centred on 0). On ReLU outputs, symmetric
# spends half of its codes on negative numbers that never occur: one bit lost, about 6 dB.
# Look at it:

# %%
act = tensors["ReLU activations (layer 5)"]
fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
for ax, symmetric in zip(axes, (True, False)):
    bits = 3
    qmin, qmax = quant_range(bits, signed=symmetric)
    scale, zero_point = qparams_for(act, bits, symmetric=symmetric)
    viz.plot_staircase(scale, zero_point, qmin, qmax, x_min=-0.5, x_max=act.max().item() * 1.1, ax=ax)
    ax.set_title(f"{bits}-bit {'symmetric' if symmetric else 'affine'} on ReLU outputs: "
                 f"{int(((torch.arange(qmin, qmax + 1) - zero_point) * scale >= 0).sum())} of "
                 f"{qmax - qmin + 1} levels >= 0")
plt.show()

# %% [markdown]
# A variant you will meet: TensorRT and TFLite divide by $q_{max} = 127$ instead of 127.5 and use
# the **narrow** range $[-127, 127]$, so that $-\max|x|$ and $+\max|x|$ are both codes
# (`choose_qparams_symmetric_qmax`). It costs one code out of 256:

# %%
w = tensors["conv weights (layer 7)"]
for label, (scale, zp), (qmin, qmax) in [
        ("/ 127.5, codes [-128, 127]", qparams_for(w, 8, symmetric=True), quant_range(8)),
        ("/ 127,   codes [-127, 127]", choose_qparams_symmetric_qmax(w.min(), w.max(), 127),
         quant_range(8, narrow=True))]:
    print(f"{label}: scale {scale.item():.6f}, SQNR {sqnr_db(w, fake_quantize(w, scale, zp, qmin, qmax)):.2f} dB")

# %% [markdown]
# ## 3. Rounding error vs clipping error
#
# A value inside the range is rounded to the nearest level: its error is at most $s/2$, and
# spread uniformly, so its mean square is about $s^2/12$. A value outside is **clipped** to
# the edge: its error grows with its distance. Shrinking the range to $[-c, c]$ makes $s$
# smaller (less rounding error) but clips more values (more clipping error). Let us measure
# both parts as $c$ moves, on the conv weights.

# %%
def clip_sweep(x, bits, fractions):
    """MSE of symmetric quantization of x on [-c, c], c = fraction * max|x|, split in two parts."""
    qmin, qmax = quant_range(bits)
    rows = {"c": [], "total": [], "rounding": [], "clipping": [], "scale": []}
    for f in fractions:
        c = f * x.abs().max()
        scale, zp = choose_qparams(-c, c, qmin, qmax, symmetric=True)
        err2 = (x - fake_quantize(x, scale, zp, qmin, qmax)).pow(2)
        code = torch.round(x * (1.0 / scale)) + zp  # before clamping
        clipped = (code < qmin) | (code > qmax)
        for key, value in [("c", c), ("total", err2.mean()), ("rounding", err2[~clipped].sum() / x.numel()),
                           ("clipping", err2[clipped].sum() / x.numel()), ("scale", scale)]:
            rows[key].append(float(value))
    return rows


fractions = torch.linspace(0.05, 1.0, runtime.pick(96, 32))
sweeps = {bits: clip_sweep(w, bits, fractions) for bits in (4, 8)}

fig, axes = plt.subplots(1, 2, figsize=(12, 4))
for ax, (bits, r) in zip(axes, sweeps.items()):
    viz.plot_error_vs_range(r["c"], r["total"], r["rounding"], r["clipping"], ax=ax,
                            title=f"{bits} bits, symmetric, conv weights (layer 7)")
plt.show()

for bits, r in sweeps.items():
    best = min(range(len(r["total"])), key=r["total"].__getitem__)
    print(f"{bits} bits: best c = {fractions[best]:.2f} * max|w|, MSE {r['total'][best]:.3g} "
          f"vs {r['total'][-1]:.3g} at c = max|w| ({r['total'][-1] / r['total'][best]:.1f}x lower)")
    print(f"        at c = max|w|: rounding MSE {r['rounding'][-1]:.3g}, scale^2/12 = {r['scale'][-1] ** 2 / 12:.3g}")
    assert 0.9 < r["rounding"][-1] / (r["scale"][-1] ** 2 / 12) < 1.1  # "about s^2/12"

# the next paragraph's claim: the best range is inside min-max, more so at fewer bits
best_c = {bits: min(range(len(r["total"])), key=r["total"].__getitem__) for bits, r in sweeps.items()}
assert best_c[4] < best_c[8] <= len(fractions) - 1 and best_c[4] < len(fractions) - 1

# %% [markdown]
# The best range is **inside** the min-max range, and more so at fewer bits: at 4 bits the
# rounding error is large, so it pays to clip the rare large weights. Choosing the range
# (calibration) is the subject of lesson 03. The histogram shows what gets clipped:

# %%
r4 = sweeps[4]
best = min(range(len(r4["total"])), key=r4["total"].__getitem__)
qmin, qmax = quant_range(4)
scale, zp = choose_qparams(-torch.tensor(r4["c"][best]), torch.tensor(r4["c"][best]), qmin, qmax, symmetric=True)
levels = dequantize(torch.arange(qmin, qmax + 1), scale, zp)
edges = (levels[0] - scale / 2).item(), (levels[-1] + scale / 2).item()  # half a step past the outer levels
viz.plot_histogram_with_range(w, *edges, levels=levels,
                              title=f"conv weights (layer 7) at 4 bits, best c = {fractions[best]:.2f} max|w|")
plt.show()

# %% [markdown]
# ## 4. Granularity: per-tensor, per-channel, per-group
#
# One scale for a whole weight tensor must fit its largest output channel. If the channels'
# ranges differ, the small channels get few levels. Look at the ranges of the output channels,
# as trained and after folding the following batch norm into them ($w \cdot \gamma / \sigma$
# per channel, lesson 04), which is what a deployed model quantizes:

# %%
def channel_ranges(name):
    w = layers[name].weight.detach()
    bn = model[int(name) + 1]
    folded = w * (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach().reshape(-1, 1, 1, 1)
    return w.flatten(1).abs().amax(1), folded.flatten(1).abs().amax(1)


raw, folded = channel_ranges("0")
viz.plot_grouped_bars([str(i) for i in range(len(raw))],
                      {"as trained": raw / raw.max(), "BN folded": folded / folded.max()},
                      ylabel="max |w| / largest channel", title="layer 0: range of each output channel")
plt.show()
for name in ("0", "3", "7"):
    raw, folded = channel_ranges(name)
    print(f"layer {name}: largest / smallest channel range {raw.max() / raw.min():.1f}x as trained, "
          f"{folded.max() / folded.min():.1f}x BN-folded")

# %% [markdown]
# So we give each output channel its own scale (**per-channel**, `PerChannel(0)`), or go
# further and give each run of `group_size` consecutive input weights its own scale
# (**per-group**, `PerGroup(16)`, as 4-bit LLM weights do with groups of 32 to 128). We view
# every weight as a matrix `(out, in * kh * kw)`; the first conv has rows of only 9 weights, so
# there a "group" is the whole row.

# %%
def group_size(w):
    row = w[0].numel()
    return 16 if row % 16 == 0 else row


def granularities(w):
    return {"per-tensor": PerTensor(), "per-channel": PerChannel(0), "per-group": PerGroup(group_size(w))}


def quantize_weight(w, bits, granularity):
    """Symmetric fake quantization of a weight, viewed as (out, in*kh*kw), at a granularity."""
    w2 = w.reshape(w.shape[0], -1)
    scale, zero_point = qparams_for(w2, bits, symmetric=True, granularity=granularity)
    qmin, qmax = quant_range(bits)
    if isinstance(granularity, PerChannel):
        out = fake_quantize(w2, scale, zero_point, qmin, qmax, axis=0)
    elif isinstance(granularity, PerGroup):
        out = fake_quantize(w2, scale, zero_point, qmin, qmax, group_size=granularity.group_size)
    else:
        out = fake_quantize(w2, scale, zero_point, qmin, qmax)
    return out.reshape(w.shape), scale.numel()


# per-channel is PyTorch's fake_quantize_per_channel_affine, bit for bit
w3 = layers["3"].weight.detach()
scale, zero_point = qparams_for(w3, 4, symmetric=True, granularity=PerChannel(0))
torch_fq = torch.fake_quantize_per_channel_affine(w3, scale, zero_point.to(torch.int32), 0, -8, 7)
assert torch.equal(quantize_weight(w3, 4, PerChannel(0))[0], torch_fq)

bits = 4
sqnr = {g: [] for g in granularities(w3)}
overhead = {g: 0 for g in sqnr}
for name, layer in layers.items():
    w = layer.weight.detach()
    for g, gran in granularities(w).items():
        w_dq, n_scales = quantize_weight(w, bits, gran)
        sqnr[g].append(sqnr_db(w, w_dq))
        overhead[g] += n_scales * 4  # one float32 scale each (symmetric: no zero point)
viz.plot_grouped_bars([f"layer {n}" for n in layers], sqnr, ylabel="SQNR (dB, higher is better)",
                      title=f"{bits}-bit symmetric weights of cnn16, by granularity")
plt.show()
weight_bytes = sum(layer.weight.numel() for layer in layers.values()) * bits // 8
for g in sqnr:
    print(f"{g:12s} mean SQNR {sum(sqnr[g]) / len(sqnr[g]):5.1f} dB; scales take {overhead[g]:5d} bytes "
          f"= {100 * overhead[g] / weight_bytes:4.1f}% of the {weight_bytes} bytes of {bits}-bit weights")
# the next paragraph's claim: finer granularity buys SQNR with storage for the scales
mean_sqnr = [sum(sqnr[g]) / len(sqnr[g]) for g in sqnr]
assert mean_sqnr == sorted(mean_sqnr) and list(overhead.values()) == sorted(overhead.values())

# %% [markdown]
# Finer granularity buys SQNR with storage for the scales (and, in hardware, with kernels
# that handle many scales). Per-channel costs little and is the default for weights.
# Per-group with small groups and float32 scales is expensive, as measured above; real 4-bit
# formats store float16 scales for groups of 32 to 128 weights.
#
# ## 5. From 8 bits to 2: the error curve and the accuracy
#
# Each bit halves the scale, so it divides the rounding MSE by 4: **about 6 dB per bit**
# ($10 \log_{10} 4 = 6.02$). We measure the SQNR of all of cnn16's weights, and the test
# accuracy of the model with its conv/linear weights quantized (activations stay float32).
# At 4 bits and below the accuracy of a single model is noisy (it varies by several points
# between training seeds), so in full mode we average the three seeds of the zoo.

# %%
BITS = runtime.pick(list(range(8, 1, -1)), [8, 6, 4, 3, 2])
seeds = runtime.pick([0, 1, 2], [0])


def with_quantized_weights(model, bits, granularity_name):
    model = copy.deepcopy(model)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, (torch.nn.Conv2d, torch.nn.Linear)):
                gran = granularities(layer.weight)[granularity_name]
                layer.weight.copy_(quantize_weight(layer.weight, bits, gran)[0])
    return model


all_w = torch.cat([layer.weight.detach().flatten() for layer in layers.values()])
sqnr_curve, acc_curve, acc_runs = {g: [] for g in sqnr}, {g: [] for g in sqnr}, {g: [] for g in sqnr}
fp32_acc = [evaluate(models.pretrained("cnn16", seed=s), digits16.test) for s in seeds]
for g, bits in tqdm([(g, b) for g in sqnr for b in BITS], desc="quantize and evaluate", disable=runtime.quiet()):
    w_dq = torch.cat([quantize_weight(layer.weight.detach(), bits, granularities(layer.weight)[g])[0].flatten()
                      for layer in layers.values()])
    sqnr_curve[g].append(sqnr_db(all_w, w_dq))
    accs = [evaluate(with_quantized_weights(models.pretrained("cnn16", seed=s), bits, g), digits16.test)
            for s in seeds]
    acc_curve[g].append(sum(accs) / len(accs))
    acc_runs[g].append(accs)

fig, axes = plt.subplots(1, 2, figsize=(12, 4))
viz.plot_error_vs_bits(BITS, sqnr_curve, ax=axes[0], ylabel="SQNR (dB)", logy=False,
                       title="weight SQNR of cnn16 (seed 0)")
viz.plot_error_vs_bits(BITS, acc_curve, ax=axes[1], ylabel="test accuracy (%)", logy=False,
                       title=f"cnn16, weights quantized (mean of {len(seeds)} seed(s))")
axes[1].axhline(sum(fp32_acc) / len(fp32_acc), color="gray", ls="--", label="float32")
axes[1].legend(fontsize=8)
plt.show()

print(f"float32 accuracy {sum(fp32_acc) / len(fp32_acc):.1f}%; accuracy: mean [min, max] over seeds {seeds}")
for g, curve in sqnr_curve.items():
    slope = (curve[0] - curve[BITS.index(4)]) / (8 - 4)
    print(f"{g:12s} SQNR falls by {slope:.2f} dB per bit from 8 to 4 bits; accuracy "
          + ", ".join(f"{b} bits {a:.1f}% [{min(r):.1f}, {max(r):.1f}]"
                      for b, a, r in zip(BITS, acc_curve[g], acc_runs[g]) if b <= 4))
    assert abs(slope - 10 * math.log10(4)) < 0.5  # "about 6 dB per bit"

# the next paragraph's claims: free down to 6 bits (within two test images of float32 on every
# seed), and the SQNR ranks the granularities in the same order at every width
image = 100 / len(digits16.test)
for g in acc_runs:
    for b, runs_b in zip(BITS, acc_runs[g]):
        if b >= 6:
            assert all(a >= f - 2 * image - 1e-9 for a, f in zip(runs_b, fp32_acc)), (g, b, runs_b)
for i in range(len(BITS)):
    column = [sqnr_curve[g][i] for g in sqnr_curve]
    assert column == sorted(column), (BITS[i], column)

# %% [markdown]
# Down to 6 bits the weights are free. Below, the SQNR ranks the granularities in the same
# order at every width, but accuracy is a noisy, nonlinear function of the error: compare a
# difference with the spread over seeds (in brackets) before you conclude anything from it.
# At 2 bits (four levels) min-max quantization of a trained model fails whatever the
# granularity. Better ranges (lesson 03) and training with quantization (lesson 05) push
# this boundary down.
#
# ## 6. Integer arithmetic with zero points
#
# A quantized layer runs on the codes. With input codes $x_q$ (zero point $z_x$, scale $s_x$)
# and weight codes $w_q$ ($z_w$, $s_w$), a dot product of length $K$ is
#
# $$ \sum_k x_k w_k \approx s_x s_w \underbrace{\sum_k (x_{q,k} - z_x)(w_{q,k} - z_w)}_{\text{int32 accumulator}} $$
#
# Written this way, every multiply needs the zero points subtracted first: operands of 9 bits
# (a uint8 code minus its zero point) that the 8-bit multiply-add units cannot take, and
# $2K$ subtractions per output. Jacob et al. (2018, section 2.3) multiply it out:
#
# $$ \sum_k (x_q - z_x)(w_q - z_w) = \underbrace{\sum_k x_q w_q}_{\text{8-bit GEMM}} - z_w \underbrace{\sum_k x_q}_{\text{row sums}}
#    \underbrace{- z_x \sum_k w_q + K z_x z_w}_{\text{weights only: precomputed}} $$
#
# The $O(MNK)$ part runs on the raw codes; the row sums cost $O(MK)$ once per input, and the
# last two terms depend on the weights alone, so a converter adds them to the bias once.
# With symmetric weights ($z_w = 0$) the row sums vanish too. **Build it** on cnn16's first
# convolution (a matrix product over 3x3 patches of the image, `qlib.intops.im2col`), with
# affine 8-bit codes for both, so that both zero points are nonzero:

# %%
conv0 = layers["0"]
images = data.calibration_batches(digits16.train, num_samples=64, seed=0)[0]
patches = intops.im2col(images, 3, padding=1).reshape(-1, 9)          # (M, K): one row per output pixel
w0 = conv0.weight.detach().reshape(16, 9)                             # (N, K)
s_x, z_x = qparams_for(patches, 8, symmetric=False)                   # uint8 codes [0, 255]
s_w, z_w = qparams_for(w0, 8, symmetric=False)
x_q = quantize(patches, s_x, z_x, *quant_range(8, signed=False))
w_q = quantize(w0, s_w, z_w, *quant_range(8, signed=False))
print(f"input: scale {s_x.item():.4f}, zero point {z_x.item()} | weights: scale {s_w.item():.5f}, zero point {z_w.item()}")


def my_expanded(x_q, w_q, z_x, z_w):
    """sum_k (x_q - z_x)(w_q - z_w), multiplied out: one GEMM on the codes plus cheap terms (int64)."""
    x, w = x_q.long(), w_q.long()
    K = x.shape[1]
    core = x @ w.T                                                     # the only M*N*K part
    row = x.sum(1, keepdim=True)                                       # M*K adds
    const = K * z_x * z_w - z_x * w.sum(1)                             # from the weights alone
    return core - z_w * row + const


direct = (x_q.long() - z_x) @ (w_q.long() - z_w).T                    # the formula as written
mine = my_expanded(x_q, w_q, int(z_x), int(z_w))
terms = zeropoint.precompute(w_q, int(z_w), int(z_x))                  # what a converter stores
assert torch.equal(mine, direct)
assert torch.equal(zeropoint.expanded_accumulate(x_q, terms), direct)
assert torch.equal(intops.int_matmul(x_q, w_q.T, int(z_x), int(z_w)).long(), direct)  # qlib's int8 kernels
real = direct.double() * s_x.double() * s_w.double()                  # the accumulator's real value
print("expanded == direct, bit for bit; real value vs float conv: max |diff|",
      f"{(real.float() - patches @ w0.T).abs().max():.4f} (rounding of x and w only)")

# %% [markdown]
# The same integers, and the same as PyTorch's quantized linear layer (`tests/test_zeropoint.py`
# checks against `torch.ao.nn.quantized.functional.linear`). What the expansion saves, per
# layer of cnn16 at a batch of 64 digits (`zeropoint.operation_counts`):

# %%
def gemm_shape(name, layer, batch=64):
    """(M, K, N) of a layer as a matrix product, from the shapes of a forward pass."""
    captured = {}
    h = layer.register_forward_hook(lambda m, i, o: captured.update(out=o))
    with torch.no_grad():
        model(images[:batch])
    h.remove()
    out = captured["out"]
    m = out.numel() // out.shape[1]
    return m, layer.weight[0].numel(), out.shape[1]


print(f"{'layer':6s} {'M x K x N':>18s} {'multiply-adds':>14s} {'direct z-ops':>13s} "
      f"{'expanded z-ops':>15s} {'(z_w = 0)':>10s}   expanded / multiply-adds")
for name, layer in layers.items():
    m_, k_, n_ = gemm_shape(name, layer)
    c = zeropoint.operation_counts(m_, k_, n_)
    c0 = zeropoint.operation_counts(m_, k_, n_, weight_zero_point=False)
    share = c["expanded_runtime_ops"] / c["multiply_adds"]
    print(f"{name:6s} {f'{m_} x {k_} x {n_}':>18s} {c['multiply_adds']:14,d} {c['direct_zero_point_ops']:13,d} "
          f"{c['expanded_runtime_ops']:15,d} {c0['expanded_runtime_ops']:10,d}   {100 * share:5.1f}%")
    assert c["expanded_runtime_ops"] < c["direct_zero_point_ops"] / 4  # the next paragraph's claim

# %% [markdown]
# Subtracting zero points inside the loop costs two operations per multiply-add (the
# "direct" column: twice the multiply-adds). Expanded, the extra work is a fraction of the
# multiply-adds that shrinks as the layer grows ($O(MK + MN)$ against $O(MNK)$): it is
# largest for the first conv, whose dot products have only $K = 9$ terms, and a few percent
# for the big ones; with symmetric weights only one add per output is left. This is why
# integer engines (and `qlib.intops`) use symmetric weights and affine activations.
#
# **Adding two quantized tensors.** A residual connection adds two tensors that were quantized
# with *different* qparams. Adding their codes is meaningless; the real sum is
# $s_a (a_q - z_a) + s_b (b_q - z_b)$, which must be re-expressed on the output's grid
# $(s_y, z_y)$ with integers only. TFLite's ADD kernel (and `qlib.requant.requantized_add`):
# shift both inputs left by 20 bits (room for fractional bits), multiply each by a fixed-point
# multiplier $M_a = s_a / (2 \max(s_a, s_b))$ (resp. $M_b$), add, and requantize once with
# $M_y = 2 \max(s_a, s_b) / (2^{20} s_y)$. Each multiplier is an int32 $m$ and a shift
# (`quantize_multiplier`), so no float is involved at run time:

# %%
a_real = torch.randn(10_000, generator=gen) * 0.5
b_real = torch.randn(10_000, generator=gen) * 3 + 1                  # a wider, shifted branch
(s_a, z_a), (s_b, z_b) = (qparams_for(t, 8, signed=True) for t in (a_real, b_real))  # affine int8, own qparams
s_y, z_y = qparams_for(a_real + b_real, 8, signed=True)
a_q = quantize(a_real, s_a, z_a, -128, 127)
b_q = quantize(b_real, s_b, z_b, -128, 127)
args = (s_a.item(), s_b.item(), s_y.item())
print("fixed-point multipliers (m, shift) for a, b and the output:", add_multipliers(*args))
y_q = requantized_add(a_q, s_a.item(), int(z_a), b_q, s_b.item(), int(z_b), s_y.item(), int(z_y))
exact = quantize(dequantize(a_q, s_a, z_a) + dequantize(b_q, s_b, z_b), s_y, z_y, -128, 127)  # float reference
naive = torch.clamp(a_q.long() + b_q.long(), -128, 127)              # adding codes: wrong
diff = (y_q.long() - exact.long()).abs()
print(f"integer add vs float reference: {100 * (diff == 0).float().mean():.2f}% of codes equal, max difference "
      f"{diff.max().item()} code; adding the codes directly is off by {(naive - exact.long()).abs().float().mean():.1f} "
      "codes on average")
assert diff.max() <= 1

# %% [markdown]
# The integer add matches the float reference, at most one code apart (where the fixed-point
# roundings meet a tie). qlib's integer
# engine (`qlib.intmodel`, lesson 04; the rule itself is in `qlib.accumulator`) adds residual branches on the int32 accumulators before
# requantizing; `requantized_add` is the form for branches that arrive as int8 tensors.
#
# ## 7. Explore

#
# Move the sliders: bit width, clipping range (a fraction of the data's range), symmetric or
# affine, and the data. Watch the staircase, which values get clipped, and the SQNR. Try
# ReLU activations with symmetric vs affine; try 3-bit weights with `clip` around the best
# value found in section 3.

# %%
gaussian = torch.randn(20000, generator=gen)
widgets.quantization_explorer({**tensors, "Gaussian noise": gaussian, "conv weights (layer 3)": w3},
                              bits=4, clip=1.0, symmetric=True)

# %% [markdown]
# ## Summary
# - Linear quantization: $x_q = \mathrm{clamp}(\mathrm{round}(x/s) + z, q_{min}, q_{max})$,
#   $\hat x = s(x_q - z)$. The range contains 0 so that 0.0 is exact. qlib matches PyTorch
#   bit for bit: round half to even, multiply by the float32 reciprocal of the scale.
# - Symmetric ($z = 0$) suits weights; affine suits one-sided data such as ReLU outputs,
#   where symmetric loses a bit.
# - Error = rounding (inside the range, about $s^2/12$) + clipping (outside). Min-max never
#   clips but is not the best range, especially at few bits.
# - Per-channel and per-group scales follow the data more closely, for some storage.
# - About 6 dB of SQNR per bit; on this CNN, weights are free down to 6 bits, and below 4
#   bits min-max weights cost many points.
# - Integer layers multiply out the zero points: one GEMM on the raw codes, row sums of the
#   input (none with symmetric weights) and a per-channel constant precomputed from the
#   weights. Tensors with different qparams are added with fixed-point multipliers onto a
#   common grid, then requantized once.
#
# **Exercises**
# 1. Repeat section 2 at 2 bits. What are the levels of a 2-bit symmetric and a 2-bit affine
#    quantizer of the ReLU activations? Is 0.0 one of them?
# 2. In section 3, plot the best clipping fraction against the bit width (2..8). Explain the trend.
# 3. Use a Laplace-distributed tensor (`torch.distributions.Laplace`) instead of the weights in
#    section 3. Does the best fraction move up or down compared with the Gaussian noise?
# 4. Per-group with `group_size` 8, 16, 32, 64 for layer 7 at 3 bits: SQNR vs storage of the
#    scales. Where would you stop?
# 5. Find a float32 `x` and `scale` for which `round(x / scale)` and `round(x * (1 / scale))` differ.
# 6. In section 6, make the weights symmetric (`qparams_for(w0, 8, symmetric=True)`, signed
#    codes). Which terms of the expansion vanish? Check it with `zeropoint.precompute`.
# 7. Repeat the residual add with `left_shift=0` in `requantized_add`. How many codes now
#    differ from the float reference, and why does TFLite shift by 20 bits?
