"""PyTorch's own int8 engine: the production reference next to qlib's teaching code.

qlib simulates quantization in float (fake-quant) and runs integer inference either with
readable int64 tensor code (``intops``, ``backend="reference"``) or through exact int8
matrix products (``qlib.kernels``, about fp32 speed on a CPU). PyTorch ships real int8 CPU kernels
(FBGEMM/oneDNN, the "x86" engine): ``torch_x86_quantize`` runs the same recipe as
``qlib.ptq.quantize_static`` through ``torch.ao.quantization`` FX graph mode::

    prepared  = prepare_fx(model, get_default_qconfig_mapping("x86"), example_inputs)
    prepared(x) for x in calibration batches
    quantized = convert_fx(prepared)        # quint8 activations, qint8 per-channel weights

Differences from qlib's default recipe: x86 activations use ``reduce_range`` (7-bit
codes, 0..127, to avoid an overflow in the AVX2 kernels), its activation observer is a
``HistogramObserver``, and conv-BN-ReLU are fused into one kernel.

``compare_latency`` times models side by side (median of several runs, interleaved) so
that the ratios, not the absolute times, can be trusted; ``model_latency`` is its
one-model case. (``qlib.latency``, from ``qlib.measure``, times any function.) On CUDA the
clock waits for the GPU (``torch.cuda.synchronize``) before starting and stopping.

``torch.ao.quantization`` is deprecated in recent PyTorch (moving to torchao); its
warnings are silenced here, and a PyTorch without it raises a clear RuntimeError.
"""

from __future__ import annotations

import copy
import itertools
import statistics
import time
import warnings

import torch
from torch import nn

from .batching import input_batches
from .measure import check_repeats, synchronizer

__all__ = ["torch_x86_quantize", "compare_latency", "model_latency"]


def torch_x86_quantize(model: nn.Module, calib_data, max_batches: int | None = None,
                       engine: str = "x86") -> nn.Module:
    """Static int8 PTQ with PyTorch's own kernels; returns a quantized ``GraphModule``.

    ``calib_data``: as for ``qlib.ptq.calibrate`` (a tensor, batches, ``(x, y)`` pairs, a
    TensorDataset or a DataLoader; see ``qlib.batching``). Sets
    ``torch.backends.quantized.engine = engine`` (a global setting that the quantized
    kernels read when they run). The x86 engine is a CPU engine: the copy that gets
    quantized is a float32 CPU copy, whatever ``model``'s device and dtype; ``model`` is
    unchanged. Float in, float out.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    if engine not in torch.backends.quantized.supported_engines:
        raise RuntimeError(f"quantized engine {engine!r} is not available in this PyTorch build "
                           f"(available: {torch.backends.quantized.supported_engines})")
    if max_batches is not None and (isinstance(max_batches, bool) or not isinstance(max_batches, int)
                                    or max_batches < 1):
        raise ValueError(f"max_batches must be None or an int >= 1, got {max_batches!r}")
    batches = list(itertools.islice(input_batches(calib_data, device="cpu", dtype=torch.float32,
                                                  finite=True), max_batches))
    if not batches:
        raise ValueError("calibration data is empty: give at least one batch")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*(reduce_range|deprecated).*", category=UserWarning)
        try:
            from torch.ao.quantization import get_default_qconfig_mapping
            from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx
        except ImportError as err:  # pragma: no cover - a future PyTorch without it
            raise RuntimeError("this PyTorch has no torch.ao.quantization FX mode; "
                               "use torchao's pt2e quantization instead") from err
        torch.backends.quantized.engine = engine
        prepared = prepare_fx(copy.deepcopy(model).cpu().float().eval(), get_default_qconfig_mapping(engine),
                              (batches[0],))
        with torch.no_grad():
            for x in batches:
                prepared(x)
        return convert_fx(prepared)


def compare_latency(models: dict[str, nn.Module], x: torch.Tensor, repeats: int = 20,
                    warmup: int = 3) -> dict[str, float]:
    """Median seconds of ``model(x)`` for each model, measured interleaved in one run.

    Round-robin timing (model A, B, C, A, B, C, ...) exposes every model to the same
    background load, so ratios between the medians are meaningful; absolute times are not.
    Runs under ``torch.inference_mode``; when ``x`` or a model is on CUDA, every timed call
    is bracketed by ``torch.cuda.synchronize`` (``qlib.measure.synchronizer``).
    """
    check_repeats(repeats, warmup)
    if not isinstance(models, dict) or not models or not all(callable(m) for m in models.values()):
        raise TypeError("models must be a non-empty dict of name -> module")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a tensor (one input batch), got {type(x).__name__}")
    sync = synchronizer(x, *[m for m in models.values() if isinstance(m, nn.Module)])
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for _ in range(warmup):
            for model in models.values():
                model(x)
        for _ in range(repeats):
            for name, model in models.items():
                sync()
                start = time.perf_counter()
                model(x)
                sync()
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def model_latency(model: nn.Module, x: torch.Tensor, repeats: int = 20, warmup: int = 3) -> float:
    """Median seconds of ``model(x)`` over ``repeats`` runs after ``warmup`` runs (no autograd).

    (Named ``latency`` before; ``qlib.latency`` is ``qlib.measure.latency``, which times any
    function: ``latency(lambda: model(x))`` without ``inference_mode``.)
    """
    return compare_latency({"model": model}, x, repeats, warmup)["model"]
