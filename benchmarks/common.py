"""What every benchmark JSON starts with: the machine, the versions, the seeds, the mode.

``header(name, seeds, fast)`` returns that dict; ``write(result, path)`` saves a result as JSON
(creating the folder). Speed numbers are only comparable inside one run (ratios); the header
says where and with what they were measured.

Every benchmark ends the same way, written here once: ``arguments(name, doc, fast_help)``
parses ``--fast``, ``--out`` (default ``results/NAME.json``) and ``--threads``;
``target_lines(targets)`` prints each target as ``target MET`` or ``target MISSED``; and
``main(name, run, table, doc, fast_help)`` runs, prints the table, writes the JSON.
"""

from __future__ import annotations

import argparse
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


def arguments(name: str, doc: str, fast_help: str, threads: int | None = 1,
              threads_help: str = "torch CPU threads (default 1: stable timings on a shared machine)",
              argv=None) -> argparse.Namespace:
    """Parse a benchmark's command line: ``--fast``, ``--out`` (a ``Path``, default
    ``results/NAME.json``), ``--threads`` (default ``threads``; ``None`` keeps torch's own)."""
    default = RESULTS_DIR / f"{name}.json"
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--fast", action="store_true", help=fast_help)
    parser.add_argument("--out", type=Path, default=default, help=f"where to write the JSON (default {default})")
    parser.add_argument("--threads", type=int, default=threads, help=threads_help)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def target_lines(targets) -> list[str]:
    """One line per target dict (``name``, ``value``, ``threshold``, ``met``): MET or MISSED."""
    return [f"target {'MET ' if t['met'] else 'MISSED'}: {t['name']}: {t['value']:.3g} (threshold {t['threshold']})"
            for t in targets]


def main(name: str, run, table, doc: str, fast_help: str, argv=None, timed: bool = False) -> int:
    """The whole ``main`` of a benchmark: parse, ``run(fast=, log=)``, print ``table(result)``, write.

    ``timed=True`` also records the run's wall time as ``result["total_time_s"]``.
    """
    args = arguments(name, doc, fast_help, argv=argv)
    start = time.perf_counter()
    result = run(fast=args.fast, log=lambda s: print(s, flush=True))
    if timed:
        result["total_time_s"] = time.perf_counter() - start
    print()
    print(table(result))
    print(f"\nwrote {write(result, args.out)}" + (f" in {result['total_time_s']:.0f} s" if timed else ""))
    return 0
