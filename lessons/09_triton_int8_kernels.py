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

# %% [markdown]
# # 09 · Triton int8 kernels and accelerators: why integers are fast, and how to write the kernel
#
# **What you will learn**
# - why int8 is faster on hardware: tensor-core throughput per number format (T4, A100,
#   H100/H200), **bytes moved**, **arithmetic intensity** and the **roofline**;
# - what accelerators beyond GPUs (NPUs, TPUs, phone DSPs, microcontrollers) require of a
#   quantized model;
# - the **Triton** programming model, built step by step and checked exactly against PyTorch:
#   a vector add, a tiled matmul, the **int8 GEMM** with an int32 accumulator, and the fused
#   **dequantizing epilogue**;
# - `qlib.kernels`: the backend dispatch (`choose_backend` says what it picked and why) and
#   `Int8Linear`, a W8A8 layer.
#
# Lesson 04 computed a quantized network with integers, emulated in int64 so that every step
# is visible. That is right for learning and slow in practice. Here we make the integer
# product fast. Without a GPU, Triton runs the kernels in its **interpreter** on the CPU:
# exact, slow, so the sizes stay small. Lab 07 follows: there you write the K-loop and the
# epilogue yourself.

# %%
import ipywidgets as ipw
import matplotlib.pyplot as plt
import torch
from IPython.display import display

from qlib import kernels, runtime
from qlib.kernels import Int8Linear, choose_backend, int8_matmul, kernel_device, load_triton

triton, tl = load_triton()  # before any @triton.jit: the interpreter when no GPU here has an int8 tl.dot
device = kernel_device()
torch.set_num_threads(1)
print(f"Triton {triton.__version__}; kernels run on {device}"
      + (" in the interpreter (TRITON_INTERPRET=1)" if kernels.interpreting() else " (compiled)"))

# %% [markdown]
# ## 1. Why int8 is faster: throughput per format
#
# A GPU's matrix units (NVIDIA's *tensor cores*) process a fixed number of bits per cycle, so
# halving the width of the operands doubles the operations per second. Peak dense
# tensor-core throughput from NVIDIA's data sheets (SXM versions; without 2:4 sparsity,
# which doubles the data-sheet headline numbers; T4 and A100 have no FP8):
#
# | GPU (architecture) | FP16 | BF16 | FP8 | INT8 | memory bandwidth |
# |---|---|---|---|---|---|
# | T4 (Turing, sm75) | 65 TFLOPS | — | — | 130 TOPS | 0.32 TB/s |
# | A100 80 GB (Ampere, sm80) | 312 | 312 | — | 624 | 2.0 TB/s |
# | H100 (Hopper, sm90) | 989 | 989 | 1979 | 1979 | 3.35 TB/s |
# | H200 (Hopper, sm90) | 989 | 989 | 1979 | 1979 | 4.8 TB/s |
#
# int8 is **2x** FP16/BF16 on every one of them; on Hopper FP8 runs at the same rate as int8,
# so there the choice between them is about accuracy (FP8 has a floating exponent, int8 a
# uniform grid with a scale). The T4, Colab's free GPU, has int8 tensor cores too, but
# Triton's int8 `tl.dot` needs Ampere (sm80) or later: on a T4 qlib uses `torch._int_mm`
# (cuBLAS) instead.

# %%
GPUS = {  # vendor data sheets, dense tensor-core peaks (TFLOPS / TOPS) and memory bandwidth (TB/s)
    "T4": {"fp16": 65, "int8": 130, "bw": 0.32},
    "A100": {"fp16": 312, "bf16": 312, "int8": 624, "bw": 2.0},
    "H100": {"fp16": 989, "bf16": 989, "fp8": 1979, "int8": 1979, "bw": 3.35},
    "H200": {"fp16": 989, "bf16": 989, "fp8": 1979, "int8": 1979, "bw": 4.8},
}
for name, g in GPUS.items():
    print(f"{name:5s} int8 / fp16 = {g['int8'] / g['fp16']:.0f}x;  ridge point (ops per byte moved): "
          f"fp16 {g['fp16'] / g['bw']:5.0f}, int8 {g['int8'] / g['bw']:5.0f}")

# %% [markdown]
# ## 2. Bytes moved, arithmetic intensity and the roofline
#
# Peak throughput is reached only if the data arrives fast enough. A GEMM
# `C (M, N) = A (M, K) @ B (K, N)` does $2MNK$ operations and moves at least
# $b_A MK + b_B KN + b_C MN$ bytes ($b$ = bytes per element). Their ratio is the
# **arithmetic intensity** $I$ (operations per byte). The **roofline** says the attainable
# speed is $\min(\text{peak},\ I \times \text{bandwidth})$: below the *ridge point*
# $\text{peak} / \text{bandwidth}$ a kernel is **memory-bound**, above it **compute-bound**.
#
# For a linear layer in an LLM, `M` is the number of tokens. Generating text one token at a
# time (*decode*, M = 1 to 16) is far below the ridge: there int8 helps by **halving the
# bytes** of the weights. Processing a long prompt (*prefill*, M in the thousands) is above
# it: there int8 helps by **doubling the peak**. Either way, 2x at best, on paper.

# %%
def intensity(m, k, n, in_bytes, out_bytes=2):
    """Operations per byte of a GEMM: 2MNK / (in_bytes (MK + KN) + out_bytes MN)."""
    return 2 * m * n * k / (in_bytes * (m * k + k * n) + out_bytes * m * n)


h = GPUS["H100"]
ai = torch.logspace(-1, 4, 200)
fig, ax = plt.subplots(figsize=(7, 4))
for fmt, in_bytes, color in (("bf16", 2, "tab:blue"), ("int8", 1, "tab:red")):
    ax.loglog(ai, torch.clamp(ai * h["bw"], max=h[fmt]), color=color, label=f"H100 {fmt} roof")
    for m in (1, 16, 256, 4096):
        x = intensity(m, 4096, 4096, in_bytes)
        y = min(h[fmt], x * h["bw"])
        ax.plot([x], [y], "o", color=color)
        ax.annotate(f"M={m}", (x, y), textcoords="offset points", xytext=(4, -12 if fmt == "int8" else 6),
                    fontsize=8, color=color)
ax.set_xlabel("arithmetic intensity (operations per byte)")
ax.set_ylabel("attainable TFLOPS / TOPS")
ax.set_title("Roofline of a 4096 x 4096 linear layer, M tokens (H100 data sheet)")
ax.legend()
plt.show()
for m in (1, 16, 256, 4096):
    t_bf16 = max(2 * m * 4096 * 4096 / (h["bf16"] * 1e12), (2 * (m * 4096 + 4096 * 4096) + 2 * m * 4096) / (h["bw"] * 1e12))
    t_int8 = max(2 * m * 4096 * 4096 / (h["int8"] * 1e12), (m * 4096 + 4096 * 4096 + 2 * m * 4096) / (h["bw"] * 1e12))
    print(f"M = {m:5d}: roofline time bf16 {1e6 * t_bf16:7.2f} us, int8 {1e6 * t_int8:7.2f} us -> {t_bf16 / t_int8:.2f}x")

# %% [markdown]
# ## 3. Accelerators beyond GPUs
#
# Most int8 inference runs not on data-center GPUs but on **NPUs** (neural processing units
# in phones and laptops), **TPUs** (Google's systolic arrays; Edge TPU on small boards),
# **DSPs** (e.g. Qualcomm Hexagon) and **microcontrollers** (Arm Cortex-M with CMSIS-NN,
# TensorFlow Lite Micro). Their integer units are simpler than a GPU's, and what they accept
# is narrower. A model that should run there typically needs:
#
# - **symmetric int8 weights** (zero point 0), so that no zero-point correction term is
#   computed per output; **per-channel** weight scales (one per output channel);
# - activations in int8 or uint8, **per tensor** (one scale for the whole tensor), with a zero
#   point; an **int32 bias** with scale `s_x * s_w`;
# - **integer-only** arithmetic end to end: int8 x int8 products accumulated in **int32**, and
#   **fixed-point requantization** of the int32 result to the next layer's int8, as a
#   multiplier and a shift (`M = M_0 * 2**-n`) instead of a float multiplication: lesson 04
#   built exactly this in `qlib.intops`.
#
# GPUs are more permissive: they have float units next to the integer ones, so the epilogue
# below dequantizes in float32 and per-token activation scales cost nothing. That is the
# W8A8 scheme of LLM.int8 and SmoothQuant, and what we build now.

# %% [markdown]
# ## 4. Triton, step 1: a vector add
#
# A Triton kernel is written for **one program instance**; a launch runs a **grid** of them.
# Program `pid` handles one **block** of `BLOCK` consecutive elements:
# `offs = pid * BLOCK + tl.arange(0, BLOCK)`. Pointers are addresses: `x_ptr + offs` is a
# block of addresses, `tl.load` reads them, `tl.store` writes. The last block usually sticks
# out past the end of the vector, so loads and stores take a **mask** `offs < n`.
# `BLOCK` is a `tl.constexpr`, known when the kernel is compiled, and a power of two.

# %%
@triton.jit
def add_kernel(x_ptr, y_ptr, out_ptr, n, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask)
    y = tl.load(y_ptr + offs, mask=mask)
    tl.store(out_ptr + offs, x + y, mask=mask)


def add(x, y, block=64):
    out = torch.empty_like(x)
    grid = (triton.cdiv(x.numel(), block),)  # enough programs to cover every element
    add_kernel[grid](x, y, out, x.numel(), BLOCK=block)
    return out


g = torch.Generator().manual_seed(0)
x = torch.randn(1000, generator=g).to(device)
y = torch.randn(1000, generator=g).to(device)
print("programs:", triton.cdiv(1000, 64), "| equal to torch:", torch.equal(add(x, y), x + y))

# %% [markdown]
# ## 5. Step 2: a tiled matmul
#
# For `C = A @ B`, program `(pid_m, pid_n)` of a 2-D grid owns a `BLOCK_M x BLOCK_N` **tile**
# of `C`. Its rows are `offs_m`, its columns `offs_n`; a block of `A` is addressed with the
# strides, `a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak` (a 2-D block of
# pointers, by broadcasting). The **K-loop** walks the shared dimension one block of `BLOCK_K`
# at a time and accumulates `tl.dot` of the two blocks. Masks read zeros past every edge:
# zeros add nothing to a dot product.
#
# Checking it exactly: float sums depend on their order, so we use small integer values,
# whose float32 sums are exact in any order.

# %%
@triton.jit
def matmul_kernel(a_ptr, b_ptr, c_ptr, M, N, K, stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak,
                    mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)
        b = tl.load(b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn,
                    mask=(offs_k[:, None] < K) & (offs_n[None, :] < N), other=0.0)
        acc += tl.dot(a, b, input_precision="ieee")
    tl.store(c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn, acc,
             mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


def matmul(a, b, blocks=(16, 16, 16)):
    M, K = a.shape
    N = b.shape[1]
    c = torch.empty(M, N, device=a.device)
    grid = (triton.cdiv(M, blocks[0]), triton.cdiv(N, blocks[1]))
    matmul_kernel[grid](a, b, c, M, N, K, *a.stride(), *b.stride(), *c.stride(),
                        BLOCK_M=blocks[0], BLOCK_N=blocks[1], BLOCK_K=blocks[2])
    return c


a = torch.randint(-3, 4, (37, 50), generator=g).float().to(device)
b = torch.randint(-3, 4, (50, 29), generator=g).float().to(device)
print("tiles:", triton.cdiv(37, 16) * triton.cdiv(29, 16), "| K-steps per tile:", triton.cdiv(50, 16),
      "| equal to torch:", torch.equal(matmul(a, b), a @ b))

# %% [markdown]
# ### Look: blocks and masks on a tiny matrix
#
# Each program writes its id into its tile, with the mask. Change the matrix and block sizes:
# how many programs run, and how many of the slots they compute are masked (wasted)? Blocks
# that fit the shape waste little; on a GPU, bigger blocks reuse each loaded value more often.

# %%
@triton.jit
def tile_map_kernel(out_ptr, M, N, stride_m, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    pid = pid_m * tl.num_programs(1) + pid_n
    ids = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32) + pid
    tl.store(out_ptr + offs_m[:, None] * stride_m + offs_n[None, :], ids,
             mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


def tile_map(m, n, block_m, block_n):
    out = torch.full((m, n), -1, dtype=torch.int32, device=device)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    tile_map_kernel[grid](out, m, n, out.stride(0), BLOCK_M=block_m, BLOCK_N=block_n)
    programs = grid[0] * grid[1]
    lines = [" ".join(f"{v:2d}" for v in row) for row in out.cpu().tolist()]
    slots = programs * block_m * block_n
    lines.append(f"\n{grid[0]} x {grid[1]} = {programs} programs; {slots} slots computed, "
                 f"{slots - m * n} masked ({100 * (slots - m * n) / slots:.0f}% wasted)")
    return "\n".join(lines)


sliders = {"m": ipw.IntSlider(value=10, min=1, max=20, description="M"),
           "n": ipw.IntSlider(value=13, min=1, max=20, description="N"),
           "block_m": ipw.Dropdown(options=[1, 2, 4, 8, 16], value=4, description="BLOCK_M"),
           "block_n": ipw.Dropdown(options=[1, 2, 4, 8, 16], value=8, description="BLOCK_N")}
out = ipw.Output()


def redraw(_change=None):
    with out:
        out.clear_output(wait=True)
        print(tile_map(**{k: w.value for k, w in sliders.items()}))


for w in sliders.values():
    w.observe(redraw, names="value")
display(ipw.VBox([ipw.HBox(list(sliders.values())[:2]), ipw.HBox(list(sliders.values())[2:]), out]))
redraw()
print(tile_map(10, 13, 4, 8))  # the same, as text (for readers without widgets)

# %% [markdown]
# ## 6. Step 3: the int8 GEMM
#
# Three things change for int8 (`qlib/kernels/gemm.py`; the kernel is printed below):
#
# - the loads read **int8** codes (`other=0` past the edges);
# - the accumulator is **int32**: `tl.zeros(..., dtype=tl.int32)` and
#   `acc = tl.dot(a, b, acc, out_dtype=tl.int32)`; the tensor cores multiply int8 and add in int32;
# - **overflow**: each product is at most $128 \cdot 128 = 2^{14}$ in size, so $K$ of them fit in
#   int32 while $K \cdot 2^{14} \le 2^{31} - 1$, i.e. $K \le 131071$ (`kernels.MAX_K`); qlib
#   refuses larger $K$. Real layers have $K$ in the thousands.
#
# qlib's kernel also orders its programs in groups of `GROUP_M` rows of tiles, so that
# programs running at the same time share rows of `A` in the cache. On a GPU the block sizes
# are autotuned; in the interpreter they are small (16 to 64).

# %%
from qlib.kernels import gemm  # noqa: E402  (imports the Triton kernels now that the mode is set)
import inspect  # noqa: E402

source = inspect.getsource(gemm.int8_gemm_kernel.fn)
print(source[source.index("    acc = tl.zeros"):source.index("    c_ptrs")])

a = torch.randint(-128, 128, (45, 70), generator=g, dtype=torch.int8)
b = torch.randint(-128, 128, (70, 33), generator=g, dtype=torch.int8)
a[0], b[:, 0] = -128, -128  # the extreme product 128 * 128 * K
c = gemm.triton_int8_matmul(a.to(device), b.to(device)).cpu()
print("int32:", c.dtype == torch.int32, "| equal to int64 matmul:", torch.equal(c.long(), a.long() @ b.long()),
      "| equal to torch._int_mm:", torch.equal(c, torch._int_mm(a, b)))
big = torch.full((1, kernels.MAX_K), -128, dtype=torch.int8)
print(f"K = {kernels.MAX_K}, every product 128 * 128: {int8_matmul(big, big.t()).item()} "
      f"<= 2**31 - 1 = {2**31 - 1}")

# %% [markdown]
# ## 7. Step 4: the fused dequantizing epilogue
#
# W8A8 inference of a linear layer: activations quantized **per token** (one scale per row
# of `A`, `row_scale`), weights **per channel** (one scale per column of `B = W.T`,
# `col_scale`). The real-valued output is
#
# $$ \mathrm{out}[m, n] = \mathrm{acc}[m, n] \cdot \mathrm{row\_scale}[m] \cdot \mathrm{col\_scale}[n] + \mathrm{bias}[n] $$
#
# computed in float32 and rounded once to float16, bfloat16 or float32. Done in the same
# kernel, on the tile still in registers, it saves writing the int32 `acc` (4 bytes per
# element) and reading it back. We check the kernel against PyTorch, bit for bit (the
# interpreter computes in NumPy float32 like PyTorch's CPU kernels), and against the float64
# result: within half an ulp of the output dtype, measured against the size of the terms
# `|acc * row_scale * col_scale| + |bias|` (when the bias cancels the product, the result is
# small and its *relative* error looks large, though every step rounded correctly).

# %%
from qlib.kernels.reference import scaled_epilogue_reference, scaled_matmul_float64  # noqa: E402

row_scale = torch.rand(45, generator=g) / 100
col_scale = torch.rand(33, generator=g) / 100
bias = torch.randn(33, generator=g)
for out_dtype in (torch.float16, torch.bfloat16, torch.float32):
    fused = gemm.triton_int8_matmul_scaled(a.to(device), b.to(device), row_scale.to(device), col_scale.to(device),
                                           bias.to(device), out_dtype).cpu()
    same = torch.equal(fused, scaled_epilogue_reference(c, row_scale, col_scale, bias, out_dtype))
    exact = scaled_matmul_float64(a, b, row_scale, col_scale, bias)
    size = scaled_matmul_float64(a, b, row_scale, col_scale).abs() + bias.double().abs()  # the terms' size
    rel = ((fused.double() - exact).abs() / size).max().item()
    print(f"{str(out_dtype):15s} bit-equal to PyTorch: {same}; max error vs float64: {rel:.1e} of the terms' "
          f"size (half an ulp of {str(out_dtype)[6:]}: {torch.finfo(out_dtype).eps / 2:.1e})")

# %% [markdown]
# ## 8. qlib.kernels: one dispatch, and a W8A8 layer
#
# `qlib.kernels.int8_matmul(a, b)` is the exact int8 product every integer path of qlib uses.
# `choose_backend` picks the implementation and says why: Triton on a GPU with int8 `tl.dot`
# (sm80+); `torch._int_mm` (cuBLAS on older GPUs such as the T4, oneDNN on x86 CPUs); exact
# int32 or float64 matmuls otherwise. The slow interpreter is chosen only when you set
# `TRITON_INTERPRET=1` yourself.
#
# `Int8Linear.from_float(linear)` quantizes the weights once per output channel and, at run
# time, each token's activations (`quantize_per_token`, a Triton kernel on the GPU), then
# runs the fused product.

# %%
a_cpu = torch.zeros(64, 512, dtype=torch.int8)
choice = choose_backend(a_cpu, a_cpu.t())
print("CPU tensors ->", choice.explain())

torch.manual_seed(0)  # nn.Linear's random initialisation, explicit
linear = torch.nn.Linear(256, 512)
qlinear = Int8Linear.from_float(linear)
print(qlinear)
tokens = torch.randn(16, 256, generator=g)
with torch.no_grad():
    y_float, y_int8 = linear(tokens), qlinear(tokens)
err = (y_int8 - y_float).abs()
print(f"W8A8 vs float: max |error| {err.max():.4f}, mean {err.mean():.5f}, outputs up to {y_float.abs().max():.2f}")

# %% [markdown]
# ## 9. Measured speed
#
# `benchmarks/int8_gemm.py` times the kernels: on a GPU, Triton vs `torch._int_mm` vs bf16
# and fp16 matmuls from 512 to 8192, the fused epilogue vs a separate dequantize, and
# `Int8Linear` vs `nn.Linear`; on the CPU, `torch._int_mm` vs fp32. Its committed results,
# `benchmarks/results/int8_gemm.json`, are read here (nothing is typed in).

# %%
bench = runtime.benchmark_result("int8_gemm")
if bench is not None:
    print(f"benchmark of {bench['created']}{' (fast mode)' if bench['fast'] else ''}, torch "
          f"{bench['versions']['torch']}, {bench['cpu']['threads']} CPU thread(s)")
    for row in bench["cpu"]["shapes"]:
        line = (f"  CPU {'x'.join(map(str, row['shape'])):>14s}: torch._int_mm is "
                f"{row['int_mm_speedup_vs_fp32']:.2f}x the fp32 matmul")
        if row["int_mm_speedup_vs_int64"]:
            line += f", {row['int_mm_speedup_vs_int64']:.0f}x the int64 emulation"
        print(line)
    lin = bench["cpu"]["int8_linear"]
    print(f"  CPU Int8Linear vs fp32 nn.Linear ({lin['shape']['tokens']} tokens, "
          f"{lin['shape']['in_features']} -> {lin['shape']['out_features']}): {lin['int8_vs_float']:.2f}x")
    gpu = bench["gpu"]
    if gpu["measured"]:
        print(f"GPU {gpu['name']}:")
        for row in gpu["gemm"]:
            print(f"  {'x'.join(map(str, row['shape'])):>16s}: " + ", ".join(f"{k} {v:.0f} TOPS" for k, v in row["tops"].items()))
        for t in bench["targets"]:
            print(f"  target {'met' if t['met'] else 'MISSED'}: {t['name']}: {t['value']:.2f} (>= {t['threshold']})")
    else:
        print(f"No GPU numbers were measured: {gpu['reason']}.")

# %% [markdown]
# ## Summary
#
# - Integer formats are fast because matrix units process more narrow operands per cycle
#   (int8 = 2x FP16/BF16 on T4, A100, H100, H200) and because they halve the bytes moved:
#   which one matters depends on the arithmetic intensity (roofline).
# - Accelerators beyond GPUs want symmetric per-channel int8 weights, integer-only arithmetic
#   and fixed-point requantization.
# - A Triton kernel is written per program: offsets from `program_id`, pointer arithmetic
#   with strides, masks at the edges, a K-loop accumulating `tl.dot` in int32, an epilogue
#   on the tile in registers.
# - int32 accumulation of int8 products is exact for $K \le 131071$.
#
# **Exercises**
# 1. In the widget, find block sizes for M = 20, N = 20 that waste nothing, and sizes that
#    waste more than half. What happens for M = 1 (decode)?
# 2. Compute the arithmetic intensity of a 1 x 4096 @ 4096 x 4096 product in bf16 and in
#    int8. Which is memory-bound on an H100, and what speed-up does the roofline predict?
# 3. Change `matmul` to accumulate in float16 (`tl.zeros(..., dtype=tl.float16)`): with the
#    integer-valued inputs above, when does the check start to fail, and why?
# 4. (GPU, sm80+) Run `benchmarks/int8_gemm.py` and compare the Triton kernel with
#    `torch._int_mm`. Which shapes favour which?
