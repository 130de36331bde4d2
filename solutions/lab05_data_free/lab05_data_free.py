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
#    W4A4 at least 93 % test accuracy;
# 4. **Q4 (2 points, graded by your instructor)** separate what the weight scales and what the
#    calibration images contribute.
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
# (`torch.linalg.vector_norm`), not its square (the form DeepInversion uses; ZeroQ's code squares
# the norms: `qlib.datafree.bn_statistics_loss(..., variant="l2")` vs `variant="zeroq"`).
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
# `model` at W`bits`A`bits`, calibrated on `images` only:
#
# - weights symmetric per-channel (`QuantConfig`'s default) with the **MSE** weight observer
#   (`weight_observer="mse"`): it picks each channel's clipping range from the weights alone, so
#   it needs no data at all, and at 4 bits it is far better than min-max (lesson 03);
# - activations affine per-tensor (the default) with the **99.9th-percentile** observer
#   (`act_observer="percentile"`, `act_observer_kwargs={"percentile": 99.9}`): their ranges are
#   what your images decide.
#
# Return the quantized model; `qlib.ptq.quantize_static` takes a list of batches. The check
# verifies both observers, then evaluates on the test digits: W8A8 must be within 1 point of
# fp32 and W4A4 at least **93 %**. Measured with the reference answer (64 images, fast mode) on
# the three shipped `cnn16` seeds: 94.7-95.8 %; the same recipe calibrated on Gaussian noise
# gives 64.7-90.3 % and on 64 real digits 96.7-98.9 %. It also checks that the images are
# not real digits.

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
    config = QuantConfig(weight_bits=bits, act_bits=bits, weight_observer="mse", act_observer="percentile",
                         act_observer_kwargs={"percentile": 99.9})
    return quantize_static(model, [images], config)
    ### END SOLUTION

# %% nbgrader={"grade": true, "grade_id": "q3-test", "locked": true, "points": 2, "schema_version": 3, "solution": false, "task": false}
check.lab05.data_free_accuracy(quantize_data_free, images)

# %% [markdown] nbgrader={"grade": false, "grade_id": "q4-text", "locked": true, "schema_version": 3, "solution": false, "task": false}
# ## Q4 (2 points, graded by your instructor) · Weight scales or calibration images?
#
# At W4A4, data-free quantization has two separate problems: the **weight** ranges (which need
# no data: the MSE observer reads the weights) and the **activation** ranges (which need
# inputs: noise, your synthetic images, or real digits). The next cell measures W4A4 on
# `cnn16` seeds 0 and 1 for both weight observers and the three calibration sources (seed 1's
# synthetic images are made with your `synthesize`, about 10 s).
#
# **Before** you run it, write down your prediction: with min-max weight scales, how much do
# synthetic images gain over noise, and does that gain shrink or grow with MSE weight scales?
# Then, in 4-6 sentences: which part of the min-max-weights loss was a weight-scale problem and
# which part a calibration-source problem? Quote the numbers, per seed (one test digit is 0.28
# points), and say what a fair comparison of calibration sources must fix first.

# %% nbgrader={"grade": false, "grade_id": "q4-measure", "locked": true, "schema_version": 3, "solution": false, "task": false}
from qlib import data
from qlib.data import calibration_batches

digits16 = data.load_digits(16)
sources = {}
for seed in (0, 1):
    model = cnn16 if seed == 0 else models.pretrained("cnn16", seed=1)
    sources[seed] = {"noise": noise,
                     "synthetic": images if seed == 0 else synthesize(model, 64, steps=30, lr=0.2, seed=0),
                     "real": torch.cat(calibration_batches(digits16.train, 64, 64, seed=0))}
    print(f"cnn16 seed {seed}: fp32 {evaluate(model, digits16.test):.1f}%")
    for weights in ("minmax", "mse"):
        row = []
        for name, batch in sources[seed].items():
            config = QuantConfig(weight_bits=4, act_bits=4, weight_observer=weights, act_observer="percentile",
                                 act_observer_kwargs={"percentile": 99.9})
            row.append(f"{name} {evaluate(quantize_static(model, [batch], config), digits16.test):5.1f}%")
        print(f"  W4A4, {weights:6s} weight scales, calibrated on: " + ", ".join(row))

# %% [markdown] nbgrader={"grade": true, "grade_id": "q4-answer", "locked": false, "points": 2, "schema_version": 3, "solution": true, "task": false}
# A model answer (the instructor's; the numbers come from the cell above). On seed 1, with
# min-max weight scales, W4A4 is poor whatever the calibration (about 62 % on noise, 78 % on
# synthetic images, and even real digits only 73 %): since real data do not help, that loss is
# a weight-scale problem, not a calibration one. With MSE weight scales, which need no data,
# the same synthetic images give about 95 % and real digits 99 %. On seed 0 min-max weights are
# already fine (96 % synthetic), so the weight observer changes little there. With good weight
# scales the calibration source is what remains: noise 90 % (seed 0) and 65 % (seed 1) against
# about 95 % for synthetic images on both, i.e. a gain of 5 and 30 points, far more than a few
# digits. A fair comparison of calibration sources must fix the weight scales first (MSE
# per-channel); otherwise the "gain" of better images mixes in a data-independent weight
# problem.

# %% [markdown] nbgrader={"grade": false, "grade_id": "outro", "locked": true, "schema_version": 3, "solution": false, "task": false}
# Done: 64 images made from the model's own BatchNorm statistics calibrate it almost as well
# as real digits. To go further (not graded): add the input term (pixels of mean 0 and std 1)
# to the loss, clamp the pixels into the range of real standardized digits, or compare with
# `qlib.datafree.synthesize_bn` and the generator of lesson 06 at W3A3.
