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
# # Lab 02 · Calibration: percentile and MSE clipping ranges
#
# Lesson 03 showed that the range an observer picks decides the quantization error: min-max
# never clips but wastes levels on rare outliers; a narrower range rounds finer but clips.
# You will write two observers as plain functions, then compare them with min-max on the
# activations of a real layer.
#
# Conventions (as in PyTorch): activations are quantized **affine** with **unsigned** codes,
# `quant_range(bits, signed=False)` (0..255 at 8 bits, 0..15 at 4). You may use qlib's
# `quant_range`, `choose_qparams` and `fake_quantize` (lab 01); not `qlib.observers`.
#
# - Fill in every cell that says `# YOUR CODE HERE` (delete the `raise NotImplementedError()`).
# - The cell after each answer runs a **self-check**: it prints `PASS` or says what was expected.
#   When your instructor grades the lab, hidden checks on fresh random inputs run as well.
# - **Run All stops at the first failing self-check** (or the first answer not written yet):
#   that is expected while you work. Fix that answer, or run the cells below it one by one
#   (Shift+Enter) to see the other checks.
# - Do not rename the functions. Run the notebook top to bottom before you submit.

# %% nbgrader={"grade": false, "grade_id": "imports", "locked": true, "schema_version": 3, "solution": false, "task": false}
import torch

from qlib import check, data, models
from qlib.fold import fold_batchnorm
from qlib.qparams import choose_qparams, quant_range
from qlib.quantize import fake_quantize

# %% [markdown] nbgrader={"grade": false, "grade_id": "q1-text", "locked": true, "schema_version": 3, "solution": false, "task": false}
# ## Q1 (2 points) · Percentile range
#
# Write `percentile_range(x, p)` returning `(lo, hi)`: the `(100 - p)`-th and the `p`-th
# percentiles of **all** values of the tensor `x` (any shape), for `50 < p <= 100`. Between two
# sorted values, interpolate linearly (this is what `torch.quantile` does; note that it takes a
# quantile in `[0, 1]`, not a percentage). Return two Python floats.
#
# Example: for `x = [0, 1, 2, 10]` and `p = 90`, the 90th percentile sits at position
# `0.9 * 3 = 2.7` of the sorted values: `2 + 0.7 * (10 - 2) = 7.6`; the 10th at position `0.1 * 3 = 0.3`: `0 + 0.3 * (1 - 0) = 0.3`.

# %% nbgrader={"grade": false, "grade_id": "q1-answer", "locked": false, "schema_version": 3, "solution": true, "task": false}
def percentile_range(x, p):
    ### BEGIN SOLUTION
    flat = x.detach().flatten().float()
    lo = torch.quantile(flat, 1 - p / 100)
    hi = torch.quantile(flat, p / 100)
    return lo.item(), hi.item()
    ### END SOLUTION

# %% nbgrader={"grade": true, "grade_id": "q1-test", "locked": true, "points": 2, "schema_version": 3, "solution": false, "task": false}
check.lab02.percentile_range(percentile_range)
### BEGIN HIDDEN TESTS
check.lab02.percentile_range_hidden(percentile_range)
### END HIDDEN TESTS

# %% [markdown] nbgrader={"grade": false, "grade_id": "q2-text", "locked": true, "schema_version": 3, "solution": false, "task": false}
# ## Q2 (1 point) · The error of a range
#
# Write `quant_mse(x, lo, hi, bits)`: choose affine qparams for the range `[lo, hi]` with
# unsigned `bits`-bit codes (`choose_qparams` with `quant_range(bits, signed=False)`),
# fake-quantize `x` with them, and return the mean squared error `mean((x_dq - x)**2)` as a
# Python float. Values outside the range are clipped to its edges: that is part of the error.

# %% nbgrader={"grade": false, "grade_id": "q2-answer", "locked": false, "schema_version": 3, "solution": true, "task": false}
def quant_mse(x, lo, hi, bits):
    ### BEGIN SOLUTION
    quant_min, quant_max = quant_range(bits, signed=False)
    scale, zero_point = choose_qparams(torch.tensor(float(lo)), torch.tensor(float(hi)), quant_min, quant_max)
    x = x.detach().float()
    x_dq = fake_quantize(x, scale, zero_point, quant_min, quant_max)
    return (x_dq - x).pow(2).mean().item()
    ### END SOLUTION

# %% nbgrader={"grade": true, "grade_id": "q2-test", "locked": true, "points": 1, "schema_version": 3, "solution": false, "task": false}
check.lab02.quant_mse(quant_mse)
### BEGIN HIDDEN TESTS
check.lab02.quant_mse_hidden(quant_mse)
### END HIDDEN TESTS

# %% [markdown] nbgrader={"grade": false, "grade_id": "q3-text", "locked": true, "schema_version": 3, "solution": false, "task": false}
# ## Q3 (3 points) · MSE search of the clipping range
#
# Write `mse_clip_range(x, bits, grid=100)`: try the ranges `[a * min(x), a * max(x)]` for
# `a = 1/grid, 2/grid, ..., grid/grid` (shrinking the min-max range toward 0), measure each
# with your `quant_mse`, and return the `(lo, hi)` with the smallest error, as two floats.
# `a = 1` is the min-max range, so the search can never do worse than min-max.
#
# This is the idea of qlib's `MSEObserver` (and of the weight-scale search in many 4-bit
# methods). A loop over `a` is fine: 100 candidates take well under a second.

# %% nbgrader={"grade": false, "grade_id": "q3-answer", "locked": false, "schema_version": 3, "solution": true, "task": false}
def mse_clip_range(x, bits, grid=100):
    ### BEGIN SOLUTION
    x_min, x_max = x.min().item(), x.max().item()
    best, best_err = (x_min, x_max), float("inf")
    for k in range(1, grid + 1):
        a = k / grid
        err = quant_mse(x, a * x_min, a * x_max, bits)
        if err < best_err:
            best, best_err = (a * x_min, a * x_max), err
    return best
    ### END SOLUTION

# %% nbgrader={"grade": true, "grade_id": "q3-test", "locked": true, "points": 3, "schema_version": 3, "solution": false, "task": false}
check.lab02.mse_clip_range(mse_clip_range)
### BEGIN HIDDEN TESTS
check.lab02.mse_clip_range_hidden(mse_clip_range)
### END HIDDEN TESTS

# %% [markdown] nbgrader={"grade": false, "grade_id": "q4-text", "locked": true, "schema_version": 3, "solution": false, "task": false}
# ## Q4 (2 points) · The activations a layer sees
#
# An observer sits at the **input** of a quantized layer. Write `layer_inputs(model, layer_name,
# batches)`: register a forward pre-hook on `model.get_submodule(layer_name)` that stores a copy
# of the layer's input, run every batch of `batches` (a list of input tensors) through the model
# in eval mode under `torch.no_grad()`, remove the hook, and return all stored inputs
# concatenated along dimension 0.
#
# Hint: `handle = module.register_forward_pre_hook(lambda module, args: ...)`; `args[0]` is the
# input; `handle.remove()` when done (a `try`/`finally` makes sure of it).
#
# The check collects from the folded `cnn16` and from the `mlp` passed in **train** mode: its
# BatchNorms would normalize with each batch's statistics and update their running ones, so the
# model must be in eval mode, and its state must not change.

# %% nbgrader={"grade": false, "grade_id": "q4-answer", "locked": false, "schema_version": 3, "solution": true, "task": false}
def layer_inputs(model, layer_name, batches):
    ### BEGIN SOLUTION
    seen = []
    layer = model.get_submodule(layer_name)
    handle = layer.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    try:
        model.eval()
        with torch.no_grad():
            for x in batches:
                model(x)
    finally:
        handle.remove()
    return torch.cat(seen)
    ### END SOLUTION

# %% nbgrader={"grade": true, "grade_id": "q4-test", "locked": true, "points": 2, "schema_version": 3, "solution": false, "task": false}
check.lab02.layer_inputs(layer_inputs)
### BEGIN HIDDEN TESTS
check.lab02.layer_inputs_hidden(layer_inputs)
### END HIDDEN TESTS

# %% [markdown] nbgrader={"grade": false, "grade_id": "q5-text", "locked": true, "schema_version": 3, "solution": false, "task": false}
# ## Q5 (2 points) · Three ranges on a real layer
#
# The cell below collects the input of layer `7` (the last convolution) of the pretrained
# `cnn16`, with its batch norms folded, over 128 calibration digits. Write
# `compare_ranges(x, bits)` returning a dict with one entry per method, each a tuple
# `(lo, hi, mse)`: the range and its `quant_mse` at `bits` bits.
#
# - `"minmax"`: `[min(x), max(x)]`;
# - `"percentile"`: your `percentile_range(x, 99.99)`;
# - `"mse"`: your `mse_clip_range(x, bits)` (grid 100).

# %% nbgrader={"grade": false, "grade_id": "q5-data", "locked": true, "schema_version": 3, "solution": false, "task": false}
digits16 = data.load_digits(16)
folded = fold_batchnorm(models.pretrained("cnn16", seed=0))
calib = data.calibration_batches(digits16.train, num_samples=128, batch_size=64, seed=0)
try:
    acts = layer_inputs(folded, "7", calib)
    print("layer 7 input:", tuple(acts.shape), f"min {acts.min():.3f}, max {acts.max():.3f}, "
          f"{100 * (acts == 0).float().mean():.1f}% exact zeros (ReLU)")
except NotImplementedError:
    acts = check.lab02.reference_layer_inputs(folded, "7", calib)  # Q4 not answered yet: use the reference
    print("(Q4 not answered: using the reference activations)")

# %% nbgrader={"grade": false, "grade_id": "q5-answer", "locked": false, "schema_version": 3, "solution": true, "task": false}
def compare_ranges(x, bits):
    ### BEGIN SOLUTION
    ranges = {"minmax": (x.min().item(), x.max().item()),
              "percentile": percentile_range(x, 99.99),
              "mse": mse_clip_range(x, bits)}
    return {name: (lo, hi, quant_mse(x, lo, hi, bits)) for name, (lo, hi) in ranges.items()}
    ### END SOLUTION

# %% nbgrader={"grade": true, "grade_id": "q5-test", "locked": true, "points": 2, "schema_version": 3, "solution": false, "task": false}
check.lab02.compare_ranges(compare_ranges, acts, bits=4)
### BEGIN HIDDEN TESTS
check.lab02.compare_ranges_hidden(compare_ranges)
### END HIDDEN TESTS

# %% [markdown] nbgrader={"grade": false, "grade_id": "q6-text", "locked": true, "schema_version": 3, "solution": false, "task": false}
# ## Q6 (2 points, graded by hand) · Predict, then measure: which range wins?
#
# **Before you run the next cell**, write in the answer cell below your prediction for layer
# 7's input: at **4 bits**, which of min-max, percentile (99.99) and MSE gives the smallest
# quantization error, and at **8 bits**? Will the best range be narrower or wider at 8 bits
# than at 4? Say why, in terms of the two errors a range trades: rounding inside the range and
# clipping outside it.
#
# Then run the cell and complete your answer (4-6 sentences): was your prediction right? Quote
# the numbers (range, percentage clipped, MSE). Why does the best range move outward as the bit
# width grows?

# %% nbgrader={"grade": false, "grade_id": "q6-measure", "locked": true, "schema_version": 3, "solution": false, "task": false}
try:
    for bits in (4, 8):
        results = compare_ranges(acts, bits)
        for name, (lo, hi, mse) in results.items():
            clipped = ((acts < lo) | (acts > hi)).float().mean().item()
            print(f"{bits} bits {name:10s}: range [{lo:.3f}, {hi:.3f}], {100 * clipped:.3f}% clipped, "
                  f"MSE {mse:.3g} ({results['minmax'][2] / mse:.1f}x below min-max)")
except NotImplementedError:
    print("answer Q1-Q5 first")

# %% [markdown] nbgrader={"grade": true, "grade_id": "q6-answer", "locked": false, "points": 2, "schema_version": 3, "solution": true, "task": false}
# A model answer (the instructor's; the numbers come from the cell above). Prediction: at
# 4 bits the MSE search wins clearly, at 8 bits by little; the best range is wider at 8 bits.
# Measured at 4 bits: min-max [0, 4.73] clips nothing but has MSE 0.00595; the 99.99th
# percentile, [0, 3.99], clips 0.01% and lowers it to 0.00423 (1.4x); the MSE search, [0, 2.88],
# clips 0.26% of the values and reaches 0.00273 (2.2x below min-max). At 8 bits the MSE search
# widens to [0, 4.49] (0.003% clipped) and is only 1.1x below min-max, and the percentile range
# is now *worse* than min-max (0.7x): clipping 0.01% of the values costs more than its finer
# grid saves. Why: a b-bit grid has 2**b - 1 steps, so the rounding error (about step**2 / 12
# per value) shrinks (255/15)**2 = 289-fold from 4 to 8 bits, while the error of a clipped value
# does not depend on b at all. When rounding is cheap (8 bits) it pays to clip less, and the
# optimum moves outward toward min-max; at 4 bits each step is coarse and clipping the rare
# tail of a ReLU output is the cheaper error.

# %% [markdown] nbgrader={"grade": false, "grade_id": "outro", "locked": true, "schema_version": 3, "solution": false, "task": false}
# Done. You have written the two observers that matter most in practice. Next: lesson 04
# puts observers into a whole post-training quantization pipeline, down to integers.
