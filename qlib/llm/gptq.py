"""GPTQ: quantize a weight matrix column by column, correcting the error as you go.

Frantar et al. (2022), "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers". For a linear layer with weight ``W`` (``(out, in)``) and calibration inputs
``X`` (``(n, in)``), find quantized ``Q`` minimising the layer's output error
``||X W^T - X Q^T||^2``. Its Hessian with respect to each row of ``W`` is the same for every row::

    H = 2 X^T X / n                                    # (in, in); the 1/n does not matter

Quantizing column ``j`` makes an error ``w_j - q_j``; the Optimal Brain Surgeon update spreads
it over the columns not yet quantized, through the inverse Hessian ``H^-1`` (``F`` = the
remaining columns)::

    delta_F = -(w_j - q_j) / [H_F^-1]_jj * [H_F^-1]_j,F      then remove j from H_F^-1

GPTQ's three tricks make this fast and stable on large matrices:

1. same column order for every row, so one ``H^-1`` serves all rows;
2. the rows ``[H_F^-1]_j,F / sqrt([H_F^-1]_jj)`` over the whole sequence are the rows of the
   upper Cholesky factor ``U`` of ``H^-1`` (no downdates needed): ``err = (w_j - q_j) / U_jj``,
   ``W[:, j:] -= err * U[j, j:]``;
3. *lazy batch updates*: within a block of ``blocksize`` (128) columns the updates touch only
   the block; the rest of ``W`` receives them once per block as one matrix product.

Damping ``lambda = percdamp * mean(diag H)`` (``percdamp = 0.01``) is added to ``diag H`` so
the Cholesky factorisation exists. ``act_order`` quantizes the columns with the largest
``diag H`` (the most active inputs) first. With groups, a group's scale and zero point are
chosen when its first column is reached, from the *updated* weights (``group_qparams``,
torchao's convention as in ``weight_only``); with ``act_order`` the groups follow the
quantization order, and ``g_idx[j]`` says which group column ``j`` belongs to.

``gptq_reference`` is the unblocked algorithm written with the explicit inverse-Hessian
downdate (step 2 undone); ``gptq_quantize`` is the blocked one; they agree to float rounding.
Both follow the input's floating dtype (float64 for tests; float16/bfloat16 computed in float32).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..granularity import PerChannel
from ..qparams import qparams_for
from .layers import FakeQuantWeightLinear, capture_inputs, linear_layers
from .weight_only import weight_range


@dataclass
class GPTQResult:
    """``weight_dq`` (``(out, in)``, float), ``w_q`` (int64 codes), ``scale``/``zero_point``
    (``(out, n_groups)``), ``g_idx`` (``(in,)`` group of each column) and ``perm`` (the
    column order used)."""
    weight_dq: torch.Tensor
    w_q: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    g_idx: torch.Tensor
    perm: torch.Tensor


def hessian(x: torch.Tensor) -> torch.Tensor:
    """``H = 2 X^T X / n`` for inputs ``x`` of shape ``(..., in)`` -> ``(in, in)`` (float32+)."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError("x must be a floating-point tensor of layer inputs (..., in)")
    x = x.reshape(-1, x.shape[-1])
    if x.shape[0] == 0:
        raise ValueError("x is empty: GPTQ needs calibration inputs")
    if not torch.isfinite(x).all():
        raise ValueError("x holds NaN or infinite values")
    x = x if x.dtype == torch.float64 else x.float()
    return 2.0 * x.T @ x / x.shape[0]


def _prepare(weight, H, percdamp, act_order):
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        raise TypeError("weight must be a floating-point (out, in) matrix")
    n = weight.shape[1]
    if H.shape != (n, n):
        raise ValueError(f"H must be ({n}, {n}) for a weight with {n} columns, got {tuple(H.shape)}")
    if not 0 <= percdamp < 1:
        raise ValueError(f"percdamp must be in [0, 1), got {percdamp}")
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    W = weight.detach().to(dtype).clone()
    H = H.detach().to(device=W.device, dtype=dtype).clone()
    dead = torch.diag(H) == 0                       # inputs that are always 0: any weight will do
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    perm = (torch.argsort(torch.diag(H), descending=True) if act_order
            else torch.arange(n, device=W.device))
    W, H = W[:, perm], H[perm][:, perm]
    H += percdamp * torch.diag(H).mean() * torch.eye(n, dtype=dtype, device=W.device)
    return W, H, perm


def _group_params(cols: torch.Tensor, bits: int, symmetric: bool):
    return qparams_for(cols, bits, symmetric, PerChannel(0), signed=symmetric)


def _quant_col(w, scale, zp, qmin, qmax):
    """``quantize``/``dequantize`` of one column (per-row qparams), written out: this runs once
    per column, so it skips the argument checks (float32 reciprocal, round half to even)."""
    codes = torch.clamp(torch.round(w * (1.0 / scale).to(w.dtype)) + zp.to(w.dtype), qmin, qmax)
    return codes.to(torch.int64), ((codes - zp.to(w.dtype)) * scale.to(w.dtype)).to(w.dtype)


def _finish(weight, Q, codes, scales, zps, perm, g):
    inv = torch.argsort(perm)
    return GPTQResult(Q[:, inv].to(weight.dtype), codes[:, inv], scales, zps, inv // g, perm)


def _check_group(n: int, group_size: int | None, blocksize: int | None = None) -> int:
    g = n if group_size is None else group_size
    if not isinstance(g, int) or g < 1 or n % g:
        raise ValueError(f"group_size must divide in_features {n}, got {group_size!r}")
    if blocksize is not None and (not isinstance(blocksize, int) or blocksize < 1):
        raise ValueError(f"blocksize must be a positive int, got {blocksize!r}")
    return g


def gptq_quantize(weight: torch.Tensor, H: torch.Tensor, bits: int = 4, group_size: int | None = 128,
                  symmetric: bool = False, percdamp: float = 0.01, blocksize: int = 128,
                  act_order: bool = False) -> GPTQResult:
    """Blocked GPTQ of ``weight`` (``(out, in)``) with Hessian ``H`` (``(in, in)``)."""
    qmin, qmax = weight_range(bits, symmetric)
    W, H, perm = _prepare(weight, H, percdamp, act_order)
    out, n = W.shape
    g = _check_group(n, group_size, blocksize)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Q, codes = torch.zeros_like(W), torch.zeros(out, n, dtype=torch.int64, device=W.device)
    scales = torch.zeros(out, n // g, dtype=torch.float32, device=W.device)
    zps = torch.zeros(out, n // g, dtype=torch.int64, device=W.device)
    for i1 in range(0, n, blocksize):
        i2 = min(i1 + blocksize, n)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            j = i1 + i
            if j % g == 0:                           # a new group: qparams of the updated weights
                cols = W1[:, i:i + g]
                if cols.shape[1] < g:                # the group runs past this block: apply the
                    need = g - cols.shape[1]         # updates still pending for those columns
                    rest = W[:, i2:i2 + need] - Err1[:, :i] @ U[i1:j, i2:i2 + need]
                    cols = torch.cat([cols, rest], dim=1)
                scale, zp = _group_params(cols, bits, symmetric)
                scales[:, j // g], zps[:, j // g] = scale, zp
            codes[:, j], Q[:, j] = _quant_col(W1[:, i], scale, zp, qmin, qmax)
            err = (W1[:, i] - Q[:, j]) / U1[i, i]
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]            # the lazy batch update
    return _finish(weight, Q, codes, scales, zps, perm, g)


def gptq_reference(weight: torch.Tensor, H: torch.Tensor, bits: int = 4, group_size: int | None = 128,
                   symmetric: bool = False, percdamp: float = 0.01,
                   act_order: bool = False) -> GPTQResult:
    """Unblocked GPTQ with the explicit OBS update and inverse-Hessian downdate (slow, clear)."""
    qmin, qmax = weight_range(bits, symmetric)
    W, H, perm = _prepare(weight, H, percdamp, act_order)
    out, n = W.shape
    g = _check_group(n, group_size)
    Hinv = torch.linalg.inv(H)
    Q, codes = torch.zeros_like(W), torch.zeros(out, n, dtype=torch.int64, device=W.device)
    scales = torch.zeros(out, n // g, dtype=torch.float32, device=W.device)
    zps = torch.zeros(out, n // g, dtype=torch.int64, device=W.device)
    for j in range(n):
        if j % g == 0:
            scale, zp = _group_params(W[:, j:j + g], bits, symmetric)
            scales[:, j // g], zps[:, j // g] = scale, zp
        codes[:, j], Q[:, j] = _quant_col(W[:, j], scale, zp, qmin, qmax)
        d = Hinv[j, j]
        W[:, j:] -= ((W[:, j] - Q[:, j]) / d)[:, None] * Hinv[j, j:][None, :]
        Hinv = Hinv - Hinv[:, j:j + 1] @ Hinv[j:j + 1, :] / d      # remove column j
    return _finish(weight, Q, codes, scales, zps, perm, g)


def output_error(weight: torch.Tensor, weight_q: torch.Tensor, x: torch.Tensor) -> float:
    """``||X W^T - X Q^T||_F^2 / n``: what GPTQ minimises (``x`` of shape ``(n, in)``)."""
    x = x.reshape(-1, x.shape[-1]).to(weight.dtype)
    return float(((x @ (weight - weight_q.to(weight.dtype)).T) ** 2).sum() / x.shape[0])


@torch.no_grad()
def quantize_model(model: nn.Module, tokens: torch.Tensor, bits: int = 4, group_size: int | None = 128,
                   symmetric: bool = False, percdamp: float = 0.01, blocksize: int = 128,
                   act_order: bool = True, layer_fn=None) -> nn.Module:
    """GPTQ every block linear, block after block, on ``tokens`` (``(batch, T)`` windows).

    As in the paper's sequential recipe, the inputs of block ``i`` are computed by the model
    whose blocks ``< i`` are already quantized, so later layers correct earlier errors.
    ``layer_fn(weight, H, bits, group_size) -> weight_dq`` replaces ``gptq_quantize`` for one
    layer (lab 11 plugs in the student's own GPTQ).
    """
    import copy
    new = copy.deepcopy(model)
    info = {"bits": bits, "group_size": group_size, "symmetric": symmetric, "method": "gptq"}
    for i in range(len(new.blocks)):
        names = [n for n in linear_layers(new) if n.startswith(f"blocks.{i}.")]
        acts = capture_inputs(new, tokens, names)
        for name in names:
            layer = new.get_submodule(name)
            h = hessian(acts[name])
            if layer_fn is None:
                w_dq = gptq_quantize(layer.weight, h, bits, group_size, symmetric, percdamp, blocksize,
                                     act_order).weight_dq
            else:
                w_dq = layer_fn(layer.weight.detach().clone(), h, bits, group_size)
            parent, _, attr = name.rpartition(".")
            setattr(new.get_submodule(parent), attr, FakeQuantWeightLinear(w_dq, layer.bias, info))
    return new
