"""Bit allocation: one weight bit width per layer, under a size budget.

Given sensitivities ``Omega[l][b]`` (``qlib.mixed.sensitivity``) and layer sizes ``n_l``
(number of weights), choose ``b_l`` for every layer to::

    minimize    sum_l Omega[l][b_l]
    subject to  sum_l n_l * b_l            <= size budget      (bits of weights)
                sum_l macs_l * b_l * a_l   <= BitOps budget    (optional; a_l: activation bits)

With a binary variable ``x[l, j] = 1`` when layer ``l`` takes the ``j``-th width, this is an
integer linear program (HAWQ-v3)::

    min c.x   s.t.  sum_j x[l, j] = 1 for each l,   A x <= budget,   x in {0, 1}

``ilp_allocate`` solves it exactly with ``scipy.optimize.milp`` (HiGHS branch and bound).
``greedy_allocate`` starts every layer at the widest width and lowers, one step at a time,
the layer whose sensitivity grows least per bit saved, until the budget holds: fast, not
always optimal. ``uniform_allocate`` gives every layer the same width (the baseline).

An allocation is a dict ``{layer name: bits}``; ``allocation_bits`` is its weight size in
bits, ``to_per_layer`` turns it into ``qlib.ptq.prepare(..., per_layer=...)`` configs (the
same dict works for ``qlib.qat.quantization_aware_training(per_layer=...)``).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch import nn

from ..fold import fold_batchnorm
from ..modules import QuantConfig, quant_layers

__all__ = ["layer_sizes", "layer_macs", "allocation_bits", "uniform_allocate", "ilp_allocate",
           "greedy_allocate", "to_per_layer"]


def layer_sizes(model: nn.Module) -> dict[str, int]:
    """``{layer: number of weights}`` of every ``nn.Linear``/``nn.Conv2d`` (biases stay 32-bit)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    layers = quant_layers(model)
    if not layers:
        raise ValueError("no layers to quantize: the model has no nn.Linear or nn.Conv2d")
    return {name: m.weight.numel() for name, m in layers.items()}


def layer_macs(model: nn.Module, example: torch.Tensor) -> dict[str, int]:
    """``{layer: multiply-accumulates for one sample}`` measured on ``example`` ``(N, ...)``."""
    if not isinstance(example, torch.Tensor) or example.dim() < 2:
        raise TypeError("example must be an input batch tensor (N, ...)")
    folded = fold_batchnorm(model).eval()
    layers = quant_layers(folded)
    macs = {}

    def hook(name, m, out):
        per_output = m.weight[0].numel()  # in_features, or c_in/groups * kh * kw
        macs[name] = int(out[0].numel() * per_output)
    handles = [m.register_forward_hook(lambda m, a, out, name=name: hook(name, m, out)) for name, m in layers.items()]
    try:
        with torch.no_grad():
            folded(example[:1])
    finally:
        for h in handles:
            h.remove()
    return macs


def allocation_bits(allocation: dict[str, int], sizes: dict[str, int]) -> int:
    """Weight size of ``allocation`` in bits: ``sum_l n_l * b_l``."""
    missing = sorted(set(sizes) - set(allocation))
    if missing:
        raise ValueError(f"the allocation has no bits for layers {missing}")
    return int(sum(sizes[name] * int(allocation[name]) for name in sizes))


def uniform_allocate(sizes: dict[str, int], bits: int) -> dict[str, int]:
    """Every layer at ``bits``."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 16:
        raise ValueError(f"bits must be an int between 2 and 16, got {bits!r}")
    return {name: bits for name in sizes}


def _table(sensitivity: dict, sizes: dict) -> tuple[list[str], list[int]]:
    if not isinstance(sensitivity, dict) or not isinstance(sizes, dict):
        raise TypeError("sensitivity must be {layer: {bits: value}} and sizes {layer: count}")
    names = list(sizes)
    if not names:
        raise ValueError("sizes is empty: no layers to allocate")
    missing = [n for n in names if n not in sensitivity]
    if missing:
        raise ValueError(f"no sensitivity for layers {missing}")
    choices = sorted(set(int(b) for b in sensitivity[names[0]]))
    for n in names:
        if sorted(int(b) for b in sensitivity[n]) != choices:
            raise ValueError(f"every layer needs the same bit choices: {n!r} has {sorted(sensitivity[n])}, "
                             f"expected {choices}")
        if not all(np.isfinite(float(v)) for v in sensitivity[n].values()):
            raise ValueError(f"sensitivity of {n!r} holds NaN or infinity")
    return names, choices


def _check_budget(budget, what: str) -> float:
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not budget > 0:
        raise ValueError(f"{what} must be a positive number, got {budget!r}")
    return float(budget)


def ilp_allocate(sensitivity: dict, sizes: dict[str, int], budget_bits: float,
                 macs: dict[str, int] | None = None, bitops_budget: float | None = None,
                 act_bits: int | dict = 8) -> dict[str, int]:
    """The optimal allocation (module docstring) by ``scipy.optimize.milp``.

    ``sensitivity``: ``{layer: {bits: Omega}}`` (the same bit choices for every layer);
    ``sizes``: ``{layer: n_l}``; ``budget_bits``: the most weight bits allowed. With
    ``macs`` and ``bitops_budget``, also ``sum_l macs_l * b_l * a_l <= bitops_budget`` with
    ``a_l = act_bits`` (an int, or a dict per layer). Raises ValueError when no allocation fits.
    """
    from scipy.optimize import Bounds, LinearConstraint, milp

    names, choices = _table(sensitivity, sizes)
    budget_bits = _check_budget(budget_bits, "budget_bits")
    L, J = len(names), len(choices)
    cost = np.array([[float(sensitivity[n][b]) for b in choices] for n in names]).ravel()
    one_each = np.kron(np.eye(L), np.ones(J))                       # (L, L*J): sum_j x[l, j] = 1
    size_row = np.array([[sizes[n] * b for b in choices] for n in names], dtype=float).ravel()
    constraints = [LinearConstraint(one_each, 1, 1), LinearConstraint(size_row[None], -np.inf, budget_bits)]
    if (macs is None) != (bitops_budget is None):
        raise ValueError("give macs and bitops_budget together, or neither")
    if macs is not None:
        bitops_budget = _check_budget(bitops_budget, "bitops_budget")
        a = {n: act_bits[n] if isinstance(act_bits, dict) else act_bits for n in names}
        ops_row = np.array([[macs[n] * b * a[n] for b in choices] for n in names], dtype=float).ravel()
        constraints.append(LinearConstraint(ops_row[None], -np.inf, bitops_budget))
    res = milp(cost, constraints=constraints, integrality=np.ones(L * J), bounds=Bounds(0, 1))
    if res.status != 0 or res.x is None:
        smallest = sum(sizes[n] * choices[0] for n in names)
        raise ValueError(f"no allocation fits the budget (smallest size {smallest} bits with {choices[0]} bits "
                         f"everywhere, budget {budget_bits:g}): {res.message}")
    x = np.round(res.x).reshape(L, J)
    return {n: choices[int(x[i].argmax())] for i, n in enumerate(names)}


def greedy_allocate(sensitivity: dict, sizes: dict[str, int], budget_bits: float) -> dict[str, int]:
    """Lower one layer one width at a time, cheapest ``dOmega / bits saved`` first, until the budget holds."""
    names, choices = _table(sensitivity, sizes)
    budget_bits = _check_budget(budget_bits, "budget_bits")
    level = {n: len(choices) - 1 for n in names}  # index into choices: start at the widest
    alloc = {n: choices[level[n]] for n in names}
    while allocation_bits(alloc, sizes) > budget_bits:
        best, best_rate = None, None
        for n in names:
            if level[n] == 0:
                continue
            b, b_next = choices[level[n]], choices[level[n] - 1]
            rate = (float(sensitivity[n][b_next]) - float(sensitivity[n][b])) / (sizes[n] * (b - b_next))
            if best_rate is None or rate < best_rate:
                best, best_rate = n, rate
        if best is None:
            raise ValueError(f"no allocation fits the budget of {budget_bits:g} bits, even with "
                             f"{choices[0]} bits everywhere")
        level[best] -= 1
        alloc[best] = choices[level[best]]
    return alloc


def to_per_layer(allocation: dict[str, int], config: QuantConfig | None = None,
                 act_bits: int | dict | None = None) -> dict[str, QuantConfig]:
    """``{layer: QuantConfig}`` for ``qlib.ptq.prepare``/``qlib.qat`` ``per_layer``.

    Each layer gets ``config`` (default W8A8) with ``weight_bits`` from ``allocation`` and
    ``act_bits`` from ``act_bits`` (an int for all, a dict per layer, or None: the config's).
    """
    config = QuantConfig() if config is None else config
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a QuantConfig, got {type(config).__name__}")
    if not isinstance(allocation, dict):
        raise TypeError(f"allocation must be a dict {{layer: bits}}, got {type(allocation).__name__}")
    out = {}
    for name, bits in allocation.items():
        a = act_bits.get(name, config.act_bits) if isinstance(act_bits, dict) else (act_bits or config.act_bits)
        out[name] = dataclasses.replace(config, weight_bits=int(bits), act_bits=int(a))
    return out
