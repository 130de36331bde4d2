"""Loading Triton: on a GPU it compiles kernels; without one, its interpreter runs them on the CPU.

Triton kernels are Python functions decorated with ``@triton.jit``. On a CUDA GPU the
decorator compiles them to GPU code at their first launch. Triton also has an
**interpreter** (``TRITON_INTERPRET=1``): the same kernel runs on the CPU, each program
instance one after the other, with NumPy arrays for blocks. It is slow (a 100 x 100 x 100
int8 GEMM takes about a second) but exact, which makes it right for teaching and for CI.

When the interpreter is chosen matters. ``TRITON_INTERPRET`` is read when Triton is first
imported (``triton.language`` defines helpers such as ``tl.zeros`` with ``@jit`` at import)
and by every ``@triton.jit`` decoration. So qlib imports Triton lazily, here, and only here:

- ``load_triton()`` returns ``(triton, tl)``. If there is no GPU with an int8 ``tl.dot``
  (no CUDA at all, or an older GPU such as Colab's T4, sm75) and Triton is not imported yet,
  it first sets ``TRITON_INTERPRET=1`` (a documented side effect on ``os.environ``), so the
  course's kernels run everywhere. ``kernel_device()`` says where their tensors go.
- If Triton was already imported without the interpreter on a machine without CUDA (e.g. by
  ``torch.compile``), kernels cannot run: it raises a ``RuntimeError`` that says to restart
  the kernel and call ``load_triton()`` first.
- ``import qlib`` and ``import qlib.kernels`` never import Triton: the CPU integer path
  (``torch._int_mm``) does not need it.

``triton_status()`` says whether Triton kernels can run here and why (for ``choose_backend``).
"""

from __future__ import annotations

import importlib.util
import os
import sys

import torch

MIN_CAPABILITY = (8, 0)
"""Triton's int8 ``tl.dot`` needs int8 tensor cores (Ampere, sm80, and later); a T4 is sm75."""

_set_by_qlib = False
SET_BY_QLIB_ENV = "QLIB_TRITON_INTERPRET"
"""qlib marks the ``TRITON_INTERPRET=1`` it sets with ``QLIB_TRITON_INTERPRET=auto``: a child
process (a notebook kernel, a test worker) inherits both and still knows the user did not ask."""


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpreter_set_by_user() -> bool:
    """True when ``TRITON_INTERPRET=1`` was set outside qlib (then dispatch may pick Triton on the CPU)."""
    return interpreting() and not _set_by_qlib and os.environ.get(SET_BY_QLIB_ENV) != "auto"


def triton_installed() -> bool:
    return "triton" in sys.modules or importlib.util.find_spec("triton") is not None


def load_triton():
    """Import Triton, turning on its interpreter first when no GPU here has an int8 ``tl.dot``.

    Returns ``(triton, triton.language)``. Raises ``ImportError`` when Triton is not
    installed and ``RuntimeError`` when it was imported too early to switch on the
    interpreter on a machine without CUDA.
    """
    global _set_by_qlib
    if not triton_installed():
        raise ImportError("Triton is not installed (pip install triton; Linux only); the CPU path "
                          "qlib.kernels.int8_matmul works without it")
    already = "triton" in sys.modules
    if not gpu_has_int8_dot() and not interpreting():
        if already:
            raise RuntimeError(
                "Triton was imported before qlib could turn on its CPU interpreter, and no GPU here has an int8 "
                "tl.dot (sm80+): restart the Python kernel and call qlib.kernels.load_triton() (or set "
                "TRITON_INTERPRET=1) before anything imports triton")
        os.environ["TRITON_INTERPRET"] = "1"
        os.environ[SET_BY_QLIB_ENV] = "auto"
        _set_by_qlib = True
    import triton
    import triton.language as tl

    if interpreting() and not type(tl.zeros).__name__ == "InterpretedFunction":
        raise RuntimeError("TRITON_INTERPRET=1 was set after triton was imported: its own helpers "
                           "(tl.zeros, ...) were compiled-mode functions. Restart the Python kernel and "
                           "set it (or call qlib.kernels.load_triton()) before importing triton")
    return triton, tl


def gpu_has_int8_dot() -> bool:
    """True when a CUDA GPU is present whose Triton has an int8 ``tl.dot`` (sm80 and later)."""
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= MIN_CAPABILITY


def kernel_device() -> torch.device:
    """Where tensors for hand-written Triton kernels go: the GPU when compiling, the CPU when interpreting."""
    return torch.device("cpu" if interpreting() or not torch.cuda.is_available() else "cuda")


def check_kernel_device(t: torch.Tensor, name: str = "tensor") -> None:
    """Compiled Triton kernels read GPU memory only; the interpreter reads any tensor."""
    if t.device.type != "cuda" and not interpreting():
        raise ValueError(f"{name} is on {t.device}: compiled Triton kernels need CUDA tensors (the CPU works only "
                         "in the interpreter, TRITON_INTERPRET=1); move it with .to(qlib.kernels.kernel_device())")


def triton_status(device: torch.device) -> tuple[bool, str]:
    """Can Triton's int8 kernels run for tensors on ``device``? ``(ok, reason)``."""
    device = torch.device(device)
    if not triton_installed():
        return False, "Triton is not installed"
    if device.type == "cuda":
        if interpreting():
            return False, "TRITON_INTERPRET=1 is set, so Triton would not use the GPU"
        cap = torch.cuda.get_device_capability(device)
        if cap < MIN_CAPABILITY:
            return False, (f"{torch.cuda.get_device_name(device)} has compute capability {cap[0]}.{cap[1]}; "
                           f"Triton's int8 tl.dot needs {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} (Ampere) or later")
        return True, f"CUDA GPU with compute capability {cap[0]}.{cap[1]} and Triton"
    if device.type == "cpu":
        if interpreter_set_by_user():
            return True, "TRITON_INTERPRET=1 was set: Triton kernels run in the CPU interpreter"
        return False, "on the CPU Triton runs only in its slow interpreter (set TRITON_INTERPRET=1 to choose it)"
    return False, f"Triton kernels here target CUDA, not {device.type}"
