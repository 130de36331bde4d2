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

# %% [markdown] nbgrader={"grade": false, "grade_id": "intro", "locked": true, "schema_version": 3, "solution": false, "task": false}
# # Lab 03 · Post-training quantization: fold, calibrate, convert
#
# You will build static post-training quantization (lesson 04) yourself:
#
# 1. fold each batch norm into the layer before it (`fold_bn`, then a whole model);
# 2. swap in fake-quant layers (qlib's `swap_modules` does this: use it);
# 3. **calibrate**: run data through the float model while observers record ranges;
# 4. **convert**: freeze the ranges and switch quantization on;
#
# and reach a stated accuracy with the digits CNN `cnn16` at W8A8 and W4A8.
# You may use `QuantConfig`, `swap_modules` and `fake_quantizers` from `qlib.modules`, not
# `qlib.fold` or `qlib.ptq` (those are what you are rebuilding).
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
# `bn.weight is None` and `bn.bias is None` (use $\gamma = 1$, $\beta = 0$). Do not modify the
# inputs. Work under `torch.no_grad()`.

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
# so the indices (layer names) stay the same. The original model must not change.

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
# It updates `qmodel` in place; return it.

# %% nbgrader={"grade": false, "grade_id": "q3-answer", "locked": false, "schema_version": 3, "solution": true, "task": false}
def calibrate(qmodel, batches):
    ### BEGIN SOLUTION
    for fq in fake_quantizers(qmodel).values():
        fq.observe, fq.quantize = True, False
    qmodel.eval()
    with torch.no_grad():
        for x in batches:
            qmodel(x)
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
# ## Q5 (3 points) · The whole pipeline, and the accuracy it must reach
#
# Write `ptq(model, batches, config)`: fold (your `fold_model`), swap in fake-quant layers with
# `swap_modules(folded, config)`, `calibrate` with `batches`, `convert`, and return the
# quantized model. The float model must not change.
#
# The check quantizes the pretrained `cnn16` (seed 0; the hidden check also seeds 1 and 2) with
# 256 calibration digits and evaluates on the 360 test digits. Targets:
#
# - **W8A8** (`QuantConfig()`: weights symmetric per-channel, activations affine per-tensor,
#   min-max): within **1 point** of fp32;
# - **W4A8** with MSE-searched weight scales (`check.lab03.W4A8_CONFIG`, below): at least
#   **95%**. (With min-max weight scales one of the three seeds drops to about 81%: at 4 bits
#   the weight range matters.)

# %% nbgrader={"grade": false, "grade_id": "q5-answer", "locked": false, "schema_version": 3, "solution": true, "task": false}
def ptq(model, batches, config):
    ### BEGIN SOLUTION
    qmodel = swap_modules(fold_model(model), config)
    calibrate(qmodel, batches)
    return convert(qmodel)
    ### END SOLUTION

# %% nbgrader={"grade": true, "grade_id": "q5-test", "locked": true, "points": 3, "schema_version": 3, "solution": false, "task": false}
check.lab03.ptq(ptq)
### BEGIN HIDDEN TESTS
check.lab03.ptq_hidden(ptq)
### END HIDDEN TESTS

# %% [markdown] nbgrader={"grade": false, "grade_id": "look-text", "locked": true, "schema_version": 3, "solution": false, "task": false}
# ## Look: your pipeline at 8 and 4 bits
#
# Not graded. The W4A4 row is not a target: how far below fp32 does it fall, and does
# the MSE weight observer help there too?

# %% nbgrader={"grade": false, "grade_id": "look", "locked": true, "schema_version": 3, "solution": false, "task": false}
digits16 = data.load_digits(16)
calib = data.calibration_batches(digits16.train, num_samples=256, batch_size=64, seed=0)
model = models.pretrained("cnn16", seed=0)
print(f"fp32: {evaluate(model, digits16.test):.2f}%")
configs = {"W8A8": QuantConfig(), "W4A8 (MSE weights)": check.lab03.W4A8_CONFIG,
           "W4A4": QuantConfig(weight_bits=4, act_bits=4),
           "W4A4 (MSE weights)": QuantConfig(weight_bits=4, act_bits=4, weight_observer="mse")}
try:
    for label, config in configs.items():
        print(f"{label:20s}: {evaluate(ptq(model, calib, config), digits16.test):.2f}%")
except NotImplementedError:
    print("answer Q1-Q5 first")

# %% [markdown] nbgrader={"grade": false, "grade_id": "outro", "locked": true, "schema_version": 3, "solution": false, "task": false}
# Done: this is static post-training quantization, the recipe PyTorch's `prepare` / `convert`
# and TensorRT's calibrators follow. Next: lesson 05 trains through the quantizer (QAT) to
# recover what 4 bits and below lose.
