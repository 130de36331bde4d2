"""Helpers for the application mini-studies of lesson 15: healthcare, vehicles, IoT.

- **Healthcare**: overall accuracy hides where a quantized model errs. ``per_class_recall``
  (recall_c = correct predictions of class c / examples of class c) and the expected
  calibration error (Guo et al., ICML 2017)::

      ECE = sum_b (|B_b| / N) * |accuracy(B_b) - mean confidence(B_b)|

  over ``num_bins`` equal-width bins of the top-class probability.
- **Vehicles**: ``corrupt`` makes simple shifted inputs (Gaussian noise, a 3x3 box blur).
- **IoT / microcontrollers**: ``packed_weight_bytes`` (b-bit codes packed ``8 // b`` to a
  byte plus a float32 scale per output channel), ``peak_activation_bytes`` (integer-only
  inference layer by layer: the input codes and the int32 accumulator of the layer alive at
  the same time, the largest such pair), ``c_header`` (the integer MLP as C arrays: int8
  weights, int32 biases, requantization multipliers and shifts) and ``c_check_first_layer``
  (compiles a C loop for the first layer's int32 accumulators and compares them bit for bit
  with ``qlib.intops``; returns None where no C compiler exists).

Shapes: ``logits`` ``(N, C)`` float, ``labels`` ``(N,)`` int64.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .intops import IntConv2d, IntLinear, quantize_multiplier

__all__ = ["per_class_recall", "expected_calibration_error", "corrupt", "packed_weight_bytes",
           "peak_activation_bytes", "int_layers", "c_header", "c_compiler", "c_check_first_layer"]


def _check_logits(logits, labels) -> None:
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or not logits.is_floating_point():
        raise TypeError(f"logits must be a float tensor (N, C), got {getattr(logits, 'shape', type(logits))}")
    if not isinstance(labels, torch.Tensor) or labels.shape != logits.shape[:1] or labels.is_floating_point():
        raise TypeError(f"labels must be an integer tensor of shape ({logits.shape[0]},)")


def per_class_recall(logits: torch.Tensor, labels: torch.Tensor, num_classes: int | None = None) -> torch.Tensor:
    """Recall of every class in percent, float64 ``(C,)``; NaN for a class with no example."""
    _check_logits(logits, labels)
    c = num_classes or logits.shape[1]
    pred = logits.argmax(1)
    hit = torch.bincount(labels[pred == labels], minlength=c).double()
    total = torch.bincount(labels, minlength=c).double()
    return torch.where(total > 0, 100 * hit / total.clamp(min=1), torch.full_like(total, float("nan")))


def expected_calibration_error(logits: torch.Tensor, labels: torch.Tensor, num_bins: int = 10) -> float:
    """ECE in percent (module docstring); 0 for a perfectly calibrated model."""
    _check_logits(logits, labels)
    if isinstance(num_bins, bool) or not isinstance(num_bins, int) or num_bins < 1:
        raise ValueError(f"num_bins must be an int >= 1, got {num_bins!r}")
    conf, pred = F.softmax(logits.double(), dim=1).max(1)
    correct = (pred == labels).double()
    bins = torch.clamp((conf * num_bins).long(), max=num_bins - 1)
    ece = torch.zeros((), dtype=torch.float64, device=logits.device)
    for b in range(num_bins):
        m = bins == b
        if m.any():
            ece += m.double().mean() * (correct[m].mean() - conf[m].mean()).abs()
    return 100 * float(ece)


def corrupt(x: torch.Tensor, kind: str, severity: float, seed: int = 0) -> torch.Tensor:
    """``"noise"``: ``x + severity * N(0, 1)`` (seeded); ``"blur"``: ``severity`` passes of a
    3x3 box blur (rounded to an int) on ``(N, C, H, W)`` images."""
    if kind == "noise":
        g = torch.Generator().manual_seed(seed)
        return x + severity * torch.randn(x.shape, generator=g).to(x.device, x.dtype)
    if kind == "blur":
        k = torch.full((x.shape[1], 1, 3, 3), 1 / 9, device=x.device, dtype=x.dtype)
        for _ in range(int(round(severity))):
            x = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k, groups=x.shape[1])
        return x
    raise ValueError(f"kind must be 'noise' or 'blur', got {kind!r}")


def packed_weight_bytes(model: nn.Module, bits: int) -> int:
    """Flash for conv/linear weights at ``bits`` (packed codes + float32 per-channel scale),
    biases as int32, BatchNorms assumed folded."""
    if bits not in (2, 4, 8):
        raise ValueError(f"bits must be 2, 4 or 8 (packable into bytes), got {bits!r}")
    total = 0
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            n, c = m.weight.numel(), m.weight.shape[0]
            total += -(-n * bits // 8) + 4 * c + 4 * c  # codes, scales, int32 bias (one per channel)
    return total


def int_layers(int_model: nn.Module) -> list[nn.Module]:
    """The integer layers (``IntLinear`` / ``IntConv2d``) of a ``convert_to_integer`` model, in order."""
    return [m for m in int_model.modules() if isinstance(m, (IntLinear, IntConv2d))]


@torch.no_grad()
def peak_activation_bytes(model: nn.Module, example: torch.Tensor) -> dict:
    """Per conv/linear layer of ``model`` (float or fake-quant), run on one ``example``
    (batch 1): int8 input codes + int32 accumulator bytes; ``peak`` is their largest sum."""
    rows = []
    hooks = [m.register_forward_hook(lambda mod, inp, out, name=name: rows.append(
        (name, inp[0][:1].numel(), out[:1].numel())))
        for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    try:
        model.eval()(example[:1])
    finally:
        for h in hooks:
            h.remove()
    layers = [{"layer": n, "input_bytes": i, "acc_bytes": 4 * o, "total": i + 4 * o} for n, i, o in rows]
    return {"layers": layers, "peak": max(r["total"] for r in layers)}


def _c_array(ctype: str, name: str, values) -> str:
    vals = ", ".join(str(int(v)) for v in values)
    return f"static const {ctype} {name}[{len(values)}] = {{{vals}}};\n"


def c_header(int_model: nn.Module, name: str = "qmodel") -> str:
    """A C header with every integer linear layer: int8 weights (row-major ``out x in``),
    weight and input zero points, int32 biases, and the requantization ``multiplier`` /
    ``shift`` to the next layer's input codes (``quantize_multiplier`` of ``s_x s_w / s_next``)."""
    layers = int_layers(int_model)
    if not layers or not all(isinstance(m, IntLinear) for m in layers):
        raise ValueError("c_header exports MLPs: the integer model must hold IntLinear layers only")
    out = [f"/* {name}: integer-only MLP exported by qlib.applications.c_header */\n",
           f"#ifndef {name.upper()}_H\n#define {name.upper()}_H\n#include <stdint.h>\n",
           f"#define {name.upper()}_NUM_LAYERS {len(layers)}\n"]
    for i, m in enumerate(layers):
        p = f"{name}_l{i}"
        out.append(f"#define {p.upper()}_IN {m.in_features}\n#define {p.upper()}_OUT {m.out_features}\n")
        out.append(_c_array("int8_t", f"{p}_w", m.weight_q.flatten().tolist()))
        out.append(_c_array("int32_t", f"{p}_w_zp", m.weight_zero_point.tolist()))
        out.append(f"static const int32_t {p}_x_zp = {int(m.input_zero_point)};\n")
        bias = m.bias_q.tolist() if m.bias_q is not None else [0] * m.out_features
        out.append(_c_array("int32_t", f"{p}_b", bias))
        if i + 1 < len(layers):
            nxt = layers[i + 1]
            mult, shift = quantize_multiplier(m.acc_scale / float(nxt.input_scale))
            out.append(_c_array("int32_t", f"{p}_mult", mult.flatten().tolist()))
            out.append(_c_array("int32_t", f"{p}_shift", shift.flatten().tolist()))
    out.append("#endif\n")
    return "".join(out)


def c_compiler() -> str | None:
    """Path of a C compiler (cc, gcc or clang) or None."""
    for cc in ("cc", "gcc", "clang"):
        path = shutil.which(cc)
        if path:
            return path
    return None


def c_check_first_layer(int_model: nn.Module, x: torch.Tensor, timeout: float = 60) -> bool | None:
    """Compile a C loop computing the first layer's int32 accumulators
    ``acc[o] = b[o] + sum_i (x_q[i] - x_zp) * (w[o, i] - w_zp[o])`` for the rows of ``x``
    and compare them with ``qlib.intops``; True when bit-exact, None without a compiler."""
    cc = c_compiler()
    if cc is None:
        return None
    layer = int_layers(int_model)[0]
    x_q = layer.quantize_input(x.flatten(1))
    want = layer(x_q)
    src = c_header(int_model, "qm") + _c_array("int32_t", "xq", x_q.flatten().tolist()) + f"""
#include <stdio.h>
int main(void) {{
  for (int n = 0; n < {x_q.shape[0]}; n++)
    for (int o = 0; o < QM_L0_OUT; o++) {{
      int32_t acc = qm_l0_b[o];
      for (int i = 0; i < QM_L0_IN; i++)
        acc += (xq[n * QM_L0_IN + i] - qm_l0_x_zp) * ((int32_t)qm_l0_w[o * QM_L0_IN + i] - qm_l0_w_zp[o]);
      printf("%d\\n", acc);
    }}
  return 0;
}}
"""
    with tempfile.TemporaryDirectory() as d:
        c, exe = Path(d) / "m.c", Path(d) / "m"
        c.write_text(src)
        subprocess.run([cc, "-O1", "-o", str(exe), str(c)], check=True, capture_output=True, timeout=timeout)
        got = subprocess.run([str(exe)], check=True, capture_output=True, text=True, timeout=timeout).stdout.split()
    return torch.equal(torch.tensor([int(v) for v in got], dtype=torch.int64), want.flatten().to(torch.int64))
