"""qlib.kernels.quantize_kernel: per-token int8 quantization in Triton (the interpreter on the CPU).

Reference: ``qlib.kernels.reference.quantize_per_token_reference``, i.e. qlib's
``choose_qparams_symmetric_qmax(..., 127)`` and ``quantize(..., -127, 127, axis=0)``, which
follow PyTorch's float32 reciprocal-then-multiply and ties-to-even rounding; bit for bit.
"""

import pytest
import torch
from hypothesis import given, settings, strategies as st

from qlib.kernels import load_triton, quantize_per_token, quantize_per_token_reference

load_triton()
from qlib.kernels.quantize_kernel import triton_quantize_per_token  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@settings(max_examples=15, deadline=None)
@given(m=st.integers(1, 8), k=st.integers(1, 300), log_scale=st.floats(-6, 4),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), seed=st.integers(0, 2**31 - 1),
       block=st.sampled_from([None, 16, 64]))
def test_codes_and_scales_are_bit_exact(m, k, log_scale, dtype, seed, block):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(m, k, generator=g) * 10 ** log_scale).to(dtype)
    x[0, : k // 2] = 0  # a partly zero row
    x_q, scale = triton_quantize_per_token(x.to(DEVICE), block=block)
    want_q, want_scale = quantize_per_token_reference(x)
    assert x_q.dtype == torch.int8 and scale.dtype == torch.float32
    assert torch.equal(scale.cpu(), want_scale) and torch.equal(x_q.cpu(), want_q)
    assert x_q.abs().amax(dim=1).cpu().le(127).all()


def test_edge_rows_ties_and_zeros():
    x = torch.tensor([[0.0, 0.0, 0.0],            # all zero: scale eps, codes 0
                      [127.0, 0.5, -1.5],          # scale 1: ties 0.5 -> 0 and -1.5 -> -2 (to even)
                      [-254.0, 1.0, 3.0]])         # scale 2: 1.0 / 2 = 0.5 -> 0, 3.0 / 2 = 1.5 -> 2
    x_q, scale = triton_quantize_per_token(x.to(DEVICE))
    assert scale.cpu().tolist() == [torch.finfo(torch.float32).eps, 1.0, 2.0]
    assert x_q.cpu().tolist() == [[0, 0, 0], [127, 0, -2], [-127, 0, 2]]


def test_dispatch_picks_the_reference_on_the_cpu_and_rejects_bad_input():
    x = torch.randn(5, 7)
    assert all(torch.equal(u, v) for u, v in zip(quantize_per_token(x), quantize_per_token(x, backend="triton")))
    with pytest.raises(ValueError, match="backend"):
        quantize_per_token(x, backend="magic")
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        triton_quantize_per_token(x.double())
    with pytest.raises(ValueError, match="2-D"):
        triton_quantize_per_token(x[0])
    with pytest.raises(ValueError, match="NaN"):
        triton_quantize_per_token(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ValueError, match="power of two"):
        triton_quantize_per_token(x, block=12)
