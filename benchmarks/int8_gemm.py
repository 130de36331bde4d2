"""Benchmark: int8 GEMMs (Triton, ``torch._int_mm``) against float matmuls, fused epilogue, Int8Linear.

On a CUDA GPU (the study the course is after):

- square shapes 512 ... 8192 and LLM-like ones (tokens x hidden -> MLP): qlib's Triton int8
  kernel (``qlib.kernels.gemm``) vs ``torch._int_mm`` (cuBLAS int8) vs ``torch.matmul`` in
  bfloat16 and float16, in TOPS (``2 M N K / time``) and as ratios;
- the fused epilogue (``int8_matmul_scaled``, bf16 output) vs ``_int_mm`` followed by a
  separate dequantize (``scaled_epilogue_reference``);
- ``Int8Linear`` (per-token quantize kernel + fused GEMM) vs ``nn.Linear`` in bf16 on a
  transformer MLP shape (4096 tokens, 4096 -> 14336).

Every result is checked before timing (int32 products equal to float64 ones, epilogues within
bf16 rounding); timing uses CUDA events after warm-up (compilation and autotuning), median of
many runs; inputs are random int8 codes. The JSON records the GPU's name, the versions and
the block configuration autotuning chose for every shape. Targets (H100/H200-class GPU):
Triton >= 90% of ``_int_mm`` at 4096 and 8192, >= 1.6x bf16 matmul, fused >= 1.2x unfused.

Without a GPU it says so (``gpu.measured = false`` with the reason) and runs the CPU
comparison only: ``torch._int_mm`` (exact int8) vs fp32 matmul vs the int64 emulation of
``qlib.intops``, small shapes, median of repeats in one run, as ratios; and ``Int8Linear``
(``torch._int_mm`` path) vs an fp32 ``nn.Linear``.

    python benchmarks/int8_gemm.py                # -> benchmarks/results/int8_gemm.json
    python benchmarks/int8_gemm.py --fast --out /tmp/int8_gemm.json
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402
from benchmarks.common import header, target_lines  # noqa: E402
from qlib.kernels import Int8Linear, int8_matmul, int8_matmul_scaled, triton_status  # noqa: E402
from qlib.kernels.reference import scaled_epilogue_reference  # noqa: E402

SEED = 0
CPU_SHAPES = [(64, 512, 256), (256, 1024, 1024), (512, 2048, 2048)]
CPU_SHAPES_FAST = [(64, 512, 256)]
GPU_SQUARE = [512, 1024, 2048, 4096, 8192]
GPU_LLM = [(2048, 4096, 14336), (2048, 14336, 4096), (4096, 4096, 4096 * 3), (32, 4096, 14336)]
MLP = {"tokens": 4096, "in_features": 4096, "out_features": 14336}
TARGETS = {"triton_vs_int_mm": 0.9, "triton_vs_bf16": 1.6, "fused_vs_unfused": 1.2}


def operands(m: int, k: int, n: int, device, seed: int = SEED):
    """Random int8 codes: ``a (M, K)`` and ``b = w.T`` of a weight ``w (N, K)`` (column-major b)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
    w = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    return a.to(device), w.to(device).t()


def cpu_timer(fn, repeats: int) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def cuda_timer(fn, repeats: int) -> float:
    """Median time of ``fn()`` from CUDA events, after warm-up runs (compilation, autotuning)."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def check_exact(got: torch.Tensor, a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    want = (a.double() @ b.double()).to(torch.int64)
    if not torch.equal(got.to(torch.int64), want):
        raise AssertionError(f"{what}: the int32 product is not exact")


def cpu_part(fast: bool) -> dict:
    rows = []
    for m, k, n in (CPU_SHAPES_FAST if fast else CPU_SHAPES):
        a, b = operands(m, k, n, "cpu")
        check_exact(int8_matmul(a, b, backend="int_mm"), a, b, f"_int_mm {m}x{k}x{n}")
        af, bf = a.float(), b.float()
        al, bl = a.long(), b.long()
        repeats = 5 if fast else 15
        t = {"int_mm": cpu_timer(lambda: torch._int_mm(a, b), repeats),
             "fp32": cpu_timer(lambda: af @ bf, repeats)}
        if m * k * n <= 64 * 512 * 256 * 16:  # the int64 emulation is slow: small shapes only
            t["int64_emulation"] = cpu_timer(lambda: al @ bl, max(3, repeats // 3))
        rows.append({"shape": [m, k, n], "median_s": t,
                     "int_mm_speedup_vs_fp32": t["fp32"] / t["int_mm"],
                     "int_mm_speedup_vs_int64": (t["int64_emulation"] / t["int_mm"]) if "int64_emulation" in t else None})
    tokens, dims = (64, (512, 1024)) if fast else (256, (1024, 4096))
    linear = linear_row(tokens, *dims, "cpu", cpu_timer, repeats, dtype=torch.float32)
    return {"threads": torch.get_num_threads(), "shapes": rows, "int8_linear": linear}


def gemm_row(m, k, n, device, timer, repeats: int, use_triton: bool) -> dict:
    """One shape: every GEMM checked, then timed; TOPS and ratios."""
    a, b = operands(m, k, n, device)
    ops = 2.0 * m * n * k
    t, configs = {}, {}
    if use_triton:
        from qlib.kernels import gemm

        check_exact(gemm.triton_int8_matmul(a, b), a, b, f"triton {m}x{k}x{n}")
        t["triton"] = timer(lambda: gemm.triton_int8_matmul(a, b), repeats)
        configs = gemm.last_config()
    if device != "cpu" or hasattr(torch, "_int_mm"):
        check_exact(torch._int_mm(a, b), a, b, f"_int_mm {m}x{k}x{n}")
        t["int_mm"] = timer(lambda: torch._int_mm(a, b), repeats)
    for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        af, bf = a.to(dtype), b.to(dtype)
        t[name] = timer(lambda: af @ bf, repeats)
    row = {"shape": [m, k, n], "median_s": t, "tops": {k_: ops / v / 1e12 for k_, v in t.items()},
           "config": configs}
    if "triton" in t:
        row["triton_vs_int_mm"] = t["int_mm"] / t["triton"]
        row["triton_vs_bf16"] = t["bf16"] / t["triton"]
    row["int_mm_vs_bf16"] = t["bf16"] / t["int_mm"]
    return row


def epilogue_row(m, k, n, device, timer, repeats: int) -> dict:
    """Fused (Triton GEMM + epilogue in one kernel) vs ``_int_mm`` then a separate dequantize."""
    a, b = operands(m, k, n, device)
    g = torch.Generator().manual_seed(SEED + 1)
    rs = (torch.rand(m, generator=g) / 100).to(device)
    cs = (torch.rand(n, generator=g) / 100).to(device)
    bias = torch.randn(n, generator=g).to(device)
    fused = lambda: int8_matmul_scaled(a, b, rs, cs, bias, torch.bfloat16, backend="triton")  # noqa: E731
    unfused = lambda: scaled_epilogue_reference(torch._int_mm(a, b), rs, cs, bias, torch.bfloat16)  # noqa: E731
    want = scaled_epilogue_reference((a.double() @ b.double()).to(torch.int32), rs, cs, bias, torch.float32)
    got = fused().float()
    tol = torch.finfo(torch.bfloat16).eps * want.abs() + 1e-6 * (want.abs().max() + 1)
    if not ((got - want).abs() <= tol).all():
        raise AssertionError(f"fused epilogue {m}x{k}x{n}: not within bf16 rounding")
    t = {"fused": timer(fused, repeats), "unfused": timer(unfused, repeats)}
    return {"shape": [m, k, n], "median_s": t, "fused_vs_unfused": t["unfused"] / t["fused"]}


def linear_row(tokens, in_features, out_features, device, timer, repeats: int,
               dtype: torch.dtype = torch.bfloat16) -> dict:
    """``Int8Linear`` (quantize + int8 GEMM + epilogue) vs ``nn.Linear`` in ``dtype`` on an MLP shape."""
    torch.manual_seed(SEED)  # nn.Linear's initialisation, explicit
    lin = torch.nn.Linear(in_features, out_features).to(device)
    q = Int8Linear.from_float(lin)
    lin_f = lin.to(dtype)
    x = torch.randn(tokens, in_features, generator=torch.Generator().manual_seed(SEED)).to(device, dtype)
    with torch.no_grad():
        err = (q(x).float() - lin_f(x).float()).abs().max().item()
        t = {"int8_linear": timer(lambda: q(x), repeats), "float_linear": timer(lambda: lin_f(x), repeats)}
    return {"shape": {"tokens": tokens, "in_features": in_features, "out_features": out_features},
            "float_dtype": str(dtype).replace("torch.", ""), "median_s": t,
            "int8_vs_float": t["float_linear"] / t["int8_linear"], "max_abs_diff_vs_float": err}


def gpu_part(fast: bool) -> dict:
    if not torch.cuda.is_available():
        return {"measured": False, "reason": "no CUDA GPU on the machine that ran this benchmark: the Triton, "
                                             "_int_mm (cuBLAS) and bf16/fp16 GPU comparisons were skipped"}
    device = torch.device("cuda")
    use_triton, why = triton_status(device)
    repeats = 10 if fast else 50
    square = GPU_SQUARE[:2] if fast else GPU_SQUARE
    rows = [gemm_row(s, s, s, device, cuda_timer, repeats, use_triton) for s in square]
    rows += [gemm_row(m, k, n, device, cuda_timer, repeats, use_triton) for m, k, n in ([] if fast else GPU_LLM)]
    out = {"measured": True, "name": torch.cuda.get_device_name(device),
           "capability": list(torch.cuda.get_device_capability(device)), "triton": use_triton,
           "triton_reason": why, "gemm": rows}
    if use_triton:
        import triton

        out["versions"] = {"triton": triton.__version__, "cuda": torch.version.cuda}
        sizes = [1024] if fast else [2048, 4096, 8192]
        out["epilogue"] = [epilogue_row(s, s, s, device, cuda_timer, repeats) for s in sizes]
        mlp = {**MLP, "tokens": 512} if fast else MLP
        out["int8_linear"] = linear_row(mlp["tokens"], mlp["in_features"], mlp["out_features"], device,
                                        cuda_timer, repeats)
    return out


def targets(gpu: dict) -> list[dict]:
    if not gpu.get("measured") or not gpu.get("triton"):
        return []
    big = [r for r in gpu["gemm"] if r["shape"][0] == r["shape"][1] == r["shape"][2] and r["shape"][0] >= 4096]
    out = []
    if big:
        for key, name in (("triton_vs_int_mm", "Triton / _int_mm speed at 4096 and 8192 (min)"),
                          ("triton_vs_bf16", "Triton / bf16 matmul speed at 4096 and 8192 (min)")):
            value = min(r[key] for r in big)
            out.append({"name": name, "value": value, "threshold": TARGETS[key], "met": value >= TARGETS[key]})
    if gpu.get("epilogue"):
        value = min(r["fused_vs_unfused"] for r in gpu["epilogue"])
        out.append({"name": "fused epilogue / (_int_mm + dequantize) speed (min)", "value": value,
                    "threshold": TARGETS["fused_vs_unfused"], "met": value >= TARGETS["fused_vs_unfused"]})
    return out


def run(fast: bool, log=print) -> dict:
    result = header("int8_gemm", [SEED], fast)
    log("CPU: torch._int_mm vs fp32 matmul vs int64 emulation")
    result["cpu"] = cpu_part(fast)
    log("GPU part" + ("" if torch.cuda.is_available() else ": skipped, no CUDA GPU"))
    result["gpu"] = gpu_part(fast)
    result["targets"] = targets(result["gpu"])
    return result


def table(result: dict) -> str:
    lines = [f"CPU ({result['cpu']['threads']} thread(s)): median ms and _int_mm speed-ups"]
    for r in result["cpu"]["shapes"]:
        t = r["median_s"]
        vs64 = r["int_mm_speedup_vs_int64"]
        lines.append(f"  {'x'.join(map(str, r['shape'])):>16s}  int_mm {1e3 * t['int_mm']:8.3f}  fp32 "
                     f"{1e3 * t['fp32']:8.3f}  -> {r['int_mm_speedup_vs_fp32']:5.2f}x fp32"
                     + (f", {vs64:5.1f}x int64" if vs64 else ""))
    lin = result["cpu"]["int8_linear"]
    lines.append(f"  Int8Linear vs fp32 nn.Linear {lin['shape']}: {lin['int8_vs_float']:.2f}x "
                 f"(max |diff| {lin['max_abs_diff_vs_float']:.3g})")
    gpu = result["gpu"]
    if not gpu["measured"]:
        lines.append(f"GPU: not measured ({gpu['reason']})")
        return "\n".join(lines)
    lines.append(f"GPU {gpu['name']} (sm{gpu['capability'][0]}{gpu['capability'][1]}): TOPS")
    for r in gpu["gemm"]:
        tops = "  ".join(f"{k} {v:7.1f}" for k, v in r["tops"].items())
        lines.append(f"  {'x'.join(map(str, r['shape'])):>18s}  {tops}")
    for r in gpu.get("epilogue", []):
        lines.append(f"  fused epilogue {r['shape'][0]}: {r['fused_vs_unfused']:.2f}x the unfused pair")
    if "int8_linear" in gpu:
        lines.append(f"  Int8Linear vs bf16 nn.Linear: {gpu['int8_linear']['int8_vs_float']:.2f}x")
    lines += target_lines(result["targets"])
    return "\n".join(lines)


def main(argv=None) -> int:
    return common.main("int8_gemm", run, table, __doc__, "small shapes, few repeats", argv)


if __name__ == "__main__":
    sys.exit(main())
