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
# # Lab 05 · Data-free quantization: calibrate without a single real image
#
# You will quantize `cnn16` to 8 and 4 bits without touching the digits it was trained on.
# The model's BatchNorm layers remember the mean and variance of the activations they saw in
# training; you will turn that memory back into calibration images (ZeroQ, Cai et al. 2020;
# see lesson 06).
#
# 1. **Q1 (3 points)** the BN-statistics loss;
# 2. **Q2 (3 points)** optimize images so that the loss becomes small;
# 3. **Q3 (2 points)** calibrate `cnn16` with your images: W8A8 within 1 point of fp32,
#    W4A4 at least 90 % test accuracy.
#
# Fill in every cell that says `# YOUR CODE HERE` (delete the `raise NotImplementedError()`).
# Each test cell prints `PASS` or says what was expected; hidden checks on fresh random models
# run when your instructor grades the lab. Do not rename the functions.
#
# **Run All stops at the first failing self-check** (or the first answer not written yet):
# that is expected while you work. Fix that answer, or run the cells below it one by one
# (Shift+Enter) to see the other checks.

# %% nbgrader={"grade": false, "grade_id": "imports", "locked": true, "schema_version": 3, "solution": false, "task": false}
import torch
from torch import nn

from qlib import check, models
from qlib.modules import QuantConfig
from qlib.ptq import quantize_static
from qlib.train import evaluate

# %% [markdown] nbgrader={"grade": false, "grade_id": "q1-text", "locked": true, "schema_version": 3, "solution": false, "task": false}
# ## Q1 (3 points) · The BN-statistics loss
#
# Write `bn_statistics_loss(model, x)`: run `model` on the batch `x` **in eval mode** and
# return, as a 0-d tensor that is differentiable with respect to `x`,
#
# $$ L(x) = \sum_{l \in \text{BatchNorms}} \big\|\mu_l(x) - \text{running\_mean}_l\big\|_2
#          + \big\|\sigma_l(x) - \sqrt{\text{running\_var}_l + \varepsilon_l}\big\|_2,
#    \qquad \sigma_l(x) = \sqrt{\text{var}_l(x) + \varepsilon_l} $$
#
# where $\mu_l(x)$ and $\text{var}_l(x)$ are the per-channel mean and **biased** variance
# (`unbiased=False`) of the tensor *entering* BatchNorm $l$, taken over the batch and every
# spatial position (dims 0, 2, 3 of an `(N, C, H, W)` activation, dim 0 of an `(N, C)` one),
# and $\varepsilon_l$ is `bn.eps`. $\|\cdot\|_2$ is the plain L2 norm over channels
# (`torch.linalg.vector_norm`), not its square.
#
# - Catch the inputs with `bn.register_forward_pre_hook(hook)` on every `nn.BatchNorm1d` /
#   `nn.BatchNorm2d` (the hook gets `(module, args)`; `args[0]` is the input), and remove the
#   hooks afterwards (`handle.remove()`).
# - Eval mode matters twice: in training mode BatchNorm would normalize with the batch's
#   statistics (later layers would see different inputs) and would overwrite its running
#   statistics. The checks hand you a model in training mode; leaving it in eval mode is fine.

# %% nbgrader={"grade": false, "grade_id": "q1-answer", "locked": false, "schema_version": 3, "solution": true, "task": false}
def bn_statistics_loss(model, x):
    ### BEGIN SOLUTION
    model.eval()
    bns = [m for m in model.modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))]
    seen = []
    handles = [bn.register_forward_pre_hook(lambda mod, args: seen.append((mod, args[0]))) for bn in bns]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    loss = x.new_zeros(())
    for bn, a in seen:
        dims = [0] + list(range(2, a.dim()))
        mu = a.mean(dim=dims)
        sigma = torch.sqrt(a.var(dim=dims, unbiased=False) + bn.eps)
        loss = loss + torch.linalg.vector_norm(mu - bn.running_mean) \
                    + torch.linalg.vector_norm(sigma - torch.sqrt(bn.running_var + bn.eps))
    return loss
    ### END SOLUTION

# %% nbgrader={"grade": true, "grade_id": "q1-test", "locked": true, "points": 3, "schema_version": 3, "solution": false, "task": false}
check.lab05.bn_loss(bn_statistics_loss)
### BEGIN HIDDEN TESTS
check.lab05.bn_loss_hidden(bn_statistics_loss)
### END HIDDEN TESTS

# %% [markdown] nbgrader={"grade": false, "grade_id": "q2-text", "locked": true, "schema_version": 3, "solution": false, "task": false}
# ## Q2 (3 points) · Optimize the pixels
#
# Write `synthesize(model, n, steps, lr, seed, shape=(1, 16, 16))`:
#
# 1. put the model in eval mode; draw the start images `x` of shape `(n, *shape)` from
#    $\mathcal N(0, 1)$ with `torch.randn(..., generator=torch.Generator().manual_seed(seed))`
#    (same seed, same images);
# 2. make `x` a leaf that needs a gradient and take `steps` steps of `torch.optim.Adam([x], lr=lr)`
#    on `bn_statistics_loss(model, x)` (the whole batch at once);
# 3. return `x.detach()`.
#
# Only the images change: the model's weights and running statistics must stay as they were.
# The check asks that 30 steps at lr 0.1 bring the loss below half that of Gaussian noise.

# %% nbgrader={"grade": false, "grade_id": "q2-answer", "locked": false, "schema_version": 3, "solution": true, "task": false}
def synthesize(model, n, steps, lr, seed, shape=(1, 16, 16)):
    ### BEGIN SOLUTION
    model.eval()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g).requires_grad_(True)
    opt = torch.optim.Adam([x], lr=lr)
    for _ in range(steps):
        loss = bn_statistics_loss(model, x)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    return x.detach()
    ### END SOLUTION

# %% nbgrader={"grade": true, "grade_id": "q2-test", "locked": true, "points": 3, "schema_version": 3, "solution": false, "task": false}
check.lab05.synthesize(synthesize)
### BEGIN HIDDEN TESTS
check.lab05.synthesize_hidden(synthesize)
### END HIDDEN TESTS

# %% [markdown] nbgrader={"grade": false, "grade_id": "q3-text", "locked": true, "schema_version": 3, "solution": false, "task": false}
# ## Q3 (2 points) · Calibrate `cnn16` with synthetic images
#
# The next cell makes 64 synthetic images for `cnn16` (seed 0) with your `synthesize`
# (30 steps at lr 0.2; about 10 s on two CPU cores) and compares their loss with noise.
#
# Then write `quantize_data_free(model, images, bits)`: static post-training quantization of
# `model` at W`bits`A`bits` (weights symmetric per-channel, activations affine per-tensor:
# `QuantConfig`'s defaults), calibrated on `images` only, with the **99.9th-percentile**
# activation observer (`act_observer="percentile"`, `act_observer_kwargs={"percentile": 99.9}`).
# Return the quantized model; `qlib.ptq.quantize_static` takes a list of batches.
#
# The check evaluates on the test digits: W8A8 must be within 1 point of fp32 and W4A4 at
# least 90 % (measured in fast mode: 94-96 %; Gaussian-noise calibration gives about 82-92 %).
# It also checks that the images are not real digits.

# %% nbgrader={"grade": false, "grade_id": "q3-images", "locked": true, "schema_version": 3, "solution": false, "task": false}
cnn16 = models.pretrained("cnn16", seed=0)
images = synthesize(cnn16, 64, steps=30, lr=0.2, seed=0)
noise = torch.randn(64, 1, 16, 16, generator=torch.Generator().manual_seed(1))
with torch.no_grad():
    print(f"BN-statistics loss: synthetic {bn_statistics_loss(cnn16, images).item():.3f}, "
          f"Gaussian noise {bn_statistics_loss(cnn16, noise).item():.3f}")

# %% nbgrader={"grade": false, "grade_id": "q3-answer", "locked": false, "schema_version": 3, "solution": true, "task": false}
def quantize_data_free(model, images, bits):
    ### BEGIN SOLUTION
    config = QuantConfig(weight_bits=bits, act_bits=bits, act_observer="percentile",
                         act_observer_kwargs={"percentile": 99.9})
    return quantize_static(model, [images], config)
    ### END SOLUTION

# %% nbgrader={"grade": true, "grade_id": "q3-test", "locked": true, "points": 2, "schema_version": 3, "solution": false, "task": false}
check.lab05.data_free_accuracy(quantize_data_free, images)

# %% [markdown] nbgrader={"grade": false, "grade_id": "outro", "locked": true, "schema_version": 3, "solution": false, "task": false}
# Done: 64 images made from the model's own BatchNorm statistics calibrate it almost as well
# as real digits. To go further (not graded): add the input term (pixels of mean 0 and std 1)
# to the loss, clamp the pixels into the range of real standardized digits, or compare with
# `qlib.datafree.synthesize_bn` and the generator of lesson 06 at W3A3.
