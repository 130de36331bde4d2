"""Where the quantizable layers of a transformer are, what they read, and how to swap them.

Every method of ``qlib.llm`` works on the ``nn.Linear`` layers inside the transformer blocks
(``blocks.0.attn.q`` ... ``blocks.3.fc2``); the embeddings and the output head stay in float.

- ``linear_layers(model)``: ``{name: nn.Linear}`` in forward order.
- ``capture_inputs(model, tokens, names)``: run the model once and keep what each named
  layer *reads*, flattened to ``(tokens, in_features)`` float32 on the model's device. These
  are the activations whose outliers make W8A8 hard, and the calibration data of GPTQ and AWQ.
- ``replace_linears(model, make)``: a deep copy of ``model`` where each block ``nn.Linear``
  named ``name`` is replaced by ``make(name, layer)`` (when it returns a module).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from ..batching import eval_mode, model_device


def linear_layers(model: nn.Module) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` layers inside ``model.blocks``, by qualified name, in forward order."""
    if not hasattr(model, "blocks"):
        raise TypeError(f"expected a transformer with .blocks (qlib.llm.model.CharLM), got "
                        f"{type(model).__name__}")
    found = {name: m for name, m in model.named_modules()
             if name.startswith("blocks.") and isinstance(m, nn.Linear)}
    if not found:
        raise ValueError("the model has no nn.Linear layers inside its blocks to quantize")
    return found


def _check_tokens(tokens: torch.Tensor) -> None:
    if not isinstance(tokens, torch.Tensor) or tokens.dtype != torch.long or tokens.dim() != 2:
        raise TypeError("tokens must be a (batch, T) int64 tensor of byte codes "
                        "(e.g. corpus.windows(data, T)[:, :-1])")
    if tokens.numel() == 0:
        raise ValueError("tokens is empty: calibration needs at least one window")


@torch.no_grad()
def collect(model: nn.Module, tokens: torch.Tensor, modules: dict[str, nn.Module], output: bool = False,
            batch_size: int = 32) -> dict[str, torch.Tensor]:
    """Run ``model`` over ``tokens`` in batches and keep, for each ``{name: module}``, its first
    input (or its output, ``output=True``) flattened to ``(tokens, features)`` float32.

    Forward hooks do the keeping; the model runs on its own device, in eval mode, and is left in
    the mode it was in; the hooks are removed even if the forward pass fails.
    """
    _check_tokens(tokens)
    store: dict[str, list[torch.Tensor]] = {n: [] for n in modules}

    def keep(name):
        def hook(module, args, out):
            x = out if output else args[0]
            store[name].append(x.detach().reshape(-1, x.shape[-1]).float())
        return hook

    hooks = [m.register_forward_hook(keep(n)) for n, m in modules.items()]
    device = model_device(model)
    try:
        with eval_mode(model):
            for i in range(0, tokens.shape[0], batch_size):
                model(tokens[i:i + batch_size].to(device))
    finally:
        for h in hooks:
            h.remove()
    return {n: torch.cat(v) for n, v in store.items()}


@torch.no_grad()
def capture_inputs(model: nn.Module, tokens: torch.Tensor, names=None,
                   batch_size: int = 32) -> dict[str, torch.Tensor]:
    """``{name: X}`` with ``X`` of shape ``(tokens, in_features)``: the input of each layer.

    ``names`` defaults to every block linear. ``tokens``: ``(batch, T)`` int64 windows.
    """
    _check_tokens(tokens)
    layers = linear_layers(model)
    names = list(layers) if names is None else list(names)
    for n in names:
        if n not in layers:
            raise ValueError(f"no block linear named {n!r}; choose from {list(layers)}")
    return collect(model, tokens, {n: layers[n] for n in names}, batch_size=batch_size)


def replace_linears(model: nn.Module, make: Callable[[str, nn.Linear], nn.Module | None]) -> nn.Module:
    """A deep copy of ``model`` with each block linear replaced by ``make(name, copy_of_layer)``.

    ``make`` returns the new module, or ``None`` to keep the layer. ``model`` is not modified.
    """
    new = copy.deepcopy(model)
    for name, layer in linear_layers(new).items():
        repl = make(name, layer)
        if repl is not None:
            parent_name, _, attr = name.rpartition(".")
            setattr(new.get_submodule(parent_name), attr, repl)
    return new


class FakeQuantWeightLinear(nn.Module):
    """A linear layer whose weight has been replaced by its dequantized codes.

    ``y = x @ W_dq^T + b``. Weight-only methods (RTN, GPTQ, AWQ) produce ``W_dq`` and keep the
    codes and qparams in ``self.qinfo`` (for the size count). Same dtype/device as ``W_dq``.
    """

    def __init__(self, weight_dq: torch.Tensor, bias: torch.Tensor | None, qinfo: dict | None = None):
        super().__init__()
        self.weight = nn.Parameter(weight_dq.detach().clone(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.qinfo = qinfo or {}
        self.in_features, self.out_features = weight_dq.shape[1], weight_dq.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight, self.bias)
