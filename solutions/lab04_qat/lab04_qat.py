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
# # Lab 04 · Quantization-aware training: STE, LSQ and a 2-bit model
#
# You will build the two gradients that make quantization-aware training work (lesson 05)
# and then train a model whose weights have only 2 bits:
#
# 1. the **straight-through estimator** as a `torch.autograd.Function` (checked bit for bit
#    against `torch.fake_quantize_per_tensor_affine`);
# 2. the **LSQ gradient of the step size** (checked against PyTorch's learnable fake-quant kernel);
# 3. a **W2A4** QAT run of the digits CNN `cnn8` that must reach a stated accuracy.
#
# - Fill in every cell that says `# YOUR CODE HERE` (delete the `raise NotImplementedError()`).
# - The cell after each answer runs a **self-check**: it prints `PASS` or says what was expected.
#   When your instructor grades the lab, hidden checks on fresh random inputs run as well.
# - **Run All stops at the first failing self-check** (or the first answer not written yet):
#   that is expected while you work. Fix that answer, or run the cells below it one by one
#   (Shift+Enter) to see the other checks.
# - Do not rename the functions or the class. Run the notebook top to bottom before you submit.

# %% nbgrader={"grade": false, "grade_id": "imports", "locked": true, "schema_version": 3, "solution": false, "task": false}
import torch

from qlib import check, data, models
from qlib.modules import QuantConfig
from qlib.qat import convert_qat, prepare_qat, quantization_aware_training
from qlib.train import evaluate

# %% [markdown] nbgrader={"grade": false, "grade_id": "q1-text", "locked": true, "schema_version": 3, "solution": false, "task": false}
# ## Q1 (3 points) · The straight-through estimator
#
# Fake quantization rounds in the forward pass:
#
# $$ q = \mathrm{round}(x \cdot (1/s)) + z, \qquad y = (\mathrm{clamp}(q, q_{min}, q_{max}) - z)\, s $$
#
# `round` has derivative 0 almost everywhere, so training through it would stall. The
# straight-through estimator (STE) uses instead
#
# $$ \frac{\partial y}{\partial x} = \begin{cases} 1 & q_{min} \le q \le q_{max} \\ 0 & \text{otherwise (clipped)} \end{cases}
# \qquad\Rightarrow\qquad \text{grad\_x} = \text{grad\_output} \cdot \text{mask} $$
#
# Write `FakeQuantSTE`, a `torch.autograd.Function` used as
# `FakeQuantSTE.apply(x, scale, zero_point, quant_min, quant_max)`: `x` is float32, `scale` a
# float32 tensor with one element, `zero_point` an integer tensor with one element, `quant_min`
# and `quant_max` ints.
#
# - `forward(ctx, x, scale, zero_point, quant_min, quant_max)` returns `y` (float32, the shape
#   of `x`), bit for bit what PyTorch computes: multiply by the float32 reciprocal
#   `1.0 / scale` (do not divide), `torch.round` (ties to even), add the zero point, clamp,
#   dequantize. Save what backward needs with `ctx.save_for_backward(...)`.
# - `backward(ctx, grad_output)` returns one gradient per input of `forward`: the gradient for
#   `x`, then `None` for the other four.
#
# Do not call `torch.fake_quantize_*` or `qlib`'s fake quantization here: that is what you are
# rebuilding. One point for the forward pass, two for the backward pass.

# %% nbgrader={"grade": false, "grade_id": "q1-answer", "locked": false, "schema_version": 3, "solution": true, "task": false}
class FakeQuantSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, zero_point, quant_min, quant_max):
        ### BEGIN SOLUTION
        q = torch.round(x * (1.0 / scale)) + zero_point
        mask = (q >= quant_min) & (q <= quant_max)
        ctx.save_for_backward(mask)
        return ((torch.clamp(q, quant_min, quant_max) - zero_point) * scale).to(torch.float32)
        ### END SOLUTION

    @staticmethod
    def backward(ctx, grad_output):
        ### BEGIN SOLUTION
        (mask,) = ctx.saved_tensors
        return grad_output * mask, None, None, None, None
        ### END SOLUTION

# %% nbgrader={"grade": true, "grade_id": "q1-forward-test", "locked": true, "points": 1, "schema_version": 3, "solution": false, "task": false}
check.lab04.fake_quant_ste_forward(FakeQuantSTE)

# %% nbgrader={"grade": true, "grade_id": "q1-backward-test", "locked": true, "points": 2, "schema_version": 3, "solution": false, "task": false}
check.lab04.fake_quant_ste_backward(FakeQuantSTE)
### BEGIN HIDDEN TESTS
check.lab04.fake_quant_ste_hidden(FakeQuantSTE)
### END HIDDEN TESTS

# %% [markdown] nbgrader={"grade": false, "grade_id": "q1-look-text", "locked": true, "schema_version": 3, "solution": false, "task": false}
# Your function in a picture (not graded): the staircase forward, and the gradient that
# passes through it, 1 inside the range and 0 where the input is clipped.

# %% nbgrader={"grade": false, "grade_id": "q1-look", "locked": true, "schema_version": 3, "solution": false, "task": false}
try:
    x = torch.linspace(-1.5, 1.5, 601, requires_grad=True)
    y = FakeQuantSTE.apply(x, torch.tensor(0.25), torch.tensor(0), -4, 3)  # signed 3-bit
    y.sum().backward()
    for lo, hi in ((-1.5, -1.05), (-0.1, 0.1), (0.8, 0.9), (1.0, 1.5)):
        sel = (x.detach() >= lo) & (x.detach() <= hi)
        print(f"x in [{lo:5.2f}, {hi:5.2f}]: y takes {sorted(set(y[sel].tolist()))}, gradient {sorted(set(x.grad[sel].tolist()))}")
except NotImplementedError:
    print("answer Q1 first")

# %% [markdown] nbgrader={"grade": false, "grade_id": "q2-text", "locked": true, "schema_version": 3, "solution": false, "task": false}
# ## Q2 (3 points) · LSQ: the gradient of the step size
#
# Learned step size quantization (LSQ, Esser et al. 2020) trains the scale $s$ too. With the
# learned zero point rounded and clamped, $z = \mathrm{clamp}(\mathrm{round}(z_{learned}), q_{min}, q_{max})$,
# and $q = \mathrm{round}(x/s) + z$, the forward pass is the same staircase and
#
# $$ \frac{\partial y}{\partial s} = \begin{cases}
#     \mathrm{round}(x/s) - x/s & q_{min} \le q \le q_{max} \quad (= (y - x)/s) \\
#     q_{min} - z & q < q_{min} \\
#     q_{max} - z & q > q_{max}
# \end{cases} $$
#
# One scale serves every element, so its gradient is the **sum** over the elements of
# `grad_output * dy/ds`. LSQ then multiplies it by a gradient scale `grad_factor`
# ($g = 1/\sqrt{N\, q_{max}}$ in the paper; here it is given to you): without it the step
# size would receive far larger updates than any single weight.
#
# Write `lsq_scale_grad(x, scale, zero_point, quant_min, quant_max, grad_output, grad_factor)`
# returning that gradient: a tensor with one element (or a float). `scale` and `zero_point`
# are float32 tensors of shape `(1,)` (LSQ learns the zero point as a float); compute
# $x/s$ as `x * (1.0 / scale)`, as in Q1. The check compares with
# `torch._fake_quantize_learnable_per_tensor_affine` (up to float summation order).

# %% nbgrader={"grade": false, "grade_id": "q2-answer", "locked": false, "schema_version": 3, "solution": true, "task": false}
def lsq_scale_grad(x, scale, zero_point, quant_min, quant_max, grad_output, grad_factor):
    ### BEGIN SOLUTION
    z = torch.clamp(torch.round(zero_point), quant_min, quant_max)
    v = x * (1.0 / scale)
    q = torch.round(v) + z
    d = torch.where(q < quant_min, quant_min - z,
                    torch.where(q > quant_max, quant_max - z, torch.round(v) - v))
    return (grad_output * d).sum() * grad_factor
    ### END SOLUTION

# %% nbgrader={"grade": true, "grade_id": "q2-test", "locked": true, "points": 3, "schema_version": 3, "solution": false, "task": false}
check.lab04.lsq_scale_grad(lsq_scale_grad)
### BEGIN HIDDEN TESTS
check.lab04.lsq_scale_grad_hidden(lsq_scale_grad)
### END HIDDEN TESTS

# %% [markdown] nbgrader={"grade": false, "grade_id": "q2-look-text", "locked": true, "schema_version": 3, "solution": false, "task": false}
# What does the gradient say (not graded)? Quantize a Gaussian tensor at 3 bits with scales
# from far too small to far too large, and take the quantization error itself as the loss,
# $\mathrm{MSE} = \mathrm{mean}((y - x)^2)$, so `grad_output` is $2 (y - x) / N$. Gradient
# descent moves $s$ *against* the gradient: a negative value means "grow the step" (too much
# is clipped), a positive one "shrink it" (the grid is too coarse). Where does the sign
# change, and where is the error smallest?

# %% nbgrader={"grade": false, "grade_id": "q2-look", "locked": true, "schema_version": 3, "solution": false, "task": false}
try:
    w = torch.randn(4096, generator=torch.Generator().manual_seed(0))
    qmin, qmax = -4, 3
    for s in (0.05, 0.2, 0.4, 0.6, 0.8, 1.2):
        y = torch.clamp(torch.round(w * (1.0 / s)), qmin, qmax) * s
        grad = float(lsq_scale_grad(w, torch.tensor([s]), torch.tensor([0.0]), qmin, qmax,
                                    2 * (y - w) / w.numel(), 1.0))
        print(f"scale {s:4.2f}: d MSE / d s = {grad:+.4f} -> {'grow' if grad < 0 else 'shrink'}, "
              f"MSE {((y - w) ** 2).mean():.4f}")
except NotImplementedError:
    print("answer Q2 first")

# %% [markdown] nbgrader={"grade": false, "grade_id": "q3-text", "locked": true, "schema_version": 3, "solution": false, "task": false}
# ## Q3 (3 points) · A 2-bit network
#
# Post-training quantization of `cnn8` with **2-bit weights and 4-bit activations** (W2A4)
# loses most of its accuracy. Write `qat_2bit(model, digits)`: train a W2A4 copy of the
# pretrained float `model` with quantization-aware training on `digits` (the 8x8 digits
# splits: `digits.train`, `digits.val`) and return the trained fake-quant model.
#
# Requirements the check verifies:
# - every conv and linear layer is quantized (as `qlib.qat.prepare_qat` does), weights at
#   **2 bits** and input activations at **4 bits**, first and last layer included;
# - the float `model` you are given does not change;
# - the returned model, frozen by `qlib.qat.convert_qat`, reaches at least **95%** on the 360
#   test digits; the check uses seed 0, the hidden check seeds 1 and 2. Do not train on the
#   test split.
#
# You may use everything in `qlib.qat` (`quantization_aware_training`, or `prepare_qat` and
# your own loop). Choose the recipe: lesson 05 compares the STE and LSQ at 2 bits, with
# min-max and MSE weight scales and two learning rates. Keep it under a minute on a laptop CPU
# (a few epochs are enough; the grader gives each cell two minutes), and pass `progress=False`
# (no progress bars in graded labs). To try a recipe before the check runs:
#
# ```python
# digits = data.load_digits(8)
# model = models.pretrained("cnn8", seed=0)
# print(evaluate(convert_qat(qat_2bit(model, digits)), digits.test))
# ```

# %% nbgrader={"grade": false, "grade_id": "q3-answer", "locked": false, "schema_version": 3, "solution": true, "task": false}
def qat_2bit(model, digits):
    ### BEGIN SOLUTION
    config = QuantConfig(weight_bits=2, act_bits=4, weight_observer="mse")
    qmodel, _ = quantization_aware_training(model, digits, config, epochs=5, lr=2e-3, method="lsq",
                                              seed=0, progress=False)
    return qmodel
    ### END SOLUTION

# %% nbgrader={"grade": true, "grade_id": "q3-test", "locked": true, "points": 3, "schema_version": 3, "solution": false, "task": false}
check.lab04.qat_2bit(qat_2bit)
### BEGIN HIDDEN TESTS
check.lab04.qat_2bit_hidden(qat_2bit)
### END HIDDEN TESTS

# %% [markdown] nbgrader={"grade": false, "grade_id": "outro", "locked": true, "schema_version": 3, "solution": false, "task": false}
# Done: you wrote the two gradients behind quantization-aware training, and a network with
# four weight values per channel classifies digits almost as well as the float one.
# Try at home: the same with the STE (`method="ste"`) and min-max weight scales, or on `cnn16`.
