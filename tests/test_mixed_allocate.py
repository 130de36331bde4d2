"""Tests of qlib.mixed.allocate. Reference: exhaustive search over every allocation (brute
force) on small random problems; the ILP is HAWQ-v3's (Yao et al. 2021), solved by scipy's milp."""

import itertools

import numpy as np
import pytest
import torch

from qlib import models, ptq
from qlib.mixed import (allocation_bits, greedy_allocate, ilp_allocate, layer_macs, layer_sizes, to_per_layer,
                        uniform_allocate)
from qlib.modules import QuantConfig, QuantConv2d

BITS = (2, 3, 4, 8)


def random_problem(rng, layers):
    sizes = {f"l{i}": int(rng.integers(10, 500)) for i in range(layers)}
    sens = {}
    for n in sizes:  # decreasing in bits, as real sensitivities are (mostly)
        v = np.sort(rng.exponential(1.0, len(BITS)))[::-1]
        sens[n] = dict(zip(BITS, v.tolist()))
    return sens, sizes


def brute_force(sens, sizes, budget, macs=None, bitops=None, act=8):
    best, best_cost = None, np.inf
    names = list(sizes)
    for choice in itertools.product(BITS, repeat=len(names)):
        alloc = dict(zip(names, choice))
        if allocation_bits(alloc, sizes) > budget:
            continue
        if macs is not None and sum(macs[n] * alloc[n] * act for n in names) > bitops:
            continue
        cost = sum(sens[n][alloc[n]] for n in names)
        if cost < best_cost:
            best, best_cost = alloc, cost
    return best, best_cost


def cost(sens, alloc):
    return sum(sens[n][b] for n, b in alloc.items())


@pytest.mark.parametrize("layers", [1, 3, 5])
def test_ilp_matches_brute_force(layers):
    rng = np.random.default_rng()  # fresh problems every run
    for _ in range(10):
        sens, sizes = random_problem(rng, layers)
        lo, hi = allocation_bits(uniform_allocate(sizes, 2), sizes), allocation_bits(uniform_allocate(sizes, 8), sizes)
        budget = float(rng.uniform(lo, hi))
        alloc = ilp_allocate(sens, sizes, budget)
        _, best = brute_force(sens, sizes, budget)
        assert allocation_bits(alloc, sizes) <= budget
        assert cost(sens, alloc) == pytest.approx(best, rel=1e-9, abs=1e-12)
        greedy = greedy_allocate(sens, sizes, budget)
        assert allocation_bits(greedy, sizes) <= budget
        assert cost(sens, greedy) >= best - 1e-9  # greedy is never better than the optimum


def test_ilp_with_bitops_budget_matches_brute_force():
    rng = np.random.default_rng()
    for _ in range(10):
        sens, sizes = random_problem(rng, 4)
        macs = {n: int(rng.integers(100, 10_000)) for n in sizes}
        budget = allocation_bits(uniform_allocate(sizes, 6), sizes)
        bitops = float(sum(macs.values()) * 8 * rng.uniform(2.5, 6))
        alloc = ilp_allocate(sens, sizes, budget, macs=macs, bitops_budget=bitops, act_bits=8)
        _, best = brute_force(sens, sizes, budget, macs, bitops)
        assert sum(macs[n] * alloc[n] * 8 for n in sizes) <= bitops
        assert cost(sens, alloc) == pytest.approx(best, rel=1e-9, abs=1e-12)


def test_greedy_can_be_suboptimal_and_ilp_is_not():
    """A case where greedy's cheapest-step rule goes wrong (found by random search)."""
    sizes = {"a": 100, "b": 300}
    sens = {"a": {2: 6.0, 3: 5.0, 4: 4.0, 8: 2.0}, "b": {2: 8.0, 3: 7.0, 4: 0.0, 8: 0.0}}
    budget = 1200
    ilp, greedy = ilp_allocate(sens, sizes, budget), greedy_allocate(sens, sizes, budget)
    assert ilp == {"a": 4, "b": 2} and cost(sens, ilp) == brute_force(sens, sizes, budget)[1] == 12.0
    assert greedy == {"a": 2, "b": 3} and cost(sens, greedy) == 13.0


def test_generous_budget_gives_widest_and_tight_budget_narrowest():
    sens, sizes = random_problem(np.random.default_rng(), 4)
    widest = allocation_bits(uniform_allocate(sizes, 8), sizes)
    assert ilp_allocate(sens, sizes, widest) == uniform_allocate(sizes, 8)
    narrowest = allocation_bits(uniform_allocate(sizes, 2), sizes)
    assert ilp_allocate(sens, sizes, narrowest) == uniform_allocate(sizes, 2)
    assert greedy_allocate(sens, sizes, narrowest) == uniform_allocate(sizes, 2)


def test_infeasible_budget_and_bad_inputs_raise():
    sens, sizes = random_problem(np.random.default_rng(0), 3)
    too_small = allocation_bits(uniform_allocate(sizes, 2), sizes) - 1
    with pytest.raises(ValueError, match="no allocation fits"):
        ilp_allocate(sens, sizes, too_small)
    with pytest.raises(ValueError, match="no allocation fits"):
        greedy_allocate(sens, sizes, too_small)
    with pytest.raises(ValueError, match="positive"):
        ilp_allocate(sens, sizes, -1)
    with pytest.raises(ValueError, match="same bit choices"):
        ilp_allocate({**sens, "l0": {2: 1.0, 8: 0.0}}, sizes, 1e9)
    with pytest.raises(ValueError, match="no sensitivity"):
        ilp_allocate({"l0": sens["l0"]}, sizes, 1e9)
    with pytest.raises(ValueError, match="NaN"):
        ilp_allocate({**sens, "l1": dict.fromkeys(BITS, float("nan"))}, sizes, 1e9)
    with pytest.raises(ValueError, match="together"):
        ilp_allocate(sens, sizes, 1e9, macs={n: 1 for n in sizes})
    with pytest.raises(ValueError, match="between 2 and 16"):
        uniform_allocate(sizes, 1)
    with pytest.raises(ValueError, match="no bits for layers"):
        allocation_bits({}, sizes)
    with pytest.raises(TypeError, match="QuantConfig"):
        to_per_layer({"a": 4}, config="w4")


def test_layer_sizes_and_macs_of_cnn16():
    model = models.create("cnn16", seed=0)
    sizes = layer_sizes(model)
    assert sizes == {"0": 16 * 9, "3": 32 * 16 * 9, "7": 64 * 32 * 9, "12": 64 * 10}
    macs = layer_macs(model, torch.zeros(2, 1, 16, 16))
    assert macs == {"0": 16 * 16 * 16 * 9, "3": 32 * 16 * 16 * 16 * 9, "7": 64 * 8 * 8 * 32 * 9, "12": 640}


def test_allocation_plugs_into_ptq_per_layer():
    model = models.create("cnn16", seed=0).eval()
    alloc = {"0": 8, "3": 4, "7": 2, "12": 6}
    per_layer = to_per_layer(alloc, act_bits={"7": 6})
    assert per_layer["7"] == QuantConfig(weight_bits=2, act_bits=6)
    x = torch.randn(8, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    q = ptq.quantize_static(model, x, per_layer=per_layer)
    got = {name: (m.config.weight_bits, m.config.act_bits) for name, m in q.named_modules()
           if isinstance(m, QuantConv2d) or hasattr(m, "weight_fq")}
    assert got == {"0": (8, 8), "3": (4, 8), "7": (2, 6), "12": (6, 8)}
    assert isinstance(q[7], QuantConv2d) and q[7].weight_fq.bits == 2
