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
# # Lab 01 · Linear quantization, bit for bit
#
# You write the four functions at the heart of every quantized model, and they must give
# **exactly** the bits PyTorch gives (see lesson 02):
#
# | question | function | points |
# |---|---|---|
# | Q1 | `quant_range(bits, signed)` | 1 |
# | Q2 | `choose_qparams(min_val, max_val, quant_min, quant_max, symmetric)`: affine 2, symmetric 2 | 4 |
# | Q3 | `quantize(x, scale, zero_point, quant_min, quant_max)` | 3 |
# | Q4 | `dequantize(x_q, scale, zero_point)` | 2 |
# | Q5 | find and fix three bugs in a per-channel quantizer: `quantize_weight(w, bits)` | 3 |
# | Q6 | written: the three bugs, their symptoms and why | 2 (graded by hand) |
#
# - Fill in every cell that says `# YOUR CODE HERE` (delete the `raise NotImplementedError()`).
# - The cell after each answer runs a **self-check**: it prints `PASS` or says what was expected.
#   When your instructor grades the lab, hidden checks compare your functions with PyTorch on
#   fresh random tensors, bit for bit.
# - Use torch operations on float32 tensors, in the order the formulas are written (Python
#   floats are float64 and can round differently). Do not call qlib's or PyTorch's quantization
#   functions in your answers: the point is to write them.
# - **Run All stops at the first failing self-check** (or the first answer not written yet):
#   that is expected while you work. Fix that answer, or run the cells below it one by one
#   (Shift+Enter) to see the other checks.
# - Do not rename the functions. Run the notebook top to bottom before you submit.

# %% nbgrader={"grade": false, "grade_id": "imports", "locked": true, "schema_version": 3, "solution": false, "task": false}
import torch
from qlib import check

# %% [markdown] nbgrader={"grade": false, "grade_id": "q1-text", "locked": true, "schema_version": 3, "solution": false, "task": false}
# ## Q1 (1 point) · The integer range
#
# Write `quant_range(bits, signed=True)` returning the pair `(quant_min, quant_max)` of Python
# ints: the full two's complement range $[-2^{b-1}, 2^{b-1}-1]$ when `signed`, else $[0, 2^b-1]$.
# For example `quant_range(8)` is `(-128, 127)` and `quant_range(4, signed=False)` is `(0, 15)`.

# %% nbgrader={"grade": false, "grade_id": "q1-answer", "locked": false, "schema_version": 3, "solution": true, "task": false}
def quant_range(bits, signed=True):
    ### BEGIN SOLUTION
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1
    ### END SOLUTION

# %% nbgrader={"grade": true, "grade_id": "q1-test", "locked": true, "points": 1, "schema_version": 3, "solution": false, "task": false}
check.lab01.quant_range(quant_range)
### BEGIN HIDDEN TESTS
check.lab01.quant_range_hidden(quant_range)
### END HIDDEN TESTS

# %% [markdown] nbgrader={"grade": false, "grade_id": "q2-text", "locked": true, "schema_version": 3, "solution": false, "task": false}
# ## Q2 (4 points) · Scale and zero point
#
# Write `choose_qparams(min_val, max_val, quant_min, quant_max, symmetric=False)`. `min_val`
# and `max_val` are 0-d float32 tensors (the min and max of the data); return
# `(scale, zero_point)`: `scale` a float32 tensor, `zero_point` an integer (an int64 tensor
# is best). These are PyTorch's observer formulas:
#
# ```text
# min_neg = min(min_val, 0)          # the range must contain 0, so that 0.0 is exact
# max_pos = max(max_val, 0)
# eps     = torch.finfo(torch.float32).eps
#
# affine (symmetric=False):
#     scale      = max((max_pos - min_neg) / (quant_max - quant_min), eps)
#     zero_point = quant_min - round(min_neg / scale)          # round: torch.round
#     zero_point = clamp(zero_point, quant_min, quant_max)
#
# symmetric (symmetric=True, used with signed ranges):
#     scale      = max(max(-min_neg, max_pos) / ((quant_max - quant_min) / 2), eps)
#     zero_point = 0
# ```
#
# `eps` keeps the scale positive when the data is constant (`min_val == max_val == 0`).
# The first test cell checks the affine case (2 points), the second the symmetric case (2 points).

# %% nbgrader={"grade": false, "grade_id": "q2-answer", "locked": false, "schema_version": 3, "solution": true, "task": false}
def choose_qparams(min_val, max_val, quant_min, quant_max, symmetric=False):
    ### BEGIN SOLUTION
    eps = torch.tensor(torch.finfo(torch.float32).eps)
    min_neg = torch.clamp(min_val, max=0.0)
    max_pos = torch.clamp(max_val, min=0.0)
    if symmetric:
        scale = torch.maximum(torch.maximum(-min_neg, max_pos) / ((quant_max - quant_min) / 2), eps)
        return scale, torch.tensor(0)
    scale = torch.maximum((max_pos - min_neg) / (quant_max - quant_min), eps)
    zero_point = quant_min - torch.round(min_neg / scale).to(torch.int64)
    return scale, torch.clamp(zero_point, quant_min, quant_max)
    ### END SOLUTION

# %% nbgrader={"grade": true, "grade_id": "q2-test-affine", "locked": true, "points": 2, "schema_version": 3, "solution": false, "task": false}
check.lab01.choose_qparams_affine(choose_qparams)
### BEGIN HIDDEN TESTS
check.lab01.choose_qparams_affine_hidden(choose_qparams)
### END HIDDEN TESTS

# %% nbgrader={"grade": true, "grade_id": "q2-test-symmetric", "locked": true, "points": 2, "schema_version": 3, "solution": false, "task": false}
check.lab01.choose_qparams_symmetric(choose_qparams)
### BEGIN HIDDEN TESTS
check.lab01.choose_qparams_symmetric_hidden(choose_qparams)
### END HIDDEN TESTS

# %% [markdown] nbgrader={"grade": false, "grade_id": "q3-text", "locked": true, "schema_version": 3, "solution": false, "task": false}
# ## Q3 (3 points) · Quantize
#
# Write `quantize(x, scale, zero_point, quant_min, quant_max)`: the integer codes
#
# $$ x_q = \mathrm{clamp}\big(\mathrm{round}(x \cdot (1/\text{scale})) + \text{zero\_point},\ q_{min},\ q_{max}\big) $$
#
# as an **integer** tensor of the shape of `x` (int64 is fine). `x` is a float32 tensor,
# `scale` a 0-d float32 tensor and `zero_point` a 0-d integer tensor (what Q2 returns). Three
# details make the bits match PyTorch:
# - multiply by the reciprocal `1.0 / scale` (a float32 tensor), do not divide by `scale`;
# - round half to even (`torch.round`: 0.5 -> 0, 1.5 -> 2, 2.5 -> 2);
# - add the zero point after rounding, then clamp.

# %% nbgrader={"grade": false, "grade_id": "q3-answer", "locked": false, "schema_version": 3, "solution": true, "task": false}
def quantize(x, scale, zero_point, quant_min, quant_max):
    ### BEGIN SOLUTION
    codes = torch.round(x * (1.0 / scale)) + zero_point
    return torch.clamp(codes, quant_min, quant_max).to(torch.int64)
    ### END SOLUTION

# %% nbgrader={"grade": true, "grade_id": "q3-test", "locked": true, "points": 3, "schema_version": 3, "solution": false, "task": false}
check.lab01.quantize(quantize)
### BEGIN HIDDEN TESTS
check.lab01.quantize_hidden(quantize)
### END HIDDEN TESTS

# %% [markdown] nbgrader={"grade": false, "grade_id": "q4-text", "locked": true, "schema_version": 3, "solution": false, "task": false}
# ## Q4 (2 points) · Dequantize
#
# Write `dequantize(x_q, scale, zero_point)` returning the float32 tensor
# $\hat x = (x_q - \text{zero\_point}) \cdot \text{scale}$. The codes `x_q` may come as
# `int8`, `uint8`, `int16`, `int32` or `int64`: beware of subtracting in 8 bits.
# `dequantize(quantize(x))` must equal `torch.fake_quantize_per_tensor_affine(x, ...)` exactly.

# %% nbgrader={"grade": false, "grade_id": "q4-answer", "locked": false, "schema_version": 3, "solution": true, "task": false}
def dequantize(x_q, scale, zero_point):
    ### BEGIN SOLUTION
    return (x_q.to(torch.int64) - zero_point).to(torch.float32) * scale
    ### END SOLUTION

# %% nbgrader={"grade": true, "grade_id": "q4-test", "locked": true, "points": 2, "schema_version": 3, "solution": false, "task": false}
check.lab01.dequantize(dequantize)
### BEGIN HIDDEN TESTS
check.lab01.dequantize_hidden(dequantize)
### END HIDDEN TESTS

# %% [markdown] nbgrader={"grade": false, "grade_id": "q5-text", "locked": true, "schema_version": 3, "solution": false, "task": false}
# ## Q5 (3 points) · Find and fix three bugs
#
# A colleague wrote per-channel quantization for the weight of a linear layer, `w` of shape
# `(out_features, in_features)`: each **output channel** (row `c`) gets its own range
# `[min(w[c]), max(w[c])]` and its own `(scale, zero_point)`, affine, with **unsigned**
# `bits`-bit codes, by the formulas of Q2 and Q3 (PyTorch's `PerChannelMinMaxObserver` and
# `torch.fake_quantize_per_channel_affine` with `ch_axis=0`). It returns
# `(w_q, scale, zero_point)`: `w_q` int64 codes of `w`'s shape, `scale` float32 of shape
# `(out_features,)`, `zero_point` integers of shape `(out_features,)`.
#
# It runs without an error, and it is wrong in **three** places. Copy it into the answer cell
# as `quantize_weight`, run the check, read what it says, fix one bug, and repeat. The check
# describes what it sees (the symptom), not which line is wrong: finding the line is your job.
# Then, in Q6, write down what you found.

# %% nbgrader={"grade": false, "grade_id": "q5-broken", "locked": true, "schema_version": 3, "solution": false, "task": false}
def broken_quantize_weight(w, bits):
    quant_min, quant_max = 0, 2**bits
    min_val = w.amin(dim=0)
    max_val = w.amax(dim=0)
    min_neg = torch.clamp(min_val, max=0.0)
    max_pos = torch.clamp(max_val, min=0.0)
    eps = torch.finfo(torch.float32).eps
    scale = torch.clamp((max_pos - min_neg) / (quant_max - quant_min), min=eps)
    zero_point = (quant_min - min_neg / scale).to(torch.int64)
    zero_point = torch.clamp(zero_point, quant_min, quant_max)
    w_q = torch.round(w * (1.0 / scale)) + zero_point
    w_q = torch.clamp(w_q, quant_min, quant_max).to(torch.int64)
    return w_q, scale, zero_point


w_demo = torch.tensor([[-0.8, 0.1, 2.2], [0.2, 0.4, 0.6]])
print("broken_quantize_weight(w_demo, 2):", broken_quantize_weight(w_demo, 2))

# %% nbgrader={"grade": false, "grade_id": "q5-answer", "locked": false, "schema_version": 3, "solution": true, "task": false}
def quantize_weight(w, bits):
    ### BEGIN SOLUTION
    quant_min, quant_max = 0, 2**bits - 1
    min_val = w.amin(dim=1)
    max_val = w.amax(dim=1)
    min_neg = torch.clamp(min_val, max=0.0)
    max_pos = torch.clamp(max_val, min=0.0)
    eps = torch.finfo(torch.float32).eps
    scale = torch.clamp((max_pos - min_neg) / (quant_max - quant_min), min=eps)
    zero_point = (quant_min - torch.round(min_neg / scale)).to(torch.int64)
    zero_point = torch.clamp(zero_point, quant_min, quant_max)
    w_q = torch.round(w * (1.0 / scale[:, None])) + zero_point[:, None]
    w_q = torch.clamp(w_q, quant_min, quant_max).to(torch.int64)
    return w_q, scale, zero_point
    ### END SOLUTION

# %% nbgrader={"grade": true, "grade_id": "q5-test", "locked": true, "points": 3, "schema_version": 3, "solution": false, "task": false}
check.lab01.quantize_weight(quantize_weight)
### BEGIN HIDDEN TESTS
check.lab01.quantize_weight_hidden(quantize_weight)
### END HIDDEN TESTS

# %% [markdown] nbgrader={"grade": false, "grade_id": "q6-text", "locked": true, "schema_version": 3, "solution": false, "task": false}
# ## Q6 (2 points, graded by hand) · What was wrong
#
# In the answer cell below, for each of the three bugs (3-6 sentences in all): the line, the
# **symptom** that gave it away (what the check or your own printout showed), and why that
# line produces it. One of the three raised no error on some shapes: which, and why is that
# the most dangerous kind?

# %% [markdown] nbgrader={"grade": true, "grade_id": "q6-answer", "locked": false, "points": 2, "schema_version": 3, "solution": true, "task": false}
# A model answer (the instructor's). (1) `quant_max = 2**bits`: a `bits`-bit code holds
# `0 .. 2**bits - 1`, so there are `2**bits - 1` steps between the ends of the range; dividing
# by `2**bits` makes every scale `(2**b - 1)/2**b` too small (0.75 instead of 1.0 at 2 bits), and
# the largest weights get the code `2**bits`, which does not fit (256 in a uint8 wraps to 0).
# (2) `amin(dim=0)` / `amax(dim=0)` reduce over the rows, so there is one range per input
# feature (column): the scales had shape `(in_features,)`, and `w * (1.0 / scale)` broadcast
# them along the columns. On a square weight nothing fails and every shape looks right; only the
# values are wrong (row c's codes depend on the other rows), which is the dangerous kind: it
# passes any test that checks shapes only. Fix: `dim=1`, and `scale[:, None]`,
# `zero_point[:, None]` so that each row uses its own. (3) `.to(torch.int64)` truncates toward
# zero: a zero point of 0.8 became 0 instead of 1. The zero point is still an integer (0.0 still
# comes back exact), but the grid of that row moves up by one step: its most negative weight
# (-0.8) now gets code 0, i.e. -0.0 after dequantization, clipped by almost a whole step, while
# the top code is wasted. Fix: `torch.round` before the cast.

# %% [markdown] nbgrader={"grade": false, "grade_id": "compare-text", "locked": true, "schema_version": 3, "solution": false, "task": false}
# ## Your functions on a real model (not graded)
#
# Quantize every conv and linear weight of the pretrained `cnn16` with your functions and with
# qlib's (per-tensor, 8-bit symmetric and 4-bit affine), count the codes that agree, and look at
# the error. Every count should be "all".

# %% nbgrader={"grade": false, "grade_id": "compare", "locked": true, "schema_version": 3, "solution": false, "task": false}
from qlib import models
from qlib.qparams import qparams_for
from qlib.quantize import quantize as qlib_quantize

model = models.pretrained("cnn16", seed=0)
for name, layer in model.named_modules():
    if not isinstance(layer, (torch.nn.Conv2d, torch.nn.Linear)):
        continue
    w = layer.weight.detach()
    line = f"layer {name:3s} {str(tuple(w.shape)):15s}"
    for bits, symmetric in [(8, True), (4, False)]:
        qmin, qmax = quant_range(bits, signed=symmetric)
        scale, zero_point = choose_qparams(w.min(), w.max(), qmin, qmax, symmetric)
        w_q = quantize(w, scale, zero_point, qmin, qmax)
        ref_scale, ref_zp = qparams_for(w, bits, symmetric=symmetric)
        ref_q = qlib_quantize(w, ref_scale, ref_zp, qmin, qmax)
        same = int((w_q.to(torch.int64) == ref_q.to(torch.int64)).sum())
        error = (dequantize(w_q, scale, zero_point) - w).abs().max().item()
        agree = "all" if same == w.numel() else f"{same} of {w.numel()}"
        line += f" | {bits}-bit {'sym' if symmetric else 'aff'}: {agree} codes agree, max error {error:.2e}"
    print(line)
