"""Checks for lab 01 (linear quantization): quant_range, choose_qparams, quantize, dequantize;
Q5's debugging of a broken per-channel quantizer lives in :mod:`qlib.check.lab01_debug`
(re-exported here: ``check.lab01.quantize_weight``).

Visible checks run worked cases a student can reason about (references: ``qlib.qparams`` and
``qlib.quantize``). Hidden checks draw random tensors (per student: :mod:`qlib.check.draws`),
exact ties of the zero point among them, and compare bit for bit with PyTorch itself
(:mod:`qlib.check.references`): ``MinMaxObserver`` for the qparams, ``torch.quantize_per_tensor``
and ``torch.fake_quantize_per_tensor_affine`` for the codes and the dequantized values. When an answer is wrong, the message says what was expected and, when
the answer matches a typical mistake (no clamp, no zero point, dividing by the scale, rounding
ties away from zero, forgetting that the range must contain 0...), which one
(:mod:`qlib.check.mistakes`).
"""

from __future__ import annotations

import importlib
from numbers import Integral

import torch

from .core import (CheckFailed, call, scalar_tensor, expect, expect_equal, expect_pair, expect_tensor, first_difference,
                   first_hint, run)
from . import references
from .draws import Draw, hidden
from .mistakes import HINTS, division_traps, scale_hint, wrong_codes, zero_point_hint
from .. import qparams as ref_qparams

from .lab01_debug import broken_quantize_weight, quantize_weight, quantize_weight_hidden, reference_quantize_weight

__all__ = ["quant_range", "quant_range_hidden", "choose_qparams_affine", "choose_qparams_affine_hidden",
           "choose_qparams_symmetric", "choose_qparams_symmetric_hidden", "quantize", "quantize_hidden",
           "dequantize", "dequantize_hidden", "quantize_weight", "quantize_weight_hidden", "broken_quantize_weight",
           "reference_quantize_weight"]

ref_quantize = importlib.import_module("qlib.quantize")  # the module: qlib.quantize is also a function


# ------------------------------------------------------------------ Q1 quant_range
def _check_range(fn, bits: int, signed: bool, want: tuple[int, int]) -> None:
    what = f"quant_range({bits}, signed={signed})"
    got = expect_pair(call(fn, bits, signed, what="quant_range"), what, "(quant_min, quant_max)")
    for v in got:
        expect(isinstance(v, Integral) and not isinstance(v, bool),
               f"{what}: expected two Python ints, got {got!r} ({type(v).__name__}); "
               f"codes are integers, use ** and ints rather than floats or tensors")
    expect(tuple(int(v) for v in got) == want, f"{what}: expected {want}, got {tuple(got)}")


def quant_range(fn) -> None:
    """Q1 visible: the 8-, 4- and 2-bit ranges, signed and unsigned."""
    def body():
        for bits, signed, want in [(8, True, (-128, 127)), (8, False, (0, 255)), (4, True, (-8, 7)),
                                   (4, False, (0, 15)), (2, True, (-2, 1))]:
            _check_range(fn, bits, signed, want)
    run("quant_range: worked cases", body)


def quant_range_hidden(fn) -> None:
    """Q1 hidden: every width from 2 to 16 bits; 8 and 16 against torch.iinfo."""
    def body():
        for bits in range(2, 17):
            for signed in (True, False):
                if bits in (8, 16) and (signed or bits == 8):
                    info = torch.iinfo({(8, True): torch.int8, (8, False): torch.uint8,
                                        (16, True): torch.int16}[(bits, signed)])
                    want = (info.min, info.max)
                else:
                    want = ref_qparams.quant_range(bits, signed)
                _check_range(fn, bits, signed, want)
    run("quant_range: all widths 2..16", body)


# ------------------------------------------------------------------ Q2 choose_qparams
def _check_qparams(fn, lo: float, hi: float, qmin: int, qmax: int, symmetric: bool,
                   want_scale: torch.Tensor, want_zp: torch.Tensor) -> None:
    min_val = torch.tensor(lo, dtype=torch.float32)
    max_val = torch.tensor(hi, dtype=torch.float32)
    lo, hi = min_val.item(), max_val.item()
    what = f"choose_qparams({lo!r}, {hi!r}, {qmin}, {qmax}, symmetric={symmetric})"
    got = expect_pair(call(fn, min_val, max_val, qmin, qmax, symmetric, what="choose_qparams"), what,
                      "(scale, zero_point)")
    scale = scalar_tensor(got[0], f"{what}, scale", integer=False)
    zp = scalar_tensor(got[1], f"{what}, zero_point", integer=True)
    want_scale = want_scale.reshape(()).to(torch.float32)
    want_zp = want_zp.reshape(()).to(torch.int64)
    if not torch.equal(scale.view(torch.int32), want_scale.view(torch.int32)):
        raise CheckFailed(f"{what}: expected scale {want_scale.item()!r}, got {scale.item()!r}."
                          + scale_hint(scale.item(), lo, hi, qmin, qmax, symmetric, want_scale.item()))
    if not torch.equal(zp, want_zp):
        hint = zero_point_hint(zp.item(), want_zp.item(), lo, qmin, qmax, symmetric)
        raise CheckFailed(f"{what}: scale is right, expected zero_point {want_zp.item()}, got {zp.item()}."
                          + hint)


def _visible_qparams(fn, symmetric: bool, cases) -> None:
    for lo, hi, (qmin, qmax) in cases:
        want = ref_qparams.choose_qparams(torch.tensor(lo), torch.tensor(hi), qmin, qmax, symmetric=symmetric)
        _check_qparams(fn, lo, hi, qmin, qmax, symmetric, *want)


def choose_qparams_affine(fn) -> None:
    """Q2 visible (affine): worked ranges, one containing 0, one positive, one negative, one empty."""
    def body():
        # (-0.1, 0.3): float64 arithmetic (Python floats) gives a scale one bit off
        _visible_qparams(fn, False, [(-1.0, 2.0, (0, 255)), (0.5, 2.0, (0, 255)), (-3.0, -1.0, (-128, 127)),
                                     (-0.3, 0.7, (0, 15)), (0.0, 0.0, (0, 255)), (-0.1, 0.3, (0, 255))])
    run("choose_qparams (affine): worked cases", body)


def choose_qparams_symmetric(fn) -> None:
    """Q2 visible (symmetric, signed codes): worked ranges."""
    def body():
        _visible_qparams(fn, True, [(-1.0, 2.0, (-128, 127)), (-0.5, 0.25, (-8, 7)), (1.0, 3.0, (-128, 127)),
                                    (-2.0, -0.5, (-2, 1)), (0.0, 0.0, (-128, 127))])
    run("choose_qparams (symmetric): worked cases", body)


def _random_tensor(draw: Draw) -> torch.Tensor:
    """Gaussian with random spread and offset, or one of the corner cases."""
    rng, gen = draw.rng, draw.gen
    kind = rng.choice(["gauss", "gauss", "gauss", "positive", "negative", "tiny", "zeros", "constant"])
    spread = 10 ** rng.uniform(-4, 3)
    x = torch.randn(rng.randint(1, 300), generator=gen) * spread + rng.uniform(-1, 1) * spread
    if kind == "positive":
        x = x.abs() + spread
    elif kind == "negative":
        x = -x.abs() - spread
    elif kind == "tiny":
        x = x * 1e-9
    elif kind == "zeros":
        x = torch.zeros_like(x)
    elif kind == "constant":
        x = torch.full_like(x, rng.uniform(-5, 5))
    return x


def _tie_tensor(draw: Draw, qmin: int, qmax: int) -> torch.Tensor:
    """[min, max] on a power-of-two grid with min / scale = -(j + 1/2): the zero point is an
    exact tie, where rounding half to even and half away from zero give different answers."""
    step = 2.0 ** draw.rng.randint(-8, 2)
    half = draw.rng.randrange(qmax - qmin) + 0.5
    return torch.tensor([-half * step, (qmax - qmin - half) * step])


def _hidden_qparams(fn, symmetric: bool, draw: Draw, cases: int = 60) -> None:
    rng = draw.rng
    for i in range(cases):
        bits = rng.randint(2, 8)
        signed = True if symmetric else rng.random() < 0.5
        qmin, qmax = ref_qparams.quant_range(bits, signed)
        x = _tie_tensor(draw, qmin, qmax) if i % 6 == 5 else _random_tensor(draw)
        want_scale, want_zp = references.minmax_qparams(x, bits, signed, symmetric)
        _check_qparams(fn, x.min().item(), x.max().item(), qmin, qmax, symmetric, want_scale, want_zp)


def choose_qparams_affine_hidden(fn) -> None:
    """Q2 hidden (affine): random tensors, 2..8 bits, against torch's MinMaxObserver."""
    hidden("choose_qparams (affine): random tensors vs torch MinMaxObserver",
           lambda draw: _hidden_qparams(fn, False, draw))


def choose_qparams_symmetric_hidden(fn) -> None:
    """Q2 hidden (symmetric): random tensors, signed 2..8 bits, against torch's MinMaxObserver."""
    hidden("choose_qparams (symmetric): random tensors vs torch MinMaxObserver",
           lambda draw: _hidden_qparams(fn, True, draw))


# ------------------------------------------------------------------ Q3 quantize
_HINTS = [(HINTS[k], k) for k in HINTS]


def _check_codes(fn, x, scale, zp, qmin, qmax, what, torch_ref: torch.Tensor | None = None) -> None:
    got = expect_tensor(call(fn, x, scale, zp, qmin, qmax, what="quantize"), what, x.shape, kind="a tensor of codes")
    expect(not got.is_floating_point(),
           f"{what}: expected integer codes, got a {got.dtype} tensor; finish with `.to(torch.int64)`")
    want = ref_quantize.quantize(x, scale, zp, qmin, qmax).to(torch.int64)
    got = got.to(torch.int64)
    if torch_ref is not None:  # the hidden check: PyTorch's own values decide
        ok = torch.equal((got - zp).to(torch.float32) * scale, torch_ref)
    else:
        ok = torch.equal(got, want)
    if ok:
        return
    n_bad, i = first_difference(got, want)
    wrong = wrong_codes(x, scale, zp, qmin, qmax)
    hint = first_hint(got, [(h, wrong[k]) for h, k in _HINTS])
    raise CheckFailed(
        f"{what}: {n_bad} of {x.numel()} codes differ. First: x = {x[i].item()!r} -> expected code "
        f"{want[i].item()}, got {got[i].item()} (scale {scale.item()!r}, zero_point {int(zp)}, "
        f"range [{qmin}, {qmax}])." + (f" Hint: {hint}." if hint else
                                       " Expected clamp(round(x * (1/scale)) + zero_point, quant_min, quant_max)."))


def quantize(fn) -> None:
    """Q3 visible: rounding, ties, clamping, zero point, and inputs where x / scale misleads."""
    def body():
        x = torch.tensor([-3.0, -1.0, -0.5, 0.0, 0.1, 0.3, 0.5, 1.2, 2.0, 5.0])
        _check_codes(fn, x, torch.tensor(0.2), torch.tensor(5), 0, 15,
                     "quantize([-3, -1, -0.5, 0, 0.1, 0.3, 0.5, 1.2, 2, 5], scale=0.2, zero_point=5, 0, 15)")
        x = torch.tensor([0.25, 0.75, 1.25, -0.25, -0.75, 3.0])  # exact ties: x / scale = 0.5, 1.5, ...
        _check_codes(fn, x, torch.tensor(0.5), torch.tensor(1), -8, 7,
                     "quantize([0.25, 0.75, 1.25, -0.25, -0.75, 3], scale=0.5, zero_point=1, -8, 7)")
        x = torch.tensor([-1.0, -0.25, 0.0, 0.126, 0.5, 0.99])
        _check_codes(fn, x, torch.tensor(1.0 / 127.5), torch.tensor(0), -128, 127,
                     "quantize([-1, -0.25, 0, 0.126, 0.5, 0.99], scale=1/127.5, zero_point=0, -128, 127)")
        scale = torch.tensor(0.0251)
        _check_codes(fn, division_traps(scale), scale, torch.tensor(3), -128, 127,
                     "quantize(values near ties, scale=0.0251, zero_point=3, -128, 127)")
    run("quantize: worked cases", body)


def quantize_hidden(fn) -> None:
    """Q3 hidden: fresh random tensors (with ties and out-of-range values), 2..8 bits, vs PyTorch."""
    def body(draw: Draw):
        rng, gen = draw.rng, draw.gen
        for _ in range(40):
            bits, signed = rng.randint(2, 8), rng.random() < 0.5
            qmin, qmax = ref_qparams.quant_range(bits, signed)
            x = torch.randn(rng.randint(1, 500), generator=gen) * 10 ** rng.uniform(-3, 2) + rng.uniform(-1, 1)
            lo, hi = x.min().clamp(max=0) * rng.uniform(0.3, 1), x.max().clamp(min=0) * rng.uniform(0.3, 1)
            scale, zp = ref_qparams.choose_qparams(lo, hi, qmin, qmax, symmetric=False)  # clips some x
            k = torch.randint(qmin - zp.item(), qmax - zp.item() + 1, (64,), generator=gen)
            x = torch.cat([x, (k + 0.5) * scale, division_traps(scale)])  # clipped values, ties, traps
            what = f"quantize on random values ({bits}-bit {'signed' if signed else 'unsigned'})"
            ref = references.fake_quantize(x, scale, zp, qmin, qmax)
            _check_codes(fn, x, scale, zp, qmin, qmax, what, torch_ref=ref)
            if bits == 8:
                got = call(fn, x, scale, zp, qmin, qmax, what="quantize")
                expect_equal(got.to(torch.int64), references.int8_codes(x, scale, zp, signed),
                             f"{what}, compared with torch.quantize_per_tensor")
    hidden("quantize: random tensors vs torch.fake_quantize_per_tensor_affine", body)


# ------------------------------------------------------------------ Q4 dequantize
def _check_dequantize(fn, x_q, scale, zp, what, want) -> None:
    got = expect_tensor(call(fn, x_q.clone(), scale, zp, what="dequantize"), what, x_q.shape, torch.float32,
                        kind="a tensor")
    if torch.equal(got, want):
        return
    n_bad, i = first_difference(got, want)
    hint = ""
    if torch.equal(got, x_q.to(torch.float32) * scale):
        hint = " Hint: subtract the zero_point before multiplying by the scale."
    elif x_q.dtype in (torch.uint8, torch.int8) and torch.equal(got, (x_q - zp).to(torch.float32) * scale):
        hint = (f" Hint: the codes are {x_q.dtype}; subtracting the zero_point in {x_q.dtype} wraps "
                f"around. Convert first: x_q.to(torch.int64) (or .float()).")
    raise CheckFailed(f"{what}: {n_bad} of {x_q.numel()} values differ. First: code {x_q[i].item()} -> "
                      f"expected {want[i].item()!r}, got {got[i].item()!r} (scale {scale.item()!r}, "
                      f"zero_point {int(zp)}); expected (x_q - zero_point) * scale." + hint)


def dequantize(fn) -> None:
    """Q4 visible: int64, uint8 and int8 codes."""
    def body():
        scale = torch.tensor(0.2)
        cases = [(torch.tensor([0, 3, 5, 7, 15]), torch.tensor(5)),
                 (torch.tensor([0, 100, 128, 200, 255], dtype=torch.uint8), torch.tensor(128)),
                 (torch.tensor([-128, -1, 0, 1, 127], dtype=torch.int8), torch.tensor(0)),
                 (torch.tensor([-8, -3, 0, 7], dtype=torch.int8), torch.tensor(-2))]
        for x_q, zp in cases:
            want = ref_quantize.dequantize(x_q, scale, zp)
            _check_dequantize(fn, x_q, scale, zp,
                              f"dequantize({x_q.tolist()} as {x_q.dtype}, scale=0.2, zero_point={int(zp)})", want)
    run("dequantize: worked cases", body)


def dequantize_hidden(fn) -> None:
    """Q4 hidden: dequantize(codes of x) == torch.fake_quantize_per_tensor_affine(x), all code dtypes."""
    def body(draw: Draw):
        rng, gen = draw.rng, draw.gen
        # first 8-bit codes in int8/uint8 with data off-centre (subtracting the zero point in
        # 8 bits overflows there), then random widths, data and code dtypes
        cases = [(8, True, torch.int8, torch.randn(300, generator=gen) + 2),
                 (8, False, torch.uint8, torch.randn(300, generator=gen) - 0.5)]
        for _ in range(40):
            bits, signed = rng.randint(2, 8), rng.random() < 0.5
            qmin, qmax = ref_qparams.quant_range(bits, signed)
            dtype = rng.choice([ref_quantize.code_dtype(qmin, qmax), torch.int16, torch.int32, torch.int64])
            cases.append((bits, signed, dtype, _random_tensor(draw)))
        for bits, signed, dtype, x in cases:
            qmin, qmax = ref_qparams.quant_range(bits, signed)
            scale, zp = ref_qparams.choose_qparams(x.min(), x.max(), qmin, qmax, symmetric=False)
            x_q = ref_quantize.quantize(x, scale, zp, qmin, qmax, dtype=dtype)
            want = references.fake_quantize(x, scale, zp, qmin, qmax)
            _check_dequantize(fn, x_q, scale, zp, f"dequantize of {bits}-bit {dtype} codes", want)
    hidden("dequantize: random codes vs torch.fake_quantize_per_tensor_affine", body)
