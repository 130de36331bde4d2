"""``python -m qlib doctor``: what this machine offers the course.

Prints versions, the device (CPU or CUDA, the GPU's name and compute capability), which
backend runs qlib's exact int8 matrix product here (``qlib.kernels.int8_matmul``: PyTorch's
``torch._int_mm``, an int32 matmul or float64), whether Triton is installed, and whether
nbgrader and the JupyterLab extensions are installed.

It reports only what is built: qlib has no Triton kernels yet, so doctor says so instead of
promising a Triton path or a fallback from one.
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import os
import platform
import shutil
import subprocess
import sys


def _version(dist: str) -> str:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return "not installed"


def device_info() -> dict[str, str]:
    """CPU or CUDA, with the GPU's name and compute capability."""
    import torch

    info = {"cpu_threads": str(torch.get_num_threads())}
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(0)
        info.update(device="cuda", gpu=torch.cuda.get_device_name(0),
                    compute_capability=f"{major}.{minor}")
    else:
        info["device"] = "cpu (no CUDA GPU visible)"
    return info


def triton_mode() -> str:
    """Whether Triton is installed; qlib itself ships no Triton kernels yet."""
    try:
        importlib.import_module("triton")
    except Exception as err:  # noqa: BLE001 - any import failure means no Triton
        return f"none in qlib yet; triton unavailable ({type(err).__name__})"
    return "none in qlib yet (triton is installed; int8 products use qlib.kernels.int8_matmul)"


def int8_backends() -> str:
    """The backend ``qlib.kernels.int8_matmul`` picks here for a small and a large product."""
    import torch

    from .kernels import choose_backend

    device = "cuda" if torch.cuda.is_available() else "cpu"
    picks = []
    for m, k, n in ((4, 6, 5), (64, 64, 64)):
        a = torch.zeros(m, k, dtype=torch.int8, device=device)
        b = torch.zeros(k, n, dtype=torch.int8, device=device)
        picks.append(f"{m}x{k}x{n}: {choose_backend(a, b)}")
    return f"{device}: " + ", ".join(picks)


def _bin(name: str) -> str | None:
    """A command from this Python's environment (the venv's bin), else from PATH."""
    here = os.path.join(os.path.dirname(sys.executable), name)
    return here if os.path.exists(here) else shutil.which(name)


def nbgrader_status() -> str:
    version = _version("nbgrader")
    if version == "not installed":
        return "not installed (pip install 'qlib[course]'; not needed on Colab)"
    on_path = shutil.which("nbgrader") is not None
    return f"{version} ({'on PATH' if on_path else 'not on PATH: activate the venv or use make'})"


def lab_extensions() -> str:
    """The JupyterLab extensions as ``jupyter labextension list`` reports them."""
    exe = _bin("jupyter")
    if exe is None:
        return "jupyter is not installed (pip install 'qlib[course]')"
    try:
        out = subprocess.run([exe, "labextension", "list"], capture_output=True, text=True,
                             timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"could not list ({err})"
    text = out.stdout + out.stderr
    wanted = ["nbgrader", "jupyterlab_widgets"]
    return ", ".join(f"{w}: {'enabled' if w in text else 'missing'}" for w in wanted)


def report() -> list[tuple[str, str]]:
    rows = [("python", platform.python_version()), ("platform", platform.platform())]
    for dist in ["qlib", "torch", "torchvision", "triton", "numpy", "scikit-learn",
                 "jupyterlab", "ipywidgets", "nbclient"]:
        rows.append((dist, _version(dist)))
    rows += list(device_info().items())
    rows += [("int8 matmul", int8_backends()), ("triton kernels", triton_mode()),
             ("nbgrader", nbgrader_status()),
             ("lab extensions", lab_extensions()),
             ("fast mode", os.environ.get("QLIB_FAST", "0")),
             ("colab", str("google.colab" in sys.modules))]
    return rows


def main() -> int:
    rows = report()
    width = max(len(k) for k, _ in rows)
    print("qlib doctor")
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")
    return 0
