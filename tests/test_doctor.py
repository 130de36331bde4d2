"""``python -m qlib doctor`` prints versions, device, Triton mode and nbgrader status.

Reference: the issue's list of what doctor reports.
"""

from __future__ import annotations

import subprocess
import sys


def test_doctor_reports_everything():
    out = subprocess.run([sys.executable, "-m", "qlib", "doctor"], capture_output=True,
                         text=True, timeout=120, check=True).stdout
    for key in ("torch", "torchvision", "triton", "device", "triton kernels", "nbgrader",
                "lab extensions"):
        assert f"  {key} " in out, key
    assert "nbgrader: enabled" in out


def test_unknown_command_prints_usage():
    out = subprocess.run([sys.executable, "-m", "qlib", "frobnicate"], capture_output=True, text=True)
    assert out.returncode == 2 and "usage" in out.stdout
