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
# # Lab 04 · Quantization-aware training: STE, LSQ and a 2-bit model
#
# You will build the two gradients that make quantization-aware training work (lesson 05)
# and then train a model whose weights have only 2 bits with them:
#
# 1. the **straight-through estimator** as a `torch.autograd.Function` (checked bit for bit
#    against `torch.fake_quantize_per_tensor_affine`);
# 2. the **LSQ gradient of the step size**, which you derive (checked against PyTorch's
#    learnable fake-quant kernel);
# 3. a **W2A4** QAT run of the digits CNN `cnn8` with your own STE and LSQ code, under a
#    budget of 100 training steps, that must reach a stated accuracy;
# 4. a written answer (graded by your instructor): predict which method fits the budget, then
#    measure.
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
import torch.nn.functional as F

from qlib import check, data, models
from qlib.check.own_qat import own_qat_model
from qlib.qat import qat_layers
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
# ## Q2 (3 points) · LSQ: derive the gradient of the step size
#
# Learned step size quantization (LSQ, Esser et al. 2020) trains the scale $s$ too. The zero
# point is learned as a float and rounded and clamped before use,
# $z = \mathrm{clamp}(\mathrm{round}(z_{learned}), q_{min}, q_{max})$; the forward pass is Q1's
#
# $$ q = \mathrm{round}(x/s) + z, \qquad \hat x = (\mathrm{clamp}(q, q_{min}, q_{max}) - z)\, s . $$
#
# **Derive** $\partial \hat x / \partial s$ yourself (on paper first), treating `round` with the
# straight-through estimator ($\partial\, \mathrm{round}(v) / \partial v := 1$) and $z$ as a constant.
# There are three cases: $q$ inside $[q_{min}, q_{max}]$ (write $\hat x$ as
# $\mathrm{round}(x/s)\, s$ and use the product rule: careful, $x/s$ depends on $s$), $q < q_{min}$ and
# $q > q_{max}$ (there $\hat x$ is a constant times $s$). Sanity checks for your result: inside the
# range it is zero when $x$ lies on the grid, and it is bounded by $1/2$ in absolute value.
#
# One scale serves every element, so its gradient is the **sum** over the elements of
# `grad_output * d x_hat / d s`. LSQ then multiplies it by a gradient scale `grad_factor`
# ($g = 1/\sqrt{N\, q_{max}}$ in the paper; here it is given to you): without it the step
# size would receive far larger updates than any single weight.
#
# Write `lsq_scale_grad(x, scale, zero_point, quant_min, quant_max, grad_output, grad_factor)`
# returning that gradient: a tensor with one element (or a float). `scale` and `zero_point`
# are float32 tensors of shape `(1,)` (`zero_point` is the learned float: round and clamp it);
# compute $x/s$ as `x * (1.0 / scale)`, as in Q1. Do not use autograd or `qlib.lsq` here: the
# check compares your formula with `torch._fake_quantize_learnable_per_tensor_affine` (the
# kernel behind `qlib.lsq`; up to float summation order), on fresh inputs and on learned zero
# points that are not integers. Q3 trains a network with your function.

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
# ## Q3 (3 points) · Train a 2-bit network with your own gradients, on a budget
#
# Post-training quantization of `cnn8` with **2-bit weights and 4-bit activations** (W2A4, per
# tensor) loses most of its accuracy. `own_qat_model(model, digits, FakeQuantSTE, lsq_scale_grad,
# method)` (given, in `qlib.check.own_qat`) builds a W2A4 copy of the float `model` whose every
# conv and linear layer quantizes its weight and its input with **your** Q1 and Q2 code:
#
# - `method="ste"`: each weight's scale is re-chosen by min-max from the current weight at every
#   step, the inputs' scales are fixed by calibration; only the weights learn, through your STE;
# - `method="lsq"`: the same start, then every scale is a parameter trained with your
#   `lsq_scale_grad` (and LSQ's $g = 1/\sqrt{N q_{max}}$).
#
# Write `qat_w2a4(model, digits, seed)`: build the model with the method of your choice, train it
# with this loop, and return it in eval mode: `steps` times, draw a batch of 64 training images
# with `idx = torch.randint(len(x), (64,), generator=g)` (`x, y = digits.train.tensors`,
# `g = torch.Generator().manual_seed(seed)`), compute `F.cross_entropy(qmodel(x[idx]), y[idx])`,
# then `zero_grad`, `backward`, `step` of `torch.optim.Adam(qmodel.parameters(), lr=...)`.
# Your choices: the method, the learning rate and the number of steps.
#
# The budget and the target (the check verifies each):
# - at most **100 steps of 64 images** (6400 training images; the model counts them and raises
#   beyond). Evaluate in eval mode (`qmodel.eval()`), which does not count;
# - never train on `digits.test`: the model raises if a training batch holds a test image;
# - the model comes from `own_qat_model` with your `FakeQuantSTE` and `lsq_scale_grad`, at W2A4;
#   the float `model` you are given does not change;
# - the check trains `cnn8` seeds 0, 1 and 2 (each with `seed` = the model's seed) and wants a
#   **mean** test accuracy of at least **93%** over the three (360 test digits each). A 2-bit
#   network trained for 100 steps varies by several points from one seed to the next, so one
#   seed cannot tell two recipes apart: the mean over seeds can.
#
# We measured both methods with this loop: one of them reaches the target and the other does
# not (Q4 asks you to predict which, before you try). To try a recipe on one seed:
#
# ```python
# digits = data.load_digits(8)
# print(evaluate(qat_w2a4(models.pretrained("cnn8", seed=0), digits, seed=0), digits.test))
# ```

# %% nbgrader={"grade": false, "grade_id": "q3-answer", "locked": false, "schema_version": 3, "solution": true, "task": false}
def qat_w2a4(model, digits, seed):
    ### BEGIN SOLUTION
    qmodel = own_qat_model(model, digits, FakeQuantSTE, lsq_scale_grad, method="lsq", seed=seed)
    x, y = digits.train.tensors
    g = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(qmodel.parameters(), lr=3e-3)
    qmodel.train()
    for _ in range(100):
        idx = torch.randint(len(x), (64,), generator=g)
        loss = F.cross_entropy(qmodel(x[idx]), y[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return qmodel.eval()
    ### END SOLUTION

# %% nbgrader={"grade": true, "grade_id": "q3-test", "locked": true, "points": 3, "schema_version": 3, "solution": false, "task": false}
check.lab04.qat_w2a4(qat_w2a4, FakeQuantSTE, lsq_scale_grad)

# %% [markdown] nbgrader={"grade": false, "grade_id": "q4-text", "locked": true, "schema_version": 3, "solution": false, "task": false}
# ## Q4 (2 points, graded by your instructor) · Predict, then measure
#
# **Before** you run the next cell, write down in the answer cell which method, `"ste"` or
# `"lsq"`, you expect to reach the target within 100 steps, and why: think of what min-max does
# to a 2-bit grid (four levels for a whole tensor of bell-shaped weights), and of what your
# `lsq_scale_grad` tells the scale to do. Then run the cell: it trains both methods with Q3's
# loop (Adam, lr 3e-3, 100 steps) on the three seeds and prints each test accuracy, the mean,
# and the first layer's 2-bit step as a fraction of its largest weight (min-max starts at
# 1/1.5 = 0.67). In 4-6 sentences: was your prediction right? Quote the numbers. Is the
# difference between the methods larger than the spread between seeds (one test digit is 0.28
# points)? What do the printed steps show LSQ doing?

# %% nbgrader={"grade": false, "grade_id": "q4-measure", "locked": true, "schema_version": 3, "solution": false, "task": false}
def train(model, digits, method, seed, steps=100, lr=3e-3):
    qmodel = own_qat_model(model, digits, FakeQuantSTE, lsq_scale_grad, method=method, seed=seed)
    x, y = digits.train.tensors
    g = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(qmodel.parameters(), lr=lr)
    for _ in range(steps):
        idx = torch.randint(len(x), (64,), generator=g)
        loss = F.cross_entropy(qmodel(x[idx]), y[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return qmodel.eval()


try:
    digits = data.load_digits(8)
    for method in ("ste", "lsq"):
        accs, steps = [], []
        for seed in (0, 1, 2):
            cnn8 = models.pretrained("cnn8", seed=seed)
            qmodel = train(cnn8, digits, method, seed)
            first = qat_layers(qmodel)["0"]
            accs.append(evaluate(qmodel, digits.test))
            steps.append(first.weight_fq.scale.item() / first.weight.detach().abs().max().item())
        print(f"{method}: W2A4 test accuracy per seed {', '.join(f'{a:.1f}' for a in accs)}%, "
              f"mean {sum(accs) / 3:.1f}%; first layer step / max|w|: {', '.join(f'{r:.2f}' for r in steps)}")
except NotImplementedError:
    print("answer Q1 and Q2 first")

# %% [markdown] nbgrader={"grade": true, "grade_id": "q4-answer", "locked": false, "points": 2, "schema_version": 3, "solution": true, "task": false}
# A model answer (the instructor's; the numbers come from the cell above). Prediction: LSQ.
# With min-max, a signed 2-bit grid has levels $\{-2, -1, 0, 1\} \cdot s$ with
# $s = \max|w| / 1.5$, so most of a bell-shaped weight tensor rounds to 0 and the STE can only
# move weights across a grid that stays this coarse; LSQ's gradient lowers the step where the
# rounding error outweighs the clipping error, so more weights get non-zero levels (LSQ's first
# layer ends with a step of about 0.5-0.6 of its largest weight, the STE's stays at 0.67). Measured: LSQ 94.4, 95.3, 93.9 (mean
# 94.5) and the STE 94.2, 93.1, 89.7 (mean 92.3), so LSQ reaches the 93 % target and the STE does
# not. But the difference per seed (0.2 to 4 points) is of the size of the spread between seeds
# (1.4 points for LSQ, 4.5 for the STE): one seed would not have told them apart, only the mean
# over seeds does, and even that is a small margin (a few digits), so I would re-measure with more
# batch orders before calling LSQ better in general.

# %% [markdown] nbgrader={"grade": false, "grade_id": "outro", "locked": true, "schema_version": 3, "solution": false, "task": false}
# Done: you derived the gradient behind LSQ and trained a network with four weight values per
# tensor using your own STE and LSQ code. Try at home: per-channel scales (lesson 05 with
# `qlib.qat`), MSE-initialised step sizes, or a larger budget for the STE.
