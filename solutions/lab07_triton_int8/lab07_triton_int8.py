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
# # Lab 07 · Triton int8 kernels: the K-loop, masks and a fused epilogue
#
# You will write the two pieces of a W8A8 matrix product that lesson 09 built step by step,
# in Triton, and the quantization step that feeds it:
#
# 1. the **K-loop with masks** of an int8 x int8 -> int32 GEMM (exact, for any shape);
# 2. the **fused dequantizing epilogue** `out = acc * row_scale[:, None] * col_scale[None, :] + bias`;
# 3. **per-token int8 quantization** of activations, in PyTorch, bit for bit.
#
# Without a GPU (or on a GPU older than Ampere, such as Colab's T4) Triton runs your kernels
# in its **interpreter** on the CPU: exact but slow, so the checks use small shapes.
#
# - Fill in every cell that says `# YOUR CODE HERE` (delete the `raise NotImplementedError()`).
# - The cell after each answer runs a **self-check**: it prints `PASS` or says what was expected.
#   When your instructor grades the lab, hidden checks on fresh random shapes and values run as well.
# - **Run All stops at the first failing self-check** (or the first answer not written yet):
#   that is expected while you work. Fix that answer, or run the cells below it one by one
#   (Shift+Enter) to see the other checks.
# - Do not rename the functions. Run the notebook top to bottom before you submit: after you
#   change a kernel, re-run the cells below it that use it.

# %% nbgrader={"grade": false, "grade_id": "imports", "locked": true, "schema_version": 3, "solution": false, "task": false}
import torch

from qlib import check
from qlib.kernels import kernel_device, load_triton

triton, tl = load_triton()  # before any @triton.jit: turns on the interpreter when no GPU can run int8 tl.dot
device = kernel_device()
print("Triton", triton.__version__, "| kernels run on", device,
      "(interpreter)" if device.type == "cpu" else "(compiled for the GPU)")

# %% [markdown] nbgrader={"grade": false, "grade_id": "q1-text", "locked": true, "schema_version": 3, "solution": false, "task": false}
# ## Q1 (3 points) · The K-loop with masks
#
# Program `(pid_m, pid_n)` of the kernel below computes one output tile
# `C[offs_m, offs_n]` of `C = A @ B` (`A (M, K)`, `B (K, N)`, int8). It gives you the tile's
# rows `offs_m` and columns `offs_n` (vectors of `BLOCK_M` and `BLOCK_N` indices, some of
# which may lie past the edge of the matrix) and calls your function for the sum over `K`:
#
# $$ \mathrm{acc}[i, j] = \sum_{k=0}^{K-1} A[\mathrm{offs\_m}[i], k]\; B[k, \mathrm{offs\_n}[j]] \quad (\text{int32}) $$
#
# Write `int8_tile_product`, a `@triton.jit` function returning `acc`, an int32 block of
# shape `(BLOCK_M, BLOCK_N)`:
#
# - start from `tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)`;
# - loop `for k0 in range(0, K, BLOCK_K)`: the columns of this step are `ks = k0 + tl.arange(0, BLOCK_K)`;
# - load the `(BLOCK_M, BLOCK_K)` block of `A` at `a_ptr + offs_m[:, None] * stride_am + ks[None, :] * stride_ak`
#   and the `(BLOCK_K, BLOCK_N)` block of `B` at `b_ptr + ks[:, None] * stride_bk + offs_n[None, :] * stride_bn`;
# - **masks**: load only where the row, the column *and* `k` are inside the matrix
#   (`offs_m < M`, `ks < K`, `offs_n < N`) and read `other=0` elsewhere: zeros add nothing to the sum;
# - accumulate `acc += tl.dot(a, b, out_dtype=tl.int32)`.
#
# `M`, `N`, `K` need not be multiples of the blocks (the check uses odd sizes). Blocks are
# powers of two, at least 16.

# %% nbgrader={"grade": false, "grade_id": "q1-answer", "locked": false, "schema_version": 3, "solution": true, "task": false}
@triton.jit
def int8_tile_product(a_ptr, b_ptr, M, N, K, stride_am, stride_ak, stride_bk, stride_bn, offs_m, offs_n,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    ### BEGIN SOLUTION
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(a_ptr + offs_m[:, None] * stride_am + ks[None, :] * stride_ak,
                    mask=(offs_m[:, None] < M) & (ks[None, :] < K), other=0)
        b = tl.load(b_ptr + ks[:, None] * stride_bk + offs_n[None, :] * stride_bn,
                    mask=(ks[:, None] < K) & (offs_n[None, :] < N), other=0)
        acc += tl.dot(a, b, out_dtype=tl.int32)
    return acc
    ### END SOLUTION

# %% [markdown] nbgrader={"grade": false, "grade_id": "q1-kernel-text", "locked": true, "schema_version": 3, "solution": false, "task": false}
# The kernel and its launcher (given): a 2-D grid of `cdiv(M, BLOCK_M) x cdiv(N, BLOCK_N)`
# programs; each stores its tile with a mask, so nothing is written past the edge.

# %% nbgrader={"grade": false, "grade_id": "q1-kernel", "locked": true, "schema_version": 3, "solution": false, "task": false}
@triton.jit
def int8_gemm_kernel(a_ptr, b_ptr, c_ptr, M, N, K, stride_am, stride_ak, stride_bk, stride_bn,
                     stride_cm, stride_cn, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = int8_tile_product(a_ptr, b_ptr, M, N, K, stride_am, stride_ak, stride_bk, stride_bn, offs_m, offs_n,
                            BLOCK_M, BLOCK_N, BLOCK_K)
    c_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn, acc, mask=c_mask)


def int8_gemm(a, b, block_m=16, block_n=16, block_k=16):
    """int32 ``a @ b`` of int8 ``a (M, K)`` and ``b (K, N)`` with your K-loop."""
    M, K = a.shape
    N = b.shape[1]
    c = torch.empty((M, N), dtype=torch.int32, device=a.device)
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    int8_gemm_kernel[grid](a, b, c, M, N, K, *a.stride(), *b.stride(), *c.stride(),
                           BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    return c

# %% nbgrader={"grade": true, "grade_id": "q1-test", "locked": true, "points": 3, "schema_version": 3, "solution": false, "task": false}
check.lab07.int8_gemm(int8_gemm)
### BEGIN HIDDEN TESTS
check.lab07.int8_gemm_hidden(int8_gemm)
### END HIDDEN TESTS

# %% [markdown] nbgrader={"grade": false, "grade_id": "q1-look-text", "locked": true, "schema_version": 3, "solution": false, "task": false}
# Not graded: what the masks protect. Multiply a `5 x 40` by a `40 x 3` matrix with 16 x 16
# tiles: one program, whose tile has 16 x 16 = 256 slots of which 15 are real, and three
# K-steps, the last one only half inside `A`.

# %% nbgrader={"grade": false, "grade_id": "q1-look", "locked": true, "schema_version": 3, "solution": false, "task": false}
try:
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-128, 128, (5, 40), generator=g, dtype=torch.int8)
    b = torch.randint(-128, 128, (40, 3), generator=g, dtype=torch.int8)
    c = int8_gemm(a.to(device), b.to(device)).cpu()
    print("programs:", triton.cdiv(5, 16) * triton.cdiv(3, 16), "| K-steps:", triton.cdiv(40, 16),
          "| real slots of the tile:", 5 * 3, "of", 16 * 16)
    print("exact:", torch.equal(c.long(), a.long() @ b.long()))
except NotImplementedError:
    print("answer Q1 first")
except Exception as err:  # the interpreter wraps errors raised inside kernels
    print("answer Q1 first" if "NotImplementedError" in str(err) else f"error: {err}")

# %% [markdown] nbgrader={"grade": false, "grade_id": "q2-text", "locked": true, "schema_version": 3, "solution": false, "task": false}
# ## Q2 (3 points) · The fused dequantizing epilogue
#
# In W8A8 inference, `A` holds per-token int8 activations (one scale per row, `row_scale (M,)`)
# and `B` per-channel int8 weights (one scale per column, `col_scale (N,)`). The real-valued
# product is
#
# $$ \mathrm{out}[m, n] = \mathrm{acc}[m, n] \cdot \mathrm{row\_scale}[m] \cdot \mathrm{col\_scale}[n] + \mathrm{bias}[n] $$
#
# Doing this while the tile is still in registers ("fusing" it) saves writing the int32
# `acc` to memory and reading it back. Write `dequant_epilogue`, a `@triton.jit` function that
# receives the tile `acc` (int32, `(BLOCK_M, BLOCK_N)`), its `offs_m`, `offs_n`, the sizes and
# three pointers, and returns the float32 tile `out`:
#
# - load `row_scale[offs_m]` and `col_scale[offs_n]` (float32) with masks `offs_m < M`, `offs_n < N`;
# - convert `acc` with `acc.to(tl.float32)` and multiply by `row_scale[:, None]` and `col_scale[None, :]`;
# - if `HAS_BIAS` (a compile-time constant: write `if HAS_BIAS:`), add `bias[offs_n]` as a row `[None, :]`.
#
# The given kernel calls your Q1 `int8_tile_product`, then your epilogue, and stores the
# result in the output dtype (float32 or float16). Q2 therefore needs a correct Q1.

# %% nbgrader={"grade": false, "grade_id": "q2-answer", "locked": false, "schema_version": 3, "solution": true, "task": false}
@triton.jit
def dequant_epilogue(acc, offs_m, offs_n, M, N, row_scale_ptr, col_scale_ptr, bias_ptr, HAS_BIAS: tl.constexpr):
    ### BEGIN SOLUTION
    row_scale = tl.load(row_scale_ptr + offs_m, mask=offs_m < M, other=0.0)
    col_scale = tl.load(col_scale_ptr + offs_n, mask=offs_n < N, other=0.0)
    out = acc.to(tl.float32) * row_scale[:, None] * col_scale[None, :]
    if HAS_BIAS:
        out = out + tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0)[None, :]
    return out
    ### END SOLUTION

# %% nbgrader={"grade": false, "grade_id": "q2-kernel", "locked": true, "schema_version": 3, "solution": false, "task": false}
@triton.jit
def int8_gemm_dequant_kernel(a_ptr, b_ptr, out_ptr, row_scale_ptr, col_scale_ptr, bias_ptr, M, N, K,
                             stride_am, stride_ak, stride_bk, stride_bn, stride_om, stride_on,
                             HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_K: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = int8_tile_product(a_ptr, b_ptr, M, N, K, stride_am, stride_ak, stride_bk, stride_bn, offs_m, offs_n,
                            BLOCK_M, BLOCK_N, BLOCK_K)
    out = dequant_epilogue(acc, offs_m, offs_n, M, N, row_scale_ptr, col_scale_ptr, bias_ptr, HAS_BIAS)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on, out.to(out_ptr.dtype.element_ty),
             mask=mask)


def int8_gemm_dequant(a, b, row_scale, col_scale, bias=None, out_dtype=torch.float32,
                      block_m=16, block_n=16, block_k=16):
    """``(a @ b) * row_scale[:, None] * col_scale[None, :] (+ bias)`` in ``out_dtype``, one kernel."""
    M, K = a.shape
    N = b.shape[1]
    out = torch.empty((M, N), dtype=out_dtype, device=a.device)
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    int8_gemm_dequant_kernel[grid](a, b, out, row_scale, col_scale, bias if bias is not None else row_scale,
                                   M, N, K, *a.stride(), *b.stride(), *out.stride(), HAS_BIAS=bias is not None,
                                   BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    return out

# %% nbgrader={"grade": true, "grade_id": "q2-test", "locked": true, "points": 3, "schema_version": 3, "solution": false, "task": false}
check.lab07.dequant_epilogue(int8_gemm_dequant)
### BEGIN HIDDEN TESTS
check.lab07.dequant_epilogue_hidden(int8_gemm_dequant)
### END HIDDEN TESTS

# %% [markdown] nbgrader={"grade": false, "grade_id": "q3-text", "locked": true, "schema_version": 3, "solution": false, "task": false}
# ## Q3 (2 points) · Per-token int8 quantization (PyTorch)
#
# The activations `A` of Q2 come from a float tensor `x (M, K)` (`M` tokens, `K` features),
# quantized on the fly with one scale per row, symmetric, in the narrow range `[-127, 127]`:
#
# $$ s_m = \max\Big(\frac{\max_k |x_{m,k}|}{127},\ \varepsilon\Big), \qquad
#    q_{m,k} = \mathrm{clamp}\big(\mathrm{round}(x_{m,k} \cdot (1 / s_m)),\ -127,\ 127\big) $$
#
# with $\varepsilon$ = `torch.finfo(torch.float32).eps` (so an all-zero row gets a positive
# scale) and `round` ties to even (`torch.round`).
#
# Write `quantize_per_token(x)` returning `(x_q, scale)`: `x_q` int8 of the shape of `x`,
# `scale` float32 of shape `(M,)`. `x` may be float32, float16 or bfloat16: compute in float32.
# Compute the reciprocal `1.0 / scale` in float32 and multiply (do not divide), as PyTorch's
# kernels do: the check compares bit for bit with `qlib`'s reference. Do not call
# `qlib.kernels` here: that is what you are rebuilding.

# %% nbgrader={"grade": false, "grade_id": "q3-answer", "locked": false, "schema_version": 3, "solution": true, "task": false}
def quantize_per_token(x):
    ### BEGIN SOLUTION
    x = x.to(torch.float32)
    scale = torch.clamp(x.abs().amax(dim=1) / 127, min=torch.finfo(torch.float32).eps)
    x_q = torch.clamp(torch.round(x * (1.0 / scale)[:, None]), -127, 127).to(torch.int8)
    return x_q, scale
    ### END SOLUTION

# %% nbgrader={"grade": true, "grade_id": "q3-test", "locked": true, "points": 2, "schema_version": 3, "solution": false, "task": false}
check.lab07.quantize_per_token(quantize_per_token)
### BEGIN HIDDEN TESTS
check.lab07.quantize_per_token_hidden(quantize_per_token)
### END HIDDEN TESTS

# %% [markdown] nbgrader={"grade": false, "grade_id": "all-text", "locked": true, "schema_version": 3, "solution": false, "task": false}
# All together (not graded): a W8A8 linear layer from your three pieces, against the float
# layer. The difference comes from rounding the weights and the activations, not from the
# GEMM, which is exact.

# %% nbgrader={"grade": false, "grade_id": "all", "locked": true, "schema_version": 3, "solution": false, "task": false}
try:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(24, 40, generator=g)
    w = torch.randn(20, 40, generator=g) / 6
    bias = torch.randn(20, generator=g) / 10
    w_q, w_scale = quantize_per_token(w)  # per output channel = per row of the weight
    x_q, x_scale = quantize_per_token(x)
    y = int8_gemm_dequant(x_q.to(device), w_q.t().to(device), x_scale.to(device), w_scale.to(device),
                          bias.to(device)).cpu()
    y_float = x @ w.t() + bias
    print(f"max |W8A8 - float| = {(y - y_float).abs().max():.4f} for outputs of size up to {y_float.abs().max():.2f}")
except NotImplementedError:
    print("answer Q1 to Q3 first")
except Exception as err:
    print("answer Q1 to Q3 first" if "NotImplementedError" in str(err) else f"error: {err}")

# %% [markdown] nbgrader={"grade": false, "grade_id": "outro", "locked": true, "schema_version": 3, "solution": false, "task": false}
# Done: your kernels are, in small, what `qlib.kernels` runs on a GPU (`gemm.py` adds grouped
# program ordering and autotuned block sizes; `quantize_kernel.py` is your Q3 as a kernel).
# Try at home: on a GPU with compute capability 8.0 or later, time your `int8_gemm` against
# `torch._int_mm` at 4096 x 4096 with blocks 128 x 128 x 64, and see `benchmarks/int8_gemm.py`.
