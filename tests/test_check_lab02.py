"""qlib.check.lab02: reference answers pass; typical wrong answers fail with a useful message.

Reference: qlib.observers.percentile_range / mse_range (the pure functions behind qlib's
percentile and MSE observers), qlib.qparams.choose_qparams + qlib.quantize.fake_quantize, and a
forward pre-hook for the activations (the check's own reference functions wrap these).
"""

from __future__ import annotations

import pytest
import torch

from qlib import check
from qlib.check import lab02
from qlib.check.core import layer_activations
from qlib.data import calibration_batches, load_digits
from qlib.fold import fold_batchnorm
from qlib.models import pretrained
from qlib.qparams import choose_qparams, quant_range
from qlib.quantize import fake_quantize


# ------------------------------------------------------------------ reference answers
def percentile_range(x, p):
    flat = x.detach().flatten().float()
    return torch.quantile(flat, 1 - p / 100).item(), torch.quantile(flat, p / 100).item()


def quant_mse(x, lo, hi, bits):
    qmin, qmax = quant_range(bits, signed=False)
    scale, zp = choose_qparams(torch.tensor(float(lo)), torch.tensor(float(hi)), qmin, qmax)
    return (fake_quantize(x.float(), scale, zp, qmin, qmax) - x).pow(2).mean().item()


def mse_clip_range(x, bits, grid=100):
    lo, hi = x.min().item(), x.max().item()
    errs = [(quant_mse(x, k / grid * lo, k / grid * hi, bits), k) for k in range(1, grid + 1)]
    k = min(errs)[1]
    return k / grid * lo, k / grid * hi


def compare_ranges(x, bits):
    out = {"minmax": (x.min().item(), x.max().item()), "percentile": percentile_range(x, 99.99),
           "mse": mse_clip_range(x, bits)}
    return {k: (lo, hi, quant_mse(x, lo, hi, bits)) for k, (lo, hi) in out.items()}


@pytest.fixture(scope="module")
def acts():
    model = fold_batchnorm(pretrained("cnn16", 0))
    return lab02.reference_layer_inputs(model, "7", calibration_batches(load_digits(16).train, 64, 64, seed=0))


def test_reference_answers_pass_every_check(capsys, acts):
    lab02.percentile_range(percentile_range)
    lab02.percentile_range_hidden(percentile_range)
    lab02.quant_mse(quant_mse)
    lab02.quant_mse_hidden(quant_mse)
    lab02.mse_clip_range(mse_clip_range)
    lab02.mse_clip_range_hidden(mse_clip_range)
    lab02.layer_inputs(lab02.reference_layer_inputs)
    lab02.layer_inputs_hidden(lab02.reference_layer_inputs)
    lab02.compare_ranges(compare_ranges, acts)
    lab02.compare_ranges_hidden(compare_ranges)
    assert capsys.readouterr().out.count("PASS") == 10


def test_qlib_reference_functions_agree_with_the_written_answers():
    x = torch.randn(3000) / (torch.rand(3000) + 0.05)
    assert lab02.reference_percentile_range(x, 99.9) == pytest.approx(percentile_range(x, 99.9), rel=1e-5)
    lo, hi = lab02.reference_mse_clip_range(x, 4)
    assert quant_mse(x, lo, hi, 4) <= quant_mse(x, *mse_clip_range(x, 4), 4) * (1 + 1e-6)
    assert quant_mse(x, lo, hi, 4) <= quant_mse(x, x.min().item(), x.max().item(), 4)


# ------------------------------------------------------------------ wrong answers
def test_percentile_swapped_and_nearest_rank_are_explained():
    with pytest.raises(AssertionError, match="swapped"):
        lab02.percentile_range(lambda x, p: percentile_range(x, p)[::-1])

    def nearest(x, p):
        s = x.flatten().sort().values
        return tuple(s[round(q * (s.numel() - 1))].item() for q in (1 - p / 100, p / 100))
    with pytest.raises(AssertionError, match="interpolate"):
        lab02.percentile_range(nearest)
    with pytest.raises(AssertionError, match=r"expected a pair \(lo, hi\)"):
        lab02.percentile_range(lambda x, p: percentile_range(x, p)[1])


def test_percentile_as_quantile_raises_readably():
    with pytest.raises(check.CheckFailed, match="raised RuntimeError"):
        lab02.percentile_range(lambda x, p: (torch.quantile(x.float().flatten(), 1 - p).item(),
                                             torch.quantile(x.float().flatten(), p).item()))


def test_quant_mse_without_clamp_or_symmetric_gets_a_hint():
    def no_clamp(x, lo, hi, bits):
        qmin, qmax = quant_range(bits, signed=False)
        scale, zp = choose_qparams(torch.tensor(float(lo)), torch.tensor(float(hi)), qmin, qmax)
        return ((torch.round(x * (1.0 / scale)) * scale) - x).pow(2).mean().item()

    def symmetric(x, lo, hi, bits):
        qmin, qmax = quant_range(bits, signed=True)
        scale, zp = choose_qparams(torch.tensor(float(lo)), torch.tensor(float(hi)), qmin, qmax, symmetric=True)
        return (fake_quantize(x, scale, zp, qmin, qmax) - x).pow(2).mean().item()
    with pytest.raises(AssertionError, match="not clamped"):
        lab02.quant_mse(no_clamp)
    with pytest.raises(AssertionError, match="symmetric quantization"):
        lab02.quant_mse_hidden(symmetric)
    with pytest.raises(AssertionError, match="root of the MSE"):
        lab02.quant_mse(lambda x, lo, hi, b: quant_mse(x, lo, hi, b) ** 0.5)


def test_mse_search_mistakes_fail():
    with pytest.raises(AssertionError, match="has MSE"):  # returns min-max: a candidate, but not the best
        lab02.mse_clip_range(lambda x, bits, grid=100: (x.min().item(), x.max().item()))
    with pytest.raises(AssertionError, match="not one of the candidate ranges"):  # symmetric range
        lab02.mse_clip_range(lambda x, bits, grid=100: (-x.abs().max().item(), x.abs().max().item()))

    def coarse(x, bits, grid=100):  # searches only a = 0.1, 0.2, ..., 1
        return mse_clip_range(x, bits, 10)
    with pytest.raises(AssertionError, match="try every a"):
        lab02.mse_clip_range_hidden(coarse)


def test_layer_inputs_mistakes_fail():
    def outputs(model, name, batches):
        seen = []
        h = model.get_submodule(name).register_forward_hook(lambda m, a, out: seen.append(out))
        with torch.no_grad():
            for x in batches:
                model(x)
        h.remove()
        return torch.cat(seen)

    def keeps_hook(model, name, batches):
        seen = []
        model.get_submodule(name).register_forward_pre_hook(lambda m, a: seen.append(a[0]))
        with torch.no_grad():
            for x in batches:
                model(x)
        return torch.cat(seen)

    def train_mode(model, name, batches):
        model.train()
        return outputs(model, name, batches)
    with pytest.raises(AssertionError, match="layer's output"):
        lab02.layer_inputs(outputs)
    with pytest.raises(AssertionError, match="remove your hook"):
        lab02.layer_inputs(keeps_hook)
    with pytest.raises(AssertionError, match="eval mode"):
        lab02.layer_inputs_hidden(train_mode)


def test_compare_ranges_mistakes_fail(acts):
    def wrong_percentile(x, bits):
        out = compare_ranges(x, bits)
        lo, hi = percentile_range(x, 99.9)
        out["percentile"] = (lo, hi, quant_mse(x, lo, hi, bits))
        return out

    def no_search(x, bits):
        out = compare_ranges(x, bits)
        out["mse"] = out["minmax"]
        return out
    with pytest.raises(AssertionError, match="99.99"):
        lab02.compare_ranges(wrong_percentile, acts)
    with pytest.raises(AssertionError, match="search"):
        lab02.compare_ranges(no_search, acts)
    with pytest.raises(AssertionError, match="expected a dict with keys"):
        lab02.compare_ranges(lambda x, bits: list(compare_ranges(x, bits).values()), acts)


def test_unimplemented_says_so():
    with pytest.raises(check.CheckFailed, match="not implemented yet"):
        lab02.mse_clip_range(check.not_implemented)


# ------------------------------------------------------------------ visible-only answers
def test_visible_layer_inputs_catches_a_model_left_in_train_mode():
    """The lab states "in eval mode": an answer that forgets it is right on the folded cnn16
    (no BatchNorm left) and must still fail the visible check (the mlp comes in train mode)."""
    def no_eval(model, layer_name, batches):  # right in every way but the mode
        return layer_activations(model, layer_name, batches)  # runs the model in its current mode
    with pytest.raises(AssertionError, match=r"layer_inputs\(mlp with BatchNorm1d, passed in train mode.*eval mode"):
        lab02.layer_inputs(no_eval)


def test_the_written_answers_model_numbers_hold():
    """Q6's model answer quotes the measurement cell (layer 7 of the folded cnn16, 128 digits):
    the MSE search wins at 4 bits by about 2x, widens at 8 bits, and the 99.99th percentile is
    worse than min-max at 8 bits."""
    model = fold_batchnorm(pretrained("cnn16", 0))
    x = lab02.reference_layer_inputs(model, "7", calibration_batches(load_digits(16).train, 128, 64, seed=0))
    r4, r8 = lab02.reference_compare_ranges(x, 4), lab02.reference_compare_ranges(x, 8)
    assert r4["mse"][2] < r4["percentile"][2] < r4["minmax"][2]
    assert 2.0 < r4["minmax"][2] / r4["mse"][2] < 2.5
    assert r8["mse"][1] > r4["mse"][1] and r8["mse"][2] <= r8["minmax"][2]
    assert r8["percentile"][2] > r8["minmax"][2]
    assert round(r4["minmax"][1], 2) == 4.73 and round(r4["mse"][1], 2) == 2.88 and round(r8["mse"][1], 2) == 4.49
