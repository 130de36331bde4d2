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
# # 12 · Transfer learning with quantized models
#
# **What you will learn**
# - how pretrained models (ResNet for images, BERT and GPT for text) are reused: keep the
#   *backbone*, train a new *head*, or fine-tune everything;
# - where quantization fits in: a frozen quantized backbone with a float or quantized head,
#   QAT fine-tuning of the whole network, and what changes with only 10 labels per class;
# - data-free: quantizing a transferred model without target data, and why the BatchNorm
#   statistics it relies on describe the *old* domain;
# - the edge scenario: a device that may only re-estimate BatchNorm statistics.
#
# ## The setting
#
# Large models are trained once on a lot of data and reused many times: a ResNet pretrained
# on ImageNet is the starting point for medical images; BERT and GPT are fine-tuned for
# classification or chat. On a device, the reused model must also be small and integer.
# Our version fits on a laptop: `cnn16`, pretrained on **handwritten** digits, reused on
# **printed** digits (`qlib.domain.load_printed`), where it scores about 55 % out of the box.

# %%
import torch

from qlib import data, models, runtime
from qlib.domain import adapt, transfer as T
from qlib.domain.evaluate import ptq_config, quantize
from qlib.domain.printed import load_printed
from qlib.modules import fake_quantizers
from qlib.train import evaluate, format_spread

hand, printed = data.load_digits(16), load_printed(16)
model = models.pretrained("cnn16", seed=0)
tgt = data.calibration_batches(printed.train, num_samples=256, seed=0)   # unlabeled target images
src = data.calibration_batches(hand.train, num_samples=256, seed=0)
print(f"cnn16 on handwritten digits {evaluate(model, hand.test):5.1f} %, on printed digits "
      f"{evaluate(model, printed.test):5.1f} % (zero-shot)")

# %% [markdown]
# ## 1. Backbone and head
#
# Every zoo model is an `nn.Sequential` whose last layer is the classifier. The backbone
# maps an image to 64 features; the head maps features to 10 logits. Splitting and
# recombining must give the same function:

# %%
backbone, head = T.split_head(model)
x = printed.test.tensors[0][:8]
with torch.no_grad():
    assert torch.equal(head(backbone(x)), model(x))
print(backbone[-2:], "->", head)

# %% [markdown]
# ## 2. A frozen quantized backbone with a new head
#
# Quantize the backbone once (W4A4 static PTQ, calibrated on unlabeled printed digits) and
# freeze it. A new linear head is trained on its features: they are computed once, so
# training the head takes a second. The head can stay float or be quantized too (calibrated
# on the backbone's features).

# %%
qb = T.quantized_backbone(model, tgt, bits=4)
float_backbone_head = T.train_head(backbone, printed.train)
q_backbone_head = T.train_head(qb, printed.train)
q_all = T.quantize_head(q_backbone_head, tgt, bits=4)
assert fake_quantizers(q_all[1])
rows = {
    "zero-shot fp32": evaluate(model, printed.test),
    "frozen fp32 backbone + new head": evaluate(float_backbone_head, printed.test),
    "frozen W4A4 backbone + float head": evaluate(q_backbone_head, printed.test),
    "frozen W4A4 backbone + W4A4 head": evaluate(q_all, printed.test),
}
for name, acc in rows.items():
    print(f"{name:36s} {acc:5.1f} %")

# %% [markdown]
# ## 3. Few labels, and QAT fine-tuning
#
# Labels are expensive. With 10 printed digits per class (100 images), a new head still
# fits on frozen features; fine-tuning the whole network with QAT has far more parameters to
# move with the same 100 images. With all labels, QAT fine-tuning can adapt the features
# themselves.

# %%
few = T.few_shot(printed.train, per_class=10, seed=0)
EPOCHS = runtime.pick(10, 1)
rows = {
    "few-shot: frozen W4A4 backbone + head": evaluate(T.train_head(qb, few), printed.test),
    f"QAT W4A4 fine-tune, all labels ({EPOCHS} ep.)": evaluate(T.qat_finetune(model, printed.train, None, 4,
                                                                             epochs=EPOCHS), printed.test),
    f"QAT W4A4 fine-tune, 10/class ({EPOCHS} ep.)": evaluate(T.qat_finetune(model, few, None, 4, epochs=EPOCHS),
                                                             printed.test),
}
for name, acc in rows.items():
    print(f"{name:40s} {acc:5.1f} %")

# %% [markdown]
# ## 4. Data-free: quantize the transferred model without target data
#
# Suppose the new head was trained elsewhere and the quantizer gets only the float model.
# It can calibrate on target images if it has them, on source images, or on synthetic
# images made from the model's BatchNorm statistics (lesson 06). But those statistics were
# gathered on the **source**: the synthetic images imitate handwritten digits' activations,
# not printed ones.

# %%
synth = T.synthetic_calibration(backbone, (1, 16, 16), num_samples=128, steps=runtime.pick(100, 20))
for name, batches in (("target images", tgt), ("source images", src), ("synthetic (BN statistics)", synth)):
    print(f"transferred fp32 -> W4A4, calibrated on {name:26s} "
          f"{evaluate(quantize(float_backbone_head, batches, 4), printed.test):5.1f} %")

# %% [markdown]
# ## 5. The edge scenario: only BatchNorm statistics
#
# A sensor in a hospital or a factory (industrial IoT) sees its own data, has no labels and
# no budget for backpropagation, but can run forward passes. AdaBN needs exactly that: one
# pass over unlabeled local images to re-estimate BN statistics, then re-fold and re-calibrate
# (lesson 10). No weight is trained, nothing leaves the device.

# %%
on_device = adapt.adabn_quantized(model, tgt, ptq_config(4))
print(f"W4A4, source calibration:          {evaluate(quantize(model, src, 4), printed.test):5.1f} %")
print(f"W4A4 after on-device AdaBN only:   {evaluate(on_device, printed.test):5.1f} %")

# %% [markdown]
# ## 6. Over three seeds
#
# `benchmarks/domain.py` repeats every variant for the three shipped seeds (10 QAT epochs,
# 200 head steps) and saves `benchmarks/results/domain.json`:

# %%
bench = runtime.benchmark_result("domain")
if bench is not None:
    print(f"seeds {bench['seeds']}{' (fast mode)' if bench['fast'] else ''}: printed-digit test accuracy, "
          "mean [min, max]\n")
    rows = bench["transfer"]
    for name, s in rows.items():
        print(f"  {name:50s} {format_spread(s)}")
    best = max(rows, key=lambda k: rows[k]["mean"])
    print(f"\nbest on average: {best}")

# %% [markdown]
# What the three seeds show (check against the table):
#
# - labels close most of the domain gap: from about 53 % zero-shot to about 86 % with a new
#   head on the frozen fp32 backbone, and the same with QAT fine-tuning of everything;
# - a frozen **W4A4** backbone costs about 6 points against the fp32 one, and quantizing the
#   head as well costs nothing more;
# - **train the head on quantized features**: the same fp32 model quantized to W4A4 *after*
#   transfer keeps only about 61 % (whatever the calibration data), 20 points below a head
#   trained on the quantized backbone's features, which learns to live with its rounding;
# - with **10 labels per class** the frozen backbone + head (about 77 %) beats QAT
#   fine-tuning of the whole network (about 70 %): few labels, few parameters;
# - **data-free** calibration of the transferred model is worse than target or source
#   calibration (about 44 % against 61 %, with a wide spread): BN-statistics images imitate
#   the old domain;
# - **AdaBN alone** does not help on printed digits (a change of shapes, not of statistics),
#   while on the corruptions of lesson 10 it recovered tens of points: on-device adaptation
#   by BN statistics is a tool for sensor drift, not for a new kind of input.
#
# ## Summary
# - Transfer = reuse a backbone, train a head (cheap, few labels suffice) or fine-tune all
#   (more labels, more compute). With quantization: quantize the backbone first and train the
#   head on quantized features, or fine-tune with QAT.
# - Data-free calibration of a transferred model reproduces the *source* statistics stored
#   in its BatchNorms: it is not a substitute for target data when the domain changed.
# - On a device, AdaBN needs only forward passes over unlabeled local data.
#
# **Exercises**
# 1. Digits 0-4 -> 5-9: train `cnn8` on the digits 0-4 only, then reuse its backbone for
#    5-9 with a new 5-class head. How does it compare with a model trained on 5-9 from scratch
#    with 10 labels per class?
# 2. Quantize the backbone to W8A8 instead of W4A4 in section 2: which rows change by more
#    than a point?
# 3. In section 4, run AdaBN on the target before the synthetic calibration
#    (`adapt.adabn(backbone, tgt)`): do the synthetic images now help?
