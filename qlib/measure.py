"""Measuring what quantization buys: bytes and time.

Size: a model with ``P`` parameters stored at ``b`` bits takes ``P * b / 8`` bytes, plus the
quantization parameters (one float32 scale and one zero point per tensor or channel).
``model_size_bytes(model, bits)`` gives the first term; ``state_dict_bytes`` the real size of
what ``torch.save`` writes. Here ``bits`` is a *storage width* (1 to 64: 32 for float32
weights, 16 for bfloat16, 1 for a binary network), not a code width of a quantizer, whose
rule is ``qlib.qparams.check_bits`` (2 to 16).

Time: ``latency`` runs a function several times after a warm-up and returns the **median**
in seconds, waiting for the GPU (``torch.cuda.synchronize``) when the work is on CUDA. Only
compare latencies measured side by side in one run, as ratios: ``side_by_side`` times several
functions interleaved (A, B, C, A, B, C, ...) so that background load hits them alike.
What is inside the timed function is what gets measured: to time a bfloat16 matmul, cast the
operands *before* (``a16 = a.bfloat16()``) and time ``lambda: a16 @ b16``; a cast inside the
call adds two passes over memory to the product.
"""

from __future__ import annotations

import io
import statistics
import time
from typing import Callable

import torch
from torch import nn


def check_storage_bits(bits, name: str = "bits") -> int:
    """``bits`` as a storage width: an int (not a bool) in ``[1, 64]``, or ValueError.

    A storage width counts the bits one stored number takes (float32: 32, int4: 4, a sign
    bit: 1). It is wider than a quantizer's code width (``qlib.qparams.check_bits``, 2 to 16)
    because sizes are also computed for float models and binary ones.
    """
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 64:
        raise ValueError(f"{name} (a storage width in bits per number) must be an int between 1 and 64, "
                         f"got {bits!r}")
    return bits


def tensor_bytes(numel: int, bits: int) -> int:
    """Bytes to store ``numel`` numbers of ``bits`` bits each (a storage width, 1 to 64), packed:
    ``ceil(numel * bits / 8)``."""
    check_storage_bits(bits)
    if isinstance(numel, bool) or not isinstance(numel, int) or numel < 0:
        raise ValueError(f"numel must be an int >= 0, got {numel!r}")
    return (numel * bits + 7) // 8


def model_size_bytes(model: nn.Module, bits: int = 32) -> int:
    """Bytes of all parameters of ``model`` stored at ``bits`` bits each (a storage width, 1 to
    64: the default 32 is float32), packed, no metadata."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    return tensor_bytes(sum(p.numel() for p in model.parameters()), bits)


def state_dict_bytes(model: nn.Module) -> int:
    """Bytes ``torch.save(model.state_dict())`` writes: the real on-disk size, metadata included."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getbuffer().nbytes


def _cuda_devices(things) -> list[torch.device]:
    devices = []
    for t in things:
        if isinstance(t, nn.Module):
            t = next(iter(list(t.parameters()) + list(t.buffers())), None)
        dev = t.device if isinstance(t, torch.Tensor) else (torch.device(t) if t is not None else None)
        if dev is not None and dev.type == "cuda" and dev not in devices:
            devices.append(dev)
    return devices


def synchronizer(*things) -> Callable[[], None]:
    """A function that waits until the GPU has finished the queued work of ``things``.

    ``things``: tensors, modules or devices. CUDA kernels run *asynchronously*: ``y = f(x)``
    returns as soon as the work is queued, so a timer read right after it measures the
    queueing, not the computation. ``torch.cuda.synchronize(device)`` before starting and
    before stopping the clock makes the time honest. With no CUDA thing it does nothing
    (and never opens a CUDA context). Called with no argument it synchronizes the current
    CUDA device when a CUDA context already exists (then work may be pending).
    """
    devices = _cuda_devices(things)
    if not things and torch.cuda.is_available() and torch.cuda.is_initialized():
        devices = [torch.device("cuda", torch.cuda.current_device())]
    if not devices:
        return lambda: None

    def sync():
        for dev in devices:
            torch.cuda.synchronize(dev)
    return sync


def check_repeats(repeats, warmup) -> None:
    """``ValueError`` unless ``repeats`` is an int >= 1 and ``warmup`` an int >= 0."""
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an int >= 1, got {repeats!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be an int >= 0, got {warmup!r}")


def latency(fn: Callable[[], object], repeats: int = 20, warmup: int = 3, *, device=None) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeats`` timed calls, after ``warmup``
    untimed ones (first calls pay for allocation and caches).

    The median, not the mean: one call slowed down by the operating system does not move
    it. ``device``: where ``fn`` computes (a device, tensor or module); on CUDA the clock
    starts and stops after ``torch.cuda.synchronize`` (see ``synchronizer``). By default it
    synchronizes whenever a CUDA context exists. ``qlib.engines.compare_latency`` times
    several models side by side.
    """
    if not callable(fn):
        raise TypeError(f"fn must be a function of no arguments, got {type(fn).__name__}")
    check_repeats(repeats, warmup)
    sync = synchronizer(device) if device is not None else synchronizer()
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def side_by_side(fns: dict, repeats: int = 10, warmup: int = 1, *, threads: int | None = 1,
                 device=None) -> dict:
    """Median seconds of each function of ``fns`` (``{name: fn}``), timed **interleaved**.

    Round ``r`` calls every function once, in order; ``repeats`` rounds after ``warmup``
    untimed ones. Drift of a shared machine (another job starting, the clock changing) then
    hits every candidate alike, so the *ratios* of the medians are meaningful where absolute
    times are not. ``threads``: run on that many intra-op threads (default 1: a thread that
    waits for a busy core distorts everything; restored afterwards; ``None`` keeps the
    current setting). ``device``: as for ``latency`` (CUDA work is synchronized around each
    call). Returns ``{name: median seconds}`` in the order of ``fns``.
    ``qlib.engines.compare_latency`` does the same for models on one input batch.
    """
    if not isinstance(fns, dict) or not fns or not all(callable(f) for f in fns.values()):
        raise TypeError("fns must be a non-empty dict of name -> function of no arguments")
    check_repeats(repeats, warmup)
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be None or an int >= 1, got {threads!r}")
    sync = synchronizer(device) if device is not None else synchronizer()
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        times: dict = {name: [] for name in fns}
        for _ in range(warmup):
            for f in fns.values():
                f()
        for _ in range(repeats):
            for name, f in fns.items():
                sync()
                start = time.perf_counter()
                f()
                sync()
                times[name].append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(before)
    return {name: statistics.median(t) for name, t in times.items()}


def cast_error(weight: torch.Tensor, dtype: torch.dtype = torch.float16) -> float:
    """Largest absolute error of casting a float32 tensor to ``dtype`` and back."""
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
        raise TypeError(f"expected a floating-point tensor, got {getattr(weight, 'dtype', type(weight).__name__)}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    if weight.numel() == 0:
        raise ValueError("weight is empty: no error to measure")
    if not torch.isfinite(weight).all():
        raise ValueError("weight contains NaN or infinite values")
    return (weight.to(dtype).float() - weight.float()).abs().max().item()
