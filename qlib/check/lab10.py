"""Checks for lab 10 (federated learning with quantized updates): a stochastic-rounding
codec for one update tensor, its exact byte count, and one FedAvg aggregation round.

References: ``qlib.federated.codec`` (per-tensor symmetric codes, ``qmax = 2**(b-1) - 1``,
``scale = max|d| / qmax``, scale 1 for an all-zero update, stochastic rounding
``q = floor(d / scale + u)``, ``u ~ U[0, 1)``, QSGD, Alistarh et al. 2017) and
``qlib.federated.fedavg.aggregate`` (McMahan et al. 2017)::

    bytes(n, b)  = ceil(n * b / 8) + 4                 (packed codes + one float32 scale)
    w_new        = w + sum_k (n_k / n) * update_k,     n = sum_k n_k

Unbiasedness is measured: the mean of 3000 decoded draws must lie within 6 standard errors
(``6 * scale / 2 / sqrt(3000)``) of ``d`` everywhere. Inputs are fresh random tensors on
every run (hidden checks: other shapes and bit widths).
"""

from __future__ import annotations

import math

import torch

from . import CheckFailed, call, expect, expect_close, run
from ..federated import codec as ref_codec
from ..federated.fedavg import aggregate as ref_aggregate
from ..qparams import PerTensor

DRAWS = 3000


def _codes_scale(got, what):
    expect(isinstance(got, tuple) and len(got) == 2, f"{what} should return a pair (codes, scale), got {type(got).__name__}")
    codes, scale = got
    expect(isinstance(codes, torch.Tensor), f"{what}: codes should be a tensor, got {type(codes).__name__}")
    expect(codes.dtype == torch.int8, f"{what}: codes should be int8, got {codes.dtype}")
    scale = torch.as_tensor(scale, dtype=torch.float32)
    expect(scale.numel() == 1, f"{what}: one scale per tensor expected, got {scale.numel()} values")
    return codes, scale.reshape(())


def _encode_case(encode, shape, bits, seed=None):
    d = torch.randn(*shape) * (0.001 + torch.rand(()).item() * 0.1)
    qmax = 2 ** (bits - 1) - 1
    want_scale = ref_codec.encode(d, bits, PerTensor(), "nearest").scale
    codes, scale = _codes_scale(call(encode, d, bits, torch.Generator().manual_seed(seed or 0)), "encode_stochastic")
    expect(codes.shape == d.shape, f"codes should have the update's shape {tuple(d.shape)}, got {tuple(codes.shape)}")
    if abs(scale.item() - want_scale.item()) > 1e-6 * want_scale.item():
        hint = " (qmax is 2**(bits-1) - 1: symmetric signed codes)" if \
            abs(scale.item() * (2 ** bits - 1) - d.abs().max().item()) < 1e-6 else ""
        raise CheckFailed(f"scale for {bits} bits: expected max|d| / {qmax} = {want_scale.item():.6g}, "
                          f"got {scale.item():.6g}{hint}")
    expect(int(codes.abs().max()) <= qmax, f"codes must lie in [-{qmax}, {qmax}] for {bits} bits")
    v = d * (1 / scale)
    near_floor_or_ceil = (codes.float() >= torch.floor(v) - 1e-3) & (codes.float() <= torch.ceil(v) + 1e-3)
    expect(bool(near_floor_or_ceil.all()), "every code must be floor(d/scale) or ceil(d/scale)")
    again, _ = _codes_scale(call(encode, d, bits, torch.Generator().manual_seed(seed or 0)), "encode_stochastic")
    expect(torch.equal(codes, again), "the same generator seed must give the same codes (draw u from `generator`)")
    # unbiasedness over many draws, one generator
    g = torch.Generator().manual_seed(1234)
    small = d[:50] if d.dim() == 1 else d.flatten()[:50]
    total = torch.zeros(small.shape, dtype=torch.float64)
    for _ in range(DRAWS):
        c, s = _codes_scale(encode(small, bits, g), "encode_stochastic")
        total += c.double() * s.double()
    mean = total / DRAWS
    s_small = small.abs().max().item() / qmax
    tol = 6 * s_small / 2 / math.sqrt(DRAWS)
    err = (mean - small.double()).abs().max().item()
    if err > tol:
        near = torch.round(small / s_small) * s_small
        hint = " (it looks like round-to-nearest: add u ~ U[0, 1) and take the floor)" if \
            (mean - near.double()).abs().max().item() < tol else ""
        raise CheckFailed(f"not unbiased: the mean of {DRAWS} decoded draws is up to {err:.3g} away from d "
                          f"(allowed {tol:.3g}){hint}")


def encode(encode_stochastic) -> None:
    run("encode_stochastic: scale, codes, seeds, unbiased", lambda: _encode_case(encode_stochastic, (64,), 4))


def encode_hidden(encode_stochastic) -> None:
    def body():
        for shape, bits in (((8, 5), 2), ((100,), 8), ((3, 2, 2), 4)):
            _encode_case(encode_stochastic, shape, bits, seed=int(torch.randint(0, 999, ())))
        codes, scale = _codes_scale(call(encode_stochastic, torch.zeros(5), 4, torch.Generator().manual_seed(0)),
                                    "encode_stochastic")
        expect(torch.equal(codes, torch.zeros(5, dtype=torch.int8)) and torch.isfinite(scale),
               "an all-zero update must give zero codes and a finite scale (use scale 1)")
    run("encode_stochastic (hidden: shapes, 2/4/8 bits, zero update)", body)


def decode(decode_fn) -> None:
    def body():
        codes = torch.randint(-7, 8, (6, 3), dtype=torch.int8)
        scale = torch.rand(()) * 0.01 + 1e-4
        got = call(decode_fn, codes, scale)
        expect(isinstance(got, torch.Tensor) and got.dtype == torch.float32, "decode should return a float32 tensor")
        expect_close(got, codes.float() * scale, "decode(codes, scale)", rtol=1e-6, atol=0)
    run("decode", body)


def update_bytes(update_bytes_fn) -> None:
    def body():
        for shape, bits in (((128, 64), 8), ((10,), 4), ((3, 3, 3), 2), ((1,), 4), ((7,), 2)):
            n = math.prod(shape)
            want = math.ceil(n * bits / 8) + 4
            got = call(update_bytes_fn, shape, bits)
            if got == want and not isinstance(got, bool):
                continue
            if got == n * bits / 8 + 4 or got == math.floor(n * bits / 8) + 4:
                raise CheckFailed(f"shape {shape}, {bits} bits: a partly filled last byte is still a whole byte "
                                  f"(ceil), expected {want}, got {got}")
            if got == math.ceil(n * bits / 8):
                raise CheckFailed(f"shape {shape}, {bits} bits: the float32 scale travels too (+4 bytes)")
            expect(got == want, f"shape {shape}, {bits} bits: expected {want} bytes, got {got!r}")
    run("update_bytes", body)


def _fedavg_case(fedavg_round, k):
    shapes = {"fc.weight": (4, 3), "fc.bias": (4,)}
    glob = {name: torch.randn(s) for name, s in shapes.items()}
    ups = [{name: torch.randn(s) * 0.1 for name, s in shapes.items()} for _ in range(k)]
    ns = [int(v) for v in torch.randint(1, 50, (k,))]
    before = {n: v.clone() for n, v in glob.items()}
    got = call(fedavg_round, glob, ups, ns)
    expect(isinstance(got, dict) and set(got) == set(shapes), f"fedavg_round should return a dict with keys {sorted(shapes)}")
    avg = ref_aggregate(list(zip(ups, ns)))
    for name in shapes:
        want = before[name] + avg[name]
        plain = before[name] + sum(u[name] for u in ups) / k
        expect(isinstance(got[name], torch.Tensor), f"new {name} should be a tensor, got {type(got[name]).__name__}")
        if torch.allclose(got[name], plain, atol=1e-6) and not torch.allclose(plain, want, atol=1e-6):
            raise CheckFailed("clients must be weighted by their number of examples n_k / n, not equally")
        if torch.allclose(got[name], avg[name], atol=1e-6):
            raise CheckFailed("return the new weights w + average update, not the average update alone")
        expect_close(got[name], want, f"new {name}", rtol=1e-5, atol=1e-6)


def fedavg(fedavg_round) -> None:
    run("fedavg_round: weighted by n_k", lambda: _fedavg_case(fedavg_round, 3))


def fedavg_hidden(fedavg_round) -> None:
    run("fedavg_round (hidden: 1 and 5 clients)", lambda: [_fedavg_case(fedavg_round, k) for k in (1, 5)])
