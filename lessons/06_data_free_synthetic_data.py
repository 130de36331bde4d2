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
if "google.colab" in sys.modules:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q",
                    "qlib @ git+https://github.com/qdm-course/quantization-course@main"], check=True)

# %% [markdown]
# # 06 · Data-free quantization: calibrating with synthetic data
#
# **What you will learn**
# - why one would quantize a model *without* its training data, and what that costs;
# - three calibration sources that need no real image: Gaussian noise, images optimized to
#   match the model's BatchNorm statistics (ZeroQ), and a trained generator (GDFQ);
# - how to build the BN-statistics loss with forward hooks, and check it against qlib;
# - what synthetic digits look like, and how their loss falls during optimization;
# - how accurate `cnn16` is at 8, 6 and 4 bits with each source, against real data.
#
# ## Why data-free?
#
# Post-training quantization (lesson 04) needs a few hundred inputs to calibrate the
# activation ranges. Often those inputs are not available to whoever quantizes the model:
#
# - **privacy**: medical images or bank transactions may not leave the hospital or the bank,
#   but the trained model may (GDPR, HIPAA, contracts);
# - **the data is gone**: deleted after training, licensed for training only, or the model
#   came from a model hub without it;
# - **the data is too large to ship**: a vendor compiling a customer's model for a chip gets
#   the weights (megabytes), not the training set (terabytes).
#
# | | |
# |---|---|
# | **advantages** | privacy (no real sample is touched); efficiency (seconds of synthesis instead of a data pipeline); scalability (one procedure for every model with BatchNorm, any number of calibration images) |
# | **challenges** | accuracy loss at low bit widths; quality of synthetic data (it matches *statistics*, not images); model-specific adaptations (needs BatchNorm; input range and shape must be known; a generator's architecture depends on the task) |
#
# The trick that makes it work: every BatchNorm layer stores the running mean and variance of
# the activations it saw during training. That is a summary of the training data, kept inside
# the model. We will turn it back into inputs.

# %%
import time

import matplotlib.pyplot as plt
import torch
from torch import nn

from qlib import data, models, runtime, viz
from qlib.datafree import (Generator, bn_statistics_loss, gaussian_batches, generator_batches,
                           synthesize_bn, train_generator)
from qlib.modules import QuantConfig
from qlib.ptq import quantize_static
from qlib.train import evaluate, format_spread

MODEL, SEED = "cnn16", 0
N_IMAGES = runtime.pick(256, 64)        # calibration images per source
BN_STEPS = runtime.pick(100, 20)        # Adam steps of the BN-statistics optimization
GEN_STEPS = runtime.pick(200, 20)       # training steps of the generator
print("fast mode:", runtime.fast(), "| images:", N_IMAGES, "| BN steps:", BN_STEPS, "| generator steps:", GEN_STEPS)

digits = data.load_digits(16)
model = models.pretrained(MODEL, seed=SEED)
shape = digits.image_shape                       # (1, 16, 16)
train_x = digits.train.tensors[0]
# the standardized values of a black and a white pixel: known from the preprocessing, not from images
INPUT_RANGE = (train_x.min().item(), train_x.max().item())
print(f"{MODEL} seed {SEED}: fp32 test accuracy {evaluate(model, digits.test):.1f} %")

# %% [markdown]
# We use `cnn16`: on it the calibration sources differ most (`cnn8` and the MLP are nearly
# indifferent to what you calibrate with). Real digits appear below only as the comparison
# row and to measure test accuracy.
#
# ## 1. Build it: the BN-statistics loss
#
# For a batch $x$, let $\tilde\mu_l, \tilde\sigma_l$ be the per-channel mean and standard
# deviation of the activation *entering* BatchNorm $l$ (model in eval mode, so nothing is
# updated), and $\mu_l, \sigma_l = \sqrt{\text{running\_var}_l + \varepsilon}$ the stored
# ones. ZeroQ (Cai et al., CVPR 2020) minimizes, over the pixels of $x$,
#
# $$ L_{BN}(x) = \sum_l \frac{1}{C_l}\|\tilde\mu_l - \mu_l\|_2^2 + \frac{1}{C_l}\|\tilde\sigma_l - \sigma_l\|_2^2 $$
#
# (the paper writes plain norms, its code squared norms averaged over the $C_l$ channels;
# qlib follows the code, lab 05 the paper). Forward pre-hooks catch each BatchNorm's input:

# %%
def my_bn_loss(model, x):
    """ZeroQ's BN-statistics loss (squared, channel-averaged), built with forward pre-hooks."""
    model.eval()
    seen = []
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    hooks = [bn.register_forward_pre_hook(lambda mod, args: seen.append((mod, args[0]))) for bn in bns]
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
    loss = x.new_zeros(())
    for bn, a in seen:
        mu = a.mean(dim=(0, 2, 3))
        sigma = torch.sqrt(a.var(dim=(0, 2, 3), unbiased=False) + bn.eps)
        loss = loss + ((mu - bn.running_mean) ** 2).mean() \
                    + ((sigma - torch.sqrt(bn.running_var + bn.eps)) ** 2).mean()
    return loss

x = torch.randn(32, *shape, generator=torch.Generator().manual_seed(1))
mine, ref = my_bn_loss(model, x), bn_statistics_loss(model, x)
torch.testing.assert_close(mine, ref)
print(f"my loss {mine.item():.5f} == qlib.datafree.bn_statistics_loss {ref.item():.5f}")

# %% [markdown]
# The real thing: how far are noise and real digits from the stored statistics?
# (`input_mean=0, input_std=1` adds the same kind of term for the input pixels, whose
# statistics are known from the standardization.)

# %%
noise = gaussian_batches(shape, N_IMAGES, batch_size=N_IMAGES, seed=SEED)[0]
real = data.calibration_batches(digits.train, N_IMAGES, batch_size=N_IMAGES, seed=SEED)[0]
with torch.no_grad():
    loss_noise = bn_statistics_loss(model, noise, input_mean=0.0, input_std=1.0).item()
    loss_real = bn_statistics_loss(model, real, input_mean=0.0, input_std=1.0).item()
print(f"BN-statistics loss: Gaussian noise {loss_noise:.4f}, real digits {loss_real:.4f}")
assert loss_real < loss_noise, "real digits should match the BN statistics better than noise"

# %% [markdown]
# ## 2. Three synthetic calibration sets
#
# - **noise**: $x \sim \mathcal N(0, 1)$, the right mean and spread for standardized pixels
#   and nothing else;
# - **BN-statistics (ZeroQ)**: start from noise, take Adam steps on the pixels to minimize
#   $L_{BN}$; pixels are clamped to the valid range after each step
#   (`qlib.datafree.synthesize_bn`);
# - **generator (GDFQ, Xu et al., ECCV 2020)**: a small network $G(z, y)$ trained so that
#   the frozen model classifies $G(z, y)$ as $y$ *and* its BN statistics match; afterwards it
#   draws as many fresh images as you like (`qlib.datafree.Generator`, `train_generator`).

# %%
t = time.perf_counter()
synth = synthesize_bn(model, shape, N_IMAGES, batch_size=N_IMAGES, steps=BN_STEPS, lr=0.5,
                      input_mean=0.0, input_std=1.0, input_range=INPUT_RANGE, seed=SEED)
t_bn = time.perf_counter() - t

t = time.perf_counter()
gen = Generator(shape, digits.num_classes, latent_dim=64, width=16, input_range=INPUT_RANGE, seed=SEED)
gen_history = train_generator(gen, model, steps=GEN_STEPS, batch_size=32, lr=5e-3, seed=SEED)
gen_images = torch.cat(generator_batches(gen, N_IMAGES, batch_size=N_IMAGES, seed=SEED))
t_gen = time.perf_counter() - t
with torch.no_grad():
    loss_gen = bn_statistics_loss(model, gen_images, input_mean=0.0, input_std=1.0).item()
print(f"BN synthesis: {t_bn:.1f} s, loss {synth.history[0]:.4f} -> {synth.history[-1]:.4f}")
assert synth.history[-1] < synth.history[0], "the optimization should lower the BN-statistics loss"
print(f"generator:    {t_gen:.1f} s, loss of its images {loss_gen:.4f}")

# %% [markdown]
# ## 3. Look: the loss falls, the images stay strange
#
# The loss of the optimized images falls by orders of magnitude, towards (sometimes below)
# that of a batch of real digits:

# %%
fig, ax = plt.subplots(figsize=(6.4, 3.4))
ax.semilogy(synth.history, label="BN-statistics images (ZeroQ)")
ax.axhline(loss_noise, color="gray", ls="--", label="Gaussian noise")
ax.axhline(loss_real, color="green", ls="--", label="real digits")
ax.axhline(loss_gen, color="purple", ls=":", label="generator images")
ax.set_xlabel("Adam step"); ax.set_ylabel("BN-statistics loss"); ax.legend(fontsize=8)
ax.set_title(f"{MODEL}: matching BatchNorm statistics ({N_IMAGES} images)")
plt.show()

# %% [markdown]
# Matching statistics is not the same as drawing digits. The synthetic images carry
# stroke-like local structure where the convolutions expect it, but a person would not read
# them as digits. For calibration that is enough: only the *ranges* of activations matter.

# %%
rows = {"real digits": real, "Gaussian noise": noise, "BN-statistics": synth.x,
        "generator": gen_images}
fig, axes = plt.subplots(len(rows), 10, figsize=(10, 1.15 * len(rows) + 0.4))
for r, (name, imgs) in enumerate(rows.items()):
    with torch.no_grad():
        pred = model(imgs[:10]).argmax(1)
    for c in range(10):
        ax = axes[r, c]
        ax.imshow(imgs[c, 0].clamp(*INPUT_RANGE), cmap="gray_r", vmin=INPUT_RANGE[0], vmax=INPUT_RANGE[1])
        ax.set_xticks([]); ax.set_yticks([])
        ax.set_title(f"pred {int(pred[c])}", fontsize=7)
    axes[r, 0].set_ylabel(name, fontsize=8, rotation=0, ha="right", va="center")
fig.suptitle("calibration images and what the fp32 model predicts for them")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 4. Measure: accuracy after calibrating with each source
#
# Static PTQ as in lesson 04 (weights symmetric per-channel, activations affine per-tensor,
# BN folded), calibrated on each set in turn, evaluated on the 360 test digits. Min-max
# activation ranges at 8, 6 and 4 bits, and the 99.9th-percentile observer at 4 bits.
#
# **Fast mode numbers are noisy**: one model seed, 64 images, 20 optimization steps; one test
# digit is 0.28 points and at 4 bits the spread over seeds is several points. Section 5 shows
# the full benchmark (three seeds, 256 images).

# %%
sources = {"real": [real], "noise": [noise], "BN-statistics": [synth.x], "generator": [gen_images]}
configs = {f"W{b}A{b} min-max": QuantConfig(weight_bits=b, act_bits=b) for b in (8, 6, 4)}
configs["W4A4 percentile"] = QuantConfig(weight_bits=4, act_bits=4, act_observer="percentile",
                                         act_observer_kwargs={"percentile": 99.9})
fp32 = evaluate(model, digits.test)
acc = {s: {c: evaluate(quantize_static(model, batches, cfg), digits.test) for c, cfg in configs.items()}
       for s, batches in sources.items()}

print(f"fp32: {fp32:.1f} %   (test accuracy %, {MODEL} seed {SEED})")
print(f"{'calibration':15s}" + "".join(f"{c:>18s}" for c in configs))
for s, row in acc.items():
    print(f"{s:15s}" + "".join(f"{v:18.1f}" for v in row.values()))

# %%
ax = viz.plot_grouped_bars(list(configs), {s: list(row.values()) for s, row in acc.items()},
                           ylabel="test accuracy (%)", title=f"{MODEL}: calibration source vs bit width")
ax.axhline(fp32, color="black", lw=0.8, ls="--")
ax.set_ylim(max(0, min(min(r.values()) for r in acc.values()) - 5), 100)
plt.show()

# %% [markdown]
# What to read off: at 8 and 6 bits every source is as good as real data (the ranges barely
# matter). At 4 bits with min-max ranges, noise calibration falls behind: its activations
# have the wrong ranges, and min-max copies them exactly. BN-statistics images and the
# generator come close to real data. Percentile clipping narrows every gap, because it
# ignores the outliers that a poor calibration set produces.
#
# ## 5. The full benchmark (three seeds)
#
# `benchmarks/datafree.py` runs this comparison on the three shipped `cnn16` seeds with 256
# images (mean [min, max] over seeds); the table below is read from its JSON.

# %%
bench = runtime.benchmark_result("datafree")
if bench is not None:
    print(f"{bench['settings']['model']}, seeds {bench['seeds']}{' (fast run)' if bench['fast'] else ''}; "
          f"fp32 {bench['fp32']['mean']:.1f} %")
    for obs in bench["settings"]["observers"]:
        cols = list(next(iter(bench["accuracy"].values())))
        print(f"\n{obs} activations      " + "".join(f"{c:>22s}" for c in cols))
        for src, per in bench["accuracy"].items():
            print(f"  {src:18s}" + "".join(
                format_spread(per[c][obs], width=8, bounds_width=5) for c in cols))
    print()
    for tgt in bench.get("targets", []):
        print(("MET    " if tgt["met"] else "MISSED ") + tgt["name"])

# %% [markdown]
# ## Summary
#
# - A BatchNorm model carries a summary of its training data: per-channel means and
#   variances. Data-free quantization uses it instead of the data.
# - Noise has the right pixel statistics but the wrong activation statistics; it is fine at
#   8 and 6 bits and falls behind at 4 bits with min-max ranges on `cnn16`.
# - ZeroQ optimizes the pixels of noise images to match the BN statistics; a GDFQ generator
#   learns to produce such images (plus class information) and can draw fresh ones.
# - Neither produces recognizable digits, and neither needs to: calibration only needs the
#   activation ranges to be right. Percentile clipping makes every source more robust.
# - The price: synthesis time, the need for BatchNorm and a known input range, and remaining
#   gaps at very low bit widths. Look at several seeds before concluding (lab 05 and the
#   benchmark do).
#
# ## Exercises
#
# 1. Run the BN optimization without `input_range` and without the input term
#    (`input_mean=None, input_std=None`). How do the images and the W4A4 min-max accuracy change?
# 2. Change `SEED` to 1 and 2. Which conclusions survive, which were noise?
# 3. Add W3A3 to `configs`. Does any synthetic source still match real data?
# 4. Give `synthesize_bn` a class term (`ce_weight=0.1, num_classes=10`) and look at the
#    predictions in the image grid. Does it help calibration?
# 5. Try `cnn8` instead of `cnn16`: why does noise calibration hurt far less there?
#    (Hint: compare the BN-statistics loss of noise for both models.)
