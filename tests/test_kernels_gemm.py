"""qlib.kernels.gemm: the Triton int8 GEMM and its fused epilogue, in the interpreter on the CPU.

References: ``a.long() @ b.long()`` (int64, exact) for the int32 accumulator;
``qlib.kernels.reference.scaled_epilogue_reference`` (PyTorch float32, same order) for the
epilogue, bit for bit in the interpreter; ``reference.scaled_matmul_float64`` (the real
number) within the output dtype's rounding everywhere, the GPU included.
Shapes are small (the interpreter runs each program instance in NumPy), odd, and filled with
the extremes -128 / 127 as well as random codes.
"""

import pytest
import torch
from hypothesis import given, settings, strategies as st

from qlib.kernels import MAX_K, int8_matmul, load_triton
from qlib.kernels.reference import scaled_epilogue_reference, scaled_matmul_float64

load_triton()  # the interpreter when there is no CUDA GPU (before the kernels are defined)
from qlib.kernels.gemm import interpreter_blocks, triton_int8_matmul, triton_int8_matmul_scaled  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
OUT_DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def codes(draw_seed: int, shape, fill: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(draw_seed)
    if fill == "min":
        return torch.full(shape, -128, dtype=torch.int8)
    if fill == "max":
        return torch.full(shape, 127, dtype=torch.int8)
    if fill == "extremes":
        pick = torch.randint(0, 2, shape, generator=g, dtype=torch.int8)
        return torch.where(pick == 1, torch.tensor(127, dtype=torch.int8), torch.tensor(-128, dtype=torch.int8))
    return torch.randint(-128, 128, shape, generator=g, dtype=torch.int8)


dims = st.integers(1, 100)
fills = st.sampled_from(["random", "extremes", "min", "max"])


@settings(max_examples=25, deadline=None)
@given(m=dims, k=st.integers(1, 300), n=dims, fill_a=fills, fill_b=fills, seed=st.integers(0, 2**31 - 1))
def test_accumulator_is_exact(m, k, n, fill_a, fill_b, seed):
    a = codes(seed, (m, k), fill_a).to(DEVICE)
    b = codes(seed + 1, (k, n), fill_b).to(DEVICE)
    out = triton_int8_matmul(a, b)
    assert out.dtype == torch.int32 and out.shape == (m, n)
    assert torch.equal(out.long().cpu(), a.long().cpu() @ b.long().cpu())


@pytest.mark.parametrize("blocks", [{"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16},
                                    {"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 32, "GROUP_M": 2},
                                    {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 16, "GROUP_M": 1}])
def test_every_block_shape_and_program_order_gives_the_same_bits(blocks):
    a = codes(1, (45, 70), "random").to(DEVICE)
    b = codes(2, (70, 33), "random").to(DEVICE)
    assert torch.equal(triton_int8_matmul(a, b, blocks=blocks).long().cpu(), a.long().cpu() @ b.long().cpu())


def test_strided_operands_need_no_copy():
    """Pointer arithmetic with strides: a transposed view and a column slice are read in place."""
    w = codes(3, (24, 37), "random").to(DEVICE)  # (N, K) like a linear weight
    a = codes(4, (9, 80), "random").to(DEVICE)[:, 5:42]  # (9, 37), row stride 80
    assert not a.is_contiguous()
    assert torch.equal(triton_int8_matmul(a, w.t()).long().cpu(), a.long().cpu() @ w.t().long().cpu())


def test_bad_blocks_are_refused():
    a = codes(0, (4, 4), "random").to(DEVICE)
    with pytest.raises(ValueError, match="power of two >= 16"):
        triton_int8_matmul(a, a, blocks={"BLOCK_M": 24})
    with pytest.raises(ValueError, match="power of two >= 16"):
        triton_int8_matmul(a, a, blocks={"BLOCK_K": 8})


def test_interpreter_blocks_are_small_powers_of_two():
    assert interpreter_blocks(1, 1, 1) == {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 4}
    assert interpreter_blocks(100, 20, 300) == {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 64, "GROUP_M": 4}


def test_overflow_bound_holds_at_max_k():
    """K = MAX_K of -128 * -128 is 2147467264 < 2**31: exact in the int32 accumulator."""
    a = torch.full((1, MAX_K), -128, dtype=torch.int8, device=DEVICE)
    out = triton_int8_matmul(a, a.t(), blocks={"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 1024})
    assert out.item() == MAX_K * 128 * 128 == 2147467264
    with pytest.raises(ValueError, match="overflow"):
        big = torch.zeros(1, MAX_K + 1, dtype=torch.int8, device=DEVICE)
        int8_matmul(big, big.t(), backend="triton")


def scales(seed, m, n):
    g = torch.Generator().manual_seed(seed)
    rs = torch.rand(m, generator=g) * 0.05 + 1e-4
    cs = torch.rand(n, generator=g) * 0.02 + 1e-4
    bias = torch.randn(n, generator=g)
    return rs.to(DEVICE), cs.to(DEVICE), bias.to(DEVICE)


@pytest.mark.parametrize("out_dtype", OUT_DTYPES)
@pytest.mark.parametrize("with_bias", [True, False])
@settings(max_examples=6, deadline=None)
@given(m=dims, k=dims, n=dims, seed=st.integers(0, 2**31 - 1))
def test_fused_epilogue_matches_references(out_dtype, with_bias, m, k, n, seed):
    a = codes(seed, (m, k), "random").to(DEVICE)
    b = codes(seed + 1, (k, n), "random").to(DEVICE)
    rs, cs, bias = scales(seed, m, n)
    bias = bias if with_bias else None
    out = triton_int8_matmul_scaled(a, b, rs, cs, bias, out_dtype)
    assert out.dtype == out_dtype and out.shape == (m, n)
    # the real number, within the output dtype's rounding (half an ulp) plus float32's steps
    exact = scaled_matmul_float64(a.cpu(), b.cpu(), rs.cpu(), cs.cpu(), None if bias is None else bias.cpu())
    eps = torch.finfo(out_dtype).eps
    terms = (a.double().cpu() @ b.double().cpu()).abs() * rs.double().cpu()[:, None] * cs.double().cpu()[None, :]
    if bias is not None:
        terms = terms + bias.double().cpu().abs()
    tol = eps * exact.abs() + 4 * torch.finfo(torch.float32).eps * terms + 1e-30
    assert ((out.double().cpu() - exact).abs() <= tol).all()
    if DEVICE == "cpu":  # the interpreter computes in NumPy float32: PyTorch's bits exactly
        acc = (a.long() @ b.long()).int()
        assert torch.equal(out, scaled_epilogue_reference(acc, rs, cs, bias, out_dtype))


def test_bfloat16_rounds_to_nearest_even():
    """Regression: Triton 3.8's interpreter truncates float32 -> bfloat16; the kernel rounds on the bits.

    Codes and scales are chosen so that many results sit just above a bfloat16 half-way point.
    """
    a = codes(11, (37, 53), "random").to(DEVICE)
    b = codes(12, (53, 29), "random").to(DEVICE)
    rs, cs, bias = scales(13, 37, 29)
    out = triton_int8_matmul_scaled(a, b, rs, cs, bias, torch.bfloat16)
    want = scaled_epilogue_reference(triton_int8_matmul(a, b), rs, cs, bias, torch.bfloat16)
    assert torch.equal(out, want)
    # ties go to even: 1 + 3 * 2**-8 lies half-way between bfloat16's 1 + 2**-7 and 1 + 2 * 2**-7
    one = torch.ones(1, 1, dtype=torch.int8, device=DEVICE)
    half_way = triton_int8_matmul_scaled(one, one, torch.tensor([1.0 + 3 * 2**-8], device=DEVICE),
                                         torch.ones(1, device=DEVICE), None, torch.bfloat16)
    assert half_way.item() == 1.0 + 2 * 2**-7


def test_empty_inner_dimension_gives_zeros_and_bias():
    a = torch.zeros(3, 0, dtype=torch.int8, device=DEVICE)
    b = torch.zeros(0, 2, dtype=torch.int8, device=DEVICE)
    assert torch.equal(triton_int8_matmul(a, b).cpu(), torch.zeros(3, 2, dtype=torch.int32))
    bias = torch.tensor([1.5, -2.0], device=DEVICE)
    out = triton_int8_matmul_scaled(a, b, torch.ones(3, device=DEVICE), torch.ones(2, device=DEVICE), bias)
    assert torch.equal(out.cpu(), bias.cpu().expand(3, 2))
