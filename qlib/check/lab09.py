"""Checks for lab 09 (mixed precision and deployment): Hutchinson's Hessian trace, an optimal
bit allocation under a size budget, and the verification of an ONNX export in ONNX Runtime.

References: the exact trace of a known Hessian (a quadratic loss ``1/2 w^T A w`` has Hessian
``A``); brute force over every allocation (``itertools.product``) for the allocation, compared
by cost (ties may pick different allocations); ``qlib.export`` and
``qlib.intmodel.convert_to_integer`` for the verification.

Tolerances: a diagonal Hessian makes every Rademacher sample exact (``v_i^2 = 1``), so the
trace must match to ``1e-4`` relative; for a full Hessian the estimate must lie within 5
standard deviations of the exact trace (the variance of one sample is
``2 sum_{i != j} A_ij^2``). The allocation's cost must equal the brute-force optimum to
``1e-9`` relative. The verification numbers must match the reference's to ``1e-6``.
"""

from __future__ import annotations

import itertools

import torch

from . import CheckFailed, call, expect, expect_close, run

BITS = (2, 3, 4, 8)


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ()).item()))


# ------------------------------------------------------------------ Q1 Hutchinson trace
def _quadratic(a: torch.Tensor):
    return lambda w: 0.5 * (w.flatten() @ a @ w.flatten())


def _check_trace(fn, a: torch.Tensor, shape, samples: int, exact_each: bool, what: str) -> None:
    w = torch.randn(shape, dtype=torch.float64, generator=_gen())
    w0 = w.clone()
    got = call(fn, _quadratic(a), w, samples, 0, what="hessian_trace")
    expect(torch.equal(w, w0), f"{what}: your function changed the weight tensor")
    try:
        got = float(got)
    except (TypeError, ValueError):
        raise CheckFailed(f"{what}: expected a number (a float), got {type(got).__name__}") from None
    exact = float(a.diagonal().sum())
    if exact_each:
        expect_close(got, exact, f"{what} (diagonal Hessian: every sample is exact)", rtol=1e-4, atol=1e-6)
        return
    std = float((2 * (a.pow(2).sum() - a.diagonal().pow(2).sum()) / samples).sqrt())
    expect(abs(got - exact) <= 5 * std + 1e-6,
           f"{what}: estimate {got:.4f}, exact trace {exact:.4f}; with {samples} samples the estimate "
           f"should be within {5 * std:.4f} (5 standard deviations). Do you average v . (H v) over the samples?")


def _spd(n: int) -> torch.Tensor:
    m = torch.randn(n, n, dtype=torch.float64, generator=_gen())
    return m @ m.T / n + torch.eye(n, dtype=torch.float64)


def hessian_trace(fn) -> None:
    """Q1 visible: a diagonal Hessian (exact) and a 12 x 12 full one (statistical)."""
    def body():
        d = torch.rand(6, dtype=torch.float64, generator=_gen()) * 3 + 0.1
        _check_trace(fn, torch.diag(d), (2, 3), 3, True, "hessian_trace(diagonal H, 3 samples)")
        _check_trace(fn, _spd(12), (12,), 400, False, "hessian_trace(full H, 400 samples)")
    run("hessian_trace: Hutchinson's estimate of Tr(H)", body)


def hessian_trace_hidden(fn) -> None:
    """Q1 hidden: other shapes (a conv-like 4-D weight), other Hessians, and seeds that matter."""
    def body():
        d = torch.rand(2 * 3 * 2 * 2, dtype=torch.float64, generator=_gen()) * 5
        _check_trace(fn, torch.diag(d), (2, 3, 2, 2), 1, True, "hessian_trace(diagonal H, 4-D weight, 1 sample)")
        _check_trace(fn, _spd(20), (4, 5), 600, False, "hessian_trace(full H, (4, 5) weight)")
        a = _spd(8)
        w = torch.randn(8, dtype=torch.float64, generator=_gen())
        t1 = float(call(fn, _quadratic(a), w, 5, 1, what="hessian_trace"))
        t1b = float(call(fn, _quadratic(a), w, 5, 1, what="hessian_trace"))
        expect(t1 == t1b, "hessian_trace: the same seed should give the same estimate (use a torch.Generator "
                          "seeded with `seed`)")
    run("hessian_trace (hidden): 4-D weights, other Hessians, seeds", body)


# ------------------------------------------------------------------ Q2 allocation
def _problem(layers: int):
    gen = _gen()
    sizes = {f"layer{i}": int(torch.randint(10, 400, (), generator=gen)) for i in range(layers)}
    sens = {}
    for n in sizes:
        v = torch.rand(len(BITS), generator=gen, dtype=torch.float64).sort(descending=True).values * 5
        sens[n] = {b: float(x) for b, x in zip(BITS, v)}
    lo = sum(sizes.values()) * BITS[0]
    hi = sum(sizes.values()) * BITS[-1]
    budget = int(lo + float(torch.rand((), generator=gen)) * (hi - lo))
    return sens, sizes, budget


def _brute_force(sens, sizes, budget) -> float:
    best = float("inf")
    for choice in itertools.product(BITS, repeat=len(sizes)):
        if sum(sizes[n] * b for n, b in zip(sizes, choice)) <= budget:
            best = min(best, sum(sens[n][b] for n, b in zip(sizes, choice)))
    return best


def _check_allocation(fn, sens, sizes, budget, what: str) -> None:
    got = call(fn, sens, sizes, budget, what="allocate")
    expect(isinstance(got, dict) and set(got) == set(sizes),
           f"{what}: expected a dict {{layer: bits}} with every layer {sorted(sizes)}, got {got!r}")
    expect(all(int(b) in BITS for b in got.values()), f"{what}: bits must be among {BITS}, got {got}")
    size = sum(sizes[n] * int(got[n]) for n in sizes)
    expect(size <= budget, f"{what}: your allocation {got} takes {size} bits, over the budget of {budget}")
    cost, best = sum(sens[n][int(got[n])] for n in sizes), _brute_force(sens, sizes, budget)
    expect(cost <= best * (1 + 1e-9) + 1e-12,
           f"{what}: your allocation costs {cost:.6f}, the optimum under this budget costs {best:.6f}")


def allocate(fn) -> None:
    """Q2 visible: 3- and 4-layer problems against brute force; the widest and narrowest budgets."""
    def body():
        for layers in (3, 4):
            sens, sizes, budget = _problem(layers)
            _check_allocation(fn, sens, sizes, budget, f"allocate({layers} layers, budget {budget})")
        sens, sizes, _ = _problem(3)
        widest = sum(sizes.values()) * BITS[-1]
        _check_allocation(fn, sens, sizes, widest, "allocate(budget = everything at 8 bits)")
        _check_allocation(fn, sens, sizes, sum(sizes.values()) * BITS[0], "allocate(budget = everything at 2 bits)")
    run("allocate: optimal under the size budget", body)


def allocate_hidden(fn) -> None:
    """Q2 hidden: fresh budgets and sensitivities, 1 to 5 layers, and a case that defeats greedy."""
    def body():
        for layers in (1, 2, 5, 5):
            sens, sizes, budget = _problem(layers)
            _check_allocation(fn, sens, sizes, budget, f"allocate({layers} layers, budget {budget})")
        sizes = {"a": 100, "b": 300}
        sens = {"a": {2: 6.0, 3: 5.0, 4: 4.0, 8: 2.0}, "b": {2: 8.0, 3: 7.0, 4: 0.0, 8: 0.0}}
        _check_allocation(fn, sens, sizes, 1200, "allocate(a case where greedy lowering is not optimal)")
    run("allocate (hidden): fresh budgets and sensitivities", body)


# ------------------------------------------------------------------ Q3 export and verify
def _reference_verify(qmodel, x):
    from ..export import ort_predict, ort_session, to_onnx
    from ..intmodel import convert_to_integer

    got = ort_predict(ort_session(to_onnx(qmodel, x[:2])), x)
    ref = convert_to_integer(qmodel)(x)
    return (got.argmax(1) == ref.argmax(1)).float().mean().item(), (got - ref).abs().max().item()


def _check_verify(fn, name: str, seed: int, count: int, what: str) -> None:
    from ..data import calibration_batches, load_digits
    from ..models import image_size, pretrained
    from ..ptq import quantize_static

    digits = load_digits(image_size(name))
    qmodel = quantize_static(pretrained(name, seed), calibration_batches(digits.train, 128, seed=seed))
    idx = torch.randperm(len(digits.test.tensors[0]), generator=_gen())[:count]
    x = digits.test.tensors[0][idx]
    got = call(fn, qmodel, x, what="verify_onnx")
    expect(isinstance(got, dict) and {"agreement", "max_abs_diff"} <= set(got),
           f"{what}: expected a dict with keys 'agreement' and 'max_abs_diff', got {got!r}")
    agreement, diff = _reference_verify(qmodel, x)
    expect_close(got["agreement"], agreement, f"{what}: agreement (a fraction in [0, 1])", rtol=1e-6, atol=1e-6)
    expect_close(got["max_abs_diff"], diff, f"{what}: max |ONNX Runtime logits - qlib integer logits|",
                 rtol=1e-4, atol=1e-6)
    expect(got["agreement"] >= 0.999, f"{what}: only {100 * got['agreement']:.2f}% of predictions agree")


def verify_onnx(fn) -> None:
    """Q3 visible: cnn16 seed 0 at W8A8 on 128 test digits."""
    run("verify_onnx: ONNX Runtime agrees with qlib's integer model",
        lambda: _check_verify(fn, "cnn16", 0, 128, "verify_onnx(cnn16 seed 0)"))


def verify_onnx_hidden(fn) -> None:
    """Q3 hidden: a residual network (res16 seed 1) on other test digits."""
    run("verify_onnx (hidden): res16",
        lambda: _check_verify(fn, "res16", 1, 96, "verify_onnx(res16 seed 1)"))
