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
# # Lab 00 · Warm-up: bytes and float16
#
# Three short questions to get used to the lab format (see lesson 00), and a written one
# (Q4) that your instructor grades by hand.
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
from qlib import check

# %% [markdown] nbgrader={"grade": false, "grade_id": "q1-text", "locked": true, "schema_version": 3, "solution": false, "task": false}
# ## Q1 (2 points) · Model size in bytes
#
# Write `size_in_bytes(num_params, bits)`: the number of bytes needed to store `num_params`
# numbers of `bits` bits each, packed tightly (two 4-bit numbers share one byte). A partly
# used last byte still counts as a whole byte. Return an `int`.

# %% nbgrader={"grade": false, "grade_id": "q1-answer", "locked": false, "schema_version": 3, "solution": true, "task": false}
def size_in_bytes(num_params, bits):
    ### BEGIN SOLUTION
    return (num_params * bits + 7) // 8
    ### END SOLUTION

# %% nbgrader={"grade": true, "grade_id": "q1-test", "locked": true, "points": 2, "schema_version": 3, "solution": false, "task": false}
check.lab00.size_in_bytes(size_in_bytes)
### BEGIN HIDDEN TESTS
check.lab00.size_in_bytes_hidden(size_in_bytes)
### END HIDDEN TESTS

# %% [markdown] nbgrader={"grade": false, "grade_id": "q2-text", "locked": true, "schema_version": 3, "solution": false, "task": false}
# ## Q2 (2 points) · The error of casting to float16
#
# Write `fp16_cast_error(w)`: cast the float32 tensor `w` to `torch.float16`, back to float32,
# and return the largest absolute difference from `w` as a Python `float`.

# %% nbgrader={"grade": false, "grade_id": "q2-answer", "locked": false, "schema_version": 3, "solution": true, "task": false}
def fp16_cast_error(w):
    ### BEGIN SOLUTION
    return (w.to(torch.float16).float() - w).abs().max().item()
    ### END SOLUTION

# %% nbgrader={"grade": true, "grade_id": "q2-test", "locked": true, "points": 2, "schema_version": 3, "solution": false, "task": false}
check.lab00.cast_error(fp16_cast_error)
### BEGIN HIDDEN TESTS
check.lab00.cast_error_hidden(fp16_cast_error)
### END HIDDEN TESTS

# %% [markdown] nbgrader={"grade": false, "grade_id": "q3-text", "locked": true, "schema_version": 3, "solution": false, "task": false}
# ## Q3 (1 point) · What fits in float16?
#
# float16 has a much smaller range than float32: its largest finite value is 65504, and
# anything that rounds beyond it becomes infinity. Write `fits_in_float16(x)` returning a bool
# tensor of the shape of `x`: `True` where casting to float16 gives a finite number.

# %% nbgrader={"grade": false, "grade_id": "q3-answer", "locked": false, "schema_version": 3, "solution": true, "task": false}
def fits_in_float16(x):
    ### BEGIN SOLUTION
    return torch.isfinite(x.to(torch.float16))
    ### END SOLUTION

# %% nbgrader={"grade": true, "grade_id": "q3-test", "locked": true, "points": 1, "schema_version": 3, "solution": false, "task": false}
check.lab00.fits_fp16(fits_in_float16)
### BEGIN HIDDEN TESTS
check.lab00.fits_fp16_hidden(fits_in_float16)
### END HIDDEN TESTS

# %% [markdown] nbgrader={"grade": false, "grade_id": "q4-text", "locked": true, "schema_version": 3, "solution": false, "task": false}
# ## Q4 (2 points, graded by hand) · Predict, then measure: how large is the float16 error?
#
# **Before you run the next cell**, write in the answer cell below your prediction. Take
# Gaussian weights of typical size 1000, 1, 0.001 and 0.000001. For which does casting to
# float16 make the largest **absolute** error (your `fp16_cast_error`), and for which the
# largest error **relative** to the values? Think of what float16 stores: a sign, 5 exponent
# bits and 10 mantissa bits (lesson 01).
#
# Then run the cell and complete your answer (3-5 sentences): was your prediction right? Quote
# the numbers. Explain the last row: why does the relative error explode there?

# %% nbgrader={"grade": false, "grade_id": "q4-measure", "locked": true, "schema_version": 3, "solution": false, "task": false}
gen = torch.Generator().manual_seed(0)
print(f"{'size':>8s} {'max |w|':>9s} {'abs error':>10s} {'error/max|w|':>13s} {'worst relative':>15s} "
      f"{'below 6.1e-5':>13s}")
for size in (1e3, 1.0, 1e-3, 1e-6):
    w = torch.randn(10000, generator=gen) * size
    try:
        error = fp16_cast_error(w)
    except NotImplementedError:
        print("answer Q2 first")
        break
    relative = ((w.to(torch.float16).float() - w).abs() / w.abs()).max().item()
    tiny = (w.abs() < 2.0**-14).float().mean().item()  # below float16's smallest normal number
    print(f"{size:8.0e} {w.abs().max().item():9.3g} {error:10.3g} {error / w.abs().max().item():13.2e} "
          f"{relative:15.2e} {100 * tiny:12.1f}%")

# %% [markdown] nbgrader={"grade": true, "grade_id": "q4-answer", "locked": false, "points": 2, "schema_version": 3, "solution": true, "task": false}
# A model answer (the instructor's; the numbers come from the cell above). The absolute error
# grows with the size of the values: 1.5 for weights around 1000, 0.00097 around 1, 9.5e-7 around
# 0.001, 3e-8 around 1e-6. Relative to the largest value it is about the same, 2.5e-4 to 3.4e-4,
# for the first three: float16 keeps 11 significant bits, so rounding moves a value by at most
# 2**-11 (4.9e-4) of itself, whatever its exponent (the worst relative error is 4.8e-4 for sizes
# 1000 and 1). Not for tiny values: below 2**-14 = 6.1e-5 (float16's smallest normal number) the
# exponent cannot go lower, the step stays fixed at 2**-24 = 6e-8, and the values lose
# significant bits. At size 1e-6 every value is that small: the error is 0.65% of the largest
# value and 100% for the smallest ones (they become 0). At 0.001, 4.8% of the values are already
# there (worst relative error 0.17). That is why mixed-precision training scales the loss up
# before the backward pass: small gradients would underflow in float16.

# %% [markdown] nbgrader={"grade": false, "grade_id": "outro", "locked": true, "schema_version": 3, "solution": false, "task": false}
# Done: you now know how many bytes a model takes at any bit width and what float16 can hold.
# Next: lesson 01 on number formats.
