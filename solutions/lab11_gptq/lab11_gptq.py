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
# # Lab 11 · GPTQ: 4-bit weights for a transformer
#
# You will quantize the weights of the course's small transformer (lesson 16) to 4 and 3
# bits, first by rounding to nearest in groups, then with GPTQ (Frantar et al. 2022):
#
# 1. **Q1 (3 points)** group-wise weight quantization (torchao's convention);
# 2. **Q2 (5 points)** the GPTQ update for one linear layer;
# 3. then apply your GPTQ to the whole model and compare perplexities;
# 4. **Q3 (2 points, graded by your instructor)** a short written answer.
#
# Fill in every cell that says `# YOUR CODE HERE` (delete the `raise NotImplementedError()`).
# Each test cell prints `PASS` or says what was expected; hidden checks on fresh random
# matrices run when your instructor grades the lab. Do not rename the functions.

# %% nbgrader={"grade": false, "grade_id": "imports", "locked": true, "schema_version": 3, "solution": false, "task": false}
import torch

from qlib import check
from qlib.llm import corpus, evaluate, gptq, model as charlm, weight_only
from qlib.runtime import pick

# %% [markdown] nbgrader={"grade": false, "grade_id": "q1-text", "locked": true, "schema_version": 3, "solution": false, "task": false}
# ## Q1 (3 points) · Group-wise quantization
#
# Write `quantize_groups(w, bits, group_size)` for a float weight `w` of shape `(out, in)`.
# Each row is cut into groups of `group_size` consecutive columns; each group gets its own
# asymmetric qparams over the unsigned codes `[qmin, qmax] = [0, 2**bits - 1]`:
#
# - `min_neg = min(min(group), 0)`, `max_pos = max(max(group), 0)`;
# - `scale = max((max_pos - min_neg) / (qmax - qmin), eps)` with `eps = torch.finfo(torch.float32).eps`;
# - `zero_point = clamp(qmin - round(min_neg / scale), qmin, qmax)` (an integer);
# - `w_q = clamp(round(w * (1 / scale)) + zero_point, qmin, qmax)` (`torch.round`: half to even).
#
# Return `(w_q, scale, zero_point)`: integer codes of `w`'s shape, and `scale`, `zero_point`
# of shape `(out, in // group_size)`. Hint: `w.reshape(out, in // group_size, group_size)`.

# %% nbgrader={"grade": false, "grade_id": "q1-answer", "locked": false, "schema_version": 3, "solution": true, "task": false}
def quantize_groups(w, bits, group_size):
    ### BEGIN SOLUTION
    out, n = w.shape
    qmin, qmax = 0, 2 ** bits - 1
    groups = w.reshape(out, n // group_size, group_size)
    min_neg = groups.amin(-1).clamp(max=0)
    max_pos = groups.amax(-1).clamp(min=0)
    scale = ((max_pos - min_neg) / (qmax - qmin)).clamp(min=torch.finfo(torch.float32).eps)
    zero_point = (qmin - torch.round(min_neg / scale)).clamp(qmin, qmax).long()
    w_q = torch.clamp(torch.round(groups * (1 / scale[..., None])) + zero_point[..., None], qmin, qmax)
    return w_q.long().reshape(out, n), scale, zero_point
    ### END SOLUTION

# %% nbgrader={"grade": true, "grade_id": "q1-test", "locked": true, "points": 3, "schema_version": 3, "solution": false, "task": false}
check.lab11.quantize_groups(quantize_groups)
### BEGIN HIDDEN TESTS
check.lab11.quantize_groups_hidden(quantize_groups)
### END HIDDEN TESTS

# %% [markdown] nbgrader={"grade": false, "grade_id": "q2-text", "locked": true, "schema_version": 3, "solution": false, "task": false}
# ## Q2 (5 points) · GPTQ for one layer
#
# Write `gptq_layer(W, H, bits, group_size)`: `W` is a float weight `(out, in)`, `H = 2 X^T X / n`
# the Hessian of the layer's inputs `(in, in)`. Return the dequantized weights `Q` (`(out, in)`,
# float) that GPTQ picks, **without modifying `W`**:
#
# 1. `W = W.clone()`, `H = H.clone()`; damping: add `0.01 * mean(diag H)` to the diagonal.
# 2. `U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)`:
#    row `j` of `U` is the inverse-Hessian row GPTQ needs at step `j`.
# 3. For each column `j = 0 .. in-1`, in order:
#    - when `j % group_size == 0`, choose the group's `scale`, `zero_point` from the **current**
#      (already updated) columns `W[:, j:j+group_size]` (your `quantize_groups` with one group);
#    - `q = (clamp(round(W[:, j] / scale) + zero_point, 0, 2**bits - 1) - zero_point) * scale`;
#    - `err = (W[:, j] - q) / U[j, j]`, then `W[:, j:] -= err[:, None] * U[j, j:][None, :]`.
#
# (The blocked, lazy-update version in `qlib.llm.gptq` gives the same result faster; plain
# column-by-column is enough here.) The check asks that your layer's output error
# `||X W^T - X Q^T||^2` be at most 1.1 times the reference GPTQ's on fresh matrices.

# %% nbgrader={"grade": false, "grade_id": "q2-answer", "locked": false, "schema_version": 3, "solution": true, "task": false}
def gptq_layer(W, H, bits, group_size):
    ### BEGIN SOLUTION
    W, H = W.clone().float(), H.clone().float()
    n = W.shape[1]
    H += 0.01 * torch.diag(H).mean() * torch.eye(n)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Q = torch.zeros_like(W)
    for j in range(n):
        if j % group_size == 0:
            _, scale, zero_point = quantize_groups(W[:, j:j + group_size], bits, group_size)
            scale, zero_point = scale[:, 0], zero_point[:, 0]
        codes = torch.clamp(torch.round(W[:, j] * (1 / scale)) + zero_point, 0, 2 ** bits - 1)
        Q[:, j] = (codes - zero_point) * scale
        err = (W[:, j] - Q[:, j]) / U[j, j]
        W[:, j:] -= err[:, None] * U[j, j:][None, :]
    return Q
    ### END SOLUTION

# %% nbgrader={"grade": true, "grade_id": "q2-test", "locked": true, "points": 5, "schema_version": 3, "solution": false, "task": false}
check.lab11.gptq_layer(gptq_layer)
### BEGIN HIDDEN TESTS
check.lab11.gptq_layer_hidden(gptq_layer)
### END HIDDEN TESTS

# %% [markdown] nbgrader={"grade": false, "grade_id": "run-text", "locked": true, "schema_version": 3, "solution": false, "task": false}
# ## Your GPTQ on the transformer
#
# The next cell quantizes every linear layer of the shipped model (seed 0) to 4 and 3 bits in
# groups of 128, with round-to-nearest (`qlib`) and with your `gptq_layer` (calibrated on a
# few windows of the training files, block after block), and prints the held-out perplexity.

# %% nbgrader={"grade": false, "grade_id": "run", "locked": true, "schema_version": 3, "solution": false, "task": false}
model = charlm.pretrained(0)
data = corpus.load()
calib, _ = corpus.random_batch(data.train, pick(32, 8), 128, torch.Generator().manual_seed(0))
limit = pick(None, 24)
print(f"fp32           perplexity {evaluate.perplexity(model, data.val, limit=limit):.3f}")
for bits in (4, 3):
    rtn = weight_only.quantize_model(model, bits, 128)
    yours = gptq.quantize_model(model, calib, bits, 128, layer_fn=gptq_layer)
    print(f"W{bits} g128 RTN    perplexity {evaluate.perplexity(rtn, data.val, limit=limit):.3f}")
    print(f"W{bits} g128 GPTQ   perplexity {evaluate.perplexity(yours, data.val, limit=limit):.3f}  (yours)")

# %% [markdown] nbgrader={"grade": false, "grade_id": "q3-text", "locked": true, "schema_version": 3, "solution": false, "task": false}
# ## Q3 (2 points, graded by your instructor) · Written answer
#
# In a few sentences: (a) why does GPTQ need calibration inputs while round-to-nearest does
# not, and what does the damping term protect against? (b) Why do smaller groups help 3-bit
# weights more than 4-bit ones, and what do they cost in model size? (c) Why does act-order
# (quantizing the columns with the largest `diag H` first) help most when the inputs have a
# few outlier channels?

# %% [markdown] nbgrader={"grade": true, "grade_id": "q3-answer", "locked": false, "points": 2, "schema_version": 3, "solution": true, "task": false}
# (a) GPTQ minimises the layer's *output* error ||XW^T - XQ^T||, whose Hessian 2X^TX comes from
# the inputs: without X it cannot tell which columns' errors matter or how to compensate them.
# Damping adds a small multiple of mean(diag H) to the diagonal so H is positive definite
# (inputs that are always zero, or linearly dependent channels, make it singular) and the
# updates stay small. (b) With 8 levels per group (3 bits) each level is wide, so one outlier
# weight stretches the whole group's grid; smaller groups isolate it. Each group stores a scale
# (and a zero point), e.g. 16 + 8 bits per group: g = 32 adds 0.75 bit per weight, g = 128 only
# 0.19. (c) The columns quantized first have the most later columns left to absorb their
# error; outlier input channels give the largest errors in the output, so fixing them first
# lets the rest compensate, instead of quantizing them last when nothing can correct them.
