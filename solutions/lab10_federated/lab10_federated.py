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
# # Lab 10 · Federated learning with quantized updates
#
# In federated learning every client sends its model update uplink every round. You will
# write the piece that makes this cheap (see lesson 14):
#
# 1. **Q1 (3 points)** quantize an update with stochastic rounding (unbiased);
# 2. **Q2 (1 point)** dequantize it;
# 3. **Q3 (2 points)** count the bytes it costs, exactly;
# 4. **Q4 (2 points)** one FedAvg aggregation round on the server;
# 5. **Q5 (2 points, graded by your instructor)** a short written answer.
#
# Fill in every cell that says `# YOUR CODE HERE` (delete the `raise NotImplementedError()`).
# Each test cell prints `PASS` or says what was expected; hidden checks on fresh random
# tensors run when your instructor grades the lab. Do not rename the functions.

# %% nbgrader={"grade": false, "grade_id": "imports", "locked": true, "schema_version": 3, "solution": false, "task": false}
import math

import torch

from qlib import check, data, models
from qlib.federated import fedavg, partition
from qlib.train import evaluate

# %% [markdown] nbgrader={"grade": false, "grade_id": "q1-text", "locked": true, "schema_version": 3, "solution": false, "task": false}
# ## Q1 (3 points) · Stochastic rounding
#
# Write `encode_stochastic(d, bits, generator)` for a float update tensor `d`. Return the pair
# `(codes, scale)`:
#
# - `qmax = 2**(bits - 1) - 1` (symmetric signed codes: 127, 7 or 1);
# - `scale = max|d| / qmax`, a 0-d float32 tensor (use `1.0` when `d` is all zeros);
# - `u = torch.rand(d.shape, generator=generator)` and `codes = floor(d * (1 / scale) + u)`,
#   clamped to `[-qmax, qmax]` and cast to `torch.int8`.
#
# Rounding `v = d / scale` up with probability `v - floor(v)` makes `E[codes] = v`: the server's
# average is unbiased. The check averages 3000 draws.

# %% nbgrader={"grade": false, "grade_id": "q1-answer", "locked": false, "schema_version": 3, "solution": true, "task": false}
def encode_stochastic(d, bits, generator):
    ### BEGIN SOLUTION
    qmax = 2 ** (bits - 1) - 1
    amax = d.abs().max().to(torch.float32)
    scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
    u = torch.rand(d.shape, generator=generator)
    codes = torch.floor(d.to(torch.float32) * (1 / scale) + u).clamp(-qmax, qmax).to(torch.int8)
    return codes, scale
    ### END SOLUTION

# %% nbgrader={"grade": true, "grade_id": "q1-test", "locked": true, "points": 3, "schema_version": 3, "solution": false, "task": false}
check.lab10.encode(encode_stochastic)
### BEGIN HIDDEN TESTS
check.lab10.encode_hidden(encode_stochastic)
### END HIDDEN TESTS

# %% [markdown] nbgrader={"grade": false, "grade_id": "q2-text", "locked": true, "schema_version": 3, "solution": false, "task": false}
# ## Q2 (1 point) · Decode
#
# Write `decode(codes, scale)`: the float32 tensor `codes * scale`.

# %% nbgrader={"grade": false, "grade_id": "q2-answer", "locked": false, "schema_version": 3, "solution": true, "task": false}
def decode(codes, scale):
    ### BEGIN SOLUTION
    return codes.to(torch.float32) * scale
    ### END SOLUTION

# %% nbgrader={"grade": true, "grade_id": "q2-test", "locked": true, "points": 1, "schema_version": 3, "solution": false, "task": false}
check.lab10.decode(decode)

# %% [markdown] nbgrader={"grade": false, "grade_id": "q3-text", "locked": true, "schema_version": 3, "solution": false, "task": false}
# ## Q3 (2 points) · Bytes on the wire
#
# Write `update_bytes(shape, bits)`: the exact number of bytes one encoded tensor of `shape`
# costs, with the codes packed `8 // bits` to a byte (a partly filled last byte still counts)
# and one float32 scale.

# %% nbgrader={"grade": false, "grade_id": "q3-answer", "locked": false, "schema_version": 3, "solution": true, "task": false}
def update_bytes(shape, bits):
    ### BEGIN SOLUTION
    return math.ceil(math.prod(shape) * bits / 8) + 4
    ### END SOLUTION

# %% nbgrader={"grade": true, "grade_id": "q3-test", "locked": true, "points": 2, "schema_version": 3, "solution": false, "task": false}
check.lab10.update_bytes(update_bytes)

# %% [markdown] nbgrader={"grade": false, "grade_id": "q4-text", "locked": true, "schema_version": 3, "solution": false, "task": false}
# ## Q4 (2 points) · One FedAvg round
#
# Write `fedavg_round(global_state, updates, num_examples)`: `global_state` is a dict of
# tensors, `updates` a list of dicts with the same keys (one per client, already decoded),
# `num_examples` the list of the clients' data sizes `n_k`. Return a **new** dict
#
# $$ w_{new} = w + \sum_k \frac{n_k}{n}\, \text{update}_k, \qquad n = \sum_k n_k .$$

# %% nbgrader={"grade": false, "grade_id": "q4-answer", "locked": false, "schema_version": 3, "solution": true, "task": false}
def fedavg_round(global_state, updates, num_examples):
    ### BEGIN SOLUTION
    n = sum(num_examples)
    return {k: w + sum(u[k] * (nk / n) for u, nk in zip(updates, num_examples))
            for k, w in global_state.items()}
    ### END SOLUTION

# %% nbgrader={"grade": true, "grade_id": "q4-test", "locked": true, "points": 2, "schema_version": 3, "solution": false, "task": false}
check.lab10.fedavg(fedavg_round)
### BEGIN HIDDEN TESTS
check.lab10.fedavg_hidden(fedavg_round)
### END HIDDEN TESTS

# %% [markdown] nbgrader={"grade": false, "grade_id": "run-text", "locked": true, "schema_version": 3, "solution": false, "task": false}
# ## Your codec in a federated run
#
# Four non-IID clients (Dirichlet alpha 0.3) on the digits, 3 rounds, 2-bit updates. The
# next cell trains with `qlib.federated` (stochastic vs nearest rounding) and prints the
# accuracy and the uplink bytes; compare the bytes with what your `update_bytes` predicts.

# %% nbgrader={"grade": false, "grade_id": "run", "locked": true, "schema_version": 3, "solution": false, "task": false}
digits = data.load_digits(8)
parts = partition.dirichlet_partition(digits.train.tensors[1], 4, 0.3, seed=0)
clients = partition.client_datasets(digits.train, parts)
for rounding in ("stochastic", "nearest"):
    model = models.create("mlp", seed=0)
    hist = fedavg.run_rounds(model, clients, fedavg.FedConfig(rounds=3, bits=2, rounding=rounding),
                             evaluate=lambda m: evaluate(m, digits.test))
    print(f"{rounding:10s}: accuracy per round {[round(a, 1) for a in hist['acc']]}, uplink {hist['bytes'][-1]:,} bytes")

# %% [markdown] nbgrader={"grade": false, "grade_id": "q5-text", "locked": true, "schema_version": 3, "solution": false, "task": false}
# ## Q5 (2 points, graded by your instructor) · Written answer
#
# In a few sentences: (a) why is round-to-nearest *biased* as a codec for model updates, and
# which entries of an update does it lose, round after round? (b) How does error feedback
# repair this, and what does it cost the client? (c) Why might non-IID clients make the
# problem worse?

# %% [markdown] nbgrader={"grade": true, "grade_id": "q5-answer", "locked": false, "points": 2, "schema_version": 3, "solution": true, "task": false}
# (a) Nearest rounding maps every entry with |d| < scale/2 to 0, every round: small but
# consistent gradient directions never reach the server, so E[decode] != d. (b) Error feedback
# keeps the residual e = (d + e) - decode(encode(d + e)) on the client and adds it to the next
# update, so what was dropped is sent later; it costs one float tensor of memory per client
# (the size of the model) and no extra bytes on the wire. (c) Non-IID clients send updates
# that disagree; the small, client-specific entries are the ones rounding drops, and errors
# no longer average out across clients.
