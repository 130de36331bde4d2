"""Run a whole converted fake-quant model in integer arithmetic (``convert_to_integer``).

Where the fake-quant model holds a float between two layers, the integer model holds an
``Accumulator`` (``qlib.accumulator``): int32 ``values`` and a float ``scale`` with
``real = values * scale``. A layer's output is exactly that (``values = acc``,
``scale = s_x * s_w``). The integer model walks the model's graph (``torch.fx``, an
``fx.Interpreter``) and applies to accumulators the rule that matches each float operation:

- quantized layer: requantize the accumulator to the layer's input codes
  (``to_codes``: ``requant.requantize_scaled``, then a pending ReLU6's clamp; a float input is
  quantized), then ``int_matmul`` or ``int_conv2d_grouped`` plus the int32 bias: a new
  accumulator with ``scale = s_x * s_w``, shape ``(C_out,)`` or ``(C_out, 1, 1)``;
- ReLU, ReLU6, pooling, means, reshapes, residual ``+``, Identity, Dropout: the integer rules
  of ``qlib.accumulator`` (exact, except the add: within half a unit);
- output: dequantize, ``values * scale`` in float.

The layers multiply through ``qlib.intops`` (``backend``: int8 kernels, or the int64
``"reference"``; the same integers, so the same outputs bit for bit). On the CPU the
accumulators stay in channels-last memory, as the GEMM writes them.

So requantization happens exactly where the fake-quant model quantizes: at the input of
the next quantized layer ("the output is requantized to the next layer's input qparams";
ReLU commutes with it, which is why Jacob et al. fuse it into the clamp, and ReLU6 is fused
the same way). Keeping the int32 accumulator through pooling and residual adds, instead of
rounding to 8 bits after every layer, is what makes the integer model agree with the
fake-quant model to within a code: rounding to the head's 8-bit codes *before* a global
average pool would clip, since the pooled values span a smaller range than the pixels they
average.

Requirements: the model traces with ``torch.fx``; its quantizers are frozen (static PTQ
or frozen QAT: ``convert`` first); activations are per-tensor, weights per-tensor or
per-output-channel; convolutions may be grouped (depthwise included). Before the first quantized layer the
model may do any float work. Layers left in float (``per_layer=None``) get dequantized
input and produce float, and an operation that mixes float tensors with accumulators
runs in float on the dequantized values: that is the boundary of a mixed-precision model.
"""

from __future__ import annotations

import copy

import torch
from torch import fx, nn

# The accumulator and its rules live in qlib.accumulator; importable from here as before.
from .accumulator import (_FUNCTION_RULES, _METHOD_RULES, _MODULE_RULES, Accumulator, _add,  # noqa: F401
                          _adaptive_avg_pool, _avg_pool, _common_scale, _mean, _monotone, _per_channel, _pooled,
                          _relu, _relu6, _reshape, activation_code, to_codes)
from .intlayers import IntConv2d, IntLinear
from .intops import _check_backend
from .modules import FakeQuantize, QuantConv2d, QuantLinear, set_submodule

__all__ = ["Accumulator", "IntegerModel", "activation_code", "convert_to_integer", "to_codes"]


def _kinds(args, kwargs) -> tuple[bool, bool]:
    """Whether the arguments hold (Accumulators, float tensors)."""
    found = []
    fx.node.map_aggregate((args, kwargs), found.append)
    return (any(isinstance(v, Accumulator) for v in found),
            any(isinstance(v, torch.Tensor) and v.is_floating_point() for v in found))


def _dequantized(args, kwargs):
    """Where float meets integer (a layer kept in float), the operation runs in float."""
    return fx.node.map_aggregate((args, kwargs), lambda v: v.dequantize() if isinstance(v, Accumulator) else v)


class _IntegerInterpreter(fx.Interpreter):
    """Executes the graph with Accumulators between layers (see the module docstring)."""

    def call_module(self, target, args, kwargs):
        module = self.fetch_attr(target)
        if isinstance(module, (IntLinear, IntConv2d)):
            acc_scale = module.acc_scale.reshape((-1, 1, 1) if isinstance(module, IntConv2d) else (-1,))
            return Accumulator(module(to_codes(args[0], module)), acc_scale)
        has_acc, has_float = _kinds(args, kwargs)
        if has_acc and not has_float and type(module) in _MODULE_RULES:
            return _MODULE_RULES[type(module)](module, *args, **kwargs)
        if has_acc and type(module) not in (nn.Linear, nn.Conv2d):  # float layers take float input
            raise NotImplementedError(f"no integer rule for module {target!r} ({type(module).__name__})")
        return super().call_module(target, *_dequantized(args, kwargs))

    def call_function(self, target, args, kwargs):
        if target is getattr and isinstance(args[0], Accumulator):
            return getattr(args[0].values, args[1])  # x.shape, x.ndim
        has_acc, has_float = _kinds(args, kwargs)
        if has_acc and not has_float:
            if target not in _FUNCTION_RULES:
                raise NotImplementedError(f"no integer rule for function {getattr(target, '__name__', target)}")
            return _FUNCTION_RULES[target](*args, **kwargs)
        return super().call_function(target, *_dequantized(args, kwargs))

    def call_method(self, target, args, kwargs):
        has_acc, has_float = _kinds(args, kwargs)
        if has_acc and not has_float:
            if target not in _METHOD_RULES:
                raise NotImplementedError(f"no integer rule for method Tensor.{target}")
            return _METHOD_RULES[target](*args, **kwargs)
        return super().call_method(target, *_dequantized(args, kwargs))

    def output(self, target, args, kwargs):
        return fx.node.map_aggregate(args[0], lambda v: v.dequantize() if isinstance(v, Accumulator) else v)


class IntegerModel(nn.Module):
    """A model whose quantized layers run in integer arithmetic; float in, float out.

    ``graph_module`` is the traced model with ``IntLinear``/``IntConv2d`` in place of the
    fake-quant layers; ``forward`` interprets its graph with the rules above.
    """

    def __init__(self, graph_module: fx.GraphModule):
        super().__init__()
        self.graph_module = graph_module

    @torch.no_grad()
    def forward(self, *args):
        return _IntegerInterpreter(self.graph_module).run(*args)


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (QuantLinear, QuantConv2d, FakeQuantize)) or super().is_leaf_module(m, qualname)


def convert_to_integer(model: nn.Module, backend: str | None = None,
                       double_rounding: bool = False) -> IntegerModel:
    """An ``IntegerModel`` computing ``model`` (a converted fake-quant model) with integers.

    Every ``QuantLinear``/``QuantConv2d`` becomes an ``IntLinear``/``IntConv2d`` (int8
    weights, int32 bias, per-channel fixed-point requantization); the output is
    dequantized to float. ``model`` is unchanged. See the module docstring for the
    supported operations; anything else raises NotImplementedError when it is reached.
    ``backend``: how the layers multiply (``qlib.intops``: ``None`` for the int8 kernels,
    ``"reference"`` for the int64 emulation; the same integers either way);
    ``double_rounding``: gemmlowp's requantization instead of TFLite's single rounding.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    _check_backend(backend)
    model = copy.deepcopy(model).eval()
    graph_module = fx.GraphModule(model, _Tracer().trace(model))
    layers = 0
    for node in graph_module.graph.nodes:
        if node.op != "call_module":
            continue
        module = graph_module.get_submodule(node.target)
        if isinstance(module, FakeQuantize):
            raise NotImplementedError(f"a standalone FakeQuantize ({node.target!r}) is not supported")
        if isinstance(module, (QuantLinear, QuantConv2d)):
            int_cls = IntLinear if isinstance(module, QuantLinear) else IntConv2d
            set_submodule(graph_module, node.target, int_cls.from_float(module, backend, double_rounding))
            layers += 1
    if layers == 0:
        raise ValueError("no layers to quantize: the model has no QuantLinear/QuantConv2d "
                         "(run qlib.ptq.quantize_static first)")
    return IntegerModel(graph_module)
