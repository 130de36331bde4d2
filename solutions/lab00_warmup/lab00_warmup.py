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
# # Lab 00 · Warm-up: bytes and float16
#
# Three short questions to get used to the lab format (see lesson 00).
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

# %% [markdown] nbgrader={"grade": false, "grade_id": "outro", "locked": true, "schema_version": 3, "solution": false, "task": false}
# Done: you now know how many bytes a model takes at any bit width and what float16 can hold.
# Next: lesson 01 on number formats.
