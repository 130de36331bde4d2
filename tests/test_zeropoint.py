"""qlib.zeropoint: the zero-point expansion of Jacob et al. 2018 (sec. 2.3, eq. 7-8).

References: the sum ``sum_k (x_q - z_x)(w_q - z_w) + b_q`` computed as written in int64, and
PyTorch's quantized linear (``torch.ao.nn.quantized.functional.linear``, the x86/fbgemm
kernel), compared on a grid where its requantization is exact (power-of-two scales, output
scale ``s_x * s_w``, accumulators inside the output range).
"""

from __future__ import annotations

import warnings

import pytest
import torch

from qlib.zeropoint import direct_accumulate, expanded_accumulate, operation_counts, precompute


def fresh_gen():
    return torch.Generator().manual_seed(torch.randint(2**31, (1,)).item() % 2**31)


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("x_dtype", [torch.uint8, torch.int8])
def test_expansion_equals_the_direct_sum_bit_for_bit(per_channel, x_dtype):
    g = fresh_gen()
    m, k, n = 7, 33, 5
    lo, hi = (0, 256) if x_dtype == torch.uint8 else (-128, 128)
    x_q = torch.randint(lo, hi, (2, m, k), generator=g).to(x_dtype)
    w_q = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    x_zp = int(torch.randint(lo, hi, (1,), generator=g))
    w_zp = torch.randint(-10, 11, (n,), generator=g) if per_channel else int(torch.randint(-10, 11, (1,), generator=g))
    bias_q = torch.randint(-5000, 5000, (n,), generator=g, dtype=torch.int32)
    terms = precompute(w_q, w_zp, x_zp, bias_q)
    got = expanded_accumulate(x_q, terms)
    assert got.shape == (2, m, n) and got.dtype == torch.int64
    assert torch.equal(got, direct_accumulate(x_q, w_q, x_zp, w_zp, bias_q))


def test_symmetric_weights_need_no_row_sums():
    """With z_w = 0 the constant is all there is: acc = x_q @ w_q.T + (b_q - z_x sum w_q)."""
    g = fresh_gen()
    x_q = torch.randint(0, 256, (4, 16), generator=g, dtype=torch.uint8)
    w_q = torch.randint(-127, 128, (3, 16), generator=g, dtype=torch.int8)
    terms = precompute(w_q, 0, 128)
    plain = x_q.long() @ w_q.long().T + terms.constant
    assert torch.equal(expanded_accumulate(x_q, terms), plain)
    assert torch.equal(terms.constant, -128 * w_q.long().sum(1))


@pytest.mark.parametrize("trial", range(3))
def test_expansion_equals_pytorchs_quantized_linear(trial):
    import torch.ao.nn.quantized.functional as qF
    g = fresh_gen()
    m, k, n = 6, 8, 4
    s_x, s_w = 2.0**-3, 2.0**-4                      # powers of two: s_x * s_w is exact
    x_zp, w_zp = int(torch.randint(3, 250, (1,), generator=g)), int(torch.randint(-100, 100, (1,), generator=g))
    x_q = (x_zp + torch.randint(-3, 4, (m, k), generator=g)).clamp(0, 255)
    w_q = (w_zp + torch.randint(-2, 3, (n, k), generator=g)).clamp(-128, 127)
    bias_q = torch.randint(-20, 21, (n,), generator=g)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*deprecated")
        x = torch._make_per_tensor_quantized_tensor(x_q.to(torch.uint8), s_x, x_zp)
        w = torch._make_per_tensor_quantized_tensor(w_q.to(torch.int8), s_w, w_zp)
        # output scale s_x * s_w: the requantization multiplier is 1, so the codes are acc + 128
        out = qF.linear(x, w, bias_q.float() * s_x * s_w, scale=s_x * s_w, zero_point=128).int_repr()
    acc = expanded_accumulate(x_q.to(torch.uint8), precompute(w_q.to(torch.int8), w_zp, x_zp, bias_q))
    assert acc.abs().max() < 128  # inside the output range: no clamping hides a difference
    assert torch.equal(out.long(), acc + 128)


def test_operation_counts():
    c = operation_counts(64, 576, 32)
    assert c["multiply_adds"] == 64 * 576 * 32 and c["direct_zero_point_ops"] == 2 * 64 * 576 * 32
    assert c["expanded_runtime_ops"] == 64 * 576 + 2 * 64 * 32
    assert operation_counts(64, 576, 32, weight_zero_point=False)["expanded_runtime_ops"] == 64 * 32
    assert c["expanded_offline_ops"] == 576 * 32 + 2 * 32
    with pytest.raises(ValueError, match="k"):
        operation_counts(1, 0, 1)


def test_bad_inputs_say_what_is_expected():
    with pytest.raises(TypeError, match="integer"):
        precompute(torch.randn(3, 4))
    with pytest.raises(ValueError, match=r"\(N, K\)"):
        expanded_accumulate(torch.zeros(2, 5, dtype=torch.int8), precompute(torch.zeros(3, 4, dtype=torch.int8)))
    with pytest.raises(TypeError, match="precompute"):
        expanded_accumulate(torch.zeros(2, 4, dtype=torch.int8), torch.zeros(3, 4))
    with pytest.raises(OverflowError):
        precompute(torch.full((1, 4), 127, dtype=torch.int8), 0, 2**30)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_expansion_on_the_gpu():
    x_q = torch.randint(0, 256, (8, 64), device="cuda", dtype=torch.uint8)
    w_q = torch.randint(-128, 128, (16, 64), device="cuda", dtype=torch.int8)
    got = expanded_accumulate(x_q, precompute(w_q, 3, 100))
    assert got.device == x_q.device
    assert torch.equal(got.cpu(), direct_accumulate(x_q.cpu(), w_q.cpu(), 100, 3))
