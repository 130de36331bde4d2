"""Deployment: a qlib-quantized model leaves Python as an ONNX graph and runs in ONNX Runtime.

ONNX writes quantization in **QDQ form**: the graph stays a float graph, and every place
where the model is quantized holds a pair ``QuantizeLinear -> DequantizeLinear``
(``q = saturate(round(x / scale) + zero_point)``, ``x_dq = (q - zero_point) * scale``). A
runtime sees the pairs and fuses them with their neighbours into integer kernels
(``QLinearConv``, ``MatMulInteger``); a runtime that cannot simply computes the float graph,
with the same numbers. ``to_onnx`` writes, for each ``QuantConv2d``/``QuantLinear`` of a
converted qlib model (``qlib.ptq.convert`` or ``qlib.qat.convert_qat``)::

    x --Q(s_x, z_x, uint8)--DQ--\\
    W_q (int8) ------DQ(s_w per channel, axis 0)--> Conv / Gemm --> float accumulator
    b_q (int32) -----DQ(s_x * s_w, axis 0)------/

with qlib's own codes and scales (``qlib.intlayers.IntConv2d.from_float``: the same integers as
``qlib.intmodel.convert_to_integer``). Activations below 8 bits keep a uint8 container and
a ``Clip`` to their range; weights below 8 bits are int8 codes inside their smaller range.
ReLU, max/average pooling, flatten and residual ``+`` become ``Relu``, ``MaxPool``,
``GlobalAveragePool``/``AveragePool``, ``Flatten``, ``Add``; ReLU6 (``nn.ReLU6``, ``F.relu6``;
MobileNet's, after depthwise convolutions) and ``nn.Hardtanh`` become ``Clip(x, min, max)`` on
the float tensor. In a QDQ graph that ``Clip`` sits between a layer's float output and the next
``QuantizeLinear``: ``Q(clip(x, 0, 6)) = clamp(Q(x), Q(0), Q(6))`` because ``Q`` is
non-decreasing, which is the code clamp of qlib's integer model (``qlib.accumulator``) and what
a runtime fuses into ``QLinearConv`` as its activation range. A float model (or a layer kept in
float) is written as plain ``Conv``/``Gemm`` (BatchNorms folded first).

``ort_session`` opens a CPU ONNX Runtime session, ``ort_predict`` runs it on batches.
``ort_quantize_static`` is ONNX Runtime's *own* static quantizer (its calibration, its QDQ
placement) on the float ONNX model, for a side-by-side. ``qdq_nodes`` lists the Q/DQ nodes
of a file. LiteRT (TensorFlow Lite) is optional (``pip install qlib[litert]``, about
0.75 GB with jax) and lives in ``qlib.litert``, re-exported here: ``litert_available`` says
why it is absent, ``to_litert`` converts with ``litert_torch`` and ``litert_predict`` runs the
LiteRT interpreter.
"""

from __future__ import annotations

import logging
import operator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from .batching import input_batches
from .fold import fold_batchnorm
from .intlayers import IntConv2d, IntLinear
from .litert import litert_available, litert_predict, to_litert  # re-exported: export.to_litert as before
from .modules import FakeQuantize, QuantConv2d, QuantLinear

__all__ = ["OPSET", "to_onnx", "qdq_nodes", "ort_session", "ort_predict", "ort_quantize_static",
           "litert_available", "to_litert", "litert_predict"]

OPSET = 17


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (QuantLinear, QuantConv2d, FakeQuantize)) or super().is_leaf_module(m, qualname)


def _onnx():
    try:
        import onnx
        return onnx
    except ImportError as err:  # pragma: no cover - onnx is a default dependency
        raise RuntimeError("qlib.export needs the onnx package: pip install onnx onnxruntime") from err


class _Builder:
    """Collects ONNX nodes and initializers while walking the fx graph."""

    def __init__(self):
        self.onnx = _onnx()
        self.nodes, self.inits, self.count = [], [], 0

    def name(self, hint: str) -> str:
        self.count += 1
        return f"{hint.replace('.', '_')}_{self.count}"

    def const(self, hint: str, array: np.ndarray) -> str:
        """An initializer of ``array``'s shape: a 0-dim array stays a scalar, as ``Clip``'s bounds and
        per-tensor ``QuantizeLinear`` scales are specified (``np.ascontiguousarray`` makes it 1-dim)."""
        name = self.name(hint)
        array = np.asarray(array)
        self.inits.append(self.onnx.numpy_helper.from_array(np.ascontiguousarray(array).reshape(array.shape), name))
        return name

    def node(self, op: str, inputs: list[str], hint: str, **attrs) -> str:
        out = self.name(hint)
        self.nodes.append(self.onnx.helper.make_node(op, inputs, [out], name=out + "_" + op, **attrs))
        return out


def _qdq_input(b: _Builder, x: str, layer, hint: str) -> str:
    qmin, qmax = layer.input_quant_min, layer.input_quant_max
    if qmin < 0 or qmax > 255:
        raise NotImplementedError(f"{hint}: ONNX export supports unsigned activation codes within 0..255, "
                                  f"got [{qmin}, {qmax}]")
    s = b.const(hint + "_x_scale", np.array(float(layer.input_scale), dtype=np.float32))
    z = b.const(hint + "_x_zp", np.array(int(layer.input_zero_point), dtype=np.uint8))
    q = b.node("QuantizeLinear", [x, s, z], hint + "_xq")
    if (qmin, qmax) != (0, 255):  # fewer bits: clamp the codes to their own range
        q = b.node("Clip", [q, b.const(hint + "_qmin", np.array(qmin, np.uint8)),
                            b.const(hint + "_qmax", np.array(qmax, np.uint8))], hint + "_xclip")
    return b.node("DequantizeLinear", [q, s, z], hint + "_xdq")


def _qdq_weights(b: _Builder, layer, hint: str) -> tuple[str, str | None]:
    w_q = layer.weight_q.cpu().numpy()
    if w_q.min() < -128 or w_q.max() > 127:
        raise NotImplementedError(f"{hint}: ONNX export supports int8 weight codes")
    w = b.node("DequantizeLinear", [b.const(hint + "_wq", w_q.astype(np.int8)),
                                    b.const(hint + "_w_scale", layer.weight_scale.cpu().numpy().astype(np.float32)),
                                    b.const(hint + "_w_zp", layer.weight_zero_point.cpu().numpy().astype(np.int8))],
               hint + "_wdq", axis=0)
    if layer.bias_q is None:
        return w, None
    acc = layer.acc_scale.cpu().numpy().astype(np.float32)
    bias = b.node("DequantizeLinear", [b.const(hint + "_bq", layer.bias_q.cpu().numpy().astype(np.int32)),
                                       b.const(hint + "_b_scale", acc),
                                       b.const(hint + "_b_zp", np.zeros(acc.shape, np.int32))],
                  hint + "_bdq", axis=0)
    return w, bias


def _conv_attrs(m) -> dict:
    pad = m.padding if isinstance(m.padding, tuple) else (m.padding, m.padding)
    if isinstance(m, nn.Conv2d) and (m.padding_mode != "zeros" or isinstance(m.padding, str)):
        raise NotImplementedError("ONNX export supports numeric zero padding only")
    return {"strides": list(m.stride), "pads": [pad[0], pad[1], pad[0], pad[1]],
            "dilations": list(m.dilation), "group": m.groups, "kernel_shape": list(m.kernel_size)}


def _layer(b: _Builder, m: nn.Module, x: str, hint: str) -> str:
    if isinstance(m, (QuantConv2d, QuantLinear)):
        int_layer = (IntConv2d if isinstance(m, QuantConv2d) else IntLinear).from_quant(m)
        x = _qdq_input(b, x, int_layer, hint)
        w, bias = _qdq_weights(b, int_layer, hint)
    else:
        w = b.const(hint + "_w", m.weight.detach().cpu().float().numpy())
        bias = None if m.bias is None else b.const(hint + "_b", m.bias.detach().cpu().float().numpy())
    inputs = [x, w] + ([bias] if bias is not None else [])
    if isinstance(m, nn.Conv2d):
        return b.node("Conv", inputs, hint, **_conv_attrs(m))
    return b.node("Gemm", inputs, hint, transB=1)


def _pool(b: _Builder, m: nn.Module, x: str, hint: str) -> str:
    if isinstance(m, nn.AdaptiveAvgPool2d) and m.output_size in (1, (1, 1)):
        return b.node("GlobalAveragePool", [x], hint)
    k = m.kernel_size if isinstance(m.kernel_size, tuple) else (m.kernel_size, m.kernel_size)
    s = m.stride if isinstance(m.stride, tuple) else (m.stride or k[0],) * 2
    p = m.padding if isinstance(m.padding, tuple) else (m.padding, m.padding)
    attrs = {"kernel_shape": list(k), "strides": list(s), "pads": [p[0], p[1], p[0], p[1]]}
    if isinstance(m, nn.MaxPool2d):
        if m.dilation not in (1, (1, 1)) or m.ceil_mode:
            raise NotImplementedError("ONNX export supports max pooling without dilation or ceil_mode")
        return b.node("MaxPool", [x], hint, **attrs)
    return b.node("AveragePool", [x], hint, count_include_pad=int(m.count_include_pad), **attrs)


def _clip(b: _Builder, x: str, lo: float, hi: float, hint: str) -> str:
    """``Clip(x, lo, hi)`` (opset >= 11: the bounds are float32 scalar inputs)."""
    return b.node("Clip", [x, b.const(hint + "_min", np.array(lo, np.float32)),
                           b.const(hint + "_max", np.array(hi, np.float32))], hint)


def _module(b: _Builder, m: nn.Module, x: str, hint: str) -> str:
    if isinstance(m, (nn.Conv2d, nn.Linear)):
        return _layer(b, m, x, hint)
    if isinstance(m, nn.ReLU):
        return b.node("Relu", [x], hint)
    if isinstance(m, nn.Hardtanh):  # nn.ReLU6 is Hardtanh(0, 6)
        return _clip(b, x, float(m.min_val), float(m.max_val), hint)
    if isinstance(m, (nn.Identity, nn.Dropout)):
        return x
    if isinstance(m, nn.Flatten):
        if m.start_dim != 1 or m.end_dim != -1:
            raise NotImplementedError("ONNX export supports Flatten(start_dim=1) only")
        return b.node("Flatten", [x], hint, axis=1)
    if isinstance(m, (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d)):
        if isinstance(m, nn.AdaptiveAvgPool2d) and m.output_size not in (1, (1, 1)):
            raise NotImplementedError("ONNX export supports AdaptiveAvgPool2d(1) only")
        return _pool(b, m, x, hint)
    raise NotImplementedError(f"no ONNX rule for module {hint!r} ({type(m).__name__})")


_ADDS = (operator.add, operator.iadd, torch.add)
_RELUS = (F.relu, torch.relu)


def to_onnx(model: nn.Module, example: torch.Tensor, path: str | Path | None = None):
    """The ONNX ``ModelProto`` of ``model`` (QDQ where qlib quantizes; module docstring).

    ``example``: one input batch ``(N, ...)``, for its shape (the batch size is left dynamic).
    ``path``: where to save it too. ``model`` is unchanged; it must trace with ``torch.fx``
    and use the supported operations (NotImplementedError names anything else).
    """
    onnx = _onnx()
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    if not isinstance(example, torch.Tensor) or example.dim() < 2:
        raise TypeError("example must be an input batch tensor (N, ...)")
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        model = fold_batchnorm(model)
    model = model.eval()
    gm = fx.GraphModule(model, _Tracer().trace(model))
    b, env, output = _Builder(), {}, None
    for node in gm.graph.nodes:
        args = [env[a.name] if isinstance(a, fx.Node) else a for a in node.args]
        if node.op == "placeholder":
            env[node.name] = "input"
        elif node.op == "call_module":
            env[node.name] = _module(b, gm.get_submodule(node.target), args[0], node.target)
        elif node.op == "call_function" and node.target in _ADDS:
            env[node.name] = b.node("Add", args[:2], node.name)
        elif node.op == "call_function" and node.target in _RELUS:
            env[node.name] = b.node("Relu", args[:1], node.name)
        elif node.op == "call_function" and node.target is F.relu6:
            env[node.name] = _clip(b, args[0], 0.0, 6.0, node.name)
        elif node.op == "call_function" and node.target is torch.flatten and args[1:] in ([], [1]):
            env[node.name] = b.node("Flatten", args[:1], node.name, axis=1)
        elif node.op == "output":
            output = args[0]
        else:
            raise NotImplementedError(f"no ONNX rule for {node.op} {getattr(node.target, '__name__', node.target)}")
    if not isinstance(output, str):
        raise NotImplementedError("ONNX export supports models with one tensor output")
    b.nodes.append(onnx.helper.make_node("Identity", [output], ["logits"], name="logits_Identity"))
    with torch.no_grad():
        out_shape = list(model(example[:1].float().to(next(model.parameters()).device)).shape)
    graph = onnx.helper.make_graph(
        b.nodes, "qlib_model",
        [onnx.helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, ["N"] + list(example.shape[1:]))],
        [onnx.helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["N"] + out_shape[1:])],
        b.inits)
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", OPSET)],
                                   producer_name="qlib")
    proto.ir_version = min(proto.ir_version, 9)
    onnx.checker.check_model(proto)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        onnx.save(proto, str(path))
    return proto


def qdq_nodes(proto_or_path) -> list[tuple[str, str]]:
    """``(op_type, name)`` of every QuantizeLinear/DequantizeLinear node, in graph order."""
    onnx = _onnx()
    proto = proto_or_path if hasattr(proto_or_path, "graph") else onnx.load(str(proto_or_path))
    return [(n.op_type, n.name) for n in proto.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]


def ort_session(proto_or_path, threads: int = 1):
    """An ONNX Runtime ``InferenceSession`` on the CPU execution provider (``threads`` intra-op)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    source = proto_or_path.SerializeToString() if hasattr(proto_or_path, "graph") else str(proto_or_path)
    return ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])


def ort_predict(session, data, batch_size: int = 256) -> torch.Tensor:
    """Float32 CPU logits of ``session`` on every batch of ``data`` (as ``qlib.batching``), concatenated."""
    name = session.get_inputs()[0].name
    outs = [session.run(None, {name: x.numpy()})[0]
            for x in input_batches(data, batch_size, device="cpu", dtype=torch.float32, finite=True)]
    if not outs:
        raise ValueError("the data is empty: give at least one batch")
    return torch.from_numpy(np.concatenate(outs))


def ort_quantize_static(float_path: str | Path, out_path: str | Path, calib, per_channel: bool = True) -> Path:
    """ONNX Runtime's own static int8 quantization of the float ONNX model at ``float_path``.

    QDQ format, uint8 activations (min-max calibration on ``calib``: the batches given to
    qlib), int8 weights per channel. Returns ``out_path``.
    """
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    batches = [x.numpy() for x in input_batches(calib, device="cpu", dtype=torch.float32, finite=True)]
    if not batches:
        raise ValueError("calibration data is empty: give at least one batch")

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(batches)

        def get_next(self):
            x = next(self.it, None)
            return None if x is None else {"input": x}

    logging.disable(logging.WARNING)  # its advice to run shape pre-processing first, on the root logger
    try:
        quantize_static(str(float_path), str(out_path), Reader(), quant_format=QuantFormat.QDQ,
                        per_channel=per_channel, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    finally:
        logging.disable(logging.NOTSET)
    return Path(out_path)
