"""LLM.int8(): int8 matmul for most features, float for the few outlier features.

Dettmers et al. (2022), "LLM.int8(): 8-bit Matrix Multiplication for Transformers at Scale".
The input ``X`` (``(tokens, in)``) of a projection is split by *columns* (feature dims):

- outlier columns ``O = {j : max_t |X[t, j]| >= threshold}`` (``threshold = 6.0`` in the
  paper), found at run time for every batch;
- the rest, multiplied in int8 with **vector-wise** scales: one per row of ``X`` (per token)
  and one per row of ``W`` (per output channel), so that both factor out of the int32 sum::

      Y = X[:, O] @ W[:, O]^T                                   # float ("16-bit") part
        + (X_q[:, ~O] @ W_q[:, ~O]^T) * s_x[:, None] * s_w[None, :]   # int8 part

The int8 weight ``W_q`` is quantized once, per output channel, over all columns (what is
stored); the outlier part reads the float weight columns, as in the paper's decomposition.
Activation scales ``s_x[t] = max_{j not in O} |X[t, j]| / 127.5`` (symmetric int8, PyTorch's
convention as in ``w8a8``). With no outlier column this is exactly per-token/per-channel W8A8.

``Int8MixedLinear`` keeps the fraction of outlier columns it met (``outlier_fraction``) so the
lesson can say how much of the matmul stayed in float. Shapes: ``x`` ``(..., in)``.
"""

from __future__ import annotations

import torch
from torch import nn

from .layers import replace_linears
from .w8a8 import fake_quantize_int8


def mixed_matmul(x: torch.Tensor, weight: torch.Tensor, weight_dq: torch.Tensor,
                 threshold: float = 6.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Y, outlier_columns)`` of the decomposition above, for ``x`` ``(tokens, in)``.

    ``weight``: the float ``(out, in)`` weight; ``weight_dq``: its per-channel int8
    quantize-dequantize (``fake_quantize_int8(weight, "channel")``).
    """
    if not threshold > 0:
        raise ValueError(f"threshold must be > 0, got {threshold}")
    if x.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"x must be (tokens, {weight.shape[1]}), got {tuple(x.shape)}")
    outlier = x.abs().amax(dim=0) >= threshold                        # (in,) bool
    cols = torch.nonzero(outlier).flatten()
    x_rest = x.masked_fill(outlier, 0.0)                              # outlier columns -> 0
    y = nn.functional.linear(fake_quantize_int8(x_rest, "token"), weight_dq.masked_fill(outlier, 0.0))
    if cols.numel():
        y = y + x[:, cols] @ weight[:, cols].T
    return y, cols


class Int8MixedLinear(nn.Module):
    """A linear layer computed with LLM.int8()'s mixed-precision decomposition."""

    def __init__(self, linear: nn.Linear, threshold: float = 6.0):
        super().__init__()
        if not threshold > 0:
            raise ValueError(f"threshold must be > 0, got {threshold}")
        self.threshold = float(threshold)
        w = linear.weight.detach()
        self.weight = nn.Parameter(w.clone(), requires_grad=False)
        self.register_buffer("weight_dq", fake_quantize_int8(w, "channel"))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(),
                                                                  requires_grad=False)
        self.columns_seen, self.calls = 0, 0

    @property
    def outlier_fraction(self) -> float:
        """Mean fraction of input columns kept in float over the calls so far."""
        return self.columns_seen / (self.calls * self.weight.shape[1]) if self.calls else 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        y, cols = mixed_matmul(flat, self.weight, self.weight_dq, self.threshold)
        self.columns_seen += cols.numel()
        self.calls += 1
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], y.shape[-1])


def quantize_model(model: nn.Module, threshold: float = 6.0) -> nn.Module:
    """A copy of ``model`` with every block linear an ``Int8MixedLinear(threshold)``."""
    return replace_linears(model, lambda name, layer: Int8MixedLinear(layer, threshold))


def outlier_fractions(model: nn.Module) -> dict[str, float]:
    """``{layer name: outlier_fraction}`` of every ``Int8MixedLinear`` in ``model``."""
    return {n: m.outlier_fraction for n, m in model.named_modules() if isinstance(m, Int8MixedLinear)}
