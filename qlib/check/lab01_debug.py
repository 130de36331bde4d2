"""Checks for lab 01's debugging question: find and fix three bugs in a per-channel quantizer.

The lab hands the student :func:`broken_quantize_weight`: per-channel affine quantization of
a linear layer's weight ``w`` of shape ``(out_features, in_features)``, one ``(scale,
zero_point)`` per **output channel** (row), unsigned ``bits``-bit codes. It holds three bugs
that students really write:

1. **off by one in the range**: ``quant_max = 2**bits`` (a ``bits``-bit code holds
   ``2**bits - 1`` at most); every scale is ``(2**b - 1) / 2**b`` of the right one;
2. **the wrong axis**: ``amin/amax(dim=0)`` gives one range per *input* feature (column), and
   ``w * (1 / scale)`` broadcasts along the columns without complaint;
3. **a truncated zero point**: ``.to(torch.int64)`` rounds toward zero, not to nearest.

The fixed function must equal PyTorch bit for bit: ``PerChannelMinMaxObserver`` (``ch_axis=0``,
``per_channel_affine``) for the qparams, ``torch.fake_quantize_per_channel_affine`` for the
dequantized codes (:func:`reference_quantize_weight`). The messages name the **symptom** (the
scales are too small by a factor, they follow the columns, a zero point is not the nearest
integer, a code is out of range), never the line. The visible check runs every symptom: a
non-square weight, a square one (where the wrong axis raises nothing), 2, 4 and 8 bits, rows
whose zero point rounds up; the hidden check draws fresh weights.
"""

from __future__ import annotations

import torch

from .core import CheckFailed, call, expect, expect_tensor, first_difference, quiet_deprecations, run
from .draws import Draw, hidden

__all__ = ["broken_quantize_weight", "reference_quantize_weight", "quantize_weight", "quantize_weight_hidden"]


def broken_quantize_weight(w, bits):
    """The lab's broken quantizer (three bugs, see the module docstring); kept here so that the
    lab's text and the tests show the same code."""
    quant_min, quant_max = 0, 2**bits
    min_val = w.amin(dim=0)
    max_val = w.amax(dim=0)
    min_neg = torch.clamp(min_val, max=0.0)
    max_pos = torch.clamp(max_val, min=0.0)
    eps = torch.finfo(torch.float32).eps
    scale = torch.clamp((max_pos - min_neg) / (quant_max - quant_min), min=eps)
    zero_point = (quant_min - min_neg / scale).to(torch.int64)
    zero_point = torch.clamp(zero_point, quant_min, quant_max)
    w_q = torch.round(w * (1.0 / scale)) + zero_point
    w_q = torch.clamp(w_q, quant_min, quant_max).to(torch.int64)
    return w_q, scale, zero_point


def reference_quantize_weight(w: torch.Tensor, bits: int):
    """``(w_q, scale, zero_point)`` from PyTorch: ``PerChannelMinMaxObserver`` (axis 0, affine,
    codes ``0 .. 2**bits - 1``) and ``torch.fake_quantize_per_channel_affine``. ``w_q``: int64
    codes, ``scale``: float32 ``(out,)``, ``zero_point``: int64 ``(out,)``."""
    quant_min, quant_max = 0, 2**bits - 1
    with quiet_deprecations():
        observer = torch.ao.quantization.PerChannelMinMaxObserver(
            ch_axis=0, dtype=torch.quint8, qscheme=torch.per_channel_affine, quant_min=quant_min, quant_max=quant_max)
        observer(w)
        scale, zero_point = observer.calculate_qparams()
        w_dq = torch.fake_quantize_per_channel_affine(w, scale, zero_point.to(torch.int32), 0, quant_min, quant_max)
    w_q = torch.round(w_dq / scale[:, None]).to(torch.int64) + zero_point[:, None]  # exact: w_dq is (q - z) * s
    return w_q, scale.to(torch.float32), zero_point.to(torch.int64)


def _check(fn, w: torch.Tensor, bits: int, what: str) -> None:
    got = call(fn, w.clone(), bits, what="quantize_weight")
    expect(isinstance(got, (tuple, list)) and len(got) == 3,
           f"{what}: expected a triple (w_q, scale, zero_point), got {type(got).__name__}")
    w_q, scale, zp = got
    out, cols = w.shape
    want_q, want_scale, want_zp = reference_quantize_weight(w, bits)
    scale = expect_tensor(scale, f"{what}, scale", kind="a float tensor of scales")
    if scale.shape != (out,):
        raise CheckFailed(f"{what}: expected one scale per output channel, shape ({out},) for w of shape "
                          f"({out}, {cols}), got shape {tuple(scale.shape)}"
                          + (": your ranges follow the columns (input features) of w" if scale.numel() == cols else ""))
    if not torch.equal(scale.to(torch.float32), want_scale):
        i = first_difference(scale.to(torch.float32), want_scale)[1]
        columns = w.amax(0).clamp(min=0) - w.amin(0).clamp(max=0)
        ratio = (scale[i] / want_scale[i]).item()
        hint = ""
        if out == cols and torch.allclose(scale.float(), columns / (2**bits - 1), rtol=1e-3):
            hint = (" Your scales follow the columns (input features) of w: the range of row c must be "
                    "the min and max of row c only")
        elif abs(ratio - (2**bits - 1) / 2**bits) < 1e-4:
            hint = (f" Every scale is {2**bits - 1}/{2**bits} of the expected one: count the steps between the "
                    f"smallest and the largest {bits}-bit code")
        raise CheckFailed(f"{what}: scale of channel {i} is {scale[i].item()!r}, expected {want_scale[i].item()!r} "
                          f"(row {i} spans [{w[i].min().item():.4g}, {w[i].max().item():.4g}]).{hint}")
    zp = expect_tensor(zp, f"{what}, zero_point", shape=(out,), kind="a tensor of zero points")
    if zp.is_floating_point() or not torch.equal(zp.to(torch.int64), want_zp):
        i = first_difference(zp.to(torch.float64), want_zp.to(torch.float64))[1] if not zp.is_floating_point() else 0
        exact = (0 - w[i].min().clamp(max=0) / want_scale[i]).item()
        raise CheckFailed(f"{what}: zero_point of channel {i} is {zp[i].item()!r}, expected {want_zp[i].item()}: "
                          f"0.0 lands {exact:.4f} codes above the bottom of row {i}'s range, and the zero point is the "
                          "*nearest* integer to that (an integer tensor); one less shifts the grid up by a step and "
                          "clips the row's most negative weights")
    w_q = expect_tensor(w_q, f"{what}, w_q", shape=w.shape, kind="a tensor of codes")
    expect(not w_q.is_floating_point(), f"{what}: expected integer codes, got {w_q.dtype}")
    w_q = w_q.to(torch.int64)
    if not torch.equal(w_q, want_q):
        n_bad, j = first_difference(w_q, want_q)
        r, c = divmod(j, cols)
        top = int(w_q.max())
        hint = (f" Codes reach {top}, but a {bits}-bit unsigned code holds 0 .. {2**bits - 1}" if top > 2**bits - 1
                else " Expected clamp(round(w * (1/scale)) + zero_point, 0, 2**bits - 1), row by row")
        raise CheckFailed(f"{what}: {n_bad} of {w.numel()} codes differ. First: w[{r}, {c}] = {w[r, c].item()!r} -> "
                          f"expected {want_q[r, c].item()}, got {w_q[r, c].item()}.{hint}")


def _weight(gen: torch.Generator, out: int, cols: int, spread: torch.Tensor | None = None) -> torch.Tensor:
    """A bell-shaped weight whose rows have very different ranges (as trained layers do)."""
    spread = torch.rand(out, 1, generator=gen) * 2 + 0.05 if spread is None else spread
    return torch.randn(out, cols, generator=gen) * spread + torch.randn(out, 1, generator=gen) * spread * 0.3


def quantize_weight(fn) -> None:
    """Q5 visible: a worked 2-bit case, a non-square and a square weight at 4 and 8 bits, an
    all-positive row; each of the three bugs shows here."""
    def body():
        w = torch.tensor([[-0.8, 0.1, 2.2], [0.2, 0.4, 0.6]])
        _check(fn, w, 2, "quantize_weight([[-0.8, 0.1, 2.2], [0.2, 0.4, 0.6]], bits=2) (want scales [1.0, 0.2], "
                         "zero points [1, 0], codes [[0, 1, 3], [1, 2, 3]])")
        gen = torch.Generator().manual_seed(15)
        _check(fn, _weight(gen, 6, 20), 4, "quantize_weight(random weight (6, 20), bits=4)")
        _check(fn, _weight(gen, 16, 16), 8, "quantize_weight(random square weight (16, 16), bits=8)")
        _check(fn, _weight(gen, 8, 8), 4, "quantize_weight(random square weight (8, 8), bits=4)")
    run("quantize_weight: worked case, non-square and square weights", body)


def quantize_weight_hidden(fn) -> None:
    """Q5 hidden: fresh weights of random shapes, 2 to 8 bits."""
    def body(draw: Draw):
        for _ in range(12):
            out, cols, bits = draw.rng.randint(1, 48), draw.rng.randint(1, 64), draw.rng.randint(2, 8)
            _check(fn, _weight(draw.gen, out, cols), bits, f"quantize_weight(random weight ({out}, {cols}), bits={bits})")
    hidden("quantize_weight: random weights", body)
