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
# # 04 · Post-training quantization: from a float model to integers
#
# **What you will learn**
# - **static** PTQ (ranges fixed by calibration) and **dynamic** PTQ (activation ranges
#   measured on every batch at run time), and what each costs;
# - **batch-norm folding**: you fold by hand, check against qlib, and see that it is exact;
# - **integer-only inference**: int8 x int8 products summed in int32, a bias in int32, and a
#   fixed-point multiplier and shift instead of a float scale; you run one layer by hand and
#   then a whole model, and check that it agrees with the fake-quant model;
# - why a MobileNet-style model (`dsc16`, depthwise-separable) collapses with per-tensor
#   8-bit weights and not with per-channel ones: dead channels and batch-norm folding;
# - accuracy, size and latency of fp32, W8A8, W4A8 and W4A4, next to PyTorch's own x86 int8
#   engine (and why its activations have 7-bit codes).
#
# Lab 03 follows: there you write folding, calibration and conversion yourself.

# %%
import copy
import warnings

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F

from qlib import data, measure, models, runtime
from qlib.engines import compare_latency, torch_x86_quantize
from qlib.fold import fold_batchnorm, fold_bn
from qlib.granularity import PerChannel, PerTensor
from qlib.intmodel import convert_to_integer
from qlib.intops import int_conv2d, quantize_multiplier, requantize
from qlib.modules import QuantConfig
from qlib.ptq import calibrate, convert, prepare, quantize_dynamic, quantize_static
from qlib.quantize import quantize
from qlib.train import evaluate, format_spread

digits = data.load_digits(16)
calib = data.calibration_batches(digits.train, num_samples=256, batch_size=64, seed=0)
test_x, test_y = digits.test.tensors
model = models.pretrained("cnn16", seed=0)
print("fast mode:", runtime.fast(), "| fp32 test accuracy:", f"{evaluate(model, digits.test):.2f}%")

# %% [markdown]
# ## 1. Static and dynamic PTQ
#
# **Static** PTQ fixes every scale and zero point before deployment, in three steps (the
# names are PyTorch's, and `quantize_static` runs all three):
#
# ```
# prepared  = prepare(model, config)     fold BN, swap in fake-quant layers, observers on
# calibrate(prepared, batches)           run calibration data: observers record ranges
# quantized = convert(prepared)          freeze the qparams, switch quantization on
# ```
#
# **Dynamic** PTQ quantizes the weights once and measures each activation's min and max
# on the batch that arrives, at run time. It needs no calibration data, and its ranges fit
# every batch; it pays for that at run time (section 1's last paragraph), and with one range
# per tensor a sample's result depends on the *other* samples in its batch.

# %%
prepared = prepare(model, QuantConfig())
calibrate(prepared, calib)
static8 = convert(prepared)
assert torch.equal(static8(test_x), quantize_static(model, calib, QuantConfig())(test_x))

one_by_one = [(test_x[i:i + 1], test_y[i:i + 1]) for i in range(runtime.pick(len(test_x), 120))]
print(f"{'':22s} {'batch of 360':>13s} {'one digit at a time':>20s}   (first {len(one_by_one)} digits)")
for bits in (8, 4):
    static = quantize_static(model, calib, QuantConfig(weight_bits=bits, act_bits=bits))
    dynamic = quantize_dynamic(model, bits)
    for name, q in (("static", static), ("dynamic", dynamic)):
        print(f"W{bits}A{bits} {name:15s} {evaluate(q, digits.test):12.2f}% {evaluate(q, one_by_one):19.2f}%")

dynamic4 = quantize_dynamic(model, 4)
with torch.no_grad():
    alone = dynamic4(test_x[:1])
    in_batch = dynamic4(test_x)[:1]
    static_alone = static8(test_x[:1]) - static8(test_x)[:1]
print("\ndynamic W4A4, digit 0 alone vs inside the test batch: logits differ by up to "
      f"{(alone - in_batch).abs().max():.3f}; static: {static_alone.abs().max():.3g}")

# one range per sample (per token, for a linear layer) instead of one per batch tensor
per_sample = quantize_dynamic(model, config=QuantConfig(weight_bits=4, act_bits=4, act_granularity=PerChannel(0)))
with torch.no_grad():
    per_sample_gap = (per_sample(test_x[:1]) - per_sample(test_x)[:1]).abs().max().item()
print(f"dynamic W4A4 with per-sample scales: differ by {per_sample_gap:.2g} (float rounding of the "
      f"batched conv); accuracy {evaluate(per_sample, digits.test):.2f}%")
assert per_sample_gap < 1e-4 < (alone - in_batch).abs().max()  # the text below: per-sample scales remove it

# %% [markdown]
# Static quantization gives each input the same answer whatever else is in the batch; the
# per-tensor dynamic model's ranges, and so its rounding, move with the batch. That is a side
# effect of one range per tensor, not a reason to avoid dynamic quantization: scales per
# sample (per *token* in a transformer, as LLM.int8() and most LLM kernels use) remove it,
# as the last line shows.
#
# Why, then, are CNNs quantized statically? **Cost.** A dynamic layer must finish its float
# (or int32) output, scan it for its min and max, compute a scale, and only then quantize it
# for the next layer: an extra pass over every activation tensor and a float requantization
# per layer. A static layer knows its output qparams in advance, so the requantization (and
# the ReLU, a clamp) is *fused* into the convolution's epilogue: the kernel writes the next
# layer's int8 codes directly, and conv + BN + ReLU run as one integer operator. In a CNN
# activations are large and each weight is reused across the whole image, so those extra
# passes would eat the gain. Dynamic quantization pays where *loading the weights*
# dominates: LSTMs and the linear layers of transformers at small batch, where int8
# weights cut memory traffic 4x and the activation pass is cheap next to it (PyTorch's
# `quantize_dynamic` targets `nn.Linear` and `nn.LSTM`).
#
# ## 2. Batch-norm folding
#
# In eval mode a BatchNorm is a fixed per-channel affine map, and the layer before it is
# linear, so the two collapse into one layer (Jacob et al. 2018):
#
# $$ f_c = \frac{\gamma_c}{\sqrt{\sigma_c^2 + \epsilon}}, \qquad w'_c = f_c\, w_c, \qquad b'_c = (b_c - \mu_c)\, f_c + \beta_c $$
#
# We fold first, then quantize: the integer kernel runs one weight tensor and one bias, and
# the quantization error is measured on the weights that really run. Fold the first
# conv + BN of `cnn16` by hand:

# %%
conv, bn = model[0], model[1]
factor = bn.weight / torch.sqrt(bn.running_var + bn.eps)
w_folded = conv.weight * factor.reshape(-1, 1, 1, 1)
b_folded = (torch.zeros_like(bn.running_mean) - bn.running_mean) * factor + bn.bias  # this conv has no bias

w_ref, b_ref = fold_bn(conv.weight, conv.bias, bn)
assert torch.allclose(w_folded, w_ref, rtol=1e-6, atol=1e-7) and torch.allclose(b_folded, b_ref, rtol=1e-6, atol=1e-6)
with torch.no_grad():
    x = test_x[:8]
    by_hand = F.conv2d(x, w_folded, b_folded, padding=1)
    print("conv + BN vs folded conv, max |difference|:", (bn(conv(x)) - by_hand).abs().max().item())

folded = fold_batchnorm(model)
with torch.no_grad():
    y, y_folded = model(test_x), folded(test_x)
print("whole model: max |logit difference|", (y - y_folded).abs().max().item(),
      "| same predictions:", torch.equal(y.argmax(1), y_folded.argmax(1)),
      f"| accuracy {evaluate(model, digits.test):.2f}% -> {evaluate(folded, digits.test):.2f}%")
print(folded)

# %% [markdown]
# Folding is exact up to float rounding (about 1e-6 here): same predictions, same accuracy.
# The batch norms became `nn.Identity`, so layer names did not change. One thing did: each
# output channel's weights were multiplied by its own $f_c$, so the channels' ranges now
# differ more, which is why weights get one scale **per output channel**:

# %%
for name in ("0", "3", "7"):
    bn_c = model[int(name) + 1]
    f = (bn_c.weight / torch.sqrt(bn_c.running_var + bn_c.eps)).detach()
    w_max = folded.get_submodule(name).weight.detach().flatten(1).abs().amax(1)
    print(f"layer {name}: fold factors in [{f.min():.2f}, {f.max():.2f}]; after folding, the largest "
          f"channel range is {w_max.max() / w_max.min():.1f}x the smallest")

# %% [markdown]
# ### When folding hurts: a depthwise-separable model
#
# `cnn16`'s spread is mild. MobileNets (Howard et al. 2017, Sandler et al. 2018) replace each
# 3x3 convolution by a **depthwise** 3x3 convolution (`groups = channels`: one 3x3 filter per
# channel, 9 weights) and a **pointwise** 1x1 convolution that mixes the channels, each with
# BatchNorm and ReLU6. The zoo's `dsc16` is such a model. A depthwise filter sees a single
# channel, so its fold factor $f_c$ depends on that one channel's statistics alone, and
# nothing averages it out. On ImageNet this is what broke MobileNetV2: with per-tensor 8-bit
# weights it fell to 0.1% top-1, and cross-layer equalization plus bias correction brought it
# back to 70.9% (Nagel et al. 2019, DFQ; lesson 07 builds both). Measure the spread of `dsc16`
# next to `cnn16`'s, and what one scale per tensor costs:

# %%
def range_spread(float_model):
    """Per folded conv/linear layer: largest / median channel range max|w| (and whether depthwise)."""
    out = {}
    for name, layer in fold_batchnorm(float_model).named_modules():
        if isinstance(layer, (torch.nn.Conv2d, torch.nn.Linear)):
            r = layer.weight.detach().flatten(1).abs().amax(1)
            out[name] = ((r.max() / r.median()).item(), getattr(layer, "groups", 1) > 1)
    return out


dsc = models.pretrained("dsc16", seed=0)
print(f"dsc16: {models.count_parameters(dsc)} parameters, fp32 {evaluate(dsc, digits.test):.2f}%")
spreads = {}
for name, m in (("cnn16", model), ("dsc16", dsc)):
    spreads[name] = spread = range_spread(m)
    print(f"{name} largest / median channel range: " + ", ".join(
        f"{k}{'(dw)' if dw else ''} {v:.1f}" for k, (v, dw) in spread.items()))
widest_dw = max(v for v, dw in spreads["dsc16"].values() if dw)
widest_cnn = max(v for v, _ in spreads["cnn16"].values())
assert widest_cnn < 10 < 100 < widest_dw  # the text below: a few x for cnn16, hundreds for dsc16

granularity = {"per-tensor": PerTensor(), "per-channel": PerChannel(0)}
dsc_fp32 = evaluate(dsc, digits.test)
dsc_acc = {}
for bits in (8, 4):
    for g, gran in granularity.items():
        q = quantize_static(dsc, calib, QuantConfig(weight_bits=bits, act_bits=8, weight_granularity=gran))
        dsc_acc[(bits, g)] = evaluate(q, digits.test)
    print(f"dsc16 W{bits}A8: per-tensor {dsc_acc[(bits, 'per-tensor')]:.2f}%, "
          f"per-channel {dsc_acc[(bits, 'per-channel')]:.2f}%")
# the text below: one scale per tensor collapses to chance even at 8 bits; per-channel keeps fp32's accuracy
assert dsc_acc[(8, "per-tensor")] < 20 and dsc_acc[(4, "per-tensor")] < 20
assert dsc_acc[(8, "per-channel")] >= dsc_fp32 - 1 and dsc_acc[(4, "per-channel")] >= dsc_fp32 - 3

# %% [markdown]
# `cnn16`'s folded ranges spread a few times; some of `dsc16`'s depthwise layers spread
# **hundreds** of times, and one scale per tensor then takes the model to chance (10%), at 8
# bits as at 4, while per-channel scales keep the float accuracy. This is MobileNetV2's
# collapse in miniature. Where do such ranges come from?
#
# ### Dead channels and the fold
#
# Look at the fold of a depthwise layer, channel by channel:
# $w^{\mathrm{fold}}_c = \gamma_c\, w_c / \sqrt{\sigma_c^2 + \epsilon}$, with $\epsilon = 10^{-5}$.
# Its input channel $c$ comes from the previous pointwise layer's BN and ReLU6. `dsc16` was
# trained with MobileNetV2's recipe (`qlib/weights/train_zoo.py`): RMSprop with a large
# learning rate held for many epochs, and no weight decay on depthwise weights or BN
# parameters. One large step can push a pointwise channel's BN shift so low that its ReLU6
# outputs 0 on **every** input: the channel is *dead*. It gets no gradient again, so it
# stays dead.
# The depthwise filter after it sees only zeros, its BN running variance $\sigma_c^2$ decays
# to about 0, and the fold multiplies it by $|\gamma_c| / \sqrt{\epsilon} \approx 316\,|\gamma_c|$;
# its $w_c$ and $\gamma_c$ get no gradient and no decay, so nothing shrinks them. In float the
# channel multiplies zeros: harmless. Quantized with one scale per tensor, its range sets the
# scale, and the live channels' weights fall below half a step and round to 0. Find the dead
# channels of the shipped model, their variances and fold factors, and count the live
# channels whose 8-bit per-tensor codes are all 0:

# %%
def depthwise_input_max(float_model, x):
    """Per depthwise conv (its index in the model): the largest value each of its input
    channels takes over the batch ``x``, a tensor ``(channels,)``. 0 means dead on ``x``."""
    seen, hooks = {}, []
    for i, m in enumerate(float_model):
        if isinstance(m, torch.nn.Conv2d) and m.groups > 1:
            hooks.append(m.register_forward_pre_hook(
                lambda m, args, i=i: seen.update({i: args[0].amax(dim=(0, 2, 3))})))
    with torch.no_grad():
        float_model(x)
    for h in hooks:
        h.remove()
    return seen


folded_dsc = fold_batchnorm(dsc)
dsc_w8_tensor = quantize_static(dsc, calib, QuantConfig(weight_bits=8, act_bits=8, weight_granularity=PerTensor()))
dead_found = {}
for i, top in depthwise_input_max(dsc, digits.train.tensors[0]).items():
    dead = top == 0  # 0 on every training image: the ReLU6 before it never fires
    live = ~dead
    bn = dsc[i + 1]
    fold_factor = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).abs().detach()
    w = folded_dsc[i].weight.detach()
    r = w.flatten(1).abs().amax(1)
    fq = dsc_w8_tensor[i].weight_fq
    scale, zp = fq.qparams()
    codes = quantize(w, scale, zp, fq.observer.quant_min, fq.observer.quant_max)
    zeroed = live & (codes.flatten(1) == zp).all(1)  # live channels rounded to nothing
    dead_found[i] = (int(dead.sum()), (r.max() / r[live].median()).item(), int(zeroed.sum()), int(live.sum()))
    line = f"depthwise layer {i:2d}: {int(dead.sum())} of {len(dead)} input channels dead"
    if dead.any():
        line += (f"; running var dead {bn.running_var[dead].max():.0e} vs live median {bn.running_var[live].median():.2f}"
                 f"; fold factor dead {fold_factor[dead].max():.0f} vs live median {fold_factor[live].median():.2f}")
    print(line + f"; largest folded range / live median {dead_found[i][1]:.0f}"
                 f"; live channels all-zero at W8 per-tensor: {int(zeroed.sum())} of {int(live.sum())}")
# the text above: dead channels exist, and they (only they) make the huge ranges that zero live channels
assert any(n for n, *_ in dead_found.values())
for n_dead, spread, n_zeroed, n_live in dead_found.values():
    assert (spread > 100 and n_zeroed > n_live / 2) if n_dead else (spread < 10 and n_zeroed == 0)

# %% [markdown]
# Per-channel scales give the dead channels their own huge scale and leave the live ones
# alone. Without them, DFQ (Nagel et al. 2019) fixes the model before quantizing: cross-layer
# equalization shrinks each depthwise channel that is too wide and moves the factor into the
# matching channels of the pointwise layers before and after it (the float function stays the
# same), and bias correction removes the mean shift that rounding leaves (lesson 07 builds both;
# DFQ also absorbs the large biases that equalization creates). The benchmark measures three
# seeds, per-tensor and per-channel, with and without them:

# %%
bench = runtime.benchmark_result("ptq")
if bench is not None and "depthwise" in bench:
    d = bench["depthwise"]
    print(f"{d['model']}, seeds {bench['seeds']}: fp32 {format_spread(d['fp32'], digits=2)}")
    for c, per_g in d["accuracy"].items():
        for g, per_m in per_g.items():
            print(f"  {c} {g:12s} " + "  ".join(f"{m} {format_spread(s_, digits=1, bounds_width=0)}"
                                                for m, s_ in per_m.items()))
    shipped = [evaluate(models.pretrained("dsc16", seed=s), digits.test) for s in bench["seeds"]]
    if [round(v, 2) for v in d["fp32"]["values"]] != [round(v, 2) for v in shipped]:
        print("(these rows were measured on earlier dsc16 weights: re-run benchmarks/ptq.py)")
    else:  # the text below, on the shipped weights
        pt, pc = d["accuracy"]["W8A8"]["per_tensor"], d["accuracy"]["W8A8"]["per_channel"]
        assert max(pt["plain"]["max"], pt["bias_correction"]["max"]) < 50 < 90 < pt["cle"]["min"]
        assert pt["cle"]["mean"] > pc["plain"]["mean"] - 1
        w4t, w4c = d["accuracy"]["W4A8"]["per_tensor"], d["accuracy"]["W4A8"]["per_channel"]
        assert w4t["plain"]["max"] + 30 < w4t["cle+bias_correction"]["mean"] < w4c["plain"]["mean"]
        assert w4t["cle"]["min"] < w4c["plain"]["min"] - 5 and w4t["cle+bias_correction"]["min"] > 80

# %% [markdown]
# Read the W8A8 per-tensor row on the shipped weights: plain and bias correction alone stay
# near chance (when most live channels of a layer round to 0 there is little for bias
# correction to correct); cross-layer equalization shrinks the dead channels' ranges towards
# their neighbours' and brings it back to within about a point of per-channel scales. That
# is DFQ's MobileNetV2 result in miniature. CLE needs a positively homogeneous activation,
# so the benchmark equalizes a copy with ReLU in place of ReLU6 (its `fp32_relu` row). At
# W4A8 equalization alone leaves one seed far behind; with bias correction on top every seed
# is far above chance, but per-channel scales stay ahead. Lesson 07 shows how CLE and bias
# correction work.

# %% [markdown]
# ## 3. Integer-only inference
#
# Fake quantization computes in float. A deployed int8 model computes in integers (Jacob et
# al. 2018; gemmlowp, TFLite). For a layer with input codes $x_q$ (scale $s_x$, zero point
# $z_x$) and weight codes $w_q$ (per channel $s_w$, zero point 0):
#
# $$ \mathrm{acc} = \sum_k (x_q - z_x)\,w_q + b_q \quad\text{(int32)}, \qquad b_q = \mathrm{round}\!\left(\frac{b}{s_x s_w}\right), \qquad y \approx s_x s_w\,\mathrm{acc} $$
#
# The next layer wants codes with its own $(s_y, z_y)$: $y_q = \mathrm{clamp}(\mathrm{round}(M\,\mathrm{acc}) + z_y)$
# with $M = s_x s_w / s_y$. The chip has no float unit for $M$: it stores $M = m \cdot 2^{\,shift-31}$
# with an int32 $m \in [2^{30}, 2^{31})$ and applies it as an integer multiply and a rounding
# right shift. Let us run layer `3` of the W8A8 model that way.

# %%
layer3, layer7 = static8[3], static8[7]
s_x, z_x = layer3.input_fq.qparams()
s_w, z_w = layer3.weight_fq.qparams()
s_y, z_y = layer7.input_fq.qparams()  # ReLU and max-pool sit between: they commute with the scale

seen = {}
hook = layer3.register_forward_pre_hook(lambda m, args: seen.update(x=args[0]))
with torch.no_grad():
    y_fake = static8[:6](test_x[:16])  # fake-quant model up to layer 3's ReLU
hook.remove()

x_q = quantize(seen["x"], s_x, z_x, 0, 255)                          # uint8 input codes
w_q = quantize(layer3.weight.detach(), s_w, z_w, -128, 127, axis=0)  # int8 weight codes, per channel
b_q = torch.round(layer3.bias.detach().double() / (s_x.double() * s_w.double())).to(torch.int32)
acc = int_conv2d(x_q, w_q, int(z_x), 0, padding=1) + b_q.reshape(-1, 1, 1)  # int32 accumulator
print("codes:", x_q.dtype, w_q.dtype, "-> accumulator:", acc.dtype, tuple(acc.shape),
      f"range [{acc.min()}, {acc.max()}]")

M = s_x.double() * s_w.double() / s_y.double()  # one real multiplier per output channel
m, shift = quantize_multiplier(M)
print(f"M for channel 0: {M[0].item():.10f} = {m[0].item()} * 2^({shift[0].item()} - 31) "
      f"(relative error {abs(m[0].item() * 2.0 ** (shift[0].item() - 31) / M[0].item() - 1):.1e})")

y_q = requantize(acc.clamp_min(0), m.reshape(-1, 1, 1), shift.reshape(-1, 1, 1), z_y, 0, 255)  # ReLU: clamp at 0
want = quantize(torch.relu(y_fake), s_y, z_y, 0, 255)
diff = (y_q.int() - want.int()).abs()
print(f"integer codes vs fake-quant codes: {100 * (diff == 0).float().mean():.2f}% equal, largest difference "
      f"{diff.max().item()} code(s)")
assert diff.max() <= 1  # the summary's claim: integer inference agrees with fake quantization to within a code

# %% [markdown]
# The integer layer reproduces the fake-quant layer: codes agree, up to an occasional one-code
# difference where float rounding of the reference and the fixed-point multiplier land on
# different sides of a half. `convert_to_integer` does this for every layer of a converted
# model (ReLU as a clamp, max-pool on codes, average-pool as an integer sum with $1/n$ moved
# into the next multiplier), leaving only the final dequantization in float:

# %%
int8_model = convert_to_integer(static8)
layer = int8_model.graph_module.get_submodule("3")
print({k: (v.dtype, tuple(v.shape)) for k, v in layer.state_dict().items()})
with torch.no_grad():
    y_fq, y_int = static8(test_x), int8_model(test_x)
print(f"whole model: max |logit difference| {(y_fq - y_int).abs().max():.4f} "
      f"(logits span [{y_fq.min():.1f}, {y_fq.max():.1f}]); same prediction on "
      f"{100 * (y_fq.argmax(1) == y_int.argmax(1)).float().mean():.2f}% of the test digits")

# %% [markdown]
# Is the integer model *exactly* the fake-quant model? Not quite, and we can say why. The
# fake-quant layer adds its bias in float; the integer layer adds $b_q$, the bias rounded to
# the accumulator's grid $s_x s_w$. That shifts a value by up to half an accumulator unit,
# which is $M/2$ of an output code. At 8-bit activations $M$ is tiny; at 4 bits the codes
# are 16 times coarser, $M$ is larger, and values close to a rounding boundary cross it.
# Test the explanation: round the fake-quant model's biases to the same grid, and compare again.

# %%
def agreement(q, x):
    with torch.no_grad():
        y_q, y_i = q(x), convert_to_integer(q)(x)
    return 100 * (y_q.argmax(1) == y_i.argmax(1)).float().mean().item(), (y_q - y_i).abs().max().item()


x_agree = test_x[:runtime.pick(len(test_x), 120)]
w4a4 = quantize_static(models.pretrained("cnn16", seed=1), calib, QuantConfig(weight_bits=4, act_bits=4))
print("W4A4, seed 1: same prediction on %.1f%% of the digits, max |logit difference| %.3g" % agreement(w4a4, x_agree))
snapped = copy.deepcopy(w4a4)
with torch.no_grad():
    for layer in (snapped[i] for i in (0, 3, 7, 12)):
        grid = layer.input_fq.qparams()[0].double() * layer.weight_fq.qparams()[0].double()
        layer.bias.copy_((torch.round(layer.bias.double() / grid) * grid).float())
snapped_agree, snapped_diff = agreement(snapped, x_agree)
print("biases on the int32 grid: same prediction on %.1f%% of the digits, max |logit difference| %.3g"
      % (snapped_agree, snapped_diff))
assert snapped_agree == 100 and snapped_diff < 1e-4  # the next paragraph: they agree to float rounding

# %% [markdown]
# With the biases on the integer grid, the two models agree to float rounding: the
# fixed-point multipliers and the integer pooling add no error of their own here. The
# difference was the bias rounding alone, and at 4 bits it is large enough to change some
# predictions (in either direction). Fake quantization that keeps a float bias is a close,
# but not exact, simulation of the deployed integer model.
#
# ## 4. Measure: accuracy, size and latency
#
# Now the table: fp32, qlib's W8A8, W4A8 and W4A4 (fake-quant accuracy, and how often the
# integer path agrees with it), and PyTorch's x86 engine (FBGEMM/oneDNN int8 kernels;
# `torch_x86_quantize` runs `torch.ao.quantization`'s `prepare_fx`/`convert_fx` with its x86
# defaults: 8-bit only, 7-bit activation codes, a histogram observer, conv+ReLU fused).
#
# Why 7-bit activation codes (`reduce_range=True`: codes 0..127 instead of 0..255)? x86 CPUs
# without VNNI multiply int8 with `VPMADDUBSW`: it multiplies unsigned 8-bit activations by
# signed 8-bit weights and adds *pairs* of products into a **16-bit** result, which
# saturates. Two products of 255 x (-128) sum to -65280, far outside int16
# [-32768, 32767]; with activations below 128 the pair stays within 2 x 127 x 128 = 32512.
# FBGEMM therefore gives up one activation bit to stay exact; CPUs with VNNI (`VPDPBUSD`
# accumulates straight into int32) do not need it, but the default keeps models portable.
#
# Size counts the bytes of the stored tensors: the integer model stores int8 codes (also
# for 4-bit weights: torch has no int4 type), so we also count 4-bit codes packed two per
# byte, as real 4-bit kernels store them. Latency is measured side by side, interleaved, and
# reported as a ratio to fp32: absolute times depend on the machine and its load.

# %%
CONFIGS = {"W8A8": (8, 8), "W4A8": (4, 8), "W4A4": (4, 4)}
n_agree = runtime.pick(len(test_x), 120)


def tensor_bytes(module, packed_weight_bits=None):
    """Bytes of the tensors in module.state_dict(); integer weight codes at packed_weight_bits if given."""
    return sum(measure.tensor_bytes(t.numel(), packed_weight_bits) if packed_weight_bits and k.endswith("weight_q")
               else t.numel() * t.element_size() for k, t in module.state_dict().items())


rows = {"fp32 (folded)": {"acc": evaluate(folded, digits.test), "bytes": tensor_bytes(folded),
                 "file": measure.state_dict_bytes(folded)}}
quantized = {}
for label, (wb, ab) in CONFIGS.items():
    q = quantize_static(model, calib, QuantConfig(weight_bits=wb, act_bits=ab))
    iq = convert_to_integer(q)
    with torch.no_grad():
        agree = (q(test_x[:n_agree]).argmax(1) == iq(test_x[:n_agree]).argmax(1)).float().mean().item()
    rows[f"qlib {label}"] = {"acc": evaluate(q, digits.test), "agree": 100 * agree,
                             "bytes": tensor_bytes(iq, packed_weight_bits=wb), "file": measure.state_dict_bytes(iq)}
    quantized[label] = (q, iq)
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    x86 = torch_x86_quantize(model, calib)
rows["torch x86 int8"] = {"acc": evaluate(x86, digits.test), "file": measure.state_dict_bytes(x86)}

batch = test_x[:runtime.pick(64, 16)]
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    seconds = compare_latency({"fp32": model, "qlib W8A8 fake-quant": quantized["W8A8"][0],
                               "qlib W8A8 integer": quantized["W8A8"][1], "torch x86 int8": x86},
                              batch, repeats=runtime.pick(20, 3), warmup=runtime.pick(3, 1))
latency = {k: v / seconds["fp32"] for k, v in seconds.items()}

print(f"cnn16 seed 0, {len(test_x)} test digits; integer agreement on {n_agree} digits; "
      f"latency: batch {len(batch)}, {torch.get_num_threads()} thread(s)\n")
print(f"{'':16s} {'accuracy':>9s} {'int agrees':>10s} {'tensor bytes':>13s} {'torch.save':>11s}")
for name, r in rows.items():
    agree = f"{r['agree']:9.1f}%" if "agree" in r else f"{'-':>10s}"
    size = f"{r['bytes']:13d}" if "bytes" in r else f"{'-':>13s}"
    print(f"{name:16s} {r['acc']:8.2f}% {agree} {size} {r['file']:11d}")
size_ratio = rows["fp32 (folded)"]["bytes"] / rows["qlib W8A8"]["bytes"]
print(f"\nfolded fp32 / integer W8A8 tensor bytes: {size_ratio:.2f}x smaller")
# the summary's claim: at 8 bits PTQ is nearly free (within two test digits of fp32) and the
# model about 4x smaller (less than 4x: scales and int32 biases)
assert rows["qlib W8A8"]["acc"] >= rows["fp32 (folded)"]["acc"] - 2 * 100 / len(digits.test) - 1e-9
assert 3 < size_ratio < 4
print("\nlatency relative to fp32 (lower is faster):")
for k, v in latency.items():
    print(f"  {k:22s} {v:6.2f}x")

# %% [markdown]
# Read the latency honestly. qlib's fake-quant model does *more* work than fp32 (it
# quantizes and dequantizes around every float op), and qlib's integer path emulates int32
# arithmetic with readable tensor code: both exist to be correct and inspectable, not fast.
# Speed comes from kernels built for it, such as PyTorch's x86 engine; how much they win on a
# model this small depends on the CPU (its int8 instructions) and on overheads such as
# quantizing the input. Size, in contrast, shrinks as promised, about 4x at 8 bits, less the
# scales and int32 biases.
#
# The numbers above are one model (seed 0). The benchmark `benchmarks/ptq.py` measures the
# same over three seeds, every observer and MSE weight scales, runs the integer model of each
# `dsc16` row too (grouped convolutions and ReLU6 in integers), and saves
# `benchmarks/results/ptq.json`; if that file is here, we show its table.

# %%
bench = runtime.benchmark_result("ptq")
if bench is not None:

    def fmt(s):
        return format_spread(s, digits=2, width=6, bounds_width=0)

    print(f"benchmark of {bench['created']}, seeds {bench['seeds']}{' (fast mode)' if bench['fast'] else ''}, "
          f"torch {bench['versions']['torch']}, {bench['machine']['torch_threads']} thread(s)")
    print(f"  fp32                        {fmt(bench['fp32'])}")
    for label in CONFIGS:
        line = f"  qlib {label} (min-max)        {fmt(bench['accuracy'][label]['minmax']['minmax'])}"
        if "mse" in bench["accuracy"][label]:
            line += f"   MSE weights {fmt(bench['accuracy'][label]['mse']['minmax'])}"
        print(line)
    print(f"  torch x86 int8              {fmt(bench['torch_x86']['acc'])}")
    dsc_int = bench.get("depthwise", {}).get("integer_path")
    if dsc_int:  # accuracy of the integer model (agreement of its predictions with the fake-quant model's)
        print("  dsc16 integer model, plain / after CLE + bias correction:")
        for c, per_g in dsc_int.items():
            print(f"    {c} " + "; ".join(f"{g} " + " / ".join(
                f"{per_g[g][m]['acc']['mean']:.1f}% ({per_g[g][m]['agreement_with_fake_quant']['mean']:.0f}%)"
                for m in ("plain", "cle+bias_correction")) for g in per_g))
    print("  size ratios: " + ", ".join(f"{k} {v:.2f}x" for k, v in bench["size_ratio"].items()))
    print("  latency / fp32: " + ", ".join(f"{k} {v:.2f}" for k, v in bench["latency"]["time_ratio_vs_fp32"].items()))
    for t in bench["targets"]:
        print(f"  target {'met' if t['met'] else 'MISSED'}: {t['name']} ({t['value']:.3g})")

# %% [markdown]
# ## 5. Look

# %%
fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
names = list(rows)
axes[0].bar(names, [rows[n]["acc"] for n in names], color="tab:blue")
axes[0].set_ylim(min(r["acc"] for r in rows.values()) - 5, 100)
axes[0].set_ylabel("test accuracy (%)")
axes[0].set_title("accuracy (seed 0)")
sized = [n for n in names if "bytes" in rows[n]]
axes[1].bar(sized, [rows[n]["bytes"] / 1024 for n in sized], color="tab:green")
axes[1].set_ylabel("KiB of stored tensors (4-bit packed)")
axes[1].set_title("size")
axes[2].bar(list(latency), list(latency.values()), color="tab:orange")
axes[2].axhline(1.0, color="black", ls="--", lw=1)
axes[2].set_yscale("log")
axes[2].set_ylabel("time / fp32 time (log)")
axes[2].set_title(f"latency, batch {len(batch)}")
for ax in axes:
    ax.tick_params(axis="x", rotation=25)
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Summary
# - Static PTQ = fold, insert observers, calibrate, convert. Dynamic PTQ skips calibration
#   but computes ranges at run time: an extra pass and a float requantization per layer, no
#   fused int8 epilogue. CNNs are quantized statically for that cost; dynamic quantization
#   serves weight-bound layers (LSTM, transformer linears). One range per tensor makes a
#   sample's output depend on its batch; per-sample (per-token) scales remove that.
# - Batch-norm folding is exact in eval mode; fold before quantizing, and use per-channel
#   weight scales, since folding spreads the channels' ranges. Depthwise layers (MobileNet,
#   `dsc16`) spread them most: a dead ReLU6 channel leaves its depthwise channel a running
#   variance of about 0, folding scales it up hundreds of times, and one scale per tensor
#   then rounds the live channels to 0 (`dsc16` falls to chance at W8A8, as MobileNetV2 did).
#   Per-channel scales keep the float accuracy; so does cross-layer equalization before
#   per-tensor quantization (lesson 07).
# - Integer-only inference: int8 x int8 products summed in int32, an int32 bias with scale
#   $s_x s_w$, and requantization by a fixed-point multiplier $m \cdot 2^{shift-31}$. Layer by
#   layer it agrees with the fake-quant model to within a code, but not exactly: the
#   fake-quant model keeps a float bias, the integer model rounds it to the $s_x s_w$ grid,
#   and at W4A4 that changes some predictions. Fake quantization is a close approximation
#   of the deployed model, exact only once it simulates the bias rounding too; check the
#   integer model itself before you trust a low-bit accuracy.
# - At 8 bits, PTQ is nearly free in accuracy and the model is about 4x smaller; at 4 bits
#   accuracy depends on calibration (lesson 03), and QAT (lesson 05) recovers the rest.
# - Speed needs real int8 kernels: compare ratios measured side by side, on your machine.
#
# **Exercises**
# 1. In section 1, evaluate the dynamic models with batches of 8, 32 and 128. How does the
#    accuracy move, and why does batch size matter only for the dynamic model?
# 2. Quantize the *unfolded* model with `swap_modules` (no folding) at W4A4, and compare with
#    folding first. Where does the BatchNorm run, and in what precision?
# 3. In section 3, use `double_rounding=True` in `requantize` (gemmlowp's two-step rounding).
#    How many codes change at 8 bits? Quantize at 4 bits and count again.
# 4. Quantize `res16`, which has residual additions, and convert it to integers. How do the
#    two branches of an addition get a common scale (`qlib/accumulator.py`)?
# 5. Time the models of section 4 with batch 1 and batch 256. When does the x86 engine pay off?
