"""What every benchmark JSON starts with: the machine, the versions, the seeds, the mode.

``header(seeds, fast)`` returns that dict; ``write(result, path)`` saves a result as JSON
(creating the folder). Speed numbers are only comparable inside one run (ratios); the header
says where and with what they were measured.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    """CPU, core count, torch threads and the SIMD level torch's CPU kernels use."""
    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "quantized_engines": list(torch.backends.quantized.supported_engines)}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def versions() -> dict:
    import qlib

    out = {"python": platform.python_version(), "torch": torch.__version__, "qlib": qlib.__version__}
    for name in ("numpy", "sklearn"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            pass
    return out


def header(name: str, seeds, fast: bool) -> dict:
    """The common first keys of a benchmark result."""
    return {"benchmark": name, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "fast": bool(fast),
            "seeds": list(seeds), "machine": machine(), "versions": versions()}


def write(result: dict, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path
