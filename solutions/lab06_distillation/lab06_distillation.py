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
# # Lab 06 · Knowledge distillation of a quantized student
#
# You will write the distillation loss, one distillation step, and then repair a W4A4
# model with distillation on synthetic inputs only: no real image, no label (lesson 08).
# A written answer (Q4, graded by your instructor) then separates what distillation repairs
# from what good weight scales repair without any data.
#
# - Fill in every cell that says `# YOUR CODE HERE` (delete the `raise NotImplementedError()`).
# - The cell after each answer runs a **self-check**: it prints `PASS` or says what was expected.
#   When your instructor grades the lab, hidden checks on fresh random inputs run as well.
# - **Run All stops at the first failing self-check** (or the first answer not written yet):
#   that is expected while you work. Fix that answer, or run the cells below it one by one
#   (Shift+Enter) to see the other checks.
# - Do not rename the functions. Run the notebook top to bottom before you submit.

# %% nbgrader={"grade": false, "grade_id": "imports", "locked": true, "schema_version": 3, "solution": false, "task": false}
import copy

import torch
import torch.nn.functional as F

from qlib import check, data, models, ptq
from qlib.datafree import synthesize_bn
from qlib.modules import QuantConfig
from qlib.train import evaluate

# %% [markdown] nbgrader={"grade": false, "grade_id": "q1-text", "locked": true, "schema_version": 3, "solution": false, "task": false}
# ## Q1 (3 points) · The distillation loss
#
# Write `distillation_loss(student_logits, teacher_logits, T)` for logits of shape
# `(N, classes)` and a temperature `T > 0`. With the softened distributions
#
# $$ p = \mathrm{softmax}(t / T), \qquad q = \mathrm{softmax}(s / T) $$
#
# (teacher logits $t$, student logits $s$, softmax over the classes), return the 0-d tensor
#
# $$ L = T^2 \cdot \frac{1}{N} \sum_{i=1}^{N} \sum_{c} p_{ic} \left(\log p_{ic} - \log q_{ic}\right)
#      = T^2 \cdot \frac1N \sum_i \mathrm{KL}(p_i \,\|\, q_i). $$
#
# Take the logarithms with `F.log_softmax` (stable for large logits), keep the result a
# tensor (gradients must reach the student's logits), and do not `.item()` it.
# The check compares with `qlib.distill.kd_loss` and with
# `T**2 * F.kl_div(log_q, log_p, reduction="batchmean", log_target=True)`.

# %% nbgrader={"grade": false, "grade_id": "q1-answer", "locked": false, "schema_version": 3, "solution": true, "task": false}
def distillation_loss(student_logits, teacher_logits, T):
    ### BEGIN SOLUTION
    log_q = F.log_softmax(student_logits / T, dim=1)
    log_p = F.log_softmax(teacher_logits / T, dim=1)
    return T * T * (log_p.exp() * (log_p - log_q)).sum(dim=1).mean()
    ### END SOLUTION

# %% nbgrader={"grade": true, "grade_id": "q1-test", "locked": true, "points": 3, "schema_version": 3, "solution": false, "task": false}
check.lab06.distillation_loss(distillation_loss)
### BEGIN HIDDEN TESTS
check.lab06.distillation_loss_hidden(distillation_loss)
### END HIDDEN TESTS

# %% [markdown] nbgrader={"grade": false, "grade_id": "q2-text", "locked": true, "schema_version": 3, "solution": false, "task": false}
# ## Q2 (3 points) · One distillation step
#
# Write `distill_step(student, teacher, x, optimizer, T)`: one optimizer step that moves the
# student towards the teacher on the batch of inputs `x`.
#
# 1. compute the teacher's logits without gradients (`torch.no_grad()`): the teacher is a
#    fixed target and must neither change nor receive gradients;
# 2. compute the student's logits and `distillation_loss(student_logits, teacher_logits, T)`;
# 3. zero the gradients, back-propagate, take the optimizer step;
# 4. return the loss as a Python `float` (the value before the step).
#
# No labels appear anywhere: the teacher's outputs are the only supervision.

# %% nbgrader={"grade": false, "grade_id": "q2-answer", "locked": false, "schema_version": 3, "solution": true, "task": false}
def distill_step(student, teacher, x, optimizer, T):
    ### BEGIN SOLUTION
    with torch.no_grad():
        teacher_logits = teacher(x)
    loss = distillation_loss(student(x), teacher_logits, T)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.item()
    ### END SOLUTION

# %% nbgrader={"grade": true, "grade_id": "q2-test", "locked": true, "points": 3, "schema_version": 3, "solution": false, "task": false}
check.lab06.distill_step(distill_step)
### BEGIN HIDDEN TESTS
check.lab06.distill_step_hidden(distill_step)
### END HIDDEN TESTS

# %% [markdown] nbgrader={"grade": false, "grade_id": "q3-setup-text", "locked": true, "schema_version": 3, "solution": false, "task": false}
# ## Q3 (4 points) · Repair a W4A4 model without data
#
# The teacher is the shipped `cnn16` in float32. Pretend that its training data is gone: the
# only inputs we have are 128 images synthesized from the teacher's BatchNorm statistics
# (`qlib.datafree.synthesize_bn`, lab 05's method). The W4A4 student starts from the best
# data-free post-training quantization we know: **MSE per-channel weight scales** (they need no
# data) and 99.9th-percentile activation ranges calibrated on the synthetic images. The cell
# below measures it; the test digits are used only to *measure*, never to train.

# %% nbgrader={"grade": false, "grade_id": "q3-setup", "locked": true, "schema_version": 3, "solution": false, "task": false}
digits = data.load_digits(16)
teacher = models.pretrained("cnn16", seed=0).eval()
synthetic = synthesize_bn(teacher, digits.image_shape, num_samples=128, batch_size=64, steps=50, lr=0.5, seed=0,
                          progress=False).x
W4A4 = QuantConfig(weight_bits=4, act_bits=4, weight_observer="mse", act_observer="percentile",
                   act_observer_kwargs={"percentile": 99.9})
ptq_student = ptq.quantize_static(teacher, synthetic.split(64), W4A4)
ptq_accuracy = evaluate(ptq_student, digits.test)
print(f"teacher fp32: {evaluate(teacher, digits.test):.1f}%   W4A4 PTQ (MSE weights, synthetic calibration): "
      f"{ptq_accuracy:.1f}%")

# %% [markdown] nbgrader={"grade": false, "grade_id": "q3-text", "locked": true, "schema_version": 3, "solution": false, "task": false}
# Write `distill_student(student, teacher, x, steps, lr, T, batch_size, seed)`: train
# `student` in place for `steps` calls of your `distill_step`, with
# `torch.optim.Adam(student.parameters(), lr=lr)`. Each step uses a minibatch of
# `batch_size` rows of `x` drawn at random with a `torch.Generator` seeded with `seed`
# (`torch.randint(len(x), (batch_size,), generator=g)`). Keep both models in eval mode.
# Return the list of losses. The fake-quantized student learns through the rounding with
# the straight-through estimator. The cell after yours distills a copy of `ptq_student` for
# 40 steps at `T = 4`, `lr = 1e-3` on the synthetic images, and the check wants at least
# **97%** test accuracy and at least **1.5 points** more than PTQ alone (measured with the
# reference answer on the three shipped seeds: PTQ 95.3 / 91.4 / 93.1, distilled
# 98.6 / 93.3 / 97.8; minibatch seed 0).

# %% nbgrader={"grade": false, "grade_id": "q3-answer", "locked": false, "schema_version": 3, "solution": true, "task": false}
def distill_student(student, teacher, x, steps, lr, T, batch_size, seed):
    ### BEGIN SOLUTION
    g = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(student.parameters(), lr=lr)
    student.eval(), teacher.eval()
    losses = []
    for _ in range(steps):
        idx = torch.randint(len(x), (batch_size,), generator=g)
        losses.append(distill_step(student, teacher, x[idx], optimizer, T))
    return losses
    ### END SOLUTION

# %% nbgrader={"grade": false, "grade_id": "q3-run", "locked": true, "schema_version": 3, "solution": false, "task": false}
student = copy.deepcopy(ptq_student)
losses = distill_student(student, teacher, synthetic, steps=40, lr=1e-3, T=4.0, batch_size=32, seed=0)
print("loss: first", round(losses[0], 4), "last", round(losses[-1], 4))

# %% nbgrader={"grade": true, "grade_id": "q3-test", "locked": true, "points": 4, "schema_version": 3, "solution": false, "task": false}
check.lab06.distilled_student(student, teacher, digits.test, ptq_accuracy)

# %% [markdown] nbgrader={"grade": false, "grade_id": "q4-text", "locked": true, "schema_version": 3, "solution": false, "task": false}
# ## Q4 (2 points, graded by your instructor) · What did distillation repair?
#
# Earlier versions of this lab quantized the weights with **min-max** scales, and distillation
# "recovered" tens of points. The next cell repeats Q3 on `cnn16` seed 1 with both weight
# observers: PTQ, then your `distill_student` (40 steps, same settings), each on the same 128
# synthetic images.
#
# **Before** you run it, predict: will distillation's gain be larger with min-max or with MSE
# weight scales, and why? Then, in 4-6 sentences: split the min-max student's total gain into a
# part that good weight scales give without any data or training, and a part that only
# distillation gives. Quote the numbers (one test digit is 0.28 points), and say which of the
# two a paper should report as "the gain of distillation".

# %% nbgrader={"grade": false, "grade_id": "q4-measure", "locked": true, "schema_version": 3, "solution": false, "task": false}
teacher1 = models.pretrained("cnn16", seed=1).eval()
synthetic1 = synthesize_bn(teacher1, digits.image_shape, num_samples=128, batch_size=64, steps=50, lr=0.5, seed=0,
                           progress=False).x
print(f"cnn16 seed 1, fp32 {evaluate(teacher1, digits.test):.1f}%")
for weights in ("minmax", "mse"):
    config = QuantConfig(weight_bits=4, act_bits=4, weight_observer=weights, act_observer="percentile",
                         act_observer_kwargs={"percentile": 99.9})
    student1 = ptq.quantize_static(teacher1, synthetic1.split(64), config)
    before = evaluate(student1, digits.test)
    try:
        distill_student(student1, teacher1, synthetic1, steps=40, lr=1e-3, T=4.0, batch_size=32, seed=0)
        after = f"{evaluate(student1, digits.test):5.1f}%"
    except NotImplementedError:
        after = "(answer Q3 first)"
    print(f"  W4A4 {weights:6s} weight scales: PTQ {before:5.1f}%, distilled {after}")

# %% [markdown] nbgrader={"grade": true, "grade_id": "q4-answer", "locked": false, "points": 2, "schema_version": 3, "solution": true, "task": false}
# A model answer (the instructor's; the numbers come from the cell above). With min-max weight
# scales PTQ gives about 49 % and distillation lifts it to about 96 %: a gain of some 47 points.
# With MSE weight scales PTQ alone already gives about 91 %, and distillation reaches about
# 93-97 %. So of the 47 points, about 43 come from choosing the weight scales well, which needs
# neither data nor training (the MSE observer reads the weights), and only the last few points
# (about 2 to 5, several test digits, and they vary with the minibatch seed) are distillation's
# own contribution: it adjusts weights and biases to the rounding, which no choice of ranges can
# do. Both students end within that spread of each other (distillation also repairs bad weight
# scales, by moving the weights), so the end result hides the difference. A paper should report the gain over the strongest data-free baseline (MSE weights), not
# over min-max; otherwise it credits distillation with repairing a weight-scale problem.

# %% [markdown] nbgrader={"grade": false, "grade_id": "outro", "locked": true, "schema_version": 3, "solution": false, "task": false}
# Done: with a few dozen steps on synthetic images, the quantized student closes most of what
# is left between good data-free PTQ and the float teacher. Lesson 08 compares inputs (noise,
# BN-synthetic images, a generator) and shows why more steps on noise can start to hurt.
