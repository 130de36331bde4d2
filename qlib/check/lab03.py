"""Checks for lab 03 (post-training quantization): BN folding, folding a model, the
calibrate and convert steps, and a whole static PTQ pipeline that must reach an accuracy.

References: ``qlib.fold.fold_bn`` / ``fold_batchnorm`` and an eval-mode ``nn.BatchNorm`` (torch)
for folding; ``qlib.ptq.calibrate`` / ``convert`` / ``quantize_static`` for the pipeline.

Tolerances: folded weights and biases within ``rtol=1e-5, atol=1e-6`` of qlib (``gamma /
sqrt(var + eps)`` and ``gamma * rsqrt(var + eps)`` differ in the last float32 bit); a folded
model's logits within ``1e-4`` of the unfolded eval-mode model. Accuracy targets on the 360
test digits (one image = 0.28 points), measured on the shipped ``cnn16`` weights, seeds 0-2:
W8A8 within :data:`W8A8_MAX_DROP` points of fp32 (measured: 0.0 to 0.3 below), and W4A8 with
MSE-searched weight scales at least :data:`W4A8_MIN_ACC` (measured: 96.9 to 99.7).
"""

from __future__ import annotations

import copy
import dataclasses

import torch
from torch import nn

from . import mistakes
from .core import CheckFailed, call, changed_entries, expect, expect_pair, expect_tensor, run, snapshot
from .draws import Draw, hidden, random_bn
from .. import fold as ref_fold
from .. import ptq as ref_ptq
from ..data import calibration_batches, load_digits
from ..models import create, pretrained
from ..modules import FakeQuantize, QuantConfig, fake_quantizers, set_quant_mode, swap_modules
from ..train import evaluate as _accuracy

W8A8_MAX_DROP = 1.0
W4A8_MIN_ACC = 95.0
W4A8_CONFIG = QuantConfig(weight_bits=4, act_bits=8, weight_observer="mse")
"""The 4-bit configuration of Q5: 4-bit weights with MSE-searched per-channel scales."""


def _test_data(image_size: int):
    digits = load_digits(image_size)
    return digits, calibration_batches(digits.train, 256, 64, seed=0)


# ------------------------------------------------------------------ Q1 fold_bn
def _check_fold_bn(fn, weight: torch.Tensor, bias, bn, what: str) -> None:
    w0, b0 = weight.clone(), None if bias is None else bias.clone()
    bn_state = snapshot(bn)
    w, b = expect_pair(call(fn, weight, bias, bn, what="fold_bn"), what, "(weight, bias)")
    w = expect_tensor(w, f"{what} weight", kind="a tensor")
    expect(torch.equal(weight, w0) and (bias is None or torch.equal(bias, b0)) and not changed_entries(bn, bn_state),
           f"{what}: your function changed its inputs (weight, bias or the BatchNorm): return new tensors")
    b = expect_tensor(b, f"{what} bias (a layer without bias gets one after folding)", kind="a tensor")
    want_w, want_b = ref_fold.fold_bn(weight, bias, bn)
    expect(w.shape == want_w.shape, f"{what}: folded weight should have shape {tuple(want_w.shape)}, got {tuple(w.shape)}")
    expect(b.shape == want_b.shape, f"{what}: folded bias should have shape {tuple(want_b.shape)}, got {tuple(b.shape)}")
    if not torch.allclose(w.float(), want_w, rtol=1e-5, atol=1e-6):
        raise CheckFailed(f"{what}: folded weight differs from w * gamma / sqrt(var + eps) by up to "
                          f"{(w.float() - want_w).abs().max().item():.3g}" + mistakes.fold_weight_hint(w.float(), weight, bn))
    if not torch.allclose(b.float(), want_b, rtol=1e-5, atol=1e-6):
        raise CheckFailed(f"{what}: folded bias differs from (b - mean) * gamma / sqrt(var + eps) + beta "
                          f"by up to {(b.float() - want_b).abs().max().item():.3g}" + mistakes.fold_bias_hint(b.float(), bias, bn))


def fold_bn(fn) -> None:
    """Q1 visible: a conv with bias and a linear without, random BN statistics; then the folded
    conv must equal conv followed by the eval-mode BatchNorm (torch)."""
    def body():
        gen = torch.Generator().manual_seed(7)
        conv = nn.Conv2d(3, 8, 3, padding=1)
        with torch.no_grad():
            conv.weight.copy_(torch.randn(8, 3, 3, 3, generator=gen))
            conv.bias.copy_(torch.randn(8, generator=gen))
        bn = random_bn(8, gen)
        _check_fold_bn(fn, conv.weight.detach(), conv.bias.detach(), bn, "fold_bn(conv 3->8 with bias, random BN)")
        w, b = call(fn, conv.weight.detach(), conv.bias.detach(), bn, what="fold_bn")
        x = torch.randn(4, 3, 6, 6, generator=gen)
        with torch.no_grad():
            want = bn(conv(x))
            got = nn.functional.conv2d(x, w, b, padding=1)
        expect(torch.allclose(got, want, rtol=1e-4, atol=1e-5),
               f"conv with the folded weights differs from bn(conv(x)) by up to {(got - want).abs().max().item():.3g}")
        lin_w = torch.randn(5, 7, generator=gen)
        _check_fold_bn(fn, lin_w, None, random_bn(5, gen, dims=1),
                       "fold_bn(linear 7->5 without bias (None), random BatchNorm1d)")
    run("fold_bn: conv and linear, random statistics", body)


def fold_bn_hidden(fn) -> None:
    """Q1 hidden: fresh random layers; BN without affine parameters; other eps values."""
    def body(draw: Draw):
        gen = draw.gen
        for c_out, c_in, k, affine, eps, with_bias in [(16, 1, 3, True, 1e-5, False), (6, 6, 1, False, 1e-3, True),
                                                       (32, 16, 3, True, 0.1, True), (4, 2, 5, False, 1e-5, False)]:
            w = torch.randn(c_out, c_in, k, k, generator=gen)
            b = torch.randn(c_out, generator=gen) if with_bias else None
            bn = random_bn(c_out, gen, affine=affine, eps=eps)
            _check_fold_bn(fn, w, b, bn, f"fold_bn(conv {c_in}->{c_out} k={k}, bias={with_bias}, "
                                         f"affine={affine}, eps={eps})")
    hidden("fold_bn: random layers and BatchNorms", body)


# ------------------------------------------------------------------ Q2 fold_model
def _check_fold_model(fn, model: nn.Module, x: torch.Tensor, what: str) -> nn.Module:
    before, was_training = copy.deepcopy(model), model.training
    got = call(fn, model, what="fold_model")
    expect(isinstance(got, nn.Module), f"{what}: expected a model, got {type(got).__name__}")
    expect(got is not model, f"{what}: return a folded copy (copy.deepcopy), keep the original model")
    expect(model.training == was_training and not changed_entries(model, before.state_dict())
           and any(isinstance(m, ref_fold.BATCHNORMS) for m in model.modules()),
        f"{what}: the original model was changed; fold a copy (copy.deepcopy(model))")
    left = [n for n, m in got.named_modules() if isinstance(m, ref_fold.BATCHNORMS)]
    expect(not left, f"{what}: BatchNorm layers left in the folded model: {left}; "
                     "replace each folded BatchNorm by nn.Identity()")
    names = [n for n, m in before.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    have = {n for n, m in got.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    expect(set(names) <= have, f"{what}: keep the layer names (indices) of the original model: "
                               f"expected layers {names}, got {sorted(have)}")
    with torch.no_grad():
        want = before.eval()(x)
        got.eval()
        out = got(x)
    expect(out.shape == want.shape, f"{what}: output shape {tuple(out.shape)}, expected {tuple(want.shape)}")
    expect(torch.allclose(out, want, rtol=1e-4, atol=1e-4),
           f"{what}: the folded model's output differs from the eval-mode original by up to "
           f"{(out - want).abs().max().item():.3g} (folding uses the running statistics, so it is exact "
           "up to float rounding)")
    return got


def fold_model(fn) -> None:
    """Q2 visible: the pretrained cnn16 (seed 0) on test digits."""
    def body():
        digits, _ = _test_data(16)
        _check_fold_model(fn, pretrained("cnn16", 0), digits.test.tensors[0][:64], "fold_model(cnn16)")
    run("fold_model: cnn16", body)


def fold_model_hidden(fn) -> None:
    """Q2 hidden: the mlp and cnn8 with random BN statistics, passed in train mode."""
    def body(draw: Draw):
        gen = draw.gen
        for name in ("mlp", "cnn8"):
            model = create(name, seed=draw.integer(1000))
            for m in model.modules():
                if isinstance(m, ref_fold.BATCHNORMS):
                    m.load_state_dict(random_bn(m.num_features, gen, dims=1).state_dict())
            model.train()
            _check_fold_model(fn, model, torch.randn(16, 1, 8, 8, generator=gen), f"fold_model({name} in train mode)")
    hidden("fold_model: mlp and cnn8, random statistics", body)


# ------------------------------------------------------------------ Q3 calibrate
def _prepared(name: str = "cnn16", seed: int = 0, config: QuantConfig | None = None) -> nn.Module:
    return swap_modules(ref_fold.fold_batchnorm(pretrained(name, seed)), config or QuantConfig()).eval()


def _observer_state(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor, int]]:
    return {n: (fq.observer.min_val.clone(), fq.observer.max_val.clone(), int(fq.observed_batches))
            for n, fq in fake_quantizers(model).items()}


def _check_calibrate(fn, model: nn.Module, batches, what: str) -> None:
    ref = ref_ptq.calibrate(set_quant_mode(copy.deepcopy(model), observe=True, quantize=False), batches)
    got = call(fn, model, batches, what="calibrate")
    expect(got is None or got is model, f"{what}: calibrate should update the model it is given "
                                        "(and may return it), not build another one")
    for name, fq in fake_quantizers(model).items():
        expect(fq.observe and not fq.quantize, f"{what}: after calibration {name} has observe={fq.observe}, "
                                               f"quantize={fq.quantize}; calibration observes the float model "
                                               "(observe=True, quantize=False)")
    want, have = _observer_state(ref), _observer_state(model)
    for name, (lo, hi, n) in want.items():
        g_lo, g_hi, g_n = have[name]
        expect(g_n == n, f"{what}: {name} saw {g_n} batches, expected {n} (every calibration batch once)")
        expect(torch.equal(g_lo, lo) and torch.equal(g_hi, hi),
               f"{what}: {name} recorded the range [{g_lo.min().item():.4g}, {g_hi.max().item():.4g}], expected "
               f"[{lo.min().item():.4g}, {hi.max().item():.4g}] (run the model in eval mode on every batch)")


def calibrate(fn) -> None:
    """Q3 visible: W8A8 cnn16 prepared by swap_modules; 4 calibration batches."""
    def body():
        _, batches = _test_data(16)
        _check_calibrate(fn, _prepared(), batches, "calibrate(prepared cnn16, 4 batches)")
    run("calibrate: cnn16", body)


def calibrate_hidden(fn) -> None:
    """Q3 hidden: switches left in the wrong state, another model, batches given as a generator-free list."""
    def body():
        _, batches = _test_data(8)
        model = _prepared("cnn8", 1, QuantConfig(weight_bits=4, act_bits=4, act_observer="moving_average"))
        for fq in fake_quantizers(model).values():
            fq.observe, fq.quantize = False, True  # e.g. left over from an earlier convert
        _check_calibrate(fn, model, batches[:3], "calibrate(cnn8 W4A4 with quantize=True left on, 3 batches)")
        model = _prepared("mlp", 2).train()
        _check_calibrate(fn, model, batches[:2], "calibrate(mlp passed in train mode, 2 batches)")
    run("calibrate: other models and states", body)


# ------------------------------------------------------------------ Q4 convert
def _check_convert(fn, calibrated: nn.Module, x: torch.Tensor, what: str) -> None:
    before = _observer_state(calibrated)
    got = call(fn, calibrated, what="convert")
    expect(isinstance(got, nn.Module) and got is not calibrated,
           f"{what}: return a converted copy (copy.deepcopy), keep the calibrated model as it is")
    expect(all(fq.observe and not fq.quantize for fq in fake_quantizers(calibrated).values()),
           f"{what}: the calibrated model's switches were changed; convert a copy")
    fqs = fake_quantizers(got)
    expect(len(fqs) == len(before), f"{what}: the converted model has {len(fqs)} quantizers, expected {len(before)}")
    for name, fq in fqs.items():
        expect(not fq.observe and fq.quantize, f"{what}: {name} has observe={fq.observe}, quantize={fq.quantize}; "
                                               "a converted model quantizes with frozen qparams "
                                               "(observe=False, quantize=True)")
    want_model = ref_ptq.convert(calibrated)
    with torch.no_grad():
        want = want_model(x)
        out = got(x)
        got(x * 10)  # a frozen model must not move its ranges
    expect(torch.allclose(out, want, rtol=0, atol=1e-6),
           f"{what}: output differs from qlib.ptq.convert's by up to {(out - want).abs().max().item():.3g}")
    after = _observer_state(got)
    for name, (lo, hi, _) in before.items():
        expect(torch.equal(after[name][0], lo) and torch.equal(after[name][1], hi),
               f"{what}: {name} still observes: its range moved after a forward pass")


def convert(fn) -> None:
    """Q4 visible: the calibrated W8A8 cnn16."""
    def body():
        digits, batches = _test_data(16)
        calibrated = ref_ptq.calibrate(_prepared(), batches)
        _check_convert(fn, calibrated, digits.test.tensors[0][:64], "convert(calibrated cnn16)")
    run("convert: cnn16", body)


def convert_hidden(fn) -> None:
    """Q4 hidden: a W4A4 cnn8 with percentile activations."""
    def body():
        digits, batches = _test_data(8)
        cfg = QuantConfig(weight_bits=4, act_bits=4, act_observer="percentile")
        calibrated = ref_ptq.calibrate(_prepared("cnn8", 2, cfg), batches)
        _check_convert(fn, calibrated, digits.test.tensors[0][:64], "convert(calibrated W4A4 cnn8)")
    run("convert: W4A4 cnn8", body)


# ------------------------------------------------------------------ Q5 the pipeline
def _check_pipeline(fn, seed: int, what: str, labels=("W8A8", "W4A8")) -> dict[str, float]:
    digits, batches = _test_data(16)
    model = pretrained("cnn16", seed)
    before = snapshot(model)
    accs = {"fp32": (fp32 := _accuracy(model, digits.test))}
    for label, cfg in [(k, c) for k, c in (("W8A8", QuantConfig()), ("W4A8", W4A8_CONFIG)) if k in labels]:
        q = call(fn, model, batches, cfg, what="ptq")
        expect(isinstance(q, nn.Module), f"{what}: ptq should return a model, got {type(q).__name__}")
        expect(not changed_entries(model, before), f"{what}: ptq changed the float model; work on copies")
        fqs = fake_quantizers(q)
        expect(fqs and all(isinstance(f, FakeQuantize) and not f.observe and f.quantize for f in fqs.values()),
               f"{what} {label}: the returned model should have frozen fake quantizers "
               "(swap_modules, calibrate, then convert)")
        expect(not any(isinstance(m, ref_fold.BATCHNORMS) for m in q.modules()),
               f"{what} {label}: BatchNorms left in the quantized model: fold them first")
        bits = {f.bits for n, f in fqs.items() if n.endswith("weight_fq")}
        expect(bits == {cfg.weight_bits}, f"{what} {label}: weights quantized at {sorted(bits)} bits, "
                                          f"expected {cfg.weight_bits}: use the config you are given")
        accs[label] = _accuracy(q, digits.test)
    if "W8A8" in accs and accs["W8A8"] < fp32 - W8A8_MAX_DROP:
        ref = _accuracy(ref_ptq.quantize_static(model, batches, QuantConfig()), digits.test)
        raise CheckFailed(f"{what}: W8A8 accuracy {accs['W8A8']:.2f}% is more than {W8A8_MAX_DROP} point below "
                          f"fp32 ({fp32:.2f}%); qlib.ptq.quantize_static reaches {ref:.2f}%")
    if "W4A8" in accs and accs["W4A8"] < W4A8_MIN_ACC:
        ref = _accuracy(ref_ptq.quantize_static(model, batches, W4A8_CONFIG), digits.test)
        raise CheckFailed(f"{what}: W4A8 (MSE weight scales) accuracy {accs['W4A8']:.2f}% < {W4A8_MIN_ACC}%; "
                          f"qlib.ptq.quantize_static reaches {ref:.2f}%")
    return accs


def ptq(fn) -> None:
    """Q5 visible: cnn16 seed 0: W8A8 within 1 point of fp32, W4A8 (MSE weights) >= 95%."""
    def body():
        accs = _check_pipeline(fn, 0, "ptq(cnn16 seed 0)")
        print("      " + ", ".join(f"{k} {v:.2f}%" for k, v in accs.items()))
    run(f"ptq: W8A8 within {W8A8_MAX_DROP} point of fp32, W4A8 >= {W4A8_MIN_ACC}%", body)


def ptq_hidden(fn) -> None:
    """Q5 hidden: the targets on seed 1, W4A8 on seed 2, and agreement with qlib at W8A8 (seed 2,
    percentile activations)."""
    def body():
        digits, batches = _test_data(16)
        _check_pipeline(fn, 1, "ptq(cnn16 seed 1)")
        _check_pipeline(fn, 2, "ptq(cnn16 seed 2)", labels=("W4A8",))
        model = pretrained("cnn16", 2)
        q = call(fn, model, batches, dataclasses.replace(QuantConfig(), act_observer="percentile"), what="ptq")
        ref = ref_ptq.quantize_static(model, batches, QuantConfig(act_observer="percentile"))
        with torch.no_grad():
            x = digits.test.tensors[0]
            agree = (q(x).argmax(1) == ref(x).argmax(1)).float().mean().item()
        if agree < 0.98:
            raise CheckFailed(f"ptq(cnn16 seed 2, percentile activations): predictions agree with "
                              f"qlib.ptq.quantize_static on only {100 * agree:.1f}% of test digits (want >= 98%)")
    run("ptq: other seeds and observers", body)
