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
# # 00 · Welcome: why quantize a neural network?
#
# **What you will learn**
# - what *quantization* means: storing and computing a model's numbers with fewer bits;
# - why it matters: memory, speed and energy, measured on a real model;
# - how this course is organized, the dataset and the model zoo you will use;
# - how labs and self-checks work (in JupyterLab with nbgrader, or on Colab).
#
# A trained network is mostly numbers: weights and the activations flowing between layers.
# They are usually stored as 32-bit floats. Quantization replaces them by small integers
# (8, 4, even 2 bits) plus a *scale* that maps the integers back to real values:
#
# $$ x \approx \text{scale} \cdot (x_q - \text{zero\_point}), \qquad x_q \in \{q_{min}, \dots, q_{max}\} $$
#
# The whole course is about choosing those numbers well, so the model keeps its accuracy.

# %%
import torch
import matplotlib.pyplot as plt
import ipywidgets as ipw

import qlib
from qlib import data, measure, models, runtime
from qlib.widgets import interact  # ipywidgets.interact, drawn without an Output widget

print("qlib", qlib.__version__, "| torch", torch.__version__, "| fast mode:", runtime.fast())

# %% [markdown]
# ## 1. The dataset: real handwritten digits, offline
#
# The default dataset is scikit-learn's *digits*: 1797 real handwritten digits of 8x8 pixels.
# It ships with scikit-learn, so everything runs offline, on a laptop CPU, in seconds. The
# split is fixed (1078 train / 359 validation / 360 test). Models that want bigger inputs get
# the same digits upsampled to 16x16.

# %%
digits8 = data.load_digits(8)
digits16 = data.load_digits(16)
print("train / val / test:", len(digits8.train), len(digits8.val), len(digits8.test))
print("image shape:", digits8.image_shape, "and", digits16.image_shape)

fig, axes = plt.subplots(2, 10, figsize=(10, 2.4))
for i in range(10):
    x, y = digits8.test[i]
    axes[0, i].imshow(x[0], cmap="gray_r"); axes[0, i].set_title(int(y)); axes[0, i].axis("off")
    axes[1, i].imshow(digits16.test[i][0][0], cmap="gray_r"); axes[1, i].axis("off")
fig.suptitle("test digits at 8x8 (top) and upsampled to 16x16 (bottom)")
plt.show()

# %% [markdown]
# ## 2. The model zoo
#
# Five small models, each trained on the digits with three seeds. Their weights ship inside
# qlib (`qlib/weights/`), and `qlib/weights/train_zoo.py` reproduces them. Four are plain
# convolutional or fully connected networks (`models.ZOO`); `dsc16` is a MobileNet-style
# depthwise-separable network (`models.DEPTHWISE_ZOO`), the kind of model that is hard to quantize
# (lessons 03, 04 and 07).

# %%
info = models.zoo_info()
print(f"{'model':6s} {'params':>7s} {'input':>6s}   test accuracy (seeds 0, 1, 2)")
for name in models.ALL_MODELS:
    accs = [info["models"][name][str(s)]["test_acc"] for s in models.SEEDS]
    n = models.count_parameters(models.create(name))
    size = models.image_size(name)
    print(f"{name:6s} {n:7d} {size:>3d}x{size:<3d}  " + "  ".join(f"{a:.1f}" for a in accs))

model = models.pretrained("cnn16", seed=0)
print("\ncnn16 re-evaluated here:", f"{qlib.evaluate(model, digits16.test):.1f}% on the test set")

# %% [markdown]
# ## 3. Memory: bytes per number
#
# A parameter stored at $b$ bits takes $b/8$ bytes. Let us measure the model in float32,
# float16 and int8, and check the first two against what `torch.save` really writes.

# %%
for bits, label in [(32, "float32"), (16, "float16"), (8, "int8"), (4, "int4"), (2, "int2")]:
    print(f"{label:8s}: {measure.model_size_bytes(model, bits):8d} bytes")
# the claim of this lesson's summary: 4x smaller at 8 bits, 8x at 4
fp32_bytes = measure.model_size_bytes(model, 32)
assert fp32_bytes / measure.model_size_bytes(model, 8) == 4
assert abs(fp32_bytes / measure.model_size_bytes(model, 4) - 8) < 0.01

fp16_model = models.pretrained("cnn16").half()
print("\ntorch.save, float32:", measure.state_dict_bytes(model), "bytes (includes BN buffers and metadata)")
print("torch.save, float16:", measure.state_dict_bytes(fp16_model), "bytes")

# %% [markdown]
# Play with the bit width: how much smaller is a model at 4 bits? at 2 bits?

# %%
def show_size(bits=8):
    fp32 = measure.model_size_bytes(model, 32)
    q = measure.model_size_bytes(model, bits)
    print(f"{bits:2d} bits: {q} bytes, {fp32 / q:.1f}x smaller than float32")

interact(show_size, bits=ipw.IntSlider(value=8, min=2, max=32, step=1))

# %% [markdown]
# ## 4. Speed and energy
#
# Fewer bits mean fewer bytes to move from memory, and integer arithmetic is cheaper than
# float arithmetic. Memory traffic often dominates: reading a number from DRAM costs far more
# energy than multiplying it. Horowitz (ISSCC 2014, 45 nm) estimated about 0.2 pJ for an 8-bit
# integer multiply, 3.7 pJ for a 32-bit float multiply, and hundreds of pJ for a 32-bit DRAM
# read. Below we measure one thing you can see on any laptop: a matrix product in float32 and
# in bfloat16 on this machine. Integer kernels come later: lesson 04 runs a whole network in
# integer arithmetic (`qlib.intmodel`), and lesson 09 writes int8 matrix-product kernels in
# Triton (`qlib.kernels`, run by Triton's interpreter when there is no GPU).
#
# Two rules for timing (lesson 01 explains them): time the **operation alone** (the casts to
# bfloat16 happen once, before the clock starts: a cast inside the timed call adds two passes
# over memory to the product), and time the candidates **side by side**, interleaved, on one
# thread, reporting ratios of medians (`qlib.measure.side_by_side`). Lesson 01 measures the
# same product with the same helper, so the two lessons agree.

# %%
n = runtime.pick(512, 256)
gen = torch.Generator().manual_seed(0)
a, b = torch.randn(n, n, generator=gen), torch.randn(n, n, generator=gen)
a16, b16 = a.bfloat16(), b.bfloat16()  # cast once, outside the timed calls
times = measure.side_by_side({
    "float32": lambda: a @ b,
    "bfloat16": lambda: a16 @ b16,
    "bfloat16, casts inside the call": lambda: a.bfloat16() @ b.bfloat16(),
}, repeats=runtime.pick(10, 5))
for name, t in times.items():
    print(f"{n}x{n} matmul, {name:32s} {t * 1e3:7.2f} ms, speed-up over float32 {times['float32'] / t:5.2f}x")
print("CPU capability:", torch.backends.cpu.get_cpu_capability(),
      "(CPUs without bf16 units may even be slower in bfloat16: measure, don't assume)")

# %% [markdown]
# ## 5. A first taste: rounding the weights to 8 bits
#
# The simplest quantizer: divide every weight by a scale so the largest magnitude maps to 127,
# round, and multiply back. Lesson 02 builds this properly; here we only look at the error.

# %%
w = model[0].weight.detach()
scale = w.abs().max() / 127
w_q = torch.clamp(torch.round(w / scale), -128, 127)
w_dq = w_q * scale
print("int8 rounding error, max:", (w - w_dq).abs().max().item(), "<= scale/2 =", (scale / 2).item())
assert (w - w_dq).abs().max() <= scale / 2 * (1 + 1e-6)  # up to float32 rounding of w / scale
print("float16 cast error, max: ", measure.cast_error(w))

plt.figure(figsize=(6, 3))
plt.hist(w.flatten(), bins=60, alpha=0.6, label="float32 weights")
plt.hist(w_dq.flatten(), bins=60, alpha=0.6, label="after int8 round trip")
plt.legend(); plt.title("first conv layer of cnn16"); plt.show()

# %% [markdown]
# ## 6. How the course works
#
# | lessons (`lessons/`) | labs (`labs/`, graded) |
# |---|---|
# | 00 welcome, 01 numbers and precision, 02 linear quantization, 03 calibration, 04 post-training quantization | lab00 warm-up, lab01 linear quantization, lab02 calibration, lab03 PTQ |
# | 05 quantization-aware training | lab04 QAT |
# | 06 synthetic data, 07 distribution matching, 08 knowledge distillation | lab05 data-free, lab06 distillation |
#
# Each lab cell you fill in is followed by a test cell that calls a **self-check** from
# `qlib.check`. It prints `PASS` or tells you what was expected. The same checks run when your
# instructor grades with nbgrader (plus hidden ones on fresh random inputs), and on Colab.
# Here is one failing and then passing:

# %%
from qlib import check


def size_in_bytes(num_params, bits):
    return num_params * bits // 8  # forgets to round up: 3 numbers at 4 bits need 2 bytes


try:
    check.lab00.size_in_bytes(size_in_bytes)
except AssertionError as err:
    print(err)


def size_in_bytes(num_params, bits):
    return (num_params * bits + 7) // 8


check.lab00.size_in_bytes(size_in_bytes)

# %% [markdown]
# ## Summary
# - Quantization stores numbers as small integers plus a scale: 4x smaller at 8 bits, 8x at 4.
# - The course runs offline on the digits with a zoo of small pretrained models.
# - Labs check themselves with `qlib.check`, in JupyterLab, under nbgrader, and on Colab.
#
# **Exercises**
# 1. How many bytes would a 7-billion-parameter language model take at 16, 8 and 4 bits?
# 2. Which of the five zoo models is largest? Which would you deploy on a microcontroller
#    with 32 KB of flash, and at how many bits?
# 3. Re-run section 5 with `res16`: is the int8 rounding error still below scale/2?
