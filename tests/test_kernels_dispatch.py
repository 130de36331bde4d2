"""qlib.kernels.dispatch: exact int8 x int8 -> int32 products and the backend rule.

Reference: int64 matmul (``a.long() @ b.long()``) for every backend; the rule of the module
docstring (Triton on sm80+ GPUs or a user-set interpreter, ``torch._int_mm`` on the CPU and
older GPUs, int32 / float64 otherwise) for ``choose_backend``.
"""

import pytest
import torch

from qlib.kernels import (BACKENDS, MAX_K, BackendChoice, choose_backend, int8_matmul, int8_matmul_scaled,
                          kernel_device, load_triton, scaled_epilogue_reference)
from qlib.kernels import triton_runtime


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (3, 5, 7), (17, 64, 33), (64, 512, 256)])
def test_every_backend_is_exact(backend, m, k, n):
    g = torch.Generator().manual_seed(m * 1000 + k * 10 + n)
    a = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
    b = torch.randint(-128, 128, (k, n), generator=g, dtype=torch.int8)
    a[0, :] = -128
    b[:, 0] = -128  # the extreme product 128 * 128 * K
    if backend == "triton":
        load_triton()
    device = kernel_device() if backend == "triton" else "cpu"  # compiled Triton needs CUDA tensors
    out = int8_matmul(a.to(device), b.to(device), backend=backend)
    assert out.dtype == torch.int32
    assert torch.equal(out.long().cpu(), a.long() @ b.long())


def test_cpu_picks_int_mm_and_bad_input_is_rejected():
    a = torch.zeros(4, 8, dtype=torch.int8)
    assert choose_backend(a, a.t().contiguous()) == "int_mm"
    with pytest.raises(TypeError, match="int8"):
        int8_matmul(a.float(), a.t())
    with pytest.raises(ValueError, match="inner"):
        int8_matmul(a, a)
    with pytest.raises(ValueError, match="backend"):
        int8_matmul(a, a.t(), backend="magic")


def test_choice_says_why():
    a = torch.zeros(4, 8, dtype=torch.int8)
    choice = choose_backend(a, a.t())
    assert isinstance(choice, BackendChoice) and isinstance(choice, str)
    assert "_int_mm" in choice.reason and "interpreter" in choice.reason
    assert choice.explain().startswith("int_mm: ")
    empty = torch.zeros(0, 8, dtype=torch.int8)
    picked = choose_backend(empty, a.t())
    assert picked == "int32" and "empty" in picked.reason
    assert int8_matmul(empty, a.t()).shape == (0, 4)


def test_cpu_picks_triton_only_when_the_user_sets_the_interpreter(monkeypatch):
    a = torch.zeros(4, 8, dtype=torch.int8)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(triton_runtime, "_set_by_qlib", True)  # qlib turned it on: keep the fast CPU path
    assert choose_backend(a, a.t()) == "int_mm"
    monkeypatch.setattr(triton_runtime, "_set_by_qlib", False)  # the user asked for it
    monkeypatch.delenv(triton_runtime.SET_BY_QLIB_ENV, raising=False)
    choice = choose_backend(a, a.t())
    assert choice == "triton" and "TRITON_INTERPRET" in choice.reason


def test_overflow_bound_is_the_largest_safe_k():
    """K * 128 * 128 <= 2**31 - 1: the bound holds at MAX_K and the next K is refused."""
    assert MAX_K * 128 * 128 <= 2**31 - 1 < (MAX_K + 1) * 128 * 128
    a = torch.full((1, MAX_K), -128, dtype=torch.int8)
    for backend in ("int_mm", "int32"):
        assert int8_matmul(a, a.t(), backend=backend).item() == MAX_K * 128 * 128
    big = torch.zeros(1, MAX_K + 1, dtype=torch.int8)
    with pytest.raises(ValueError, match="overflow"):
        int8_matmul(big, big.t())


def test_int_mm_refusal_is_explicit():
    a = torch.zeros(0, 8, dtype=torch.int8)
    with pytest.raises(ValueError, match="int_mm"):
        int8_matmul(a, a.t(), backend="int_mm")


@pytest.mark.parametrize("backend", ["int_mm", "int32", "float64"])
@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_scaled_product_is_the_epilogue_of_the_exact_product(backend, out_dtype):
    g = torch.Generator().manual_seed(7)
    a = torch.randint(-128, 128, (19, 40), generator=g, dtype=torch.int8)
    b = torch.randint(-128, 128, (40, 24), generator=g, dtype=torch.int8)
    rs, cs, bias = torch.rand(19, generator=g) / 50, torch.rand(24, generator=g) / 50, torch.randn(24, generator=g)
    out = int8_matmul_scaled(a, b, rs, cs, bias, out_dtype=out_dtype, backend=backend)
    want = ((a.long() @ b.long()).float() * rs[:, None] * cs[None, :] + bias).to(out_dtype)
    assert out.dtype == out_dtype and torch.equal(out, want)
    assert torch.equal(scaled_epilogue_reference((a.long() @ b.long()).int(), rs, cs, bias, out_dtype), want)


def test_scaled_product_rejects_bad_scales():
    a = torch.zeros(3, 8, dtype=torch.int8)
    b = torch.zeros(8, 5, dtype=torch.int8)
    with pytest.raises(ValueError, match=r"row_scale must have shape \(3,\)"):
        int8_matmul_scaled(a, b, torch.ones(5), torch.ones(5))
    with pytest.raises(TypeError, match="col_scale must be float32"):
        int8_matmul_scaled(a, b, torch.ones(3), torch.ones(5, dtype=torch.float64))
    with pytest.raises(TypeError, match="out_dtype"):
        int8_matmul_scaled(a, b, torch.ones(3), torch.ones(5), out_dtype=torch.int32)


@pytest.mark.skipif(torch.cuda.is_available(), reason="compiled Triton on a GPU machine reads CUDA tensors")
def test_triton_refuses_cpu_tensors_unless_interpreting(monkeypatch):
    load_triton()
    a = torch.zeros(4, 8, dtype=torch.int8)
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # as if the kernels were compiled
    with pytest.raises(ValueError, match="CUDA tensors"):
        int8_matmul(a, a.t(), backend="triton")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_rule_follows_compute_capability():
    a = torch.zeros(32, 64, dtype=torch.int8, device="cuda")
    choice = choose_backend(a, a.t())
    if torch.cuda.get_device_capability() >= (8, 0):
        assert choice == "triton", choice.reason
    else:
        assert choice == "int_mm" and "8.0" in choice.reason
    small = torch.zeros(4, 6, dtype=torch.int8, device="cuda")
    if torch.cuda.get_device_capability() < (8, 0):
        assert choose_backend(small, small.t()) == "float64"
