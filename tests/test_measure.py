"""qlib.measure: bytes at a bit width and latency.

Reference: the packed-size formula ceil(numel * bits / 8) and torch.save's real file size.
"""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

import qlib
from qlib import measure, models


def test_tensor_bytes():
    assert measure.tensor_bytes(1000, 32) == 4000
    assert measure.tensor_bytes(3, 4) == 2
    assert measure.tensor_bytes(0, 8) == 0
    with pytest.raises(ValueError, match="bits"):
        measure.tensor_bytes(10, 0)


@pytest.mark.parametrize("bits", [1, 16, 32, 64])
def test_sizes_take_storage_widths_beyond_the_code_widths(bits):
    # reference: a storage width is any 1..64 bits per number (float32 is 32); qparams.check_bits
    # (code widths, 2..16) would reject 1, 32 and 64
    assert measure.tensor_bytes(8, bits) == bits
    assert measure.check_storage_bits(bits) == bits


@pytest.mark.parametrize("bits", [0, 65, 8.0, True])
def test_storage_width_errors_say_what_is_expected(bits):
    with pytest.raises(ValueError, match="storage width .* between 1 and 64"):
        measure.tensor_bytes(8, bits)


def test_model_size_matches_parameters_and_state_dict():
    model = models.create("cnn8")
    n = models.count_parameters(model)
    assert measure.model_size_bytes(model) == 4 * n
    assert measure.model_size_bytes(model, 8) == n
    # torch.save also stores BN buffers and metadata: bigger than the parameters alone
    assert measure.state_dict_bytes(model) > 4 * n
    with pytest.raises(TypeError):
        measure.model_size_bytes(torch.zeros(3))


def test_latency_is_the_median_of_the_timed_calls_after_warmup():
    """Reference: the median of ``repeats`` timed calls; ``warmup`` calls are not timed.

    The calls sleep for a scripted number of milliseconds: the first (warm-up) call and two
    outliers are slow. The median ignores them; a mean or a timed warm-up would not.
    """
    script = iter([0.3] + [0.002, 0.1, 0.002, 0.002, 0.1, 0.002, 0.002])
    calls = []

    def fn():
        calls.append(1)
        time.sleep(next(script))
    t = measure.latency(fn, repeats=7, warmup=1)
    assert len(calls) == 8
    assert 0.002 <= t < 0.015  # the mean of the timed calls is >= 0.03; a timed warm-up, 0.3


def test_latency_grows_with_the_work():
    """Ten times the matrix products take several times longer (real CPU arithmetic)."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(192, 192, generator=g), torch.randn(192, 192, generator=g)

    def work(n):
        def fn():
            for _ in range(n):
                a @ b
        return fn
    t1 = measure.latency(work(1), repeats=9, warmup=2)
    t10 = measure.latency(work(10), repeats=9, warmup=2)
    assert t10 > 3 * t1


def test_synchronizer_is_a_no_op_without_cuda_work():
    """On the CPU there is nothing to wait for, and no CUDA context may be opened for it."""
    sync = measure.synchronizer(torch.zeros(2), nn.Linear(2, 2), torch.device("cpu"))
    assert sync() is None
    with pytest.raises(TypeError, match="function"):
        measure.latency(3.0)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="repeats"):
            measure.latency(lambda: None, repeats=bad)
    with pytest.raises(ValueError, match="warmup"):
        measure.latency(lambda: None, warmup=-1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_latency_waits_for_the_gpu():
    """Without synchronize a CUDA matmul "takes" the few microseconds of queueing it."""
    a = torch.randn(4096, 4096, device="cuda")
    t_sync = measure.latency(lambda: a @ a, repeats=5, warmup=2, device=a)
    t_small = measure.latency(lambda: a[:64, :64] @ a[:64, :64], repeats=5, warmup=2, device=a)
    assert t_sync > 5 * t_small  # 4096^3 vs 64^3 multiply-adds, measured, not queued


def test_one_meaning_of_latency():
    """``qlib.latency`` is ``qlib.measure.latency`` (a function of no arguments); the engines'
    model timer is ``model_latency``, not a second ``latency`` with another signature."""
    from qlib import engines
    assert qlib.latency is measure.latency
    assert not hasattr(engines, "latency") and callable(engines.model_latency)


def test_side_by_side_interleaves_and_takes_the_median_of_each():
    """Reference: round-robin calls (A, B, A, B, ...) after the warm-up rounds, the median of each.

    Scripted sleeps: A's third call is a 0.2 s outlier (the median ignores it); the call
    order is recorded and must alternate.
    """
    order = []
    a_script = iter([0.0, 0.001, 0.001, 0.2, 0.001, 0.001])  # warm-up first, then 5 timed

    def a():
        order.append("a")
        time.sleep(next(a_script))

    def b():
        order.append("b")
        time.sleep(0.004)
    before = torch.get_num_threads()
    t = measure.side_by_side({"a": a, "b": b}, repeats=5, warmup=1)
    assert order == ["a", "b"] * 6
    assert list(t) == ["a", "b"]
    assert t["a"] < 0.003 < t["b"] < 0.03
    assert torch.get_num_threads() == before  # the thread setting is restored


def test_side_by_side_runs_on_the_threads_asked_and_rejects_bad_input():
    seen = []
    measure.side_by_side({"f": lambda: seen.append(torch.get_num_threads())}, repeats=2, warmup=0)
    assert seen == [1, 1]
    with pytest.raises(TypeError, match="dict"):
        measure.side_by_side([lambda: None])
    with pytest.raises(ValueError, match="threads"):
        measure.side_by_side({"f": lambda: None}, threads=0)
    with pytest.raises(ValueError, match="repeats"):
        measure.side_by_side({"f": lambda: None}, repeats=0)


def test_cast_error():
    w = torch.tensor([1.0, 1.0 + 2 ** -12])
    assert measure.cast_error(w) == pytest.approx(2 ** -12)
    with pytest.raises(TypeError):
        measure.cast_error(torch.tensor([1, 2]))
