"""Lab 07's grading: nbgrader gives wrong answers partial marks, and the checks say why.

Reference: nbgrader 0.9 (generate_assignment, autograde, export), as in tests/test_grading.py,
which already checks that lab 07's solution gets full marks and its untouched release none.
Here: a fused epilogue that forgets the bias loses Q2's 3 points only, and a per-token
quantizer that divides by 127.5 loses Q3's 2 points only (Q1's Triton K-loop still passes).
The fast tests below run ``qlib.check.lab07`` directly (the Triton interpreter on the CPU) on
the reference answers (PASS) and on typical mistakes (a failed check with the right hint).
"""

from __future__ import annotations


import pytest

from test_grading import ROOT, graded_lab, points, solution_nb, totals

LAB = "lab07_triton_int8"
FULL = 8.0

NO_BIAS = '''@triton.jit
def dequant_epilogue(acc, offs_m, offs_n, M, N, row_scale_ptr, col_scale_ptr, bias_ptr, HAS_BIAS: tl.constexpr):
    row_scale = tl.load(row_scale_ptr + offs_m, mask=offs_m < M, other=0.0)
    col_scale = tl.load(col_scale_ptr + offs_n, mask=offs_n < N, other=0.0)
    return acc.to(tl.float32) * row_scale[:, None] * col_scale[None, :]
'''

DIVISOR_127_5 = '''def quantize_per_token(x):
    x = x.to(torch.float32)
    scale = torch.clamp(x.abs().amax(dim=1) / 127.5, min=torch.finfo(torch.float32).eps)
    return torch.clamp(torch.round(x * (1.0 / scale)[:, None]), -127, 127).to(torch.int8), scale
'''

@pytest.fixture(scope="module")
def course(tmp_path_factory):
    return graded_lab(tmp_path_factory.mktemp("course07"), LAB,
                      {"no_bias": {"q2-answer": NO_BIAS}, "divisor": {"q3-answer": DIVISOR_127_5}})


@pytest.mark.grading
def test_max_score():
    assert sum(points(solution_nb(LAB)).values()) == FULL


@pytest.mark.grading
def test_epilogue_without_bias_loses_q2_only(course):
    assert totals(course, LAB)["no_bias"] == FULL - 3


@pytest.mark.grading
def test_wrong_divisor_loses_q3_only(course):
    assert totals(course, LAB)["divisor"] == FULL - 2


# ------------------------------------------------------------------ the checks themselves
def _answer_code() -> str:
    """The lab's reference answers and given kernels (code cells without checks or demos)."""
    import jupytext

    nb = jupytext.read(ROOT / "solutions" / LAB / f"{LAB}.py")
    return "\n\n".join(c.source for c in nb.cells[1:] if c.cell_type == "code"
                       and "check.lab07" not in c.source and "try:" not in c.source)


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    import importlib.util
    import sys

    from qlib.kernels import load_triton

    load_triton()  # before the module's @triton.jit: the interpreter on the CPU
    path = tmp_path_factory.mktemp("lab07") / "lab07_answers.py"  # Triton reads kernels' source from a file
    path.write_text(_answer_code() + "\n\n" + WRONG_KERNELS + "\n\n" + NO_BIAS.replace("def dequant_epilogue",
                                                                                        "def epilogue_no_bias"))
    spec = importlib.util.spec_from_file_location("lab07_answers", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["lab07_answers"] = module
    spec.loader.exec_module(module)
    return module


WRONG_KERNELS = '''
@triton.jit
def tile_product_no_k_mask(a_ptr, b_ptr, M, N, K, stride_am, stride_ak, stride_bk, stride_bn, offs_m, offs_n,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(a_ptr + offs_m[:, None] * stride_am + ks[None, :] * stride_ak, mask=offs_m[:, None] < M, other=0)
        b = tl.load(b_ptr + ks[:, None] * stride_bk + offs_n[None, :] * stride_bn, mask=offs_n[None, :] < N, other=0)
        acc += tl.dot(a, b, out_dtype=tl.int32)
    return acc


@triton.jit
def tile_product_not_implemented(a_ptr, b_ptr, M, N, K, stride_am, stride_ak, stride_bk, stride_bn, offs_m, offs_n,
                                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    raise NotImplementedError()
'''


def test_reference_answers_pass(lab):
    from qlib import check

    check.lab07.int8_gemm(lab.int8_gemm)
    check.lab07.dequant_epilogue(lab.int8_gemm_dequant)
    check.lab07.quantize_per_token(lab.quantize_per_token)
    check.lab07.quantize_per_token_hidden(lab.quantize_per_token)


@pytest.mark.parametrize("kernel,message", [("tile_product_no_k_mask", "mask the loads"),
                                            ("tile_product_not_implemented", "not implemented yet")])
def test_wrong_k_loop_fails_with_a_hint(lab, kernel, message):
    from qlib import check

    original = lab.int8_tile_product
    lab.int8_tile_product = getattr(lab, kernel)  # the given kernel looks it up by name at launch
    try:
        with pytest.raises(AssertionError, match=message):
            check.lab07.int8_gemm(lab.int8_gemm)
    finally:
        lab.int8_tile_product = original


def test_epilogue_without_bias_fails_with_a_hint(lab):
    from qlib import check

    original = lab.dequant_epilogue
    lab.dequant_epilogue = lab.epilogue_no_bias
    try:
        with pytest.raises(AssertionError, match="the bias is missing"):
            check.lab07.dequant_epilogue(lab.int8_gemm_dequant)
    finally:
        lab.dequant_epilogue = original


def test_wrong_quantizers_fail_with_a_hint(lab):
    import torch

    from qlib import check

    ns = {"torch": torch}
    exec(DIVISOR_127_5, ns)
    with pytest.raises(AssertionError, match="not 127.5"):
        check.lab07.quantize_per_token(ns["quantize_per_token"])

    def half_up(x):
        x = x.to(torch.float32)
        scale = torch.clamp(x.abs().amax(dim=1) / 127, min=torch.finfo(torch.float32).eps)
        return torch.clamp(torch.floor(x * (1.0 / scale)[:, None] + 0.5), -127, 127).to(torch.int8), scale

    with pytest.raises(AssertionError, match="ties go to the even"):
        check.lab07.quantize_per_token(half_up)


def _right_epilogue(a, b, row_scale, col_scale, bias, out_dtype, *blocks):
    """A correct int8_gemm_dequant in PyTorch: exact int32 product, float32 epilogue, one rounding."""
    import torch

    out = (a.long() @ b.long()).to(torch.float32) * row_scale[:, None] * col_scale[None, :]
    return (out if bias is None else out + bias).to(out_dtype)


def test_float16_outputs_below_the_normal_range_are_judged_by_their_own_rounding():
    """A correct answer whose float16 outputs are subnormal (|out| < 6.1e-5: K = 3 keeps some
    products small) passes: there float16's step is 2**-24, not eps16 * |out|. With the old
    tolerance (eps16 * |out| only) seed 6 failed this correct answer (out 1.56164e-05, expected
    1.55902e-05), as a hidden draw once cost a graded submission Q2's points."""
    import torch

    from qlib.check import lab07

    for seed in range(10):
        lab07._check_dequant(_right_epilogue, 60, 3, 60, False, torch.float16, torch.Generator().manual_seed(seed))


def test_hidden_cases_are_the_same_at_a_regrade():
    """The hidden checks draw through qlib.check.draws: the same base seed gives the same cases
    (before, they drew from an unseeded random.Random(), so a re-grade could change a score)."""
    import torch

    from qlib.check import draws, lab07
    from qlib.kernels import quantize_per_token_reference

    def record(seen):
        def fn(x):
            seen.append(x.clone())
            return quantize_per_token_reference(x)
        return fn

    runs = []
    for _ in range(2):
        seen = []
        with draws.seeded(5):
            lab07.quantize_per_token_hidden(record(seen))
        runs.append(seen)
    assert len(runs[0]) == len(runs[1]) > 0
    assert all(torch.equal(x, y) for x, y in zip(*runs))
    epilogue = []
    with draws.seeded(5):
        lab07.dequant_epilogue_hidden(lambda a, *rest: epilogue.append(a.clone()) or _right_epilogue(a, *rest))
    with draws.seeded(5):
        lab07.dequant_epilogue_hidden(lambda a, *rest: epilogue.append(a.clone()) or _right_epilogue(a, *rest))
    half = len(epilogue) // 2
    assert half > 0 and all(torch.equal(x, y) for x, y in zip(epilogue[:half], epilogue[half:]))
