"""benchmarks/int8_gemm.py: the fast run writes the documented JSON; its GPU functions work.

Reference: the benchmark's own docstring (header from benchmarks/common.py; ``cpu.shapes``
with ``median_s`` for int_mm / fp32 / int64 emulation and the speed-ups; ``cpu.int8_linear``;
``gpu.measured`` false with a reason on a machine without CUDA; ``targets``). The GPU
functions (``gemm_row``, ``epilogue_row``, ``linear_row``) are also run on the CPU, tiny
shapes, Triton in its interpreter and a wall-clock timer, so that their checks and
bookkeeping are tested where no GPU is lent.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="module")
def result(fast_benchmark):
    return fast_benchmark("int8_gemm", timeout=600)


def test_header_and_cpu_ratios(result):
    res, _ = result
    assert res["benchmark"] == "int8_gemm" and res["fast"] is True and res["seeds"] == [0]
    for key in ("platform", "cpu_count", "torch_threads"):
        assert key in res["machine"]
    (row,) = res["cpu"]["shapes"]
    assert row["shape"] == [64, 512, 256]
    t = row["median_s"]
    assert all(t[k] > 0 for k in ("int_mm", "fp32", "int64_emulation"))
    assert row["int_mm_speedup_vs_fp32"] == pytest.approx(t["fp32"] / t["int_mm"])
    lin = res["cpu"]["int8_linear"]
    assert lin["float_dtype"] == "float32" and 0 < lin["max_abs_diff_vs_float"] < 0.1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU report")
def test_says_the_gpu_part_was_skipped(result):
    res, stdout = result
    assert res["gpu"]["measured"] is False and "no CUDA GPU" in res["gpu"]["reason"]
    assert res["targets"] == []
    assert "GPU: not measured" in stdout


def test_gpu_functions_on_the_cpu_interpreter():
    from benchmarks import int8_gemm as bench
    from qlib.kernels import kernel_device, load_triton

    load_triton()
    device = kernel_device()
    if device.type == "cuda":  # then these run compiled, with a real GPU timer
        row = bench.gemm_row(48, 32, 40, device, bench.cuda_timer, 2, use_triton=True)
        epi = bench.epilogue_row(24, 32, 16, device, bench.cuda_timer, 2)
        assert row["median_s"]["triton"] > 0 and epi["fused_vs_unfused"] > 0
        return
    row = bench.gemm_row(40, 24, 36, "cpu", bench.cpu_timer, 1, use_triton=True)
    assert set(row["median_s"]) == {"triton", "int_mm", "bf16", "fp16"}
    assert row["triton_vs_int_mm"] == pytest.approx(row["median_s"]["int_mm"] / row["median_s"]["triton"])
    epi = bench.epilogue_row(20, 24, 18, "cpu", bench.cpu_timer, 1)
    assert epi["fused_vs_unfused"] > 0
    lin = bench.linear_row(5, 24, 16, "cpu", bench.cpu_timer, 1)
    assert lin["float_dtype"] == "bfloat16" and lin["max_abs_diff_vs_float"] < 0.1
    gpu = {"measured": True, "triton": True, "gemm": [{**row, "shape": [4096] * 3}], "epilogue": [epi]}
    names = [t["name"] for t in bench.targets(gpu)]
    assert len(names) == 3 and "fused" in names[2]


def test_exactness_check_catches_a_wrong_product():
    from benchmarks import int8_gemm as bench

    a, b = bench.operands(3, 4, 5, "cpu")
    with pytest.raises(AssertionError, match="not exact"):
        bench.check_exact((a.int() @ b.int()) + 1, a, b, "wrong")
