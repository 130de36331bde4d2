"""qlib.llm.weight_only: int4/int3 weights in groups, torchao's ``quantize_affine`` convention.

Reference: torchao's ``choose_qparams_affine`` + ``quantize_affine`` (``ZeroPointDomain.INT``)
when torchao is importable; always the written formula: ``scale = (max_pos - min_neg) / (qmax -
qmin)``, ``zero_point = qmin - round(min_neg / scale)``, ``q = clamp(round(w * (1/scale)) + zp)``
(asymmetric, codes ``[0, 2^b - 1]``) and ``scale = absmax / ((qmax - qmin) / 2)`` (symmetric,
codes ``[-2^(b-1), 2^(b-1) - 1]``).
"""

from __future__ import annotations

import pytest
import torch

from qlib.llm import model as charlm, weight_only as wo

EPS = torch.finfo(torch.float32).eps


def _formula(w, bits, g, symmetric):
    rows = w.reshape(-1, g)
    lo, hi = rows.amin(1).clamp(max=0), rows.amax(1).clamp(min=0)
    if symmetric:
        qmin, qmax = -2 ** (bits - 1), 2 ** (bits - 1) - 1
        scale = (torch.maximum(-lo, hi) / ((qmax - qmin) / 2)).clamp(min=EPS)
        zp = torch.zeros_like(scale)
    else:
        qmin, qmax = 0, 2 ** bits - 1
        scale = ((hi - lo) / (qmax - qmin)).clamp(min=EPS)
        zp = (qmin - torch.round(lo / scale)).clamp(qmin, qmax)
    q = torch.clamp(torch.round(rows * (1.0 / scale[:, None])) + zp[:, None], qmin, qmax)
    return q.reshape(w.shape).long(), scale.reshape(w.shape[0], -1)


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("g", [32, 64, 128])
@pytest.mark.parametrize("symmetric", [False, True])
def test_codes_match_the_formula(bits, g, symmetric):
    w = torch.randn(16, 256, generator=torch.Generator().manual_seed(torch.randint(2**31, (1,)).item() % 2**31))
    w_q, scale, zp = wo.quantize_groups(w, bits, g, symmetric)
    q_ref, s_ref = _formula(w, bits, g, symmetric)
    assert torch.equal(w_q.long(), q_ref) and torch.equal(scale, s_ref)
    w_dq = wo.dequantize_groups(w_q, scale, zp, g)
    assert ((w_dq - w).abs().reshape(16, -1, g) <= scale[..., None] / 2 + 1e-6).all()


@pytest.mark.parametrize("symmetric", [False, True])
def test_codes_match_torchao(symmetric):
    pq = pytest.importorskip("torchao.quantization.quant_primitives")
    w = torch.randn(32, 256, generator=torch.Generator().manual_seed(torch.randint(2**31, (1,)).item() % 2**31))
    mapping = pq.MappingType.SYMMETRIC if symmetric else pq.MappingType.ASYMMETRIC
    qmin, qmax = (-8, 7) if symmetric else (0, 15)
    s, z = pq.choose_qparams_affine(w, mapping, (1, 64), torch.int32, qmin, qmax)
    ref = pq.quantize_affine(w, (1, 64), s, z, torch.int32, qmin, qmax)
    w_q, scale, zp = wo.quantize_groups(w, 4, 64, symmetric)
    assert torch.equal(w_q.to(torch.int32), ref)
    torch.testing.assert_close(scale, s.reshape(scale.shape), rtol=0, atol=0)


def test_smaller_groups_smaller_error_and_size():
    w = torch.randn(64, 256)
    errs = [(wo.fake_quantize_groups(w, 4, g) - w).pow(2).mean() for g in (32, 64, 128, None)]
    assert errs == sorted(errs)
    m = charlm.create(0, charlm.CharLMConfig(width=64, layers=1, heads=2, context=8))
    n_lin = sum(p.numel() for n, p in m.named_parameters() if n.startswith("blocks") and p.dim() == 2)
    fp = wo.model_size_bytes(m)
    assert fp - wo.model_size_bytes(m, 4, 64) == n_lin * 4 - n_lin // 2 - (n_lin // 64) * 3


def test_bad_inputs():
    with pytest.raises(ValueError, match="group_size"):
        wo.quantize_groups(torch.randn(4, 100), 4, 32)
    with pytest.raises(ValueError, match="bits"):
        wo.quantize_groups(torch.randn(4, 64), 1, 32)
