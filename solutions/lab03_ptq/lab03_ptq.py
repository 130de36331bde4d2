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

# %% [markdown] nbgrader={"grade": false, "grade_id": "intro", "locked": true, "schema_version": 3, "solution": false, "task": false}
# # Lab 03 · Post-training quantization: fold, calibrate, convert
#
# You will build static post-training quantization (lesson 04) yourself, then design a 4-bit
# one, then do the arithmetic of a quantized layer the way an integer-only chip does it:
#
# | question | what | points |
# |---|---|---|
# | Q1 | `fold_bn`: fold a batch norm into the layer before it | 2 |
# | Q2 | `fold_model`: fold a whole model | 2 |
# | Q3 | `calibrate`: observers record ranges of the float model | 2 |
# | Q4 | `convert`: freeze the ranges, switch quantization on | 1 |
# | Q5 | `ptq`: the whole pipeline; W8A8 within 1 point of fp32 | 2 |
# | Q6 | written: predict, then measure, where W4A4 loses its accuracy | 2 (graded by hand) |
# | Q7 | `w4a4_settings`: your W4A4 design must reach a target | 3 |
# | Q8 | the zero-point expansion: `zero_point_offset`, `int_linear` | 2 |
# | Q9 | fixed-point requantization: `quantize_multiplier`, `requantize` | 3 |
#
# You may use `QuantConfig`, `swap_modules` and `fake_quantizers` from `qlib.modules`, not
# `qlib.fold`, `qlib.ptq`, `qlib.intops` or `qlib.requant` in your answers (those are what you
# are rebuilding); Q7's check quantizes with `qlib.ptq` itself.
#
# - Fill in every cell that says `# YOUR CODE HERE` (delete the `raise NotImplementedError()`).
# - The cell after each answer runs a **self-check**: it prints `PASS` or says what was expected.
#   When your instructor grades the lab, hidden checks on fresh random inputs run as well.
# - **Run All stops at the first failing self-check** (or the first answer not written yet):
#   that is expected while you work. Fix that answer, or run the cells below it one by one
#   (Shift+Enter) to see the other checks.
# - Do not rename the functions. Run the notebook top to bottom before you submit.

# %% nbgrader={"grade": false, "grade_id": "imports", "locked": true, "schema_version": 3, "solution": false, "task": false}
import copy

import torch
from torch import nn

from qlib import check, data, models
from qlib.modules import QuantConfig, fake_quantizers, swap_modules
from qlib.train import evaluate

# %% [markdown] nbgrader={"grade": false, "grade_id": "q1-text", "locked": true, "schema_version": 3, "solution": false, "task": false}
# ## Q1 (2 points) · Fold a batch norm into a layer
#
# In eval mode a BatchNorm computes, per channel $c$,
# $\mathrm{bn}(y)_c = \gamma_c (y_c - \mu_c) / \sqrt{\sigma^2_c + \epsilon} + \beta_c$ with its
# running statistics $\mu$ (`bn.running_mean`) and $\sigma^2$ (`bn.running_var`). After a layer
# $y = w x + b$ this is again a layer, with
#
# $$ f_c = \gamma_c / \sqrt{\sigma^2_c + \epsilon}, \qquad w'_c = f_c \, w_c, \qquad b'_c = (b_c - \mu_c) f_c + \beta_c $$
#
# where $w_c$ is every weight of **output** channel $c$ (axis 0 of a conv or linear weight).
# Write `fold_bn(weight, bias, bn)` returning the new `(weight, bias)` tensors. `bias` may be
# `None` (a layer without bias: use zeros); a BatchNorm built with `affine=False` has
# `bn.weight is None` and `bn.bias is None` (use $\gamma = 1$, $\beta = 0$); $\epsilon$ is the
# BatchNorm's own `bn.eps` (not always `1e-5`). Do not modify the inputs. Work under
# `torch.no_grad()`. The check covers all of these cases.

# %% nbgrader={"grade": false, "grade_id": "q1-answer", "locked": false, "schema_version": 3, "solution": true, "task": false}
def fold_bn(weight, bias, bn):
    ### BEGIN SOLUTION
    with torch.no_grad():
        mean, var = bn.running_mean, bn.running_var
        gamma = bn.weight if bn.weight is not None else torch.ones_like(mean)
        beta = bn.bias if bn.bias is not None else torch.zeros_like(mean)
        b = bias if bias is not None else torch.zeros_like(mean)
        factor = gamma / torch.sqrt(var + bn.eps)
        new_weight = weight * factor.reshape(-1, *([1] * (weight.dim() - 1)))
        new_bias = (b - mean) * factor + beta
    return new_weight, new_bias
    ### END SOLUTION

# %% nbgrader={"grade": true, "grade_id": "q1-test", "locked": true, "points": 2, "schema_version": 3, "solution": false, "task": false}
check.lab03.fold_bn(fold_bn)
### BEGIN HIDDEN TESTS
check.lab03.fold_bn_hidden(fold_bn)
### END HIDDEN TESTS

# %% [markdown] nbgrader={"grade": false, "grade_id": "q2-text", "locked": true, "schema_version": 3, "solution": false, "task": false}
# ## Q2 (2 points) · Fold a whole model
#
# The zoo models are `nn.Sequential` chains in which every `nn.Conv2d` or `nn.Linear` that
# is followed by a batch norm sits right before it: `model[i]` is the layer and `model[i + 1]`
# the `BatchNorm1d`/`BatchNorm2d`. Write `fold_model(model)` that returns a folded **copy**
# (`copy.deepcopy`, in eval mode): each such layer gets the folded weight and bias (as
# `nn.Parameter`s; a layer without bias gains one) and its batch norm becomes `nn.Identity()`,
# so the indices (layer names) stay the same. The original model must not change, even when it
# is passed in train mode. The check folds `cnn16` (`Conv2d -> BatchNorm2d`) and the `mlp`
# (`Linear -> BatchNorm1d`).

# %% nbgrader={"grade": false, "grade_id": "q2-answer", "locked": false, "schema_version": 3, "solution": true, "task": false}
def fold_model(model):
    ### BEGIN SOLUTION
    folded = copy.deepcopy(model).eval()
    for i in range(len(folded) - 1):
        layer, bn = folded[i], folded[i + 1]
        if isinstance(layer, (nn.Conv2d, nn.Linear)) and isinstance(bn, (nn.BatchNorm1d, nn.BatchNorm2d)):
            weight, bias = fold_bn(layer.weight, layer.bias, bn)
            layer.weight = nn.Parameter(weight)
            layer.bias = nn.Parameter(bias)
            folded[i + 1] = nn.Identity()
    return folded
    ### END SOLUTION

# %% nbgrader={"grade": true, "grade_id": "q2-test", "locked": true, "points": 2, "schema_version": 3, "solution": false, "task": false}
check.lab03.fold_model(fold_model)
### BEGIN HIDDEN TESTS
check.lab03.fold_model_hidden(fold_model)
### END HIDDEN TESTS

# %% [markdown] nbgrader={"grade": false, "grade_id": "q3-text", "locked": true, "schema_version": 3, "solution": false, "task": false}
# ## Q3 (2 points) · Calibrate
#
# `swap_modules(model, config)` returns a copy of a model whose conv and linear layers are
# fake-quant layers. Each holds two `FakeQuantize` modules (`input_fq`, `weight_fq`) with two
# switches: `observe` (the observer records what flows by) and `quantize` (the tensor is
# replaced by its fake-quantized version). `fake_quantizers(model)` gives
# `{name: FakeQuantize}` for all of them.
#
# Write `calibrate(qmodel, batches)`: set every quantizer to `observe=True, quantize=False`
# (the model then runs in float and the observers see the float activations), put the model in
# eval mode, and run every batch (a list of input tensors) through it under `torch.no_grad()`.
# Switching `observe` on *opens* a calibration (`fq.calibrating` becomes `True`): while it is
# open, every eval-mode forward pass records. So end by **closing** it: `fq.calibrating = False`
# for every quantizer, so that evaluating the model later does not move its ranges.
# It updates `qmodel` in place; return it.
#
# The check calibrates a W8A8 `cnn16`; a `cnn8` whose quantizers were left at `quantize=True`
# by an earlier convert; and an `mlp` whose BatchNorms are still there (not folded), passed in
# **train** mode: in train mode a BatchNorm normalizes with each batch's own statistics (and
# updates its running ones), so the observers would see other ranges than at inference.

# %% nbgrader={"grade": false, "grade_id": "q3-answer", "locked": false, "schema_version": 3, "solution": true, "task": false}
def calibrate(qmodel, batches):
    ### BEGIN SOLUTION
    for fq in fake_quantizers(qmodel).values():
        fq.observe, fq.quantize = True, False
    qmodel.eval()
    with torch.no_grad():
        for x in batches:
            qmodel(x)
    for fq in fake_quantizers(qmodel).values():
        fq.calibrating = False
    return qmodel
    ### END SOLUTION

# %% nbgrader={"grade": true, "grade_id": "q3-test", "locked": true, "points": 2, "schema_version": 3, "solution": false, "task": false}
check.lab03.calibrate(calibrate)
### BEGIN HIDDEN TESTS
check.lab03.calibrate_hidden(calibrate)
### END HIDDEN TESTS

# %% [markdown] nbgrader={"grade": false, "grade_id": "q4-text", "locked": true, "schema_version": 3, "solution": false, "task": false}
# ## Q4 (1 point) · Convert
#
# Write `convert(qmodel)`: return a **copy** of a calibrated model in eval mode in which every
# quantizer has `observe=False, quantize=True`: the ranges are frozen and every input and
# weight is fake-quantized with them. (`FakeQuantize.freeze()` does exactly this for one
# quantizer; setting the two switches yourself is fine too.) The calibrated model must not change.

# %% nbgrader={"grade": false, "grade_id": "q4-answer", "locked": false, "schema_version": 3, "solution": true, "task": false}
def convert(qmodel):
    ### BEGIN SOLUTION
    converted = copy.deepcopy(qmodel).eval()
    for fq in fake_quantizers(converted).values():
        fq.observe, fq.quantize = False, True
    return converted
    ### END SOLUTION

# %% nbgrader={"grade": true, "grade_id": "q4-test", "locked": true, "points": 1, "schema_version": 3, "solution": false, "task": false}
check.lab03.convert(convert)
### BEGIN HIDDEN TESTS
check.lab03.convert_hidden(convert)
### END HIDDEN TESTS

# %% [markdown] nbgrader={"grade": false, "grade_id": "q5-text", "locked": true, "schema_version": 3, "solution": false, "task": false}
# ## Q5 (2 points) · The whole pipeline
#
# Write `ptq(model, batches, config)`: fold (your `fold_model`), swap in fake-quant layers with
# `swap_modules(folded, config)`, `calibrate` with `batches`, `convert`, and return the
# quantized model. The float model must not change.
#
# The check quantizes the pretrained `cnn16` (seed 0; the hidden check another seed) with 256
# calibration digits and evaluates on the 360 test digits: at **W8A8** (`QuantConfig()`: weights
# symmetric per-channel, activations affine per-tensor, min-max) it must stay within **1 point**
# of fp32. It also hands your `ptq` a W4A8 config with MSE weight observers and percentile
# activation observers: your model must predict like qlib's own pipeline with that config
# (on at least 98% of the test digits), so use the config you are given.

# %% nbgrader={"grade": false, "grade_id": "q5-answer", "locked": false, "schema_version": 3, "solution": true, "task": false}
def ptq(model, batches, config):
    ### BEGIN SOLUTION
    qmodel = swap_modules(fold_model(model), config)
    calibrate(qmodel, batches)
    return convert(qmodel)
    ### END SOLUTION

# %% nbgrader={"grade": true, "grade_id": "q5-test", "locked": true, "points": 2, "schema_version": 3, "solution": false, "task": false}
check.lab03.ptq(ptq)
### BEGIN HIDDEN TESTS
check.lab03.ptq_hidden(ptq)
### END HIDDEN TESTS

# %% [markdown] nbgrader={"grade": false, "grade_id": "q6-text", "locked": true, "schema_version": 3, "solution": false, "task": false}
# ## Q6 (2 points, graded by hand) · Predict, then measure: where does W4A4 lose?
#
# At W4A4 with min-max observers, `cnn16` loses accuracy, much more on some seeds than on
# others. Two quantizers could be to blame: the 4-bit **weights** (symmetric, per output
# channel) or the 4-bit **input activations** (affine, one range per tensor).
#
# **Before you run the next cell**, write in the answer cell below your prediction: which of
# the two costs more accuracy, and why (think of the shape of each distribution and of what a
# min-max range does to it at 16 levels). Then run the cell: it quantizes the three shipped
# seeds at W4A8 (only the weights at 4 bits), W8A4 (only the activations) and W4A4, all with
# min-max observers. Complete your answer (4-6 sentences): was your prediction right? Quote the
# numbers. What does it tell you to change for Q7?

# %% nbgrader={"grade": false, "grade_id": "q6-measure", "locked": true, "schema_version": 3, "solution": false, "task": false}
digits16 = data.load_digits(16)
calib = data.calibration_batches(digits16.train, num_samples=256, batch_size=64, seed=0)
print(f"{'seed':>4s} {'fp32':>6s} {'W4A8':>6s} {'W8A4':>6s} {'W4A4':>6s}   (min-max observers)")
for seed in range(3):
    fp32_model = models.pretrained("cnn16", seed=seed)
    row = [evaluate(fp32_model, digits16.test)]
    for w_bits, a_bits in [(4, 8), (8, 4), (4, 4)]:
        quantized = check.lab03.reference_ptq(fp32_model, calib, QuantConfig(weight_bits=w_bits, act_bits=a_bits))
        row.append(evaluate(quantized, digits16.test))
    print(f"{seed:4d} " + " ".join(f"{acc:6.2f}" for acc in row))

# %% [markdown] nbgrader={"grade": true, "grade_id": "q6-answer", "locked": false, "points": 2, "schema_version": 3, "solution": true, "task": false}
# A model answer (the instructor's; the numbers come from the cell above). Prediction: the
# weights. Trained weights are bell-shaped with a few large values per channel, and a min-max
# range at 4 bits spreads only 15 steps over that whole span: most weights fall into the two
# or three levels around zero. Activations are per-tensor, but after a ReLU they are positive,
# and with 4 bits a min-max range still resolves the bulk. Measured: W8A4 stays within about
# a point of fp32 on every seed (99.2, 99.7, 98.6), W4A8 falls to 98.1, 81.1 and 95.6, and
# W4A4 to 95.8, 68.6 and 90.0: the 4-bit weights cause nearly all of the loss, and the spread
# between seeds is large (seed 1 has channels whose min-max range is set by a few outliers).
# For Q7: choose the weight ranges by MSE (clip the outliers) first; the activation observer
# matters less.

# %% [markdown] nbgrader={"grade": false, "grade_id": "q7-text", "locked": true, "schema_version": 3, "solution": false, "task": false}
# ## Q7 (3 points) · Design a W4A4 quantization that reaches a target
#
# The budget: **every** conv and linear layer of `cnn16` with 4-bit weights and 4-bit input
# activations (`weight_bits=4, act_bits=4`; no layer left in float or at 8 bits). Within it,
# you choose: the observers (`weight_observer`, `act_observer`: `"minmax"`,
# `"moving_average"`, `"percentile"`, `"mse"`, `"entropy"`, with options through
# `weight_observer_kwargs` / `act_observer_kwargs`, e.g. `{"percentile": 99.9}`), symmetric or
# affine, the granularity, and per-layer variations.
#
# Write `w4a4_settings()` returning `(config, per_layer)`: a `QuantConfig` for every layer and a
# dict `{layer name: QuantConfig}` of per-layer exceptions (`{}` for none; layer names as in
# `model.named_modules()`, e.g. `"0"`, `"12"`). The check quantizes `cnn16` with
# `qlib.ptq.quantize_static(model, calib, config, per_layer)` (256 calibration digits) and
# needs at least **96%** on the test digits on seeds 0 and 1; the hidden check, on seed 2. That
# target comes from a measurement: a good choice reaches 96.9% or more on each of the three
# seeds (min-max observers: 68.6% on seed 1). If you miss it, the message says how the same
# settings do with 8-bit weights and with 8-bit activations.

# %% nbgrader={"grade": false, "grade_id": "q7-answer", "locked": false, "schema_version": 3, "solution": true, "task": false}
def w4a4_settings():
    ### BEGIN SOLUTION
    config = QuantConfig(weight_bits=4, act_bits=4, weight_observer="mse", act_observer="percentile")
    return config, {}
    ### END SOLUTION

# %% nbgrader={"grade": true, "grade_id": "q7-test", "locked": true, "points": 3, "schema_version": 3, "solution": false, "task": false}
check.lab03.w4a4(w4a4_settings)
### BEGIN HIDDEN TESTS
check.lab03.w4a4_hidden(w4a4_settings)
### END HIDDEN TESTS

# %% [markdown] nbgrader={"grade": false, "grade_id": "q8-text", "locked": true, "schema_version": 3, "solution": false, "task": false}
# ## Q8 (2 points) · Integer-only: the zero-point expansion
#
# A quantized linear layer with input codes `x_q` (zero point $z_x$), weight codes `w_q`
# (zero point $z_w$) and an int32 bias `b_q` computes, for input row $m$ and output $n$, the
# int32 accumulator
#
# $$ \mathrm{acc}_{mn} = \sum_{k=1}^{K} (x_{mk} - z_x)(w_{nk} - z_w) + b_n . $$
#
# Subtracting $z_x$ from every input code at run time costs a pass over the input, and the
# differences no longer fit 8 bits. Kernels avoid it (Jacob et al. 2018, section 2.3): expand
# the product yourself. Some terms involve only weights, zero points and the bias: a converter
# computes them **once, offline**, into one integer per output channel. What is left at run time
# is the product of the raw codes $\sum_k x_{mk} w_{nk}$ plus what the input contributes.
#
# - `zero_point_offset(w_q, z_x, z_w, bias_q)`: the offline part, an integer tensor of shape
#   `(N,)`. `w_q` is `(N, K)` (int8 or uint8 codes), `z_x`, `z_w` are ints, `bias_q` an int32
#   `(N,)` tensor or `None` (no bias).
# - `int_linear(x_q, w_q, z_w, offset)`: the accumulator `(M, N)` from the raw codes `x_q`
#   `(M, K)` (uint8 or int8), `w_q`, $z_w$ and the `offset` of `zero_point_offset`. It is **not
#   given $z_x$**: everything that involves $z_x$ must be in the offset.
#
# Integers only, exact: convert codes to `torch.int64` before multiplying or summing (8-bit
# products overflow). The checks use int8 and 4-bit unsigned weights ($z_w \neq 0$), with and
# without bias, against the direct sum.

# %% nbgrader={"grade": false, "grade_id": "q8-answer", "locked": false, "schema_version": 3, "solution": true, "task": false}
def zero_point_offset(w_q, z_x, z_w, bias_q):
    ### BEGIN SOLUTION
    w = w_q.to(torch.int64)
    offset = -z_x * w.sum(1) + w.shape[1] * z_x * z_w
    return offset if bias_q is None else offset + bias_q.to(torch.int64)
    ### END SOLUTION


def int_linear(x_q, w_q, z_w, offset):
    ### BEGIN SOLUTION
    x = x_q.to(torch.int64)
    return x @ w_q.to(torch.int64).T - z_w * x.sum(1, keepdim=True) + offset
    ### END SOLUTION

# %% nbgrader={"grade": true, "grade_id": "q8-test-offset", "locked": true, "points": 1, "schema_version": 3, "solution": false, "task": false}
check.lab03.zero_point_offset(zero_point_offset)
### BEGIN HIDDEN TESTS
check.lab03.zero_point_offset_hidden(zero_point_offset)
### END HIDDEN TESTS

# %% nbgrader={"grade": true, "grade_id": "q8-test-linear", "locked": true, "points": 1, "schema_version": 3, "solution": false, "task": false}
check.lab03.int_linear(int_linear)
### BEGIN HIDDEN TESTS
check.lab03.int_linear_hidden(int_linear)
### END HIDDEN TESTS

# %% [markdown] nbgrader={"grade": false, "grade_id": "q9-text", "locked": true, "schema_version": 3, "solution": false, "task": false}
# ## Q9 (3 points) · Integer-only: fixed-point requantization
#
# The accumulator's real value is $\mathrm{acc} \cdot s_x s_w$. The next layer wants codes of
# its own scale $s_y$ and zero point $z_y$: $y_q = \mathrm{clamp}(\mathrm{round}(M \cdot
# \mathrm{acc}) + z_y, q_{min}, q_{max})$ with the real multiplier $M = s_x s_w / s_y$. A chip
# without floats stores $M = m \cdot 2^{\text{shift} - 31}$ with an integer $m$ in $[2^{30},
# 2^{31})$ (31 significant bits, "Q31"), and computes $M \cdot \mathrm{acc}$ with one integer
# multiply and one rounding right shift.
#
# - `quantize_multiplier(M)`: for a Python float $2^{-30} \le M < 2^{16}$, return the two
#   Python ints `(m, shift)`, with `m` the integer nearest to $M \cdot 2^{31 - \text{shift}}$.
#   Hint: `math.frexp(M)` gives $M = f \cdot 2^e$ with $f \in [0.5, 1)$. Careful: rounding
#   $f \cdot 2^{31}$ can give exactly $2^{31}$, which is outside the range.
# - `requantize(acc, m, shift, z_y, quant_min, quant_max)`: `acc` an int64 tensor (int32
#   values); return the int64 codes. Round to nearest with ties toward $+\infty$ (TFLite's
#   single rounding: $-2.5 \to -2$, $2.5 \to 3$), with integer operations: with
#   $t = 31 - \text{shift}$, add $2^{t-1}$ to the int64 product `acc * m`, shift right by $t$
#   (`>>` rounds toward $-\infty$), add $z_y$, clamp.
#
# The checks compare bit for bit with the exact answer (Python integers), on ties of both
# signs, the int32 extremes, multipliers below and above 1, and near-ties that float64 cannot
# resolve (`acc * m` needs up to 62 bits, a float64 holds 53: do it in integers).

# %% nbgrader={"grade": false, "grade_id": "q9-answer", "locked": false, "schema_version": 3, "solution": true, "task": false}
import math


def quantize_multiplier(M):
    ### BEGIN SOLUTION
    mantissa, exponent = math.frexp(M)
    m = round(mantissa * 2**31)
    if m == 2**31:
        m, exponent = m // 2, exponent + 1
    return m, exponent
    ### END SOLUTION


def requantize(acc, m, shift, z_y, quant_min, quant_max):
    ### BEGIN SOLUTION
    t = 31 - shift
    y = (acc.to(torch.int64) * m + (1 << (t - 1))) >> t
    return torch.clamp(y + z_y, quant_min, quant_max)
    ### END SOLUTION

# %% nbgrader={"grade": true, "grade_id": "q9-test-multiplier", "locked": true, "points": 1, "schema_version": 3, "solution": false, "task": false}
check.lab03.quantize_multiplier(quantize_multiplier)
### BEGIN HIDDEN TESTS
check.lab03.quantize_multiplier_hidden(quantize_multiplier)
### END HIDDEN TESTS

# %% nbgrader={"grade": true, "grade_id": "q9-test-requantize", "locked": true, "points": 2, "schema_version": 3, "solution": false, "task": false}
check.lab03.requantize(requantize)
### BEGIN HIDDEN TESTS
check.lab03.requantize_hidden(requantize)
### END HIDDEN TESTS

# %% [markdown] nbgrader={"grade": false, "grade_id": "outro", "locked": true, "schema_version": 3, "solution": false, "task": false}
# Done: this is static post-training quantization, the recipe PyTorch's `prepare` / `convert`
# and TensorRT's calibrators follow, and the integer arithmetic an int8 kernel runs underneath
# (lesson 04 and `qlib.intops` / `qlib.requant`, which you can now read line by line). Next:
# lesson 05 trains through the quantizer (QAT) to recover what 4 bits and below lose.
