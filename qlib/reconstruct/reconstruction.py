"""Output reconstruction: the loop that AdaRound (per layer) and BRECQ (per block) share.

A **unit** is a chain of submodules of a quantized model, named in execution order (one layer
for AdaRound; a residual block or a conv-ReLU(-pool) group for BRECQ). Reconstructing it means::

    x~ = the unit's input in the *quantized* model (every earlier unit already rounded)
    y  = the unit's output in the *float* model (on float inputs)
    minimise  E || unit_V(x~) - y ||^2  +  lambda * sum_layers f_reg(V; beta)     over V

where ``unit_V`` is the unit with every weight soft-rounded (``AdaRoundQuantizer``) and its
input activations fake-quantized as they will be at inference. Feeding ``x~`` (not the float
input) lets each unit compensate the error of the units before it: the paper's "asymmetric"
reconstruction (AdaRound, section 5; BRECQ, section 3). The squared error is summed over the
channel axis and averaged over the batch and positions (as in the BRECQ reference code); no
Fisher weighting (BRECQ's optional second-order weighting): plain MSE.

With ``learn_act_scale=True`` the frozen scales of the unit's input quantizers become
parameters too, trained with LSQ gradients (``qlib.lsq.lsq_fake_quantize``), as BRECQ does.

``capture`` records the input of one module and the output of another over a whole data set;
``reconstruct_unit`` runs the optimisation and writes the result back (weights exactly on the
grid, learned activation scales into the frozen buffers).
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from ..lsq import lsq_fake_quantize, lsq_grad_factor
from ..qparams import PerTensor
from .rounding import AdaRoundQuantizer, beta_schedule, rounding_regularizer

__all__ = ["capture", "run_chain", "quant_layers_in", "reconstruct_unit"]


def capture(model: nn.Module, name: str, x: torch.Tensor, where: str, batch_size: int = 256) -> torch.Tensor:
    """The input (``where="input"``) or output (``"output"``) of submodule ``name`` of ``model``
    for every sample of ``x`` (``(N, ...)``), concatenated along dim 0, without gradients."""
    if where not in ("input", "output"):
        raise ValueError(f"where must be 'input' or 'output', got {where!r}")
    module = model.get_submodule(name)
    seen: list[torch.Tensor] = []
    if where == "input":
        handle = module.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    else:
        handle = module.register_forward_hook(lambda m, args, out: seen.append(out.detach()))
    try:
        with torch.no_grad():
            for xb in x.split(batch_size):
                model(xb)
    finally:
        handle.remove()
    return torch.cat(seen)


def run_chain(model: nn.Module, names: list[str], x: torch.Tensor) -> torch.Tensor:
    """``x`` through the submodules ``names`` of ``model``, in order."""
    for name in names:
        x = model.get_submodule(name)(x)
    return x


def quant_layers_in(model: nn.Module, names: list[str]) -> dict[str, nn.Module]:
    """``{full name: layer}`` of the fake-quant layers (with a ``weight_fq``) inside the unit."""
    out = {}
    for name in names:
        for sub, m in model.get_submodule(name).named_modules():
            if hasattr(m, "weight_fq") and hasattr(m, "input_fq"):
                out[f"{name}.{sub}" if sub else name] = m
    return out


class _LearnedInputQuant(nn.Module):
    """An input quantizer whose per-tensor scale is an LSQ parameter (starts at the frozen one)."""

    def __init__(self, fq: nn.Module, numel: int):
        super().__init__()
        scale, zero_point = fq.qparams()
        self.scale = nn.Parameter(scale.detach().clone().reshape(1))
        self.register_buffer("zero_point", zero_point.detach().clone().reshape(1))
        self.quant_min, self.quant_max = int(fq.quant_min), int(fq.quant_max)
        self.grad_factor = lsq_grad_factor(numel, max(self.quant_max, 1))

    def forward(self, x):
        return lsq_fake_quantize(x, self.scale.clamp_min(1e-8), self.zero_point, self.quant_min, self.quant_max,
                                 grad_factor=self.grad_factor)


def reconstruct_unit(qmodel: nn.Module, names: list[str], x_in: torch.Tensor, y: torch.Tensor, *,
                     iters: int, batch_size: int, lr: float, reg_weight: float, warmup: float,
                     beta: tuple[float, float], generator: torch.Generator, learn_act_scale: bool = False,
                     act_lr: float = 1e-3, progress: bool = False, desc: str = "reconstruct") -> dict:
    """Learn the rounding of every layer in the unit ``names`` of ``qmodel`` (in place).

    ``x_in``: ``(N, ...)`` inputs of the unit in the quantized model; ``y``: ``(N, ...)`` float
    outputs. ``iters`` Adam steps on mini-batches drawn with ``generator``. Returns a dict with
    ``loss_start`` / ``loss_end`` (reconstruction term on the last mini-batch), ``binary``
    (share of near-binary ``h(V)`` before hardening) and ``layers``.
    """
    layers = quant_layers_in(qmodel, names)
    if not layers:
        return {"layers": [], "loss_start": 0.0, "loss_end": 0.0, "binary": 1.0}
    saved = {}
    rounders, act_modules = {}, {}
    for name, layer in layers.items():
        saved[name] = (layer.weight_fq, layer.input_fq)
        rounders[name] = AdaRoundQuantizer(layer.weight, layer.weight_fq)
        layer.weight_fq = rounders[name]
        if learn_act_scale and not layer.input_fq.dynamic and layer.input_fq.quantize \
                and isinstance(layer.input_fq.granularity, PerTensor):
            act_modules[name] = _LearnedInputQuant(layer.input_fq, int(x_in[0].numel()))
            layer.input_fq = act_modules[name]
    opt = torch.optim.Adam([r.V for r in rounders.values()], lr=lr)
    act_opt = (torch.optim.Adam([a.scale for a in act_modules.values()], lr=act_lr) if act_modules else None)
    n = len(x_in)
    stats = {"layers": list(layers)}
    try:
        for step in tqdm(range(iters), desc=desc, disable=not progress, leave=False):
            idx = torch.randint(n, (min(batch_size, n),), generator=generator).to(x_in.device)
            out = run_chain(qmodel, names, x_in[idx])
            err = (out - y[idx]).pow(2)
            rec = err.sum(1).mean() if err.dim() > 1 else err.mean()
            b = beta_schedule(step, iters, warmup, *beta)
            reg = (sum(rounding_regularizer(r.V, b) for r in rounders.values()) * reg_weight
                   if b is not None else rec.new_zeros(()))
            opt.zero_grad(set_to_none=True)
            if act_opt is not None:
                act_opt.zero_grad(set_to_none=True)
            (rec + reg).backward()
            opt.step()
            if act_opt is not None:
                act_opt.step()
            if step == 0:
                stats["loss_start"] = rec.item()
        stats["loss_end"] = rec.item() if iters else 0.0
        stats.setdefault("loss_start", stats["loss_end"])
    finally:
        total = sum(r.V.numel() for r in rounders.values())
        stats["binary"] = sum(r.binary_fraction() * r.V.numel() for r in rounders.values()) / total
        with torch.no_grad():
            for name, layer in layers.items():
                weight_fq, input_fq = saved[name]
                layer.weight.copy_(rounders[name].hard_weight())
                layer.weight_fq, layer.input_fq = weight_fq, input_fq
                if name in act_modules:
                    learned = act_modules[name].scale.detach().clamp_min(1e-8)
                    input_fq.frozen_scale = learned.to(input_fq.frozen_scale.dtype).reshape(input_fq.frozen_scale.shape)
    return stats
