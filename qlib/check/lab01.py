"""Checks for lab 01 (linear quantization): quant_range, choose_qparams, quantize, dequantize.

Visible checks run worked cases a student can reason about (references: ``qlib.qparams`` and
``qlib.quantize``). Hidden checks draw fresh random tensors and compare bit for bit with
PyTorch itself: ``torch.ao.quantization.MinMaxObserver`` for the qparams,
``torch.quantize_per_tensor`` and ``torch.fake_quantize_per_tensor_affine`` for the codes and
the dequantized values. When an answer is wrong, the message says what was expected and, when
the answer matches a typical mistake (no clamp, no zero point, dividing by the scale, rounding
ties away from zero, forgetting that the range must contain 0...), which one.
"""

from __future__ import annotations

import importlib
import random
import warnings
from contextlib import contextmanager
from numbers import Integral

import torch

from . import CheckFailed, call, expect, expect_equal, run
from .. import qparams as ref_qparams

ref_quantize = importlib.import_module("qlib.quantize")  # the module: qlib.quantize is also a function

EPS = torch.finfo(torch.float32).eps


@contextmanager
def _torch_reference():
    """PyTorch's quantized dtypes and torch.ao are deprecated: silence that, only here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*deprecat")
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        yield


# ------------------------------------------------------------------ Q1 quant_range
def _check_range(fn, bits: int, signed: bool, want: tuple[int, int]) -> None:
    what = f"quant_range({bits}, signed={signed})"
    got = call(fn, bits, signed, what="quant_range")
    expect(isinstance(got, (tuple, list)) and len(got) == 2,
           f"{what}: expected a pair (quant_min, quant_max), got {got!r}")
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
def _scalar(value, what: str, integer: bool) -> torch.Tensor:
    """A student's scale or zero point as a 0-d tensor (float32 or int64), or a clear failure."""
    if isinstance(value, torch.Tensor):
        expect(value.numel() == 1, f"{what}: expected one number (per-tensor), got shape {tuple(value.shape)}")
        if integer:
            expect(not value.is_floating_point(),
                   f"{what}: expected an integer (int or integer tensor), got a {value.dtype} tensor; "
                   f"convert it, e.g. `.to(torch.int64)`")
            return value.reshape(()).to(torch.int64)
        expect(value.is_floating_point(), f"{what}: expected a float tensor, got {value.dtype}")
        return value.detach().reshape(()).to(torch.float32)
    if integer:
        expect(isinstance(value, Integral) and not isinstance(value, bool),
               f"{what}: expected an integer, got {value!r} ({type(value).__name__})")
        return torch.tensor(int(value))
    expect(isinstance(value, (float, int)) and not isinstance(value, bool),
           f"{what}: expected a number or a float32 tensor, got {type(value).__name__}")
    return torch.tensor(float(value), dtype=torch.float32)


def _scale_hint(got: float, lo: float, hi: float, qmin: int, qmax: int, symmetric: bool, want: float) -> str:
    """Name the typical mistake a wrong scale comes from (empty string if none matches)."""
    def near(a, b):
        return abs(a - b) <= 1e-5 * max(abs(b), 1e-30)
    amax = max(abs(lo), abs(hi))
    if want == EPS and got != EPS:
        return (" Hint: for a range of width 0 (a constant tensor) the scale would be 0; PyTorch uses "
                "max(scale, eps) with eps = torch.finfo(torch.float32).eps.")
    if symmetric and near(got, amax / qmax):
        return " Hint: divide by (quant_max - quant_min) / 2 (127.5 for 8 bits), not by quant_max."
    if not symmetric and near(got, (hi - lo) / (qmax - qmin)) and not near(got, want):
        return (" Hint: the range must contain 0 so that 0.0 is exact: use min(min_val, 0) and "
                "max(max_val, 0).")
    if near(got, want):
        return (" Hint: almost; your scale differs only in the last bits. Compute it exactly as the "
                "formula is written, with torch operations on float32 tensors (Python floats are "
                "float64 and round differently).")
    return ""


def _check_qparams(fn, lo: float, hi: float, qmin: int, qmax: int, symmetric: bool,
                   want_scale: torch.Tensor, want_zp: torch.Tensor) -> None:
    min_val = torch.tensor(lo, dtype=torch.float32)
    max_val = torch.tensor(hi, dtype=torch.float32)
    lo, hi = min_val.item(), max_val.item()
    what = f"choose_qparams({lo!r}, {hi!r}, {qmin}, {qmax}, symmetric={symmetric})"
    got = call(fn, min_val, max_val, qmin, qmax, symmetric, what="choose_qparams")
    expect(isinstance(got, (tuple, list)) and len(got) == 2,
           f"{what}: expected a pair (scale, zero_point), got {type(got).__name__}")
    scale = _scalar(got[0], f"{what}, scale", integer=False)
    zp = _scalar(got[1], f"{what}, zero_point", integer=True)
    want_scale = want_scale.reshape(()).to(torch.float32)
    want_zp = want_zp.reshape(()).to(torch.int64)
    if not torch.equal(scale.view(torch.int32), want_scale.view(torch.int32)):
        raise CheckFailed(f"{what}: expected scale {want_scale.item()!r}, got {scale.item()!r}."
                          + _scale_hint(scale.item(), lo, hi, qmin, qmax, symmetric, want_scale.item()))
    if not torch.equal(zp, want_zp):
        hint = ""
        if symmetric:
            hint = " Hint: symmetric quantization (signed codes) has zero_point 0."
        elif min(lo, 0.0) == 0.0 and want_zp.item() == qmin:
            hint = " Hint: when min_val >= 0 the range starts at 0, whose code is quant_min."
        elif not qmin <= zp.item() <= qmax:
            hint = " Hint: clamp the zero_point into [quant_min, quant_max]."
        elif abs(zp.item() - want_zp.item()) == 1:
            hint = (" Hint: off by one. Compute round(min_neg / scale) with torch.round on float32 "
                    "tensors: float64 (Python) arithmetic or rounding ties away from zero can land on "
                    "the other integer.")
        if not symmetric:
            hint += " (zero_point = quant_min - round(min_neg / scale), then clamped.)"
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


def _random_tensor(rng: random.Random, gen: torch.Generator) -> torch.Tensor:
    """Gaussian with random spread and offset, or one of the corner cases."""
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


def _observer(bits: int, signed: bool, symmetric: bool):
    tq = torch.ao.quantization
    qscheme = torch.per_tensor_symmetric if symmetric else torch.per_tensor_affine
    kwargs = {}
    if bits != 8:
        kwargs["quant_min"], kwargs["quant_max"] = ref_qparams.quant_range(bits, signed)
    return tq.MinMaxObserver(dtype=torch.qint8 if signed else torch.quint8, qscheme=qscheme, **kwargs)


def _hidden_qparams(fn, symmetric: bool, cases: int = 60) -> None:
    rng = random.Random()
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    for _ in range(cases):
        x = _random_tensor(rng, gen)
        bits = rng.randint(2, 8)
        signed = True if symmetric else rng.random() < 0.5
        with _torch_reference():
            observer = _observer(bits, signed, symmetric)
            observer(x)
            want_scale, want_zp = observer.calculate_qparams()
        qmin, qmax = ref_qparams.quant_range(bits, signed)
        _check_qparams(fn, x.min().item(), x.max().item(), qmin, qmax, symmetric, want_scale, want_zp)


def choose_qparams_affine_hidden(fn) -> None:
    """Q2 hidden (affine): random tensors, 2..8 bits, against torch's MinMaxObserver."""
    run("choose_qparams (affine): random tensors vs torch MinMaxObserver",
        lambda: _hidden_qparams(fn, symmetric=False))


def choose_qparams_symmetric_hidden(fn) -> None:
    """Q2 hidden (symmetric): random tensors, signed 2..8 bits, against torch's MinMaxObserver."""
    run("choose_qparams (symmetric): random tensors vs torch MinMaxObserver",
        lambda: _hidden_qparams(fn, symmetric=True))


# ------------------------------------------------------------------ Q3 quantize
def _variants(x, scale, zp, qmin, qmax) -> list[tuple[str, torch.Tensor]]:
    """Typical wrong answers, each with the hint that explains it."""
    v = x * (1.0 / scale)
    away = torch.sign(v) * torch.floor(v.abs() + 0.5)
    ties = "round ties to even with torch.round: floor(v + 0.5) or round-half-away differ at exact halves"
    return [
        ("clamp the codes to [quant_min, quant_max]: values outside the range must be clipped",
         torch.round(v) + zp),
        ("add the zero_point (after rounding)", torch.clamp(torch.round(v), qmin, qmax)),
        ("multiply by the reciprocal, x * (1.0 / scale), as PyTorch does: x / scale can round differently",
         torch.clamp(torch.round(x / scale) + zp, qmin, qmax)),
        (ties, torch.clamp(away + zp, qmin, qmax)),
        (ties, torch.clamp(torch.floor(v + 0.5) + zp, qmin, qmax)),
        ("round first, then add the zero_point: round(v + zero_point) differs at ties",
         torch.clamp(torch.round(v + zp), qmin, qmax)),
        ("round to the nearest integer: .to(int) truncates toward zero",
         torch.clamp(torch.trunc(v) + zp, qmin, qmax)),
    ]


def _division_traps(scale: torch.Tensor) -> torch.Tensor:
    """Inputs near ties where x / scale and x * (1/scale) round to different integers."""
    x = (torch.arange(-300, 300, dtype=torch.float32) + 0.5) * scale
    return x[torch.round(x / scale) != torch.round(x * (1.0 / scale))]


def _check_codes(fn, x, scale, zp, qmin, qmax, what, torch_ref: torch.Tensor | None = None) -> None:
    got = call(fn, x, scale, zp, qmin, qmax, what="quantize")
    expect(isinstance(got, torch.Tensor), f"{what}: expected a tensor of codes, got {type(got).__name__}")
    expect(got.shape == x.shape, f"{what}: expected shape {tuple(x.shape)}, got {tuple(got.shape)}")
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
    bad = (got != want).nonzero().flatten()
    i = bad[0].item() if len(bad) else 0
    hint = next((h for h, v in _variants(x, scale, zp, qmin, qmax) if torch.equal(got, v.to(torch.int64))), "")
    raise CheckFailed(
        f"{what}: {len(bad)} of {x.numel()} codes differ. First: x = {x[i].item()!r} -> expected code "
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
        _check_codes(fn, _division_traps(scale), scale, torch.tensor(3), -128, 127,
                     "quantize(values near ties, scale=0.0251, zero_point=3, -128, 127)")
    run("quantize: worked cases", body)


def quantize_hidden(fn) -> None:
    """Q3 hidden: fresh random tensors (with ties and out-of-range values), 2..8 bits, vs PyTorch."""
    def body():
        rng = random.Random()
        gen = torch.Generator().manual_seed(rng.randrange(2**31))
        for _ in range(40):
            bits, signed = rng.randint(2, 8), rng.random() < 0.5
            qmin, qmax = ref_qparams.quant_range(bits, signed)
            x = torch.randn(rng.randint(1, 500), generator=gen) * 10 ** rng.uniform(-3, 2) + rng.uniform(-1, 1)
            lo, hi = x.min().clamp(max=0) * rng.uniform(0.3, 1), x.max().clamp(min=0) * rng.uniform(0.3, 1)
            scale, zp = ref_qparams.choose_qparams(lo, hi, qmin, qmax, symmetric=False)  # clips some x
            k = torch.randint(qmin - zp.item(), qmax - zp.item() + 1, (64,), generator=gen)
            x = torch.cat([x, (k + 0.5) * scale, _division_traps(scale)])  # clipped values, ties, traps
            what = f"quantize on random values ({bits}-bit {'signed' if signed else 'unsigned'})"
            with _torch_reference():
                ref = torch.fake_quantize_per_tensor_affine(x, scale.item(), int(zp), qmin, qmax)
                _check_codes(fn, x, scale, zp, qmin, qmax, what, torch_ref=ref)
                if bits == 8:
                    codes = torch.quantize_per_tensor(x, scale.item(), int(zp),
                                                      torch.qint8 if signed else torch.quint8).int_repr()
                    got = call(fn, x, scale, zp, qmin, qmax, what="quantize")
                    expect_equal(got.to(torch.int64), codes.to(torch.int64),
                                 f"{what}, compared with torch.quantize_per_tensor")
    run("quantize: random tensors vs torch.fake_quantize_per_tensor_affine", body)


# ------------------------------------------------------------------ Q4 dequantize
def _check_dequantize(fn, x_q, scale, zp, what, want) -> None:
    got = call(fn, x_q.clone(), scale, zp, what="dequantize")
    expect(isinstance(got, torch.Tensor), f"{what}: expected a tensor, got {type(got).__name__}")
    expect(got.shape == x_q.shape, f"{what}: expected shape {tuple(x_q.shape)}, got {tuple(got.shape)}")
    expect(got.dtype == torch.float32, f"{what}: expected a float32 tensor, got {got.dtype}")
    if torch.equal(got, want):
        return
    bad = (got != want).nonzero().flatten()
    i = bad[0].item()
    hint = ""
    if torch.equal(got, x_q.to(torch.float32) * scale):
        hint = " Hint: subtract the zero_point before multiplying by the scale."
    elif x_q.dtype in (torch.uint8, torch.int8) and torch.equal(got, (x_q - zp).to(torch.float32) * scale):
        hint = (f" Hint: the codes are {x_q.dtype}; subtracting the zero_point in {x_q.dtype} wraps "
                f"around. Convert first: x_q.to(torch.int64) (or .float()).")
    raise CheckFailed(f"{what}: {len(bad)} of {x_q.numel()} values differ. First: code {x_q[i].item()} -> "
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
    def body():
        rng = random.Random()
        gen = torch.Generator().manual_seed(rng.randrange(2**31))
        # first 8-bit codes in int8/uint8 with data off-centre (subtracting the zero point in
        # 8 bits overflows there), then random widths, data and code dtypes
        cases = [(8, True, torch.int8, torch.randn(300, generator=gen) + 2),
                 (8, False, torch.uint8, torch.randn(300, generator=gen) - 0.5)]
        for _ in range(40):
            bits, signed = rng.randint(2, 8), rng.random() < 0.5
            qmin, qmax = ref_qparams.quant_range(bits, signed)
            dtype = rng.choice([ref_quantize.code_dtype(qmin, qmax), torch.int16, torch.int32, torch.int64])
            cases.append((bits, signed, dtype, _random_tensor(rng, gen)))
        for bits, signed, dtype, x in cases:
            qmin, qmax = ref_qparams.quant_range(bits, signed)
            scale, zp = ref_qparams.choose_qparams(x.min(), x.max(), qmin, qmax, symmetric=False)
            x_q = ref_quantize.quantize(x, scale, zp, qmin, qmax, dtype=dtype)
            with _torch_reference():
                want = torch.fake_quantize_per_tensor_affine(x, scale.item(), int(zp), qmin, qmax)
            _check_dequantize(fn, x_q, scale, zp, f"dequantize of {bits}-bit {dtype} codes", want)
    run("dequantize: random codes vs torch.fake_quantize_per_tensor_affine", body)
