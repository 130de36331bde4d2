"""Checks for lab 11 (GPTQ): group-wise weight quantization and the GPTQ update of one layer.

References: ``qlib.llm.weight_only.quantize_groups`` (asymmetric, unsigned codes
``[0, 2**bits - 1]``, torchao's ``quantize_affine`` convention)::

    min_neg = min(min_g, 0), max_pos = max(max_g, 0)            (over each group of g columns)
    scale   = max((max_pos - min_neg) / (qmax - qmin), eps)
    zp      = clamp(qmin - round(min_neg / scale), qmin, qmax)
    w_q     = clamp(round(w * (1 / scale)) + zp, qmin, qmax)

and ``qlib.llm.gptq.gptq_quantize`` (Frantar et al. 2022; no act-order, damping 0.01). The
GPTQ check draws fresh weights and correlated inputs ``X`` with an outlier channel and asks
that the student's output error ``||X W^T - X Q^T||^2`` be at most ``FACTOR`` times the
reference's, and below round-to-nearest's, with every column of ``Q`` on its group's grid.
"""

from __future__ import annotations

import torch

from . import CheckFailed, call, expect, expect_tensor, hidden, run
from ..llm import gptq as ref_gptq
from ..llm import weight_only as ref_wo

FACTOR = 1.10


def _quantize_case(fn, out, n, bits, g, gen=None):
    w = torch.randn(out, n, generator=gen) * (0.02 + torch.rand((), generator=gen).item())
    w[0, :g] = w[0, :g].abs() + 0.01                     # a group with no negative weight
    got = call(fn, w, bits, g)
    expect(isinstance(got, tuple) and len(got) == 3,
           f"quantize_groups should return (w_q, scale, zero_point), got {type(got).__name__}")
    w_q, scale, zp = got
    want_q, want_s, want_z = ref_wo.quantize_groups(w, bits, g, symmetric=False)
    expect_tensor(scale, "scale", shape=want_s.shape)
    expect_tensor(zp, "zero_point", shape=want_z.shape)
    expect_tensor(w_q, "w_q", shape=w.shape)
    expect(not w_q.is_floating_point(), f"w_q should hold integer codes, got {w_q.dtype}")
    if not torch.allclose(scale.float(), want_s, rtol=1e-6, atol=0):
        if torch.allclose(scale.float(), (w.reshape(out, -1, g).amax(-1) - w.reshape(out, -1, g).amin(-1))
                          / (2 ** bits - 1), rtol=1e-6):
            raise CheckFailed("scale: widen each group's range to include 0 first "
                              "(min_neg = min(min, 0), max_pos = max(max, 0))")
        raise CheckFailed(f"scale differs from (max_pos - min_neg) / (2**bits - 1) per group: "
                          f"expected {want_s.flatten()[:4].tolist()}, got {scale.flatten()[:4].tolist()}")
    expect(torch.equal(zp.long(), want_z), "zero_point: expected clamp(qmin - round(min_neg / scale), qmin, qmax) "
                                           "per group (an integer code)")
    if not torch.equal(w_q.long(), want_q.long()):
        bad = (w_q.long() != want_q.long()).sum().item()
        raise CheckFailed(f"{bad} codes differ from clamp(round(w * (1/scale)) + zero_point, 0, 2**bits - 1) "
                          f"(round half to even, the group's scale for each column)")


def quantize_groups(fn) -> None:
    run("quantize_groups: 4 bits, groups of 32",
        lambda: _quantize_case(fn, 8, 128, 4, 32))


def quantize_groups_hidden(fn) -> None:
    def body(draw):
        for bits, g, out, n in ((3, 64, 5, 128), (4, 128, 7, 256), (2, 16, 3, 48)):
            _quantize_case(fn, out, n, bits, g, draw.gen)
    hidden("quantize_groups (hidden: 2/3/4 bits, other groups and shapes)", body)


def problem(out: int, n: int, gen: torch.Generator | None = None):
    """Fresh weights ``(out, n)`` and correlated inputs ``(4n, n)`` with one outlier channel."""
    w = torch.randn(out, n, generator=gen)
    x = torch.randn(4 * n, n, generator=gen) @ (torch.randn(n, n, generator=gen) * 0.3)
    x[:, int(torch.randint(0, n, (), generator=gen))] *= 8
    return w, x


def _gptq_case(fn, out, n, bits, g, gen=None):
    w, x = problem(out, n, gen)
    h = ref_gptq.hessian(x)
    before = w.clone()
    got = call(fn, w, h, bits, g)
    expect(torch.equal(w, before), "gptq_layer must not modify the weight it is given (work on a clone)")
    q = expect_tensor(got, "gptq_layer(...)", shape=w.shape)
    expect(q.is_floating_point() and torch.isfinite(q).all(), "gptq_layer should return finite float weights")
    # a quantized group holds at most 2**bits distinct values in each row
    levels = q.reshape(out, n // g, g).float().sort(dim=-1).values.diff(dim=-1)
    distinct = (levels.abs() > 1e-6 * q.abs().max()).sum(-1) + 1
    expect(int(distinct.max()) <= 2 ** bits,
           f"a group of {g} columns holds {int(distinct.max())} distinct values in one row; quantized to "
           f"{bits} bits it can hold at most {2 ** bits}")
    ref = ref_gptq.gptq_quantize(w, h, bits, g, act_order=False).weight_dq
    rtn = ref_wo.fake_quantize_groups(w, bits, g)
    e_got, e_ref = ref_gptq.output_error(w, q, x), ref_gptq.output_error(w, ref, x)
    e_rtn = ref_gptq.output_error(w, rtn, x)
    if e_got > FACTOR * e_ref:
        hint = " (that is round-to-nearest: propagate each column's error to the later columns)" \
            if abs(e_got - e_rtn) <= 1e-6 * e_rtn else ""
        raise CheckFailed(f"output error {e_got:.4g} is above {FACTOR} x the reference GPTQ's {e_ref:.4g} "
                          f"(round-to-nearest: {e_rtn:.4g}){hint}")
    expect(e_got < e_rtn, f"output error {e_got:.4g} is not below round-to-nearest's {e_rtn:.4g}")


def gptq_layer(fn) -> None:
    run("gptq_layer: 4 bits, groups of 32, error <= 1.1 x reference",
        lambda: _gptq_case(fn, 16, 64, 4, 32))


def gptq_layer_hidden(fn) -> None:
    def body(draw):
        for bits, g, out, n in ((4, 64, 12, 128), (3, 32, 9, 96), (4, 128, 8, 128)):
            _gptq_case(fn, out, n, bits, g, draw.gen)
    hidden("gptq_layer (hidden: 3/4 bits, other groups and shapes)", body)
