"""BRECQ: AdaRound's learned rounding, reconstructed block by block (Li et al., ICLR 2021).

Layer-wise reconstruction (``adaround``) matches each layer's output alone and cannot trade an
error in one layer against another. Li et al. show (second-order analysis: the loss Hessian is
close to block-diagonal over *blocks*, not layers) that reconstructing the output of a whole
**block** (a residual block, or a conv-ReLU group) is the better unit: the layers inside a block
learn their roundings jointly, against the block's output, and across blocks the error is again
fed forward (the quantized model's input)::

    for each block B in execution order:
        x~ = B's input in the quantized model         y = B's output in the float model
        min over V of the layers in B (and, optionally, B's activation step sizes):
            || B_V(x~) - y ||^2  +  lambda * sum_{layers in B} f_reg(V_layer, beta)

The block output includes its ReLU (and pooling), so errors that the ReLU clips away cost
nothing. Here the squared error is plain MSE (the paper's optional Fisher weighting, the squared
gradient of the task loss per output, is not used: it needs labels or the model's own
predictions and barely matters at this scale). With ``learn_act_scale=True`` the step sizes of the
block's input quantizers are learned with LSQ at the same time (the paper learns them after the
weights; here jointly, one pass).

Blocks (``find_blocks``): for an ``nn.Sequential`` model, each top-level child that holds
quantized layers starts a block, and the children after it without quantized layers (ReLU,
pooling, flatten) join it. A residual ``BasicBlock`` is one child, so it is one block. Any other
model falls back to one block per layer (AdaRound); or give ``blocks`` yourself (lists of
submodule names, each a chain that runs in order).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .adaround import calibration_tensor, check_reconstruct_args, float_reference
from .reconstruction import capture, quant_layers_in, reconstruct_unit, run_chain

__all__ = ["find_blocks", "brecq"]


def find_blocks(model: nn.Module) -> list[list[str]]:
    """The reconstruction blocks of ``model``: lists of submodule names (module docstring)."""
    if isinstance(model, nn.Sequential):
        blocks: list[list[str]] = []
        for name, child in model.named_children():
            has_layers = bool(quant_layers_in(model, [name]))
            if has_layers or not blocks:
                blocks.append([name])
            else:
                blocks[-1].append(name)
        return [b for b in blocks if quant_layers_in(model, b)] if blocks else []
    return [[n] for n, m in model.named_modules() if hasattr(m, "weight_fq") and hasattr(m, "input_fq")]


def _check_blocks(model: nn.Module, blocks) -> list[list[str]]:
    if not isinstance(blocks, (list, tuple)) or not blocks:
        raise ValueError("blocks must be a non-empty list of lists of submodule names")
    out = []
    for b in blocks:
        names = [b] if isinstance(b, str) else list(b)
        for n in names:
            model.get_submodule(n)  # AttributeError naming the missing part
        out.append(names)
    return out


def brecq(qmodel: nn.Module, data, *, blocks: list[list[str]] | None = None, float_model: nn.Module | None = None,
          iters: int = 300, batch_size: int = 32, lr: float = 5e-2, reg_weight: float = 0.01,
          warmup: float = 0.2, beta: tuple[float, float] = (20.0, 2.0), learn_act_scale: bool = True,
          act_lr: float = 1e-3, seed: int = 0, progress: bool = False, return_stats: bool = False):
    """A copy of the converted ``qmodel`` with block-wise reconstructed rounding (BRECQ).

    Arguments as ``qlib.reconstruct.adaround``, plus ``blocks`` (default ``find_blocks``),
    ``learn_act_scale`` (LSQ on the per-tensor input step sizes inside each block) and its
    ``act_lr``. Weights end exactly on their frozen grids; learned activation scales are
    written into the input quantizers' frozen scales. ``qmodel`` is unchanged.
    """
    check_reconstruct_args(qmodel, iters, batch_size, lr, reg_weight, warmup, beta, seed)
    fp = float_reference(qmodel) if float_model is None else float_model.eval()
    q = copy.deepcopy(qmodel).eval()
    blocks = find_blocks(q) if blocks is None else _check_blocks(q, blocks)
    x = calibration_tensor(q, data)
    gen = torch.Generator().manual_seed(seed)
    grads = [p.requires_grad for p in q.parameters()]
    for p in q.parameters():
        p.requires_grad_(False)
    stats = {}
    for names in blocks:
        key = "+".join(names)
        x_in = _chain_input(q, names, x)
        y = _chain_output(fp, names, x)
        stats[key] = reconstruct_unit(q, names, x_in, y, iters=iters, batch_size=batch_size, lr=lr,
                                      reg_weight=reg_weight, warmup=warmup, beta=tuple(beta), generator=gen,
                                      learn_act_scale=learn_act_scale, act_lr=act_lr, progress=progress,
                                      desc=f"brecq {key}")
    for p, g in zip(q.parameters(), grads):
        p.requires_grad_(g)
    return (q, stats) if return_stats else q


def _chain_input(model: nn.Module, names: list[str], x: torch.Tensor) -> torch.Tensor:
    return capture(model, names[0], x, "input")


def _chain_output(model: nn.Module, names: list[str], x: torch.Tensor) -> torch.Tensor:
    out = capture(model, names[-1], x, "output")
    # the chain must reproduce the model: its input run through ``names`` gives this output
    message = f"block {names} is not a chain of submodules that the model runs in this order"
    with torch.no_grad():
        x_in = capture(model, names[0], x[:2], "input")
        try:
            same = torch.allclose(run_chain(model, names, x_in), out[:2], atol=1e-5, rtol=1e-4)
        except RuntimeError as err:  # shapes that do not fit
            raise ValueError(f"{message} ({err})") from None
        if not same:
            raise ValueError(message)
    return out
