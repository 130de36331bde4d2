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
# # Lab 09 · Mixed precision: sensitivity, bit allocation, deployment
#
# You will build the three pieces of lesson 13 yourself:
#
# 1. a **sensitivity** measure: Hutchinson's estimate of the Hessian trace (HAWQ-v2);
# 2. the **optimal bit allocation** under a size budget (an ILP with `scipy.optimize.milp`, or
#    an exact dynamic program);
# 3. the **verification** of a quantized model exported to ONNX and run by ONNX Runtime;
#
# and a short written answer, graded by your instructor. You may use `qlib.export`,
# `qlib.intmodel`, `qlib.ptq` and scipy; not `qlib.mixed` (that is what you are rebuilding).
#
# - Fill in every cell that says `# YOUR CODE HERE` (delete the `raise NotImplementedError()`).
# - The cell after each answer runs a **self-check**: it prints `PASS` or says what was expected.
#   When your instructor grades the lab, hidden checks on fresh budgets and sensitivities run as well.
# - Do not rename the functions. Run the notebook top to bottom before you submit.

# %% nbgrader={"grade": false, "grade_id": "imports", "locked": true, "schema_version": 3, "solution": false, "task": false}
import numpy as np
import torch

from qlib import check, data, models
from qlib.fold import fold_batchnorm
from qlib.export import ort_predict, ort_session, to_onnx
from qlib.intmodel import convert_to_integer
from qlib.modules import QuantConfig, quant_layers
from qlib.ptq import quantize_static
from qlib.train import evaluate

torch.set_num_threads(1)

# %% [markdown] nbgrader={"grade": false, "grade_id": "q1-text", "locked": true, "schema_version": 3, "solution": false, "task": false}
# ## Q1 (2 points) · The Hessian trace, without the Hessian
#
# HAWQ-v2 rates a layer by $\mathrm{Tr}(H)/n \cdot \|Q(W) - W\|^2$, where $H$ is the Hessian of
# the loss with respect to the layer's weights $W$ ($n$ of them). Building $H$ costs $n^2$
# numbers; **Hutchinson's estimator** needs only Hessian-vector products:
#
# $$\mathrm{Tr}(H) = \mathbb{E}_v\left[v^\top H v\right], \qquad v_i = \pm 1 \text{ with probability } 1/2,$$
#
# and $Hv$ is the gradient of $g \cdot v$, where $g = \partial L / \partial W$ was computed
# with `create_graph=True` (`torch.autograd.grad(g, w, grad_outputs=v)`).
#
# Write `hessian_trace(loss_fn, weight, samples, seed)`: `loss_fn(w)` returns a scalar loss
# for a weight tensor `w` of `weight`'s shape and dtype. Average $v^\top H v$ over `samples`
# vectors drawn, one after the other, from **one** `torch.Generator().manual_seed(seed)`
# (`torch.randint(0, 2, shape, generator=g) * 2 - 1`). Return a Python float. Do not modify
# `weight` (work on `weight.detach().clone().requires_grad_(True)`).

# %% nbgrader={"grade": false, "grade_id": "q1-answer", "locked": false, "schema_version": 3, "solution": true, "task": false}
def hessian_trace(loss_fn, weight, samples, seed):
    ### BEGIN SOLUTION
    w = weight.detach().clone().requires_grad_(True)
    grad = torch.autograd.grad(loss_fn(w), w, create_graph=True)[0]
    gen = torch.Generator().manual_seed(seed)
    total = 0.0
    for _ in range(samples):
        v = (torch.randint(0, 2, w.shape, generator=gen) * 2 - 1).to(w.dtype)
        hv = torch.autograd.grad(grad, w, grad_outputs=v, retain_graph=True)[0]
        total += float((v * hv).sum())
    return total / samples
    ### END SOLUTION

# %% nbgrader={"grade": true, "grade_id": "q1-test", "locked": true, "points": 2, "schema_version": 3, "solution": false, "task": false}
check.lab09.hessian_trace(hessian_trace)
### BEGIN HIDDEN TESTS
check.lab09.hessian_trace_hidden(hessian_trace)
### END HIDDEN TESTS

# %% [markdown] nbgrader={"grade": false, "grade_id": "q2-text", "locked": true, "schema_version": 3, "solution": false, "task": false}
# ## Q2 (3 points) · The optimal allocation
#
# Given `sensitivity[layer][bits]` (a float for each bit width in `(2, 3, 4, 8)`), `sizes[layer]`
# (number of weights) and `budget_bits`, choose one width per layer to
#
# $$\min \sum_l \Omega_l(b_l) \quad \text{subject to} \quad \sum_l n_l\, b_l \le B.$$
#
# Write `allocate(sensitivity, sizes, budget_bits)` returning `{layer: bits}`. It must be
# **optimal** (the checks compare with brute force), not greedy. Two ways:
#
# - an ILP: binary $x_{l,b}$, $\sum_b x_{l,b} = 1$ per layer, the size row $\le B$, solved by
#   `scipy.optimize.milp(c, constraints=[LinearConstraint(...), ...], integrality=..., bounds=Bounds(0, 1))`;
# - a dynamic program over the layers: the best cost for each total size used so far (sizes
#   are integers, so the table is exact).
#
# You may assume the budget can always be met (every layer at 2 bits fits).

# %% nbgrader={"grade": false, "grade_id": "q2-answer", "locked": false, "schema_version": 3, "solution": true, "task": false}
def allocate(sensitivity, sizes, budget_bits):
    ### BEGIN SOLUTION
    from scipy.optimize import Bounds, LinearConstraint, milp

    names = list(sizes)
    bits = sorted(sensitivity[names[0]])
    cost = np.array([[sensitivity[n][b] for b in bits] for n in names]).ravel()
    one_each = np.kron(np.eye(len(names)), np.ones(len(bits)))
    size_row = np.array([[sizes[n] * b for b in bits] for n in names], dtype=float).ravel()
    res = milp(cost, constraints=[LinearConstraint(one_each, 1, 1), LinearConstraint(size_row[None], 0, budget_bits)],
               integrality=np.ones(cost.size), bounds=Bounds(0, 1))
    x = np.round(res.x).reshape(len(names), len(bits))
    return {n: bits[int(x[i].argmax())] for i, n in enumerate(names)}
    ### END SOLUTION

# %% nbgrader={"grade": true, "grade_id": "q2-test", "locked": true, "points": 3, "schema_version": 3, "solution": false, "task": false}
check.lab09.allocate(allocate)
### BEGIN HIDDEN TESTS
check.lab09.allocate_hidden(allocate)
### END HIDDEN TESTS

# %% [markdown] nbgrader={"grade": false, "grade_id": "q3-text", "locked": true, "schema_version": 3, "solution": false, "task": false}
# ## Q3 (2 points) · Export and verify
#
# A model that leaves Python must be checked where it lands. Write `verify_onnx(qmodel, x)`
# for a converted qlib model (`quantize_static`) and a batch of test images `x`:
#
# 1. export it with `to_onnx(qmodel, x[:2])` (an ONNX model in QDQ form) and open it with
#    `ort_session(...)`; get the logits with `ort_predict(session, x)`;
# 2. compute qlib's integer-model logits, `convert_to_integer(qmodel)(x)`;
# 3. return `{"agreement": fraction of images whose predicted class (argmax) is the same,
#    "max_abs_diff": the largest |difference| between the two logit tensors}` as floats.

# %% nbgrader={"grade": false, "grade_id": "q3-answer", "locked": false, "schema_version": 3, "solution": true, "task": false}
def verify_onnx(qmodel, x):
    ### BEGIN SOLUTION
    onnx_logits = ort_predict(ort_session(to_onnx(qmodel, x[:2])), x)
    int_logits = convert_to_integer(qmodel)(x)
    agreement = (onnx_logits.argmax(1) == int_logits.argmax(1)).float().mean().item()
    return {"agreement": agreement, "max_abs_diff": (onnx_logits - int_logits).abs().max().item()}
    ### END SOLUTION

# %% nbgrader={"grade": true, "grade_id": "q3-test", "locked": true, "points": 2, "schema_version": 3, "solution": false, "task": false}
check.lab09.verify_onnx(verify_onnx)
### BEGIN HIDDEN TESTS
check.lab09.verify_onnx_hidden(verify_onnx)
### END HIDDEN TESTS

# %% [markdown] nbgrader={"grade": false, "grade_id": "look-text", "locked": true, "schema_version": 3, "solution": false, "task": false}
# ## Look: your allocation on cnn16
#
# Not graded. Sensitivities from your `hessian_trace` (HAWQ-v2's formula), your allocation at
# the size of uniform 3-bit weights, and the accuracy of both after PTQ (8-bit activations).

# %% nbgrader={"grade": false, "grade_id": "look", "locked": true, "schema_version": 3, "solution": false, "task": false}
digits16 = data.load_digits(16)
calib = data.calibration_batches(digits16.train, num_samples=256, batch_size=64, seed=0)
model = models.pretrained("cnn16", seed=0).eval()
folded = fold_batchnorm(model).eval()  # the layers as they will be quantized
layers = {n: m for n, m in folded.named_modules() if n in quant_layers(model)}
x_val, y_val = digits16.val.tensors


def loss_of(layer):
    def loss_fn(w):
        saved = layer.weight
        del layer.weight
        layer.weight = w
        try:
            return torch.nn.functional.cross_entropy(folded(x_val), y_val)
        finally:
            del layer.weight
            layer.weight = saved
    return loss_fn


def weight_error(w, bits):
    qmax = 2 ** (bits - 1) - 1
    scale = w.abs().amax(dim=tuple(range(1, w.dim())), keepdim=True) / qmax
    return float(((w / scale).round().clamp(-qmax - 1, qmax) * scale - w).pow(2).sum())


try:
    sizes = {n: m.weight.numel() for n, m in layers.items()}
    traces = {n: hessian_trace(loss_of(m), m.weight.detach(), 4, 0) for n, m in layers.items()}
    sens = {n: {b: traces[n] / sizes[n] * weight_error(m.weight.detach(), b) for b in (2, 3, 4, 8)}
            for n, m in layers.items()}
    alloc = allocate(sens, sizes, 3 * sum(sizes.values()))
    for label, per_layer in (("uniform W3", {n: QuantConfig(weight_bits=3) for n in sizes}),
                             (f"mixed {alloc}", {n: QuantConfig(weight_bits=b) for n, b in alloc.items()})):
        print(f"{label:50s} {evaluate(quantize_static(model, calib, per_layer=per_layer), digits16.test):.2f}%")
except NotImplementedError:
    print("answer Q1 and Q2 first")

# %% [markdown] nbgrader={"grade": false, "grade_id": "q4-text", "locked": true, "schema_version": 3, "solution": false, "task": false}
# ## Q4 (2 points, graded by your instructor) · Explain
#
# In a few sentences: which layers did your allocation give the most bits, and why does the
# sensitivity formula favour them (think of $n_l$ and of what the Hessian trace measures)?
# Then: why would a greedy rule ("lower the layer whose sensitivity grows least per bit
# saved, until the budget holds") miss the optimum, and why is the exported model's ONNX file
# no smaller for 3-bit weights than for 8-bit ones?

# %% [markdown] nbgrader={"grade": true, "grade_id": "q4-answer", "locked": false, "points": 2, "schema_version": 3, "solution": true, "task": false}
# ### BEGIN SOLUTION
# The first convolution and the classifier get the most bits: they hold few weights ($n_l$
# small), so every bit they get costs little size, and their Hessian trace per weight is
# large (each weight touches every pixel, or directly the logits). The big middle
# convolution holds most weights, so it is cheap in loss per bit saved and is pushed down.
# Greedy lowers one layer one step at a time by the best immediate rate, so it cannot see
# that a larger drop elsewhere (e.g. 4 -> 2 bits of a big layer) frees room for a more
# sensitive small layer; the ILP weighs all combinations at once. ONNX stores the weight
# codes in int8 containers (one byte each) whatever their range, so 3-bit codes take as much
# room as 8-bit ones unless the format packs them (int4 types, or compression).
# ### END SOLUTION

# %% [markdown] nbgrader={"grade": false, "grade_id": "outro", "locked": true, "schema_version": 3, "solution": false, "task": false}
# Done: this is HAWQ-v3's recipe (Hessian-aware sensitivity, an ILP under a size budget)
# and the check every deployment needs (the runtime agrees with the reference). The library
# versions are `qlib.mixed` and `qlib.export`.
