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
# # 10 · Domain shift: quantized models when the world moves
#
# **What you will learn**
# - what a *domain shift* is, and two ways to make one offline: corruptions of the test
#   digits at five severities, and a different source (digits printed in fonts);
# - how to measure whether quantization hurts *more* under shift: the
#   (shift x severity x bits) grid and the drop relative to fp32, over three seeds;
# - which data to calibrate a quantized model on when deployment data differs from training;
# - **AdaBN** (re-estimate BatchNorm statistics on unlabeled target images) for float and
#   quantized models (which step must come before folding), and **TENT** (entropy minimization);
# - an explorer widget: pick a shift and a severity, see the images, predictions and accuracy.
#
# ## Why it matters
#
# A model is trained on one distribution $p_S(x, y)$ (the *source*) and deployed on another,
# $p_T(x, y)$ (the *target*): a new camera, another hospital's scanner, dust on a lens, a
# different printer. When only the inputs move ($p_T(x) \neq p_S(x)$, same labelling rule)
# it is a *covariate shift*. A quantized model adds its own approximations on top: ranges
# calibrated on source data may clip or waste levels on the target, and its errors may grow
# faster than the float model's. Whether they do is a measurement, not a belief.

# %%
import ipywidgets as widgets
import matplotlib.pyplot as plt
import torch
from IPython.display import display

from qlib import data, models, runtime
from qlib.domain import adapt, evaluate as ev, shifts
from qlib.domain.printed import load_printed
from qlib.train import evaluate, format_spread

MODEL, SEED = "cnn16", 0
digits = data.load_digits(16)                   # the source: handwritten digits
printed = load_printed(16)                      # a different source of the same classes
train_x = digits.train.tensors[0]
BOUNDS = (train_x.min().item(), train_x.max().item())   # black and white pixels, standardized
calib = data.calibration_batches(digits.train, num_samples=256, seed=0)

fp32 = models.pretrained(MODEL, seed=SEED)
w8 = ev.quantize(fp32, calib, bits=8)           # static PTQ, calibrated on the source
w4 = ev.quantize(fp32, calib, bits=4)
variants = {"fp32": fp32, "W8A8": w8, "W4A4": w4}
for name, m in variants.items():
    print(f"{name:5s} clean test accuracy {evaluate(m, digits.test):5.1f} %")

# %% [markdown]
# ## 1. Build a corruption, then check it against qlib
#
# The models see *standardized* images ($x = (\text{pixel} - \mu)/\sigma$). A corruption is
# defined on pixels, so we map to $u \in [0, 1]$ with the black and white levels
# $(lo, hi)$, corrupt, clamp back into $[0, 1]$ and map back:
#
# $$ u = \frac{x - lo}{hi - lo}, \qquad u' = \mathrm{clamp}(u + \sigma_s\, \varepsilon, 0, 1),
#    \qquad x' = lo + u' (hi - lo), \qquad \varepsilon \sim \mathcal N(0, 1) $$
#
# The noise comes from a seeded `torch.Generator` on the images' device: same seed, same
# images, and the global random state is left alone. The clamp makes every corruption
# *bounded*: no pixel leaves $[lo, hi]$.

# %%
def my_gaussian_noise(x, sigma, seed, bounds):
    lo, hi = (torch.as_tensor(b, dtype=x.dtype, device=x.device) for b in bounds)
    u = ((x - lo) / (hi - lo)).clamp(0, 1)
    g = torch.Generator(device=x.device).manual_seed(seed)
    u = u + sigma * torch.randn(x.shape, generator=g, device=x.device, dtype=x.dtype)
    return lo + u.clamp(0, 1) * (hi - lo)


x = digits.test.tensors[0][:64]
sigma = shifts.PARAMS["gaussian_noise"][2]      # severity 3
mine = my_gaussian_noise(x, sigma, seed=0, bounds=BOUNDS)
theirs = shifts.corrupt(x, "gaussian_noise", 3, seed=0, bounds=BOUNDS)
print("max |mine - qlib| =", (mine - theirs).abs().max().item())
assert torch.allclose(mine, theirs, atol=1e-6)
assert mine.min() >= BOUNDS[0] - 1e-6 and mine.max() <= BOUNDS[1] + 1e-6

# %% [markdown]
# qlib has six corruptions (`shifts.SHIFTS`), each at severities 1-5. Their parameters are
# in `shifts.PARAMS`; they are mild on purpose, because these small models, trained without
# augmentation, break quickly. One row per shift, severity grows to the right:

# %%
fig, axes = plt.subplots(len(shifts.SHIFTS), 6, figsize=(7, 1.2 * len(shifts.SHIFTS)))
sample = digits.test.tensors[0][3:4]
for r, name in enumerate(shifts.SHIFTS):
    axes[r, 0].imshow(sample[0, 0], cmap="gray_r", vmin=BOUNDS[0], vmax=BOUNDS[1])
    axes[r, 0].set_ylabel(name, rotation=0, ha="right", fontsize=8)
    for sev in shifts.SEVERITIES:
        img = shifts.corrupt(sample, name, sev, seed=0, bounds=BOUNDS)
        axes[r, sev].imshow(img[0, 0], cmap="gray_r", vmin=BOUNDS[0], vmax=BOUNDS[1])
for ax in axes.flat:
    ax.set_xticks([]), ax.set_yticks([])
axes[0, 0].set_title("clean", fontsize=8)
for sev in shifts.SEVERITIES:
    axes[0, sev].set_title(f"severity {sev}", fontsize=8)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 2. A different source: printed digits
#
# `load_printed` typesets 0-9 in the fonts matplotlib ships (DejaVu, STIX, Computer Modern,
# bold and slanted), jitters them, and then makes them look like scikit-learn's digits
# (fit into 32x32, average 4x4 blocks, 17 grey levels, standardized with the handwritten
# training set's statistics). No download, a fixed split. Nothing is corrupted: the
# *source* differs.

# %%
fig, axes = plt.subplots(2, 10, figsize=(9, 2))
for i in range(10):
    axes[0, i].imshow(digits.test.tensors[0][i, 0], cmap="gray_r")
    axes[1, i].imshow(printed.test.tensors[0][i, 0], cmap="gray_r")
    axes[1, i].set_title(int(printed.test.tensors[1][i]), fontsize=8)
for ax in axes.flat:
    ax.set_xticks([]), ax.set_yticks([])
axes[0, 0].set_ylabel("hand"), axes[1, 0].set_ylabel("printed")
plt.show()
for name, m in variants.items():
    print(f"{name:5s} on printed digits: {evaluate(m, printed.test):5.1f} %")

# %% [markdown]
# ## 3. Does quantization hurt more under shift?
#
# For every corrupted test set we measure fp32, W8A8 and W4A4 (all calibrated on source
# digits) and the **drop** $\text{acc}_{fp32} - \text{acc}_{W4A4}$ on the same images. If
# quantization hurt more under shift, the drop would grow with the severity. Here is one
# seed, a few shifts (`qlib.domain.accuracy_grid` does the loops):

# %%
some = ("gaussian_noise", "blur", "contrast") if runtime.fast() else shifts.SHIFTS
grid = ev.accuracy_grid([fp32], digits.test, calib, shifts=some, severities=(1, 3, 5), bits=(32, 8, 4),
                        bounds=BOUNDS)
drop = ev.drop_grid(grid)
print(f"{'shift':18s} {'sev':>3s} {'fp32':>6s} {'W8A8':>6s} {'W4A4':>6s} {'drop W4':>8s}")
for name in some:
    for sev, cell in grid[name].items():
        print(f"{name:18s} {sev:>3s} {cell['fp32']['mean']:6.1f} {cell['W8A8']['mean']:6.1f} "
              f"{cell['W4A4']['mean']:6.1f} {drop[name][sev]['W4A4']['mean']:8.1f}")

# %% [markdown]
# One seed is one model: a point of difference is three test digits. `benchmarks/domain.py`
# runs the full grid (six shifts, five severities) on the three shipped seeds and saves
# `benchmarks/results/domain.json`; we read it, and print the drop of W4A4 and W8A8 with its
# spread, mean [min, max] over seeds, averaged over shifts at each severity:

# %%
fmt = format_spread  # mean [min, max], one decimal
bench = runtime.benchmark_result("domain")
if bench is not None:
    g, d = bench["grid"]["accuracy"], bench["grid"]["drop"]
    print(f"seeds {bench['seeds']}{' (fast mode)' if bench['fast'] else ''}; drop = fp32 - quantized, points\n")
    print(f"{'shift':16s} {'sev':>3s} {'fp32':>19s} {'drop W8A8':>19s} {'drop W4A4':>19s}")
    for name, by_sev in g.items():
        for sev, cell in by_sev.items():
            print(f"{name:16s} {sev:>3s} {fmt(cell['fp32']):>19s} {fmt(d[name][sev]['W8A8']):>19s} "
                  f"{fmt(d[name][sev]['W4A4']):>19s}")
    clean_drop = d["none"]["0"]["W4A4"]
    worse = [(n, s) for n, by in d.items() if n not in ("none",) for s, c in by.items()
             if c["W4A4"]["min"] > clean_drop["max"]]
    better = [(n, s) for n, by in d.items() if n not in ("none",) for s, c in by.items()
              if c["W4A4"]["max"] < clean_drop["min"]]
    print(f"\nW4A4 drop on clean digits: {fmt(clean_drop)}")
    print(f"cells where the W4A4 drop is larger than on clean digits for every seed: {worse}")
    print(f"cells where it is smaller for every seed: {better}")

# %% [markdown]
# How to read it. Compare each drop with the clean drop *and with the spread*: a cell
# counts only if every seed agrees (the two lists above). In the committed run:
#
# - W8A8 is essentially free everywhere: its mean drop is about 0 in every cell, and no
#   single seed loses more than about 2.5 points.
# - W4A4 loses 0.8-2.5 points on clean digits, and more than that, on every seed, in 24 of
#   the 31 shifted cells: all of contrast, inversion and elastic, rotation 2-5, moderate
#   noise and blur, and the printed digits. There quantization *does* hurt more under shift.
# - Not in the strongest noise and blur (severities 4-5): once fp32 is near failure, there
#   is little left for quantization to lose, both err on the same images, and the seeds
#   spread so widely that nothing is decided. Nor at severity 1 of noise, blur and rotation,
#   where the shift is too small to matter. So "quantization hurts more under shift" holds
#   for moderate shifts, not at every severity; the lists above are computed from the JSON,
#   so check them against this text.
#
# ## 4. Which data to calibrate on?
#
# Static PTQ fixes the activation ranges on calibration data. When the deployment data
# differs, which should it be? We compare W4A4 on printed digits calibrated on source
# digits, unlabeled printed digits, a mix, and Gaussian noise:

# %%
tgt = data.calibration_batches(printed.train, num_samples=256, seed=0)
mix = [torch.cat([s[:32], t[:32]]) for s, t in zip(calib, tgt)]
noise = [torch.randn(256, 1, 16, 16, generator=torch.Generator().manual_seed(0))]
table = ev.calibration_sources([fp32], {"source": calib, "target": tgt, "mix": mix, "noise": noise},
                               printed.test, bits=4)
for name, s in table.items():
    print(f"W4A4 calibrated on {name:7s}: {s['mean']:5.1f} % on printed digits")
if bench is not None:
    print("\nbenchmark, three seeds:")
    for bits, rows in bench["calibration"].items():
        for name, s in rows.items():
            print(f"  {bits} {name:30s} {fmt(s)}")

# %% [markdown]
# Calibrating on target images fixes the *ranges*, nothing else: the weights still compute
# features for handwritten digits. Over three seeds, source, target and mixed calibration
# give the same W4A4 accuracy on printed digits (within the spread), while the domain itself
# costs about 45 points. The synthetic (BN-statistics) images of lesson 06 reproduce the
# *source* statistics and do worse at W4A4, Gaussian noise worse still.
#
# ## 5. AdaBN: re-estimate BatchNorm statistics on the target
#
# Each BatchNorm normalizes with the running mean and variance of the *training*
# activations. On the target those are wrong. AdaBN re-estimates them on unlabeled target
# images and changes nothing else. From scratch:

# %%
import copy
from torch import nn


def my_adabn(model, batches):
    model = copy.deepcopy(model)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    model.eval()
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None              # cumulative average over all batches
        bn.train()                      # normalize with batch statistics, update running ones
    with torch.no_grad():
        for x in batches:
            model(x)
    for bn in bns:
        bn.momentum = 0.1
    return model.eval()


noisy_train = shifts.corrupt_dataset(digits.train, "gaussian_noise", 5, seed=1, bounds=BOUNDS)
noisy_test = shifts.corrupt_dataset(digits.test, "gaussian_noise", 5, seed=0, bounds=BOUNDS)
target_batches = data.calibration_batches(noisy_train, num_samples=256, seed=0)
mine, theirs = my_adabn(fp32, target_batches), adapt.adabn(fp32, target_batches)
for (k, a), (_, b) in zip(mine.state_dict().items(), theirs.state_dict().items()):
    assert torch.allclose(a.float(), b.float(), atol=1e-6), k
changed = [k for k, v in theirs.state_dict().items() if not torch.equal(v, fp32.state_dict()[k])]
print("entries changed by AdaBN:", sorted({k.split(".")[-1] for k in changed}))
print(f"fp32 on noise 5: {evaluate(fp32, noisy_test):5.1f} %  ->  with AdaBN: {evaluate(theirs, noisy_test):5.1f} %")

# %% [markdown]
# ### AdaBN for a quantized model: adapt before folding
#
# A quantized model has no BatchNorm left: PTQ folded each one into its conv's weights
# before choosing the scales. So "AdaBN on a quantized model" means going back to the float
# model: **adapt -> re-fold -> re-calibrate**. The re-fold gives new weights (and new weight
# scales); the re-calibration gives activation ranges for the re-normalized activations.
# Two alternatives: re-calibrate only (source BN statistics), or adapt and re-fold but keep
# the source activation ranges. And TENT: a few steps of entropy minimization on the BN
# affine parameters, starting from AdaBN statistics.

# %%
from qlib.domain.evaluate import ptq_config

cfg = ptq_config(4)
rows = {
    "fp32": evaluate(fp32, noisy_test),
    "fp32 + AdaBN": evaluate(adapt.adabn(fp32, target_batches), noisy_test),
    "W4A4, source calibration": evaluate(w4, noisy_test),
    "W4A4, re-calibrated only": evaluate(adapt.adabn_quantized(fp32, target_batches, cfg, order="recalibrate"),
                                         noisy_test),
    "W4A4, AdaBN, stale ranges": evaluate(adapt.adabn_quantized(fp32, target_batches, cfg, calib, "stale_ranges"),
                                          noisy_test),
    "W4A4, AdaBN -> fold -> calibrate": evaluate(adapt.adabn_quantized(fp32, target_batches, cfg), noisy_test),
}
tented = adapt.tent(fp32, target_batches, steps=runtime.pick(3, 1), lr=5e-3)
rows["fp32 + TENT"] = evaluate(tented, noisy_test)
rows["W4A4, TENT -> fold -> calibrate"] = evaluate(ev.quantize(tented, target_batches, 4), noisy_test)
for name, acc in rows.items():
    print(f"{name:34s} {acc:5.1f} %")

# %% [markdown]
# The benchmark repeats this on the printed digits and three corruptions, over the seeds:

# %%
if bench is not None:
    for target, rows in bench["adaptation"].items():
        print(target)
        for name, s in rows.items():
            print(f"   {name:34s} {fmt(s)}")

# %% [markdown]
# What the three seeds show:
#
# - AdaBN alone recovers most of a *statistical* shift for fp32 (contrast 5: from about
#   68 % to over 99 %; noise 5 and blur 5: tens of points). On printed digits, where the
#   *shapes* differ, it gains a few points only.
# - For W4A4, re-calibrating on the target recovers almost nothing: the ranges were not the
#   problem. Re-estimating the BN statistics **before folding** recovers most of the fp32
#   gain. Whether the activation ranges are then re-calibrated or kept from the source
#   makes no difference beyond the spread here: the re-normalized activations have nearly
#   the source ranges again, which is what AdaBN is for.
# - TENT (3 steps) is within the spread of AdaBN everywhere: with so little data and so few
#   steps, the entropy term adds little to the statistics.
#
# ## 6. Explore
#
# Pick a shift and a severity: the widget shows eight corrupted test digits with the
# predictions of the chosen model (green right, red wrong) and its accuracy on the whole
# corrupted test set. (Explicit widgets and `observe`: one evaluation of 360 digits per
# change, drawn once now.)

# %%
shift_w = widgets.Dropdown(options=("none",) + shifts.SHIFTS, value="gaussian_noise", description="shift")
sev_w = widgets.IntSlider(value=3, min=1, max=5, description="severity")
model_w = widgets.ToggleButtons(options=list(variants), value="fp32", description="model")
out = widgets.Output()


def show(_=None):
    images = digits.test.tensors[0]
    if shift_w.value != "none":
        images = shifts.corrupt(images, shift_w.value, sev_w.value, seed=0, bounds=BOUNDS)
    labels = digits.test.tensors[1]
    with torch.no_grad():
        pred = variants[model_w.value](images).argmax(1)
    acc = 100.0 * (pred == labels).float().mean().item()
    with out:
        out.clear_output(wait=True)
        fig, axes = plt.subplots(1, 8, figsize=(8, 1.4))
        for i, ax in enumerate(axes):
            ax.imshow(images[i, 0], cmap="gray_r", vmin=BOUNDS[0], vmax=BOUNDS[1])
            ax.set_title(f"{int(pred[i])}", color="green" if pred[i] == labels[i] else "red")
            ax.set_xticks([]), ax.set_yticks([])
        fig.suptitle(f"{model_w.value}, {shift_w.value} {sev_w.value if shift_w.value != 'none' else ''}: "
                     f"{acc:.1f} % on the test set", fontsize=9)
        plt.show()


for w in (shift_w, sev_w, model_w):
    w.observe(show, names="value")
show()
display(widgets.VBox([widgets.HBox([shift_w, sev_w]), model_w, out]))

# %% [markdown]
# ## Summary
# - A **domain shift** moves the input distribution. Corruptions (noise, blur, rotation,
#   contrast, inversion, elastic) at five severities and printed digits are two offline
#   targets; every corruption is seeded and bounded.
# - Whether quantization hurts **more** under shift is a per-cell question: compare the
#   fp32-minus-quantized drop with the clean drop and the seeds' spread. W8A8 costs nothing
#   measurable; W4A4 loses more at moderate severities, not at the strongest.
# - **Calibration data** fixes ranges, not features: calibrating on target images does not
#   change W4A4's accuracy on printed digits beyond the spread.
# - **AdaBN** (re-estimate BN statistics on unlabeled target images) recovers large parts of
#   statistical shifts. For a **quantized** model the statistics must be re-estimated on the
#   float model *before* folding; re-calibrating the ranges alone does not help. **TENT**
#   adds entropy minimization on BN's affine parameters (here: no gain beyond the spread).
#
# **Exercises**
# 1. Implement `rotation` yourself with `F.affine_grid` and `F.grid_sample`, and compare it
#    with `shifts.rotation` at 90 degrees against `torch.rot90`.
# 2. AdaBN needs a batch of target images. How many? Repeat section 5 with 16, 64 and 256
#    target images: when does AdaBN start to help?
# 3. Calibrate W4A4 with `act_observer="minmax"` instead of the percentile observer on
#    the noisy digits. Does the calibration source matter more or less?
# 4. Run section 3 for seeds 1 and 2 and check which of your seed-0 conclusions survive.
