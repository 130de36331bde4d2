"""Bad-input probe of the numerics core: qlib.qparams, qlib.quantize, qlib.observers, qlib.entropy.

Reference: the design's error rule ("every public function rejects bad input with a clear
ValueError or TypeError that says what was expected"). Each case calls one public function
with one bad argument (bits out of range or a bool, NaN/inf or empty tensors, integer tensors
where floats are expected, scales of the wrong shape, bad axes, ...) and checks the exception
type, words of its message, and that qlib raised it itself (not an error from inside torch).
"""

import math
from pathlib import Path

import pytest
import torch

from qlib import entropy, observers, qparams, quantize as qz
from qlib.qparams import PerChannel, PerGroup, PerTensor

X = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
NAN = torch.tensor([1.0, float("nan")])
INF = torch.tensor([1.0, float("inf")])
EMPTY = torch.zeros(0)
INTS = torch.arange(6)
S, Z = torch.ones(6) * 0.1, torch.zeros(6, dtype=torch.int64)
NAMES = ["minmax", "moving_average", "percentile", "mse", "entropy"]
QLIB = str(Path(qparams.__file__).parent)


def observed(name, x, **kw):
    obs = observers.make_observer(name, **kw)
    obs(x)
    return obs


CASES = {
    # ---------------------------------------------------------------- bits and ranges
    "quant_range bits=1": (lambda: qparams.quant_range(1), ValueError, r"bits must be in \[2, 16\]"),
    "quant_range bits=17": (lambda: qparams.quant_range(17), ValueError, r"bits must be in \[2, 16\]"),
    "quant_range bits=-4": (lambda: qparams.quant_range(-4), ValueError, r"bits must be in \[2, 16\]"),
    "quant_range bits=True": (lambda: qparams.quant_range(True), TypeError, "bits must be an int"),
    "quant_range bits=8.0": (lambda: qparams.quant_range(8.0), TypeError, "bits must be an int"),
    "quant_range signed='yes'": (lambda: qparams.quant_range(8, "yes"), TypeError, "signed and narrow must be True or False"),
    "check_bits bits=False": (lambda: qparams.check_bits(False), TypeError, "bits must be an int"),
    "check_bits bits=32": (lambda: qparams.check_bits(32), ValueError, r"bits must be in \[2, 16\]"),
    "qparams_for bits=1": (lambda: qparams.qparams_for(X, bits=1), ValueError, r"bits must be in \[2, 16\]"),
    "qparams_for bits=True": (lambda: qparams.qparams_for(X, bits=True), TypeError, "bits must be an int"),
    "qparams_for signed=1": (lambda: qparams.qparams_for(X, signed=1), TypeError, "signed must be True, False or None"),
    "check_quant_range reversed": (lambda: qparams.check_quant_range(5, 5), ValueError, "quant_min must be < quant_max"),
    "check_quant_range float": (lambda: qparams.check_quant_range(0.0, 255), TypeError, "quant_min must be an int"),
    "check_quant_range bool": (lambda: qparams.check_quant_range(False, 255), TypeError, "quant_min must be an int"),
    "check_quant_range beyond int32": (lambda: qparams.check_quant_range(0, 2**32), ValueError, "does not fit in int32"),
    "code_dtype reversed": (lambda: qz.code_dtype(7, -8), ValueError, "quant_min must be < quant_max"),
    "choose_qparams range without 0": (lambda: qparams.choose_qparams(-1.0, 1.0, 1, 255), ValueError, "must contain 0"),
    "choose_qparams eps=0": (lambda: qparams.choose_qparams(-1.0, 1.0, 0, 255, eps=0.0), ValueError, "eps must be > 0"),
    "choose_qparams eps=nan": (lambda: qparams.choose_qparams(-1.0, 1.0, 0, 255, eps=math.nan), ValueError, "eps must be > 0"),
    "choose_qparams symmetric='yes'": (lambda: qparams.choose_qparams(-1.0, 1.0, 0, 255, symmetric="yes"),
                                       TypeError, "symmetric must be True or False"),
    "symmetric_qmax quant_max=0": (lambda: qparams.choose_qparams_symmetric_qmax(-1.0, 1.0, 0), ValueError,
                                   "quant_max must be >= 1"),
    "symmetric_qmax quant_max=127.0": (lambda: qparams.choose_qparams_symmetric_qmax(-1.0, 1.0, 127.0), TypeError,
                                       "quant_max must be an int"),
    # ---------------------------------------------------------------- NaN / inf
    "minmax NaN": (lambda: qparams.minmax(NAN), ValueError, "NaN or infinite"),
    "qparams_for inf": (lambda: qparams.qparams_for(INF), ValueError, "NaN or infinite"),
    "minmax_qparams NaN": (lambda: qparams.minmax_qparams(NAN, 0, 255), ValueError, "NaN or infinite"),
    "choose_qparams NaN min": (lambda: qparams.choose_qparams(torch.tensor(math.nan), 1.0, 0, 255), ValueError,
                               "min_val contains NaN or infinite"),
    "choose_qparams inf max": (lambda: qparams.choose_qparams(-1.0, math.inf, 0, 255), ValueError,
                               "max_val contains NaN or infinite"),
    "symmetric_qmax NaN": (lambda: qparams.choose_qparams_symmetric_qmax(math.nan, 1.0, 127), ValueError, "NaN or infinite"),
    "quantize NaN": (lambda: qz.quantize(NAN, 0.1, 0, -128, 127), ValueError, "NaN or infinite"),
    "fake_quantize inf": (lambda: qz.fake_quantize(INF, 0.1, 0, -128, 127), ValueError, "NaN or infinite"),
    "round_half_away NaN": (lambda: qz.quantize_round_half_away(NAN, 0.1, 0, -128, 127), ValueError, "NaN or infinite"),
    "quantize NaN scale": (lambda: qz.quantize(X, math.nan, 0, -128, 127), ValueError, "scale must be finite and > 0"),
    "dequantize inf scale": (lambda: qz.dequantize(INTS, math.inf, 0), ValueError, "scale must be finite and > 0"),
    "percentile_range NaN": (lambda: observers.percentile_range(NAN[None], 99.0), ValueError, "NaN or infinite"),
    "mse_range inf": (lambda: observers.mse_range(INF[None], 0, 255), ValueError, "NaN or infinite"),
    "kl_threshold_bins NaN": (lambda: entropy.kl_threshold_bins(NAN, 2), ValueError, "no NaN or infinite"),
    # ---------------------------------------------------------------- empty
    "minmax empty": (lambda: qparams.minmax(EMPTY), ValueError, "empty"),
    "qparams_for empty": (lambda: qparams.qparams_for(torch.zeros(3, 0)), ValueError, "empty"),
    "choose_qparams empty": (lambda: qparams.choose_qparams(EMPTY, EMPTY, 0, 255), ValueError, "empty"),
    "quantize empty": (lambda: qz.quantize(EMPTY, 0.1, 0, -128, 127), ValueError, "empty"),
    "fake_quantize empty": (lambda: qz.fake_quantize(EMPTY, 0.1, 0, -128, 127), ValueError, "empty"),
    "dequantize empty": (lambda: qz.dequantize(EMPTY.to(torch.int8), 0.1, 0), ValueError, "empty"),
    "round_half_away empty": (lambda: qz.quantize_round_half_away(EMPTY, 0.1, 0, -8, 7), ValueError, "empty"),
    "quantize empty scale": (lambda: qz.quantize(X, torch.zeros(0), 0, -8, 7), ValueError, "must hold 1 value"),
    "percentile_range empty": (lambda: observers.percentile_range(torch.zeros(1, 0), 99.0), ValueError, "empty"),
    "mse_range empty": (lambda: observers.mse_range(torch.zeros(2, 0), 0, 255), ValueError, "empty"),
    "kl_threshold_bins empty": (lambda: entropy.kl_threshold_bins(EMPTY, 2), ValueError, "non-empty 1-D"),
    "reservoir capacity 0": (lambda: observers.reservoir_update(torch.zeros(1, 0), 0, X[:1], 0), ValueError,
                             "capacity must be a positive int"),
    # ---------------------------------------------------------------- dtypes
    "minmax int tensor": (lambda: qparams.minmax(INTS), TypeError, "floating-point"),
    "qparams_for bool tensor": (lambda: qparams.qparams_for(INTS > 2), TypeError, "floating-point"),
    "choose_qparams int min": (lambda: qparams.choose_qparams(torch.tensor(-1), torch.tensor(1.0), 0, 255),
                               TypeError, "min_val must be a floating-point"),
    "choose_qparams string": (lambda: qparams.choose_qparams("-1", 1.0, 0, 255), TypeError,
                              "min_val must be a torch.Tensor"),
    "quantize int x": (lambda: qz.quantize(INTS, 0.1, 0, -128, 127), TypeError, "floating-point"),
    "quantize list x": (lambda: qz.quantize([1.0], 0.1, 0, -128, 127), TypeError, "must be a torch.Tensor"),
    "fake_quantize complex x": (lambda: qz.fake_quantize(torch.ones(2, dtype=torch.complex64), 0.1, 0, -8, 7),
                                TypeError, "floating-point"),
    "round_half_away int x": (lambda: qz.quantize_round_half_away(INTS, 0.1, 0, -8, 7), TypeError, "floating-point"),
    "quantize int scale tensor": (lambda: qz.quantize(X, torch.tensor(1), 0, -8, 7), TypeError,
                                  "scale must be a floating-point tensor"),
    "quantize bool scale": (lambda: qz.quantize(X, True, 0, -8, 7), TypeError, "scale must be a float"),
    "quantize string scale": (lambda: qz.quantize(X, "0.1", 0, -8, 7), TypeError, "scale must be a float"),
    "quantize float zero_point": (lambda: qz.quantize(X, 0.1, 0.5, -8, 7), TypeError, "zero_point must be an integer"),
    "quantize float zero_point tensor": (lambda: qz.quantize(X, 0.1, torch.tensor(0.0), -8, 7), TypeError,
                                         "zero_point must be an integer tensor"),
    "quantize bool zero_point": (lambda: qz.quantize(X, 0.1, False, -8, 7), TypeError, "zero_point must be an integer"),
    "quantize float dtype": (lambda: qz.quantize(X, 0.1, 0, -8, 7, dtype=torch.float16), TypeError, "integer torch.dtype"),
    "quantize narrow dtype": (lambda: qz.quantize(X, 0.1, 0, 0, 255, dtype=torch.int8), ValueError, "cannot hold codes"),
    "round_half_away float dtype": (lambda: qz.quantize_round_half_away(X, 0.1, 0, -8, 7, dtype=torch.float32),
                                    TypeError, "integer torch.dtype"),
    "dequantize float codes": (lambda: qz.dequantize(X, 0.1, 0), TypeError, "x_q must hold integer codes"),
    "dequantize bool codes": (lambda: qz.dequantize(INTS > 2, 0.1, 0), TypeError, "x_q must hold integer codes"),
    "percentile_range int rows": (lambda: observers.percentile_range(INTS[None], 99.0), TypeError, "floating-point"),
    "percentile_range 1-D rows": (lambda: observers.percentile_range(X[0], 99.0), ValueError, "must be 2-D"),
    "mse_range int rows": (lambda: observers.mse_range(INTS[None], 0, 255), TypeError, "floating-point"),
    "kl_threshold_bins bool hist": (lambda: entropy.kl_threshold_bins(INTS > 2, 2), TypeError, "real counts"),
    "kl_threshold_bins negative": (lambda: entropy.kl_threshold_bins(torch.tensor([1.0, -1.0]), 2), ValueError,
                                   "non-negative counts"),
    "reservoir 1-D new": (lambda: observers.reservoir_update(torch.zeros(1, 0), 0, X[0], 4), ValueError,
                          "must be a 2-D tensor"),
    # ---------------------------------------------------------------- scale shapes
    "quantize 6 scales per-tensor": (lambda: qz.quantize(X, S, 0, -8, 7), ValueError, "axis=None means per-tensor"),
    "quantize per-channel wrong length": (lambda: qz.quantize(X, S[:4], Z[:4], -8, 7, axis=1), ValueError,
                                          r"length x.shape\[1\] = 6"),
    "quantize per-channel 2-D scale": (lambda: qz.quantize(X, S.reshape(1, 6), Z, -8, 7, axis=1), ValueError,
                                       "must be 1-D"),
    "quantize zero_point shape": (lambda: qz.quantize(X, S, Z[:3], -8, 7, axis=1), ValueError,
                                  "per-channel zero_point must be 1-D of length"),
    "fake_quantize per-group shape": (lambda: qz.fake_quantize(X, torch.ones(4, 3), torch.zeros(4, 3, dtype=torch.int64),
                                                               -8, 7, granularity=PerGroup(3)),
                                      ValueError, r"per-group scale must have shape \(4, 2\)"),
    "dequantize per-tensor 2 scales": (lambda: qz.dequantize(INTS, torch.ones(2), 0), ValueError,
                                       "must hold 1 value"),
    "choose_qparams shapes differ": (lambda: qparams.choose_qparams(torch.zeros(3), torch.ones(2), 0, 255), ValueError,
                                     "differ in shape"),
    "choose_qparams min > max": (lambda: qparams.choose_qparams(1.0, -1.0, 0, 255), ValueError, "min_val must be <= max_val"),
    "rows_to_qparams length": (lambda: qparams.rows_to_qparams(torch.ones(5), (4, 6), PerChannel(0)), ValueError,
                               "expected a tensor of 4 values"),
    "mse_range lo shape": (lambda: observers.mse_range(X, 0, 255, lo=torch.zeros(2), hi=torch.ones(2)), ValueError,
                           r"lo must have shape \(R,\)"),
    "reservoir rows differ": (lambda: observers.reservoir_update(torch.zeros(2, 0), 0, X, 4), ValueError,
                              "must have the rows of new"),
    "zero_point out of range": (lambda: qz.fake_quantize(X, 0.1, 300, 0, 255), ValueError, "zero_point must lie in"),
    # ---------------------------------------------------------------- axes and granularity
    "quantize axis=2": (lambda: qz.quantize(X, S, Z, -8, 7, axis=2), ValueError, "axis 2 is out of range"),
    "quantize axis=-3": (lambda: qz.quantize(X, S, Z, -8, 7, axis=-3), ValueError, "axis -3 is out of range"),
    "quantize axis=1.0": (lambda: qz.quantize(X, S, Z, -8, 7, axis=1.0), TypeError, "axis must be an int"),
    "fake_quantize axis=True": (lambda: qz.fake_quantize(X, S, Z, -8, 7, axis=True), TypeError, "axis must be an int"),
    "dequantize axis=5": (lambda: qz.dequantize(INTS.reshape(1, 6), S, Z, axis=5), ValueError, "axis 5 is out of range"),
    "group_size 0": (lambda: qz.fake_quantize(X, S, Z, -8, 7, group_size=0), ValueError, "group_size must be a positive int"),
    "group_size not dividing": (lambda: qz.fake_quantize_per_group(X, S, Z, -8, 7, 4), ValueError, "not divisible"),
    "granularity and axis": (lambda: qz.quantize(X, S, Z, -8, 7, axis=1, granularity=PerChannel(1)), ValueError,
                             "either granularity= or axis="),
    "granularity string": (lambda: qz.dequantize(INTS, 0.1, 0, granularity="per_tensor"), TypeError,
                           "granularity must be PerTensor"),
    "PerChannel axis string": (lambda: PerChannel("0"), TypeError, "PerChannel axis must be an int"),
    "PerGroup group_size 0": (lambda: PerGroup(0), ValueError, "group_size must be a positive int"),
    "PerGroup axis float": (lambda: PerGroup(4, 1.0), TypeError, "PerGroup axis must be an int"),
    "qparams_for PerChannel(2)": (lambda: qparams.qparams_for(X, granularity=PerChannel(2)), ValueError,
                                  "axis 2 is out of range"),
    "qparams_for granularity string": (lambda: qparams.qparams_for(X, granularity="per_channel"), TypeError,
                                       "granularity must be"),
    "to_rows PerChannel on 0-d": (lambda: qparams.to_rows(torch.tensor(1.0), PerChannel(0)), ValueError,
                                  "axis 0 is out of range for a tensor with 0 dims"),
    "to_rows list": (lambda: qparams.to_rows([1.0], PerTensor()), TypeError, "x must be a torch.Tensor"),
    "qparams_shape not divisible": (lambda: qparams.qparams_shape((4, 6), PerGroup(4)), ValueError, "not divisible"),
    "check_tensor list": (lambda: qparams.check_tensor([1.0]), TypeError, "must be a torch.Tensor"),
    "check_granularity None": (lambda: qparams.check_granularity(None), TypeError, "granularity must be"),
    # ---------------------------------------------------------------- observer arguments
    "make_observer unknown": (lambda: observers.make_observer("histogram"), ValueError, "unknown observer 'histogram'"),
    "make_observer not a string": (lambda: observers.make_observer(3), ValueError, "unknown observer 3"),
    "percentile_range 150": (lambda: observers.percentile_range(X, 150), ValueError, r"percentile must be in \(50, 100\]"),
    "percentile_range 30": (lambda: observers.percentile_range(X, 30), ValueError, r"percentile must be in \(50, 100\]"),
    "percentile_range string": (lambda: observers.percentile_range(X, "99"), TypeError, "percentile must be a number"),
    "mse_range grid=0": (lambda: observers.mse_range(X, 0, 255, grid=0), ValueError, "grid must be a positive int"),
    "mse_range grid=True": (lambda: observers.mse_range(X, 0, 255, grid=True), TypeError, "grid must be an int"),
    "mse_range bad range": (lambda: observers.mse_range(X, 255, 0), ValueError, "quant_min must be < quant_max"),
    "PercentileObserver 30": (lambda: observers.PercentileObserver(percentile=30), ValueError, "percentile must be in"),
    "MSEObserver grid=0": (lambda: observers.MSEObserver(grid=0), ValueError, "grid must be a positive int"),
    "MSEObserver max_samples=1.5": (lambda: observers.MSEObserver(max_samples=1.5), TypeError, "max_samples must be an int"),
    "MovingAverage constant=0": (lambda: observers.MovingAverageMinMaxObserver(averaging_constant=0.0), ValueError,
                                 r"averaging_constant must be in \(0, 1\]"),
    "MovingAverage constant=True": (lambda: observers.MovingAverageMinMaxObserver(averaging_constant=True), TypeError,
                                    "averaging_constant must be a number"),
    "EntropyObserver bins=4": (lambda: entropy.EntropyObserver(bins=4), ValueError, "bins must be an int >= 8"),
    "EntropyObserver bins=64.0": (lambda: entropy.EntropyObserver(bins=64.0), TypeError, "bins must be an int"),
    "EntropyObserver bits=17": (lambda: entropy.EntropyObserver(bits=17), ValueError, r"bits must be in \[2, 16\]"),
    "kl_threshold_bins num_levels=0": (lambda: entropy.kl_threshold_bins(torch.ones(8), 0), ValueError,
                                       "num_levels must be a positive int"),
    "kl_threshold_bins 2-D": (lambda: entropy.kl_threshold_bins(torch.ones(2, 8), 4), ValueError, "non-empty 1-D"),
}
for _name in NAMES:
    CASES |= {
        f"{_name} bits=1": (lambda n=_name: observers.make_observer(n, bits=1), ValueError, r"bits must be in \[2, 16\]"),
        f"{_name} bits=False": (lambda n=_name: observers.make_observer(n, bits=False), TypeError, "bits must be an int"),
        f"{_name} signed='no'": (lambda n=_name: observers.make_observer(n, signed="no"), TypeError,
                                 "signed must be True, False or None"),
        f"{_name} granularity string": (lambda n=_name: observers.make_observer(n, granularity="per_tensor"), TypeError,
                                        "granularity must be"),
        f"{_name} NaN batch": (lambda n=_name: observed(n, NAN), ValueError, "NaN or infinite"),
        f"{_name} empty batch": (lambda n=_name: observed(n, EMPTY), ValueError, "empty"),
        f"{_name} int batch": (lambda n=_name: observed(n, INTS), TypeError, "floating-point"),
        f"{_name} PerChannel(3) on 2-D": (lambda n=_name: observed(n, X, granularity=PerChannel(3)), ValueError,
                                          "axis 3 is out of range"),
        f"{_name} PerGroup(4) on 6 columns": (lambda n=_name: observed(n, X, granularity=PerGroup(4)), ValueError,
                                              "not divisible by group_size"),
        f"{_name} shape change": (lambda n=_name: observed(n, X, granularity=PerChannel(0))(torch.ones(5, 6)), ValueError,
                                  "one observer per tensor"),
        f"{_name} no data": (lambda n=_name: observers.make_observer(n).calculate_qparams(), ValueError,
                             "observer has seen no data"),
    }


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_rejected_by_qlib_with_a_clear_message(case):
    fn, error, words = CASES[case]
    with pytest.raises(error, match=words) as info:
        fn()
    assert info.type is error  # exactly the promised type, not a subclass from elsewhere
    raiser = str(info.traceback[-1].path)
    assert raiser.startswith(QLIB), f"raised from {raiser}, not by qlib"


def test_the_probe_covers_every_public_function():
    covered = " ".join(CASES)
    public = set(qparams.__all__) | set(qz.__all__) | set(observers.__all__) | set(entropy.__all__)
    not_probed = {"PerTensor", "PerAxis", "FakeQuantizeSTE", "ObserverBase", "MinMaxObserver", "resolve_signed"}
    names = {n: n for n in public - not_probed}
    names |= {"choose_qparams_symmetric_qmax": "symmetric_qmax", "quantize_round_half_away": "round_half_away",
              "fake_quantize_per_group": "group_size not dividing", "MovingAverageMinMaxObserver": "MovingAverage",
              "make_observer": "make_observer", "reservoir_update": "reservoir"}
    missing = [n for n, key in names.items() if key not in covered]
    assert not missing, f"no bad-input case for {missing}"
